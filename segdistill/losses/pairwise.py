r"""Pair-wise similarity distillation (Liu et al., CVPR 2019), memory-linear."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from segdistill._checks import (
    check_choice,
    check_feature_pair,
    check_positive_int,
    check_real,
)
from segdistill._features import Resize, align_grids, check_resize, full_precision
from segdistill._reduction import Reduction, check_reduction, reduce_loss
from segdistill.losses._gram import squared_distance
from segdistill.losses.affinity import METHODS, Method

__all__ = ["PairwiseLoss", "pairwise_loss"]

PatchSize = int | tuple[int, int] | None


def _check_patch(patch_size: PatchSize) -> tuple[int, int] | None:
    if patch_size is None:
        return None
    if isinstance(patch_size, int):
        patch_size = (patch_size, patch_size)
    if not isinstance(patch_size, tuple) or len(patch_size) != 2:
        raise TypeError(f"patch_size must be an int, a pair of ints or None, got {patch_size!r}")
    return (check_positive_int("patch_size", patch_size[0]),
            check_positive_int("patch_size", patch_size[1]))


def _check_options(patch_size: PatchSize, method: str, resize: str, eps: float,
                   reduction: str) -> tuple[int, int] | None:
    check_choice("method", method, METHODS)
    check_resize(resize)
    check_real("eps", eps, minimum=0.0, strict=True)
    check_reduction(reduction)
    return _check_patch(patch_size)


def _pairwise(student: Tensor, teacher: Tensor, patch: tuple[int, int] | None, method: Method,
              resize: Resize, eps: float, reduction: Reduction) -> Tensor:
    """:func:`pairwise_loss` with its options already validated."""
    check_feature_pair(student, teacher)
    student, teacher = align_grids(student, teacher, resize)
    ctx, (x_s, x_t) = full_precision(student, teacher)
    with ctx:
        if patch is not None:
            x_s = F.max_pool2d(x_s, patch, stride=patch, ceil_mode=True)
            x_t = F.max_pool2d(x_t, patch, stride=patch, ceil_mode=True)
        x_s, x_t = x_s.flatten(2), x_t.flatten(2)
        # sum_ij (a^s_ij - a^t_ij)^2 per image
        per_image = squared_distance(x_s, x_t, eps=eps, method=method) / x_s.shape[-1] ** 2
        return reduce_loss(per_image, reduction)


def pairwise_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    patch_size: PatchSize = None,
    method: Method = "auto",
    resize: Resize = "none",
    eps: float = 1e-8,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Pair-wise similarity distillation of Liu et al. (CVPR 2019, "Structured Knowledge
    Distillation for Semantic Segmentation").

    With :math:`a_{ij}` the cosine similarity of the feature vectors of nodes
    :math:`i` and :math:`j`, per image

    .. math::

        \mathcal{L}_{pa} = \frac{1}{N^2} \sum_{i=1}^{N} \sum_{j=1}^{N}
            \big(a^s_{ij} - a^t_{ij}\big)^2 ,

    then reduced over the batch (``'mean'``, as in the authors' code). A node
    is a position (:math:`N = HW`), or with ``patch_size`` a patch max-pooled
    to one vector (``F.max_pool2d`` with kernel = stride = ``patch_size`` and
    ``ceil_mode=True``, so partial patches at the border are kept), as in the
    paper; :math:`N` is then the number of patches. A node whose features are
    all zero has zero similarity to every node (its norm is clamped at
    ``eps``).

    The sum over pairs is computed by the memory-linear algorithm of
    :func:`~segdistill.affinity_loss` (its squared-Frobenius form) from
    C x C Gram matrices: no N x N tensor, unless ``method='dense'``, or
    ``method='auto'`` and the channel count is comparable to N or larger.
    Both stay within 1e-3 of a float64 dense evaluation in float32 however
    close the maps are (the Gram terms' cancellation is avoided or recomputed
    in float64, see the affinity guide); a NaN or an infinity in an image
    makes its loss NaN. The
    affinities there are scaled by :math:`1/N`, so without pooling this loss
    is :math:`N` times ``affinity_loss(..., distance='squared')``.

    Args:
        student: the student's features.
        teacher: the teacher's features; channel counts may differ.
        patch_size: pool nodes from patches of this size, or ``None``.
        method: ``'auto'``, ``'dense'`` or ``'linear'``; all give the same value.
        resize: ``'none'`` requires equal H x W up to one cell of stride rounding;
            ``'student'`` or ``'teacher'`` bilinearly resizes the other map onto
            that one's grid.
        eps: lower bound on a node's norm (after dividing it by its largest
            entry) before normalising: an all-zero node stays zero.
        reduction: ``'none'`` (per image) | ``'mean'`` | ``'sum'`` over the batch.

    Shape:
        - student: :math:`(B, C_s, H, W)`.
        - teacher: :math:`(B, C_t, H, W)`.
        - output: scalar, or :math:`(B,)` with ``reduction='none'``.

    Returns:
        The loss, in the compute dtype (float32, or float64 for float64 inputs).

    Raises:
        TypeError: an input is not a floating-point tensor, a ``patch_size``
            that is not an int, a pair of ints or ``None``.
        ValueError: not 4-D, empty, different batch or (without ``resize``)
            spatial sizes, inputs on different devices, a ``patch_size``
            below 1, or an unknown option.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> s, t = torch.randn(2, 4, 8, 8), torch.randn(2, 16, 8, 8)
        >>> round(pairwise_loss(s, t).item(), 4)
        0.3119
        >>> round(pairwise_loss(s, t, patch_size=2).item(), 4)
        0.0474
    """
    patch = _check_options(patch_size, method, resize, eps, reduction)
    return _pairwise(student, teacher, patch, method, resize, eps, reduction)


