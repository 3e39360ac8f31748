r"""Affinity distillation loss (He et al., CVPR 2019, eqs. 3-4), memory-linear.

The affinity of a feature map :math:`\psi` of shape (C, H, W) with
:math:`N = HW` positions is the N x N matrix of scaled cosine similarities

.. math::

    A_{ij} = \frac{1}{N}\,
        \frac{\psi_i}{\lVert\psi_i\rVert_2} \cdot \frac{\psi_j}{\lVert\psi_j\rVert_2},

and the loss compares the student's and the teacher's affinities row by row.
Written that way it needs two N x N matrices per image: at output stride 8 on a
1024 x 2048 Cityscapes frame, N = 32768 and one matrix takes 4.3 GB in float32.

This module computes the same value without any N x N tensor. With
:math:`S` (:math:`C_s \times N`) and :math:`T` (:math:`C_t \times N`) the
position-normalised features of one image, columns :math:`s_i` and :math:`t_i`,

.. math::

    N^2 \lVert A^s_i - A^t_i \rVert_2^2 = \lVert S^\top s_i - T^\top t_i \rVert_2^2
        = s_i^\top G_{ss}\, s_i - 2\, s_i^\top G_{st}\, t_i + t_i^\top G_{tt}\, t_i,

with the Gram matrices :math:`G_{ss} = SS^\top`, :math:`G_{st} = ST^\top`,
:math:`G_{tt} = TT^\top` of size C x C. Every term is a batched matrix product:
:math:`O(BNC^2)` time and :math:`O(B(NC + C^2))` memory instead of
:math:`O(BN^2C)` and :math:`O(BN^2)`. The squared-Frobenius variant is cheaper
still, because :math:`\sum_i s_i^\top G_{ss} s_i = \lVert G_{ss} \rVert_F^2`.

The three terms cancel when the maps agree; the kernel
(``segdistill/losses/_gram.py``, shared with the pair-wise loss) subtracts first
(:math:`E = S - T`, equal channel counts) and recomputes in float64 the images
that float32 cannot resolve, so that in float32 every method stays within
1e-3 (value) and 1e-2 (gradient) of a float64 dense evaluation, however close
the maps are: the bound ``tests/test_numerics.py`` checks.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from segdistill._checks import (
    check_choice,
    check_feature_map,
    check_feature_pair,
    check_positive_int,
    check_real,
)
from segdistill._features import Resize, align_grids, check_resize, full_precision
from segdistill._reduction import Reduction, check_reduction, reduce_loss
from segdistill.losses._gram import row_distances, squared_distance, unit_columns

__all__ = ["AffinityLoss", "affinity_loss", "affinity_matrix"]

Distance = Literal["l2", "squared"]
Method = Literal["auto", "dense", "linear"]
DISTANCES: tuple[str, ...] = ("l2", "squared")
METHODS: tuple[str, ...] = ("auto", "dense", "linear")


def affinity_matrix(features: Tensor, eps: float = 1e-8) -> Tensor:
    r"""The dense affinity matrix of eq. (3), one N x N matrix per image.

    This materialises the matrix, so it is meant for inspecting a map (the
    paper's Figure 3 plots one row of it) and for small inputs; the loss never
    calls it.

    .. math::

        A_{ij} = \frac{1}{N}\,
            \frac{\psi_i}{\lVert\psi_i\rVert_2} \cdot \frac{\psi_j}{\lVert\psi_j\rVert_2}

    Args:
        features: a feature map.
        eps: lower bound on a position's norm before dividing, so that an
            all-zero position gives a zero row instead of NaN.

    Shape:
        - features: :math:`(B, C, H, W)`.
        - output: :math:`(B, N, N)` with :math:`N = HW`, row-major positions.

    Returns:
        The affinity matrices, in at least float32.

    Raises:
        TypeError: ``features`` is not a floating-point tensor.
        ValueError: ``features`` is not 4-D or is empty.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> a = affinity_matrix(torch.randn(1, 8, 2, 2))
        >>> a.shape
        torch.Size([1, 4, 4])
        >>> a[0].diagonal()  # each position is its own perfect match: 1 / N
        tensor([0.2500, 0.2500, 0.2500, 0.2500])
    """
    check_feature_map(features, "features")
    check_real("eps", eps, minimum=0.0, strict=True)
    ctx, (x,) = full_precision(features)
    with ctx:
        s = unit_columns(x.flatten(2), eps)
        return s.mT @ s / s.shape[-1]


def _check_options(
    distance: str, method: str, resize: str, chunk_size: int | None, eps: float, reduction: str
) -> None:
    check_choice("distance", distance, DISTANCES)
    check_choice("method", method, METHODS)
    check_resize(resize)
    if chunk_size is not None:
        check_positive_int("chunk_size", chunk_size)
    check_real("eps", eps, minimum=0.0, strict=True)
    check_reduction(reduction)


def _affinity(student: Tensor, teacher: Tensor, distance: Distance, method: Method,
              resize: Resize, chunk_size: int | None, eps: float,
              reduction: Reduction) -> Tensor:
    """:func:`affinity_loss` with its options already validated."""
    check_feature_pair(student, teacher)
    student, teacher = align_grids(student, teacher, resize)
    ctx, (x_s, x_t) = full_precision(student, teacher)
    with ctx:
        x_s, x_t = x_s.flatten(2), x_t.flatten(2)
        n = x_s.shape[-1]
        if distance == "squared":  # N^2 sum_i ||A^s_i - A^t_i||^2 per image
            total = squared_distance(x_s, x_t, eps=eps, method=method, chunk_size=chunk_size)
            per_image = total / n**3
        else:  # N ||A^s_i - A^t_i|| per image and row
            rows = row_distances(x_s, x_t, eps=eps, method=method, chunk_size=chunk_size)
            per_image = rows.mean(dim=1) / n
        return reduce_loss(per_image, reduction)


def affinity_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    distance: Distance = "l2",
    method: Method = "auto",
    resize: Resize = "none",
    chunk_size: int | None = None,
    eps: float = 1e-8,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Affinity distillation loss of He et al. (CVPR 2019), eq. (4).

    For each image, the mean over positions of the L2 distance between the
    rows of the student's and the teacher's affinity matrices (eq. 3):

    .. math::

        \mathcal{L}_{aff} = \frac{1}{N} \sum_{i=1}^{N}
            \big\lVert A_i(\psi_s) - A_i(\psi_t) \big\rVert_2 ,

    or, with ``distance='squared'``, the mean over rows of the squared distance,
    :math:`\frac{1}{N}\lVert A(\psi_s) - A(\psi_t)\rVert_F^2`. In the paper
    :math:`\psi_s = C_a(\phi_s)` (the student's features through an
    :class:`~segdistill.Adapter`) and :math:`\psi_t = E(\phi_t)` (the teacher's
    features through the :class:`~segdistill.Translator`'s encoder). The two
    maps may have different channel counts; their affinities are N x N either
    way.

    ``method='linear'`` computes this from C x C Gram matrices and never
    allocates an N x N tensor (see the module docstring);
    ``method='dense'`` builds the affinity rows explicitly, in row blocks;
    ``method='auto'`` picks whichever needs fewer multiply-adds for the shapes
    at hand (linear unless the channel count is comparable to N or larger).
    All methods compute in float32 at least, with autocast disabled, to
    within 1e-3 of a float64 dense evaluation even where the maps nearly agree
    (see the docs' affinity guide). A NaN or an infinity in an image gives that
    image a NaN loss.

    Args:
        student: the student's (adapted) feature map.
        teacher: the teacher's (translated) feature map.
        distance: ``'l2'`` for the paper's row-wise L2 distance, ``'squared'``
            for its square (a squared-Frobenius loss, smooth everywhere).
        method: ``'auto'``, ``'dense'`` or ``'linear'``; all give the same value.
        resize: the maps must share H x W (up to one cell of stride rounding)
            unless this is ``'student'`` (resize the teacher's map bilinearly
            onto the student's grid) or ``'teacher'`` (the other way round).
        chunk_size: rows per block for the dense method; by default blocks of
            at most :math:`2^{24}` elements.
        eps: lower bound on a position's norm, after the vector is divided by
            its largest entry, so that an all-zero feature vector gives zero
            affinities instead of NaN; every non-zero vector is normalised
            exactly, whatever its scale.
        reduction: ``'none'`` | ``'mean'`` | ``'sum'`` over the batch.

    Shape:
        - student: :math:`(B, C_s, H, W)`.
        - teacher: :math:`(B, C_t, H, W)` (or another H x W with ``resize``).
        - output: scalar, or :math:`(B,)` with ``reduction='none'``.

    Returns:
        The loss, in the compute dtype (float32, or float64 for float64 inputs).

    Raises:
        TypeError: an input is not a floating-point tensor.
        ValueError: an input is not 4-D or is empty, the batch sizes or the
            spatial sizes differ (without ``resize``), the inputs are on
            different devices, or an option has an unknown value.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> student, teacher = torch.randn(2, 16, 8, 8), torch.randn(2, 32, 8, 8)
        >>> loss = affinity_loss(student, teacher)
        >>> round(loss.item(), 4)
        0.0373
        >>> dense = affinity_loss(student, teacher, method="dense")
        >>> torch.allclose(loss, dense, rtol=1e-4)
        True
        >>> affinity_loss(teacher, teacher).abs().item() < 1e-6
        True
    """
    _check_options(distance, method, resize, chunk_size, eps, reduction)
    return _affinity(student, teacher, distance, method, resize, chunk_size, eps, reduction)


class AffinityLoss(nn.Module):
    r"""Affinity distillation loss of He et al. (CVPR 2019), as a module.

    Stores the options of :func:`affinity_loss`, validated once here, and
    computes it in ``forward``; see that function for the formula, the
    algorithm and the arguments.

    Args:
        distance: ``'l2'`` (the paper's) or ``'squared'``.
        method: ``'auto'``, ``'dense'`` or ``'linear'``.
        resize: ``'none'``, ``'student'`` or ``'teacher'``.
        chunk_size: rows per block for the dense method.
        eps: lower bound on a position's norm before normalising.
        reduction: ``'none'`` | ``'mean'`` | ``'sum'`` over the batch.

    Shape:
        - student: :math:`(B, C_s, H, W)`.
        - teacher: :math:`(B, C_t, H, W)`.
        - output: scalar, or :math:`(B,)` with ``reduction='none'``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> criterion = AffinityLoss()
        >>> criterion
        AffinityLoss(distance='l2', method='auto', resize='none', eps=1e-08, reduction='mean')
        >>> round(criterion(torch.randn(2, 16, 8, 8), torch.randn(2, 32, 8, 8)).item(), 4)
        0.0373
    """

    def __init__(
        self,
        distance: Distance = "l2",
        method: Method = "auto",
        resize: Resize = "none",
        chunk_size: int | None = None,
        eps: float = 1e-8,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__()
        _check_options(distance, method, resize, chunk_size, eps, reduction)
        self.distance: Distance = distance
        self.method: Method = method
        self.resize: Resize = resize
        self.chunk_size = chunk_size
        self.eps = eps
        self.reduction: Reduction = reduction

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return _affinity(student, teacher, self.distance, self.method, self.resize,
                         self.chunk_size, self.eps, self.reduction)

    def extra_repr(self) -> str:
        chunk = "" if self.chunk_size is None else f", chunk_size={self.chunk_size}"
        return (
            f"distance={self.distance!r}, method={self.method!r}, resize={self.resize!r}"
            f"{chunk}, eps={self.eps}, reduction={self.reduction!r}"
        )
