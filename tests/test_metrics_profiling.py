"""ConfusionMatrix against a per-class loop; parameter and FLOP counts by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from segdistill.metrics import ConfusionMatrix
from segdistill.profiling import count_flops, count_parameters, measure_throughput


def reference_iou(pred, target, k, ignore):
    ious = []
    valid = target != ignore
    for c in range(k):
        p, t = (pred == c) & valid, (target == c) & valid
        union = (p | t).sum().item()
        ious.append((p & t).sum().item() / union if union else math.nan)
    return ious


def test_iou_matches_reference_over_batches():
    g = torch.Generator().manual_seed(0)
    cm = ConfusionMatrix(5, ignore_index=255)
    preds, targets = [], []
    for _ in range(3):
        pred = torch.randint(0, 5, (2, 7, 9), generator=g)
        target = torch.randint(0, 5, (2, 7, 9), generator=g)
        target[target == 4] = 255  # class 4 never in the ground truth
        cm.update(pred, target)
        preds.append(pred)
        targets.append(target)
    expected = reference_iou(torch.cat(preds), torch.cat(targets), 5, 255)
    torch.testing.assert_close(cm.iou(), torch.tensor(expected, dtype=torch.float32),
                               equal_nan=True)
    assert cm.iou()[4] == 0  # predicted but never true: IoU 0, counted in the mean
    assert cm.miou() == pytest.approx(sum(expected) / 5)


def test_absent_class_is_nan_and_left_out():
    cm = ConfusionMatrix(3, ignore_index=None)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert math.isnan(cm.iou()[2]) and cm.miou() == 1.0
    assert cm.pixel_accuracy() == 1.0


def test_errors():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"same shape, got \(2,\) and \(3,\)"):
        cm.update(torch.zeros(2, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match=r"expected integer label maps, got torch.float32"):
        cm.update(torch.zeros(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"num_classes must be a positive int, got 0"):
        ConfusionMatrix(0)


def test_counts():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.ReLU(), nn.Conv2d(8, 2, 1))
    assert count_parameters(model) == 3 * 8 * 9 + 8 * 2 + 2
    x = torch.zeros(1, 3, 10, 10)
    # 2 FLOPs per multiply-add: 8 x 8 outputs x 8 channels x 27, then 8 x 8 x 2 x 8
    assert count_flops(model, x) == 2 * (64 * 8 * 27 + 64 * 2 * 8)
    model.train()
    count_flops(model, x)
    assert model.training  # mode restored
    assert measure_throughput(model, x, warmup=1, repeats=2) > 0
