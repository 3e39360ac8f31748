"""Evaluation: single-scale val mIoU, per-class IoU and pixel accuracy, with each model's
parameters, FLOPs and images/s; and the in-training validation of ``--val-every``."""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from examples.segmentation import data, profiling
from examples.segmentation.data import IGNORE_INDEX
from examples.segmentation.reporting import format_eval
from examples.segmentation.run import Run, autocast, dataset, model_for
from examples.segmentation.training import read_checkpoint, read_log_rows, rewrite_lines
from segdistill import save_checkpoint
from segdistill.hooks import select_output


def segmentation_metrics(num_classes: int) -> MetricCollection:
    """mIoU (over the classes present in the labels or the predictions), per-class IoU
    (NaN for a class in neither) and pixel accuracy, the ignore label left out.

    torchmetrics keeps one confusion matrix for the three and sums it over all
    processes when they are computed.
    """
    common: dict[str, Any] = {"num_classes": num_classes, "ignore_index": IGNORE_INDEX,
                              "validate_args": False}
    return MetricCollection({
        "miou": MulticlassJaccardIndex(average="macro", **common),
        "iou": MulticlassJaccardIndex(average="none", zero_division=math.nan, **common),
        "pixel_accuracy": MulticlassAccuracy(average="micro", **common),
    })


@torch.no_grad()
def evaluate_model(run: Run, model: nn.Module, val: Any) -> dict[str, torch.Tensor]:
    """The metrics of ``model`` (in eval mode) on ``val``, each process scoring its shard
    under ``--amp``'s autocast. The confusion counts live on ``run.device`` and are summed
    over the processes there (NCCL reduces CUDA tensors only)."""
    shard = Subset(val, range(run.rank, len(val), run.world_size))
    with run.device:  # the states, made on the device; .to() keeps them there on a reset
        metrics = segmentation_metrics(run.config.num_classes).to(run.device)
    batch = run.config.eval_batch_size
    for image, label in DataLoader(shard, batch_size=batch, num_workers=run.config.workers):
        with autocast(run):
            logits = select_output(model(image.to(run.device)))
        metrics.update(logits.argmax(1), label.to(run.device))
    values: dict[str, torch.Tensor] = metrics.compute()
    return values


@torch.no_grad()
def evaluate(run: Run, name: str, echo: bool = True) -> dict[str, Any]:
    """(e) Single-scale val mIoU (ignore 255), per-class IoU, parameters, FLOPs, images/s,
    written to ``OUT/<name>/eval.json`` (and printed when ``echo``).

    FLOPs and images/s are measured at the evaluation resolution, the size of the first
    val image (Cityscapes: 1024 x 2048), images/s at ``--eval-batch-size`` and under
    ``--amp``'s autocast.
    """
    model = model_for(run, name).eval()
    val = dataset(run, train=False)
    values = evaluate_model(run, model, val)
    channels, height, width = val[0][0].shape
    batch = run.config.eval_batch_size
    with autocast(run):
        images_per_second = profiling.throughput(
            model, torch.zeros(batch, channels, height, width, device=run.device))
    result = {
        "model": name, "miou": float(values["miou"]),
        "pixel_accuracy": float(values["pixel_accuracy"]),
        "iou": {c: (None if math.isnan(v) else v) for c, v in
                zip(data.CLASS_NAMES[run.config.dataset], values["iou"].tolist(), strict=True)},
        "params": profiling.count_parameters(model),
        "flops": profiling.count_flops(model, torch.zeros(1, channels, height, width,
                                                          device=run.device)),
        "images_per_second": images_per_second,
        "input": [height, width], "device": str(run.device), "amp": run.config.amp,
    }
    if run.main:
        path = run.out / name / "eval.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        if echo:
            print(format_eval(result))
    return result


def validator(run: Run, stage: str, weights: nn.Module) -> Any:
    """With ``--val-every K``: a ``fit`` callback that evaluates ``weights`` on the val split
    every K steps (on every process, each its shard), appends to ``OUT/<stage>/val.jsonl`` and
    keeps the best val mIoU's weights in ``OUT/<stage>/best.pt``."""
    every = run.config.val_every
    if not every:
        return None
    folder = run.out / stage
    best_path = folder / "best.pt"
    best = [-math.inf]
    if run.resume and best_path.is_file():
        best[0] = float(read_checkpoint(best_path)["miou"])
    val = dataset(run, train=False)

    def on_step(step: int, row: dict[str, float]) -> None:
        if step % every:
            return
        was_training = weights.training
        weights.eval()
        values = evaluate_model(run, weights, val)
        weights.train(was_training)
        miou = float(values["miou"])
        if run.main:
            folder.mkdir(parents=True, exist_ok=True)
            log = folder / "val.jsonl"  # rows past a resumed checkpoint come again
            rows = read_log_rows(log, lambda r: r["step"] < step) if log.is_file() else []
            rewrite_lines(log, [*rows, json.dumps({"step": step, "miou": miou})])
            if miou > best[0]:
                save_checkpoint({"model": weights.state_dict(), "step": step, "miou": miou},
                                best_path)
        best[0] = max(best[0], miou)

    return on_step
