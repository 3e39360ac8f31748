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
from segdistill.translator import Translator
from segdistill.visualize import label_palette, pixel_affinity, save_prediction_grid

__all__ = ["predict_with_features", "save_figure"]


@torch.no_grad()
def predict_with_features(model: nn.Module, path: str, x: Tensor) -> tuple[Tensor, Tensor]:
    """The arg-max predictions of ``model`` on ``x`` and its features at ``path``."""
    hooks = FeatureHooks(model, {"f": path})
    try:
        model.eval()
        logits = model(x)
        return logits.argmax(1), hooks.pop()["f"]
    finally:
        hooks.remove()


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
    x, y = val.images[:num_scenes], val.labels[:num_scenes]
    size = x.shape[-2:]
    teacher_pred, teacher_feat = predict_with_features(teacher, models.TEACHER_FEATURES, x)
    with torch.no_grad():
        translator.eval()
        teacher_code = translator.encode(teacher_feat)
    outputs = {"teacher": (teacher_pred, teacher_code)}
    for name, student in students.items():
        outputs[name] = predict_with_features(student, models.STUDENT_FEATURES, x)

    pixels = []
    for i in range(num_scenes):
        digit = torch.nonzero(y[i] > 0)
        pixels.append(tuple(digit[len(digit) // 2].tolist()) if len(digit)
                      else (size[0] // 2, size[1] // 2))
    predictions = {name: [p[i].numpy() for i in range(num_scenes)]
                   for name, (p, _) in outputs.items()}
    affinities = {name: [pixel_affinity(f[i:i + 1], pixels[i], size) for i in range(num_scenes)]
                  for name, (_, f) in outputs.items()}
    images: list[np.ndarray] = [x[i, 0].numpy() for i in range(num_scenes)]
    return save_prediction_grid(
        path, images, [y[i].numpy() for i in range(num_scenes)], predictions,
        label_palette(NUM_CLASSES, ignore_index=None), affinities, pixels,
        title="segdistill demo: val scenes; affinity = cosine of the marked cell's features "
              "with every other cell",
    )
