"""The demo's figure: predictions side by side, and one pixel's affinity map (cf. the
paper's Figure 3)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from segdistill.demo import models
from segdistill.demo.data import NUM_CLASSES, DigitScenes
from segdistill.hooks import FeatureHooks
from segdistill.losses.affinity import affinity_matrix
from segdistill.translator import Translator

__all__ = ["save_figure"]


def _palette() -> np.ndarray:
    import matplotlib

    colours = matplotlib.colormaps["tab10"](np.arange(10))[:, :3]
    return np.concatenate([np.zeros((1, 3)), colours])  # background black


@torch.no_grad()
def _features(model: nn.Module, path: str, x: Tensor) -> tuple[Tensor, Tensor]:
    hooks = FeatureHooks(model, {"f": path})
    try:
        model.eval()
        logits = model(x)
        return logits.argmax(1), hooks.pop()["f"]
    finally:
        hooks.remove()


def _pixel_affinity(features: Tensor, pixel: tuple[int, int], size: int) -> np.ndarray:
    """Row of the affinity matrix for the feature cell under ``pixel``, as an image."""
    _, _, h, w = features.shape
    row, col = pixel[0] * h // size, pixel[1] * w // size
    a = affinity_matrix(features[:1])[0, row * w + col].reshape(h, w) * (h * w)  # cosines
    return a.numpy()


def save_figure(
    path: str | Path,
    val: DigitScenes,
    teacher: nn.Module,
    students: Mapping[str, nn.Module],
    translator: Translator,
    num_scenes: int = 4,
) -> Path:
    """Write a PNG: scenes, labels, the teacher's and each student's predictions, and the
    cosine-affinity map of one digit pixel in the teacher's translated features and in
    each student's features.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("the figure needs matplotlib: pip install 'segdistill[demo]'") from error

    x, y = val.images[:num_scenes], val.labels[:num_scenes]
    size = x.shape[-1]
    palette = _palette()
    teacher_pred, teacher_feat = _features(teacher, models.TEACHER_FEATURES, x)
    with torch.no_grad():
        translator.eval()
        teacher_code = translator.encode(teacher_feat)
    columns: list[tuple[str, Tensor, Tensor]] = [("teacher", teacher_pred, teacher_code)]
    for name, student in students.items():
        pred, feat = _features(student, models.STUDENT_FEATURES, x)
        columns.append((name, pred, feat))

    ncols = 2 + 2 * len(columns)
    fig, axes = plt.subplots(num_scenes, ncols, figsize=(1.6 * ncols, 1.7 * num_scenes),
                             squeeze=False)
    for i in range(num_scenes):
        digit = torch.nonzero(y[i] > 0)
        pixel = tuple(digit[len(digit) // 2].tolist()) if len(digit) else (size // 2, size // 2)
        panels: list[tuple[str, np.ndarray, str | None]] = [
            ("image", x[i, 0].numpy(), "gray"),
            ("ground truth", palette[y[i].numpy()], None),
        ]
        for name, pred, _ in columns:
            panels.append((name, palette[pred[i].clamp(0, NUM_CLASSES - 1).numpy()], None))
        for name, _, feat in columns:
            panels.append((f"affinity: {name}", _pixel_affinity(feat[i:i + 1], pixel, size),
                           "magma"))
        for j, (title, image, cmap) in enumerate(panels):
            ax = axes[i, j]
            if cmap == "magma":
                ax.imshow(image, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
                h, w = image.shape
                ax.plot(pixel[1] * w / size - 0.5, pixel[0] * h / size - 0.5, "c+", ms=8)
            else:
                ax.imshow(image, cmap=cmap, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=7)
    fig.suptitle("segdistill demo: val scenes; affinity = cosine of the marked cell's "
                 "features with every other cell", fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
