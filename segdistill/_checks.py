"""Input validation shared by every public entry point.

Every loss and module validates its arguments here, at the boundary, so that a
wrong input fails with a message naming what was expected and what came,
instead of broadcasting silently or producing a NaN later.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "check_choice",
    "check_feature_map",
    "check_feature_pair",
    "check_positive_int",
    "check_real",
    "check_same_batch",
    "check_same_device",
    "check_shape",
    "compute_dtype",
]


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``allowed``."""
    if not isinstance(value, str) or value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_real(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    strict: bool = False,
    allow_inf: bool = False,
) -> float:
    """Validate a real-number hyperparameter and return it as ``float``.

    Args:
        name: the parameter's name, used in the message.
        value: what the caller passed.
        minimum: the smallest accepted value, or ``None`` for no bound.
        strict: if ``True`` the bound itself is excluded.
        allow_inf: accept ``+inf`` (for norm orders).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not (allow_inf and value > 0)):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None:
        if strict and value <= minimum:
            raise ValueError(f"{name} must be greater than {minimum}, got {value}")
        if not strict and value < minimum:
            raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return float(value)


def check_positive_int(name: str, value: Any) -> int:
    """Validate a positive integer hyperparameter."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def check_shape(x: Any, name: str, dims: Sequence[str]) -> dict[str, int]:
    """Check that ``x`` is a non-empty floating tensor with named dimensions.

    Args:
        x: the value to check.
        name: what the caller calls it ("student", "teacher", ...).
        dims: one name per expected dimension, e.g. ``("B", "C", "H", "W")``.

    Returns:
        A mapping from each dimension name to its size.

    Raises:
        TypeError: ``x`` is not a tensor or not floating point.
        ValueError: ``x`` has the wrong number of dimensions or is empty.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"expected {name} to be a torch.Tensor, got {type(x).__name__}")
    layout = "(" + ", ".join(dims) + ")"
    if x.ndim != len(dims):
        raise ValueError(
            f"expected {name} of shape {layout}, got a {x.ndim}-D tensor of shape "
            f"{tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"expected {name} to have a floating-point dtype, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"expected {name} to be non-empty, got shape {tuple(x.shape)}")
    return dict(zip(dims, x.shape, strict=True))


def check_feature_map(x: Any, name: str) -> dict[str, int]:
    """Check a (B, C, H, W) feature map; see :func:`check_shape`."""
    return check_shape(x, name, ("B", "C", "H", "W"))


def check_same_device(a: Tensor, b: Tensor, names: tuple[str, str]) -> None:
    """Raise ``ValueError`` when two tensors live on different devices."""
    if a.device != b.device:
        raise ValueError(
            f"expected {names[0]} and {names[1]} on the same device, got {a.device} and {b.device}"
        )


def check_same_batch(a: Tensor, b: Tensor, names: tuple[str, str]) -> None:
    """Raise ``ValueError`` when two tensors disagree on their first dimension."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"expected {names[0]} and {names[1]} with the same batch size, "
            f"got {a.shape[0]} and {b.shape[0]}"
        )


def check_feature_pair(
    student: Any,
    teacher: Any,
    names: tuple[str, str] = ("student", "teacher"),
    same_channels: str | None = None,
) -> None:
    """The checks every two-map loss starts with: both (B, C, H, W) floating maps,
    non-empty, on one device, with one batch size.

    Args:
        student: the student's map.
        teacher: the teacher's map.
        names: what to call them in messages.
        same_channels: if given, the channel counts must agree too; the text is
            appended to the message (e.g. where a regressor comes from).
    """
    check_feature_map(student, names[0])
    check_feature_map(teacher, names[1])
    check_same_device(student, teacher, names)
    check_same_batch(student, teacher, names)
    if same_channels is not None and student.shape[1] != teacher.shape[1]:
        raise ValueError(
            f"expected {names[0]} and {names[1]} with the same number of channels, got "
            f"{student.shape[1]} and {teacher.shape[1]}{same_channels}"
        )


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype losses compute in: the promoted input dtype, at least float32.

    Half and bfloat16 inputs (from autocast or a half-precision teacher) are
    upcast so that sums over many positions and the cancelling Gram terms of the
    affinity loss keep their accuracy; float64 stays float64.
    """
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.promote_types(dtype, torch.float32)
