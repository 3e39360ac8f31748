"""Reporting: Markdown tables of the evaluations, the machine footer of every result, and
the figure of predictions and affinity maps (the paper's Figure 3)."""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from examples.segmentation import data, profiling
from examples.segmentation.data import IGNORE_INDEX
from examples.segmentation.figures import label_palette, save_prediction_grid
from examples.segmentation.run import (
    Run,
    dataset,
    load_weights,
    model_for,
    new_translator,
    student_feature,
    teacher_feature,
)
from segdistill import FeatureHooks, pixel_affinity
from segdistill.hooks import select_output


def format_eval(result: dict[str, Any]) -> str:
    """One evaluation as a Markdown table of per-class IoU."""
    lines = [f"## {result['model']}: mIoU {100 * result['miou']:.2f} %, "
             f"{result['params'] / 1e6:.2f} M parameters, "
             f"{result['flops'] / 1e9:.3g} GFLOPs at {result['input'][0]} x {result['input'][1]}, "
             f"{result['images_per_second']:.1f} images/s on {result['device']}",
             "", "| class | IoU (%) |", "|---|---:|"]
    for name, value in result["iou"].items():
        lines.append(f"| {name} | {'n/a' if value is None else f'{100 * value:.2f}'} |")
    return "\n".join(lines)


def format_summary(results: Sequence[dict[str, Any]]) -> str:
    """Several evaluations as one Markdown table: mIoU, parameters, FLOPs, images/s."""
    lines = ["| model | val mIoU (%) | params | MFLOPs / image | images/s |",
             "|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['model']} | {100 * r['miou']:.2f} | {r['params']:,} | "
                     f"{r['flops'] / 1e6:,.1f} | {r['images_per_second']:,.0f} |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """The CPU, the threads torch uses, and the versions: the footer of every result."""
    return {"cpu": profiling.cpu_model(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def footer(seconds: float) -> str:
    """``'<seconds> s on <CPU> (<threads> threads), torch ..., Python ...'``, with the
    machine's load average over the last 5 minutes: how busy it was besides this run."""
    m = machine()
    load = f", load average {os.getloadavg()[1]:.1f}" if hasattr(os, "getloadavg") else ""
    return (f"{seconds:.0f} s on {m['cpu']} ({m['threads']} threads{load}), "
            f"torch {m['torch']}, Python {m['python']}")


def _default_pixel(label: torch.Tensor) -> tuple[int, int]:
    """The middle one of the labelled foreground pixels (not background, not ignored), or
    the centre of the image if there is none."""
    fg = torch.nonzero((label > 0) & (label != IGNORE_INDEX))
    if len(fg):
        row, col = fg[len(fg) // 2].tolist()
        return int(row), int(col)
    return label.shape[0] // 2, label.shape[1] // 2


@torch.no_grad()
def visualize(run: Run, shown: Sequence[str] | Mapping[str, str], count: int = 4,
              pixel: tuple[int, int] | None = None, path: Path | None = None) -> Path:
    """(f) PNG grid: image, ground truth, each model's prediction, and the affinity map of
    one pixel in each model's last features (the teacher's through the translator's
    encoder, as the student sees them), as in the paper's Figure 3.

    Args:
        run: the run.
        shown: the models' folders under ``OUT``, or a mapping of titles to folders.
        count: how many val images.
        pixel: the (row, column) of the affinity maps; by default, per image, the middle
            labelled foreground pixel.
        path: the PNG; by default ``OUT/figures/<dataset>.png``.
    """
    folders = dict(shown) if isinstance(shown, Mapping) else {name: name for name in shown}
    val = dataset(run, train=False)
    images, labels = zip(*(val[i] for i in range(min(count, len(val)))), strict=True)
    pixels = [pixel or _default_pixel(label) for label in labels]
    translator = None
    translator_path = run.out / "translator" / "model.pt"
    if translator_path.is_file():
        translator = load_weights(new_translator(run), translator_path, "translator")
        translator.to(run.device).eval()
    predictions: dict[str, list[Any]] = {}
    affinities: dict[str, list[Any]] = {}
    for title, folder in folders.items():
        model = model_for(run, folder).eval()
        teacher = folder == "teacher"
        layer = teacher_feature(run) if teacher else student_feature(run)
        hooks = FeatureHooks(model, {"f": layer})
        predictions[title], affinities[title] = [], []
        for image, pix in zip(images, pixels, strict=True):
            logits = select_output(model(image[None].to(run.device)))
            feats = hooks.pop()["f"]
            if teacher and translator is not None:
                feats = translator.encode(feats)
            predictions[title].append(logits.argmax(1)[0].cpu().numpy())
            affinities[title].append(pixel_affinity(feats, pix, image.shape[-2:]).cpu().numpy())
        hooks.remove()
    out = path or run.out / "figures" / f"{run.config.dataset}.png"
    return save_prediction_grid(
        out, [data.picture(run.config, img) for img in images],
        [lab.numpy() for lab in labels], predictions,
        label_palette(run.config.num_classes, IGNORE_INDEX), affinities, pixels,
        title=f"{run.config.dataset} val: predictions, and the cosine of the marked pixel's "
              "features with every other position's")
