"""Feature-map helpers shared by the losses: precision, resizing, normalisation."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from segdistill._checks import check_choice, compute_dtype

__all__ = ["RESIZE_MODES", "Resize", "align_grids", "check_resize", "full_precision",
           "normalize_channels", "safe_norm"]

Resize = Literal["none", "student", "teacher"]
RESIZE_MODES: tuple[str, ...] = get_args(Resize)


def check_resize(resize: object) -> None:
    """Raise ``ValueError`` unless ``resize`` is ``'none'``, ``'student'`` or ``'teacher'``."""
    check_choice("resize", resize, RESIZE_MODES)


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


def align_grids(student: Tensor, teacher: Tensor,
                resize: Resize = "none") -> tuple[Tensor, Tensor]:
    """Put a student and a teacher (B, C, H, W) map on one H x W grid: the library's one rule.

    Every loss with a ``resize`` option decides here, and it is the only owner
    of the grid in a call: a :class:`~segdistill.DistillationTerm` hands the
    maps to its loss as they are. ``resize`` is validated once, by the caller
    (when a loss module is built, or at the top of a functional loss):

    - Equal grids pass through.
    - ``resize='student'`` resizes the teacher's map onto the student's grid,
      ``resize='teacher'`` the student's onto the teacher's (bilinear,
      ``align_corners=False``), whatever the sizes.
    - ``resize='none'`` (the default) accepts grids that differ by at most one
      cell per dimension, which is stride rounding (a 513 x 513 input gives
      65 x 65 at output stride 8 and 33 x 33 at 16; ``ceil(65 / 2) = 33``, but a
      floor-rounding network gives 32): the teacher's map is resized onto the
      student's grid with ``align_corners=True``, which keeps the corner cells
      aligned. A larger difference is a configuration error and raises.

    Args:
        student: the student's map.
        teacher: the teacher's map.
        resize: ``'none'``, ``'student'`` or ``'teacher'`` (already validated).

    Returns:
        The two maps on one grid.

    Raises:
        ValueError: grids that differ by more than stride rounding with
            ``resize='none'``.

    Example:
        >>> s, t = torch.zeros(1, 2, 33, 33), torch.zeros(1, 2, 32, 32)
        >>> [tuple(x.shape[-2:]) for x in align_grids(s, t)]
        [(33, 33), (33, 33)]
        >>> [tuple(x.shape[-2:]) for x in align_grids(s, torch.zeros(1, 2, 65, 65), "teacher")]
        [(65, 65), (65, 65)]
    """
    s_size, t_size = tuple(student.shape[-2:]), tuple(teacher.shape[-2:])
    if s_size == t_size:
        return student, teacher
    if resize == "teacher":
        return F.interpolate(student, size=t_size, mode="bilinear", align_corners=False), teacher
    if resize == "student":
        return student, F.interpolate(teacher, size=s_size, mode="bilinear", align_corners=False)
    if all(abs(s - t) <= 1 for s, t in zip(s_size, t_size, strict=True)):
        return student, F.interpolate(teacher, size=s_size, mode="bilinear", align_corners=True)
    ratio = max(max(t / s, s / t) for s, t in zip(s_size, t_size, strict=True))
    raise ValueError(
        f"expected student and teacher features on the same H x W, got {s_size} and "
        f"{t_size}; pass resize='student' or resize='teacher' to interpolate one onto the "
        f"other's grid (the grids differ by about {ratio:.3g}x, more than the one cell of "
        "stride rounding that resize='none' aligns; or hook layers at matching output strides)"
    )


def safe_norm(x: Tensor, dim: int, p: float = 2.0, eps: float = 1e-8) -> Tensor:
    """The divisor that :func:`normalize_channels` uses: the ``p``-norm along ``dim``,
    computed without overflow or underflow, clamped at ``eps`` relative to the
    vector's largest entry.

    Each vector is first scaled so that its largest absolute entry is 1; its
    norm is then at least 1 unless the vector is zero, and the clamp at ``eps``
    only guards the all-zero vector (for ``eps <= 1``). The returned divisor is
    that clamped norm times the scale, so ``x / safe_norm(x)`` is exactly
    scale-invariant: inputs scaled by 1e20 or 1e-20 normalise to the same
    vectors in float32. The scaling pass only runs when a plain norm would leave
    the range where squaring is exact (or when ``eps > 1``, or under
    ``torch.compile``); a NaN or an infinity in a vector makes its divisor (and
    so the vector) NaN.

    Shape:
        - x: any shape; output: ``x``'s shape with ``dim`` of size 1.
    """
    norm: Tensor = torch.linalg.vector_norm(x, ord=p, dim=dim, keepdim=True)
    info = torch.finfo(norm.dtype)
    lo, hi = eps, info.max
    if p != float("inf"):
        # |x|^p neither underflows nor overflows between these (with room for the sum)
        lo = max(eps, (info.tiny / info.eps) ** (1.0 / p))
        hi = (info.max * info.eps) ** (1.0 / p)
    # The check is a data-dependent branch, which torch.compile(fullgraph=True)
    # cannot trace: compiled code always takes the scaled path.
    if (eps <= 1.0 and not torch.compiler.is_compiling()
            and plain_norm_is_exact(x, norm, dim, lo, hi)):
        return norm.clamp_min(eps)
    scale = x.detach().abs().amax(dim=dim, keepdim=True)
    # A zero vector keeps scale 1 (its norm is then clamped at eps); NaN > 0 is False,
    # so a NaN vector stays NaN; an infinite entry gives inf / inf = NaN.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scaled: Tensor = torch.linalg.vector_norm(x / scale, ord=p, dim=dim, keepdim=True)
    return scaled.clamp_min(eps) * scale


def plain_norm_is_exact(x: Tensor, norm: Tensor, dim: int, lo: float, hi: float) -> bool:
    """Whether ``norm`` (a norm, or a squared norm, of ``x`` along ``dim``, computed
    without scaling, keepdim) can be used as it is: every entry within
    ``[lo, hi]``, the range where the powers neither underflow nor overflow, or
    exactly zero for a vector that is all zeros. A zero from underflow (a vector
    of entries around 1e-25 in float32) or a NaN is not."""
    inside = (norm >= lo) & (norm <= hi)
    if bool(inside.all()):
        return True
    zero = norm == 0
    if not bool((inside | zero).all()):
        return False
    largest = x.detach().abs().amax(dim=dim, keepdim=True)
    return not bool(torch.where(zero, largest, torch.zeros_like(largest)).any())


def normalize_channels(x: Tensor, dim: int, p: float = 2.0, eps: float = 1e-8) -> Tensor:
    """Divide ``x`` by its ``p``-norm along ``dim`` (see :func:`safe_norm`).

    Every non-zero vector, however small or large, comes out with unit norm
    (no overflow in float32 at 1e20, no underflow at 1e-20); a zero vector
    stays zero, with a finite gradient (``1 / eps``); a vector holding a NaN or
    an infinity becomes NaN.
    """
    normalized: Tensor = x / safe_norm(x, dim, p, eps)
    return normalized
