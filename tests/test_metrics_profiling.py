"""The pipeline's metrics (torchmetrics) against a per-class loop; parameter and FLOP counts
by hand; the library's pixel affinity against the dense affinity matrix."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from segdistill import affinity_matrix, pixel_affinity

pytest.importorskip("torchmetrics")
pytest.importorskip("torchdata")
sys.path.append(str(Path(__file__).resolve().parent.parent))  # for `examples`

from examples.segmentation.evaluation import segmentation_metrics
from examples.segmentation.profiling import (
    count_flops,
    count_parameters,
    throughput,
)


def reference_iou(pred, target, k, ignore):
    ious = []
    valid = target != ignore
    for c in range(k):
        p, t = (pred == c) & valid, (target == c) & valid
        union = (p | t).sum().item()
        ious.append((p & t).sum().item() / union if union else math.nan)
    return ious


def test_iou_matches_reference_over_batches(device):
    g = torch.Generator().manual_seed(0)
    metrics = segmentation_metrics(6).to(device)
    preds, targets = [], []
    for _ in range(3):
        pred = torch.randint(0, 5, (2, 7, 9), generator=g)  # class 5 never predicted
        target = torch.randint(0, 5, (2, 7, 9), generator=g)
        target[target == 4] = 255  # class 4 never in the ground truth
        metrics.update(pred.to(device), target.to(device))
        preds.append(pred)
        targets.append(target)
    values = metrics.compute()
    states = [state for m in metrics.values() for state in m.metric_state.values()]
    assert states and all(state.device.type == device.type for state in states)
    expected = reference_iou(torch.cat(preds), torch.cat(targets), 6, 255)
    torch.testing.assert_close(values["iou"].cpu(), torch.tensor(expected), equal_nan=True)
    assert values["iou"][4] == 0  # predicted but never true: IoU 0, counted in the mean
    assert math.isnan(values["iou"][5])  # in neither: left out of the mean
    assert float(values["miou"]) == pytest.approx(sum(expected[:5]) / 5)
    valid = torch.cat(targets) != 255
    accuracy = (torch.cat(preds) == torch.cat(targets))[valid].float().mean()
    assert float(values["pixel_accuracy"]) == pytest.approx(float(accuracy))


def test_counts():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.ReLU(), nn.Conv2d(8, 2, 1))
    assert count_parameters(model) == 3 * 8 * 9 + 8 * 2 + 2
    x = torch.zeros(1, 3, 10, 10)
    # 2 FLOPs per multiply-add: 8 x 8 outputs x 8 channels x 27, then 8 x 8 x 2 x 8
    assert count_flops(model, x) == 2 * (64 * 8 * 27 + 64 * 2 * 8)
    model.train()
    count_flops(model, x)
    assert model.training  # mode restored
    assert throughput(model, x, min_run_time=0.05) > 0
    assert model.training


def test_pixel_affinity_is_a_row_of_the_affinity_matrix():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(1, 5, 3, 4, generator=g)
    # pixel (5, 7) of a 6 x 8 image lies in cell (2, 3) of the 3 x 4 grid
    row = affinity_matrix(features)[0, 2 * 4 + 3] * 12
    torch.testing.assert_close(pixel_affinity(features, (5, 7), (6, 8)).flatten(), row)
    assert pixel_affinity(features, (5, 7), (6, 8))[2, 3] == pytest.approx(1.0)


def test_pixel_affinity_errors():
    with pytest.raises(ValueError, match=r"shape \(1, C, h, w\), got \(5, 3\)"):
        pixel_affinity(torch.zeros(5, 3), (0, 0), (4, 4))
    with pytest.raises(ValueError, match=r"pixel \(4, 0\) lies outside an image of size \(4, 4\)"):
        pixel_affinity(torch.zeros(1, 2, 2, 2), (4, 0), (4, 4))


@pytest.mark.parametrize("features,error,match", [
    (torch.zeros(0, 2, 2, 2), ValueError, r"expected features to be non-empty, got shape "
                                          r"\(0, 2, 2, 2\)"),
    (torch.zeros(1, 2, 0, 2), ValueError, r"non-empty, got shape \(1, 2, 0, 2\)"),
    (torch.zeros(1, 2, 2, 2, dtype=torch.complex64), TypeError,
     r"expected features to have a floating-point dtype, got torch.complex64"),
    ([[1.0]], TypeError, r"expected features to be a torch.Tensor, got list"),
])
def test_pixel_affinity_validates_like_the_losses(features, error, match):
    with pytest.raises(error, match=match):
        pixel_affinity(features, (0, 0), (4, 4))
