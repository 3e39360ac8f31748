"""Feature-map helpers shared by the losses: precision, resizing, normalisation."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from segdistill._checks import check_choice, check_same_spatial, compute_dtype

__all__ = ["RESIZE_MODES", "Resize", "align_spatial", "full_precision", "normalize_channels"]

Resize = Literal["none", "student", "teacher"]
RESIZE_MODES: tuple[str, ...] = ("none", "student", "teacher")


def full_precision(*tensors: Tensor) -> tuple[AbstractContextManager[None], list[Tensor]]:
    """Disable autocast and upcast ``tensors`` to the loss compute dtype.

    Returns the context manager to compute under and the upcast tensors. Losses
    reduce over many positions and some subtract nearly equal Gram terms, which
    half precision cannot represent; computing in float32 (or float64 when the
    inputs are float64) keeps them accurate and finite under ``torch.autocast``.
    """
    dtype = compute_dtype(*tensors)
    ctx = torch.autocast(device_type=tensors[0].device.type, enabled=False)
    return ctx, [t.to(dtype) for t in tensors]


def align_spatial(student: Tensor, teacher: Tensor, resize: str) -> tuple[Tensor, Tensor]:
    """Bring two (B, C, H, W) maps onto one grid, only when asked to.

    Args:
        student: the student's feature map.
        teacher: the teacher's feature map.
        resize: ``'none'`` requires equal H x W and raises otherwise;
            ``'student'`` bilinearly resizes the teacher onto the student's grid;
            ``'teacher'`` resizes the student onto the teacher's grid.
    """
    check_choice("resize", resize, RESIZE_MODES)
    if student.shape[-2:] == teacher.shape[-2:]:
        return student, teacher
    if resize == "none":
        check_same_spatial(student, teacher, ("student", "teacher"))
    if resize == "student":
        teacher = F.interpolate(
            teacher, size=student.shape[-2:], mode="bilinear", align_corners=False
        )
    else:
        student = F.interpolate(
            student, size=teacher.shape[-2:], mode="bilinear", align_corners=False
        )
    return student, teacher


def normalize_channels(x: Tensor, dim: int, p: float = 2.0, eps: float = 1e-8) -> Tensor:
    """Divide ``x`` by its ``p``-norm along ``dim``, clamped below at ``eps``.

    A zero vector stays zero (instead of becoming NaN), with a finite gradient.
    """
    norm = torch.linalg.vector_norm(x, ord=p, dim=dim, keepdim=True)
    normalized: Tensor = x / norm.clamp_min(eps)
    return normalized