class PairwiseLoss(nn.Module):
    r"""Pair-wise similarity distillation (Liu et al., CVPR 2019), as a module.

    Stores the options of :func:`pairwise_loss`, validated once here, and
    computes it in ``forward``; see that function for the formula and the
    arguments.

    Args:
        patch_size: pool nodes from patches of this size (an int or an
            (h, w) pair), or ``None`` for one node per position.
        method: ``'auto'``, ``'dense'`` or ``'linear'``.
        resize: ``'none'``, ``'student'`` or ``'teacher'``.
        eps: lower bound on a node's norm before normalising.
        reduction: ``'none'`` | ``'mean'`` | ``'sum'`` over the batch.

    Shape:
        - student: :math:`(B, C_s, H, W)`.
        - teacher: :math:`(B, C_t, H, W)`.
        - output: scalar, or :math:`(B,)` with ``reduction='none'``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> criterion = PairwiseLoss(patch_size=2)
        >>> criterion
        PairwiseLoss(patch_size=(2, 2), method='auto', resize='none', eps=1e-08, reduction='mean')
        >>> round(criterion(torch.randn(2, 4, 8, 8), torch.randn(2, 16, 8, 8)).item(), 4)
        0.0474
    """

    def __init__(self, patch_size: PatchSize = None,
                 method: Method = "auto",
                 resize: Resize = "none", eps: float = 1e-8,
                 reduction: Reduction = "mean") -> None:
        super().__init__()
        self.patch_size = _check_options(patch_size, method, resize, eps, reduction)
        self.method: Method = method
        self.resize: Resize = resize
        self.eps = eps
        self.reduction: Reduction = reduction

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return _pairwise(student, teacher, self.patch_size, self.method, self.resize, self.eps,
                         self.reduction)

    def extra_repr(self) -> str:
        return (f"patch_size={self.patch_size}, method={self.method!r}, "
                f"resize={self.resize!r}, eps={self.eps}, reduction={self.reduction!r}")
