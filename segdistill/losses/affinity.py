r"""Affinity distillation loss (He et al., CVPR 2019, eqs. 3-4), exact and memory-linear.

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
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from segdistill._checks import (
    check_choice,
    check_feature_map,
    check_feature_pair,
    check_positive_int,
    check_real,
)
from segdistill._features import RESIZE_MODES, Resize, align_spatial, full_precision
from segdistill._reduction import Reduction, check_reduction, reduce_loss

__all__ = ["AffinityLoss", "affinity_loss", "affinity_matrix"]

Distance = Literal["l2", "squared"]
Method = Literal["auto", "dense", "linear"]
DISTANCES: tuple[str, ...] = ("l2", "squared")
METHODS: tuple[str, ...] = ("auto", "dense", "linear")

# Rows whose squared distance falls below this many machine epsilons of the
# (non-negative) Gram terms it was computed from are rounding noise: the true
# value there is zero to working precision, so it counts as zero, with a zero
# gradient, instead of feeding 1 / sqrt(noise) into the backward pass.
_CANCELLATION_ULPS = 32.0

# Upper bound on the elements of one dense row block (B x rows x N).
_DENSE_BLOCK_ELEMENTS = 1 << 24


def _flatten_normalized(x: Tensor, eps: float) -> Tensor:
    """(B, C, H, W) -> (B, C, N) with each position's channel vector of unit L2 norm."""
    flat = x.flatten(2)
    norm = torch.linalg.vector_norm(flat, dim=1, keepdim=True)
    normalized: Tensor = flat / norm.clamp_min(eps)
    return normalized


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
        s = _flatten_normalized(x, eps)
        return s.mT @ s / s.shape[-1]


def _dense_is_cheaper(n: int, c_s: int, c_t: int, distance: str) -> bool:
    """Compare multiply-add counts per image of the dense and the linear algorithm.

    Dense: the two N x N products, :math:`N^2 (C_s + C_t)`. Linear: the three
    Gram blocks, :math:`N (C_s^2 + C_s C_t + C_t^2)`, and for the row-wise L2
    distance as much again to apply them to every position.
    """
    grams = c_s * c_s + c_s * c_t + c_t * c_t
    linear = grams * n * (2 if distance == "l2" else 1)
    dense = n * n * (c_s + c_t)
    return dense <= linear


def _row_distances_linear(s: Tensor, t: Tensor, distance: str) -> Tensor:
    """Per-row distances scaled by N, from C x C Gram matrices only.

    Returns :math:`N\\lVert A^s_i - A^t_i\\rVert_2` (shape (B, N)) for ``'l2'``
    and :math:`N^2 \\sum_i \\lVert A^s_i - A^t_i\\rVert_2^2` (shape (B,)) for
    ``'squared'``.
    """
    if distance == "squared":
        g_ss = s @ s.mT
        g_st = s @ t.mT
        g_tt = t @ t.mT
        # sum_i s_i' G s_i = trace(S' G S) = trace(G S S') = ||G||_F^2
        total = g_ss.square().sum((1, 2)) - 2 * g_st.square().sum((1, 2))
        total = total + g_tt.square().sum((1, 2))
        return total.clamp_min(0.0)
    rows: Tensor = _LinearRowNorms.apply(s, t)
    return rows


class _LinearRowNorms(torch.autograd.Function):
    r"""Row norms :math:`d_i = \lVert S^\top s_i - T^\top t_i \rVert_2` with a hand-written
    backward pass.

    With :math:`\Delta = S^\top S - T^\top T` (N x N, never formed) and
    :math:`w_i = \partial L / \partial r_i` for :math:`r_i = d_i^2`, the gradient is

    .. math::

        \frac{\partial L}{\partial S} = 2\, (S\Delta) W + 2\, (SW)\,\Delta
            = 2\, Y_s W + 2\, (SW S^\top) S - 2\, (SW T^\top) T,

    with :math:`W = \mathrm{diag}(w)` and :math:`Y_s = S\Delta = G_{ss} S - G_{st} T`,
    which the forward pass computes anyway; the teacher's gradient is the same
    with the roles swapped. That is four C x C x N products where autograd
    would take six. With ``create_graph=True`` the backward pass recomputes
    its inputs from S and T, so second derivatives are exact too.
    """

    @staticmethod
    def forward(ctx: Any, s: Tensor, t: Tensor) -> Tensor:
        rows, keep, y_s, y_t = _linear_row_terms(s, t, with_y_t=ctx.needs_input_grad[1])
        ctx.save_for_backward(s, t, y_s, y_t, rows, keep)
        return rows

    @staticmethod
    def backward(ctx: Any, grad_rows: Tensor) -> tuple[Tensor | None, Tensor | None]:
        s, t, y_s, y_t, rows, keep = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: recompute what the forward saved, so that the
            # graph of this backward pass reaches s and t (exact double backward).
            rows, keep, y_s, y_t = _linear_row_terms(s, t, with_y_t=ctx.needs_input_grad[1])
        # dL/dr_i = g_i / (2 d_i), zero where the row counted as zero
        w = torch.where(keep, grad_rows / torch.where(keep, 2 * rows, torch.ones_like(rows)),
                        torch.zeros_like(rows)).unsqueeze(1)
        grad_s = grad_t = None
        if ctx.needs_input_grad[0]:
            sw = s * w
            grad_s = torch.baddbmm(y_s * w, sw @ s.mT, s)
            grad_s = 2.0 * torch.baddbmm(grad_s, sw @ t.mT, t, alpha=-1.0)
        if ctx.needs_input_grad[1]:
            tw = t * w
            grad_t = torch.baddbmm(y_t * w, tw @ t.mT, t)
            grad_t = 2.0 * torch.baddbmm(grad_t, tw @ s.mT, s, alpha=-1.0)
        return grad_s, grad_t


def _linear_row_terms(s: Tensor, t: Tensor, with_y_t: bool
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Row norms, the mask of rows above rounding noise, :math:`S\\Delta` and
    (if asked) :math:`-T\\Delta`, from six C x C x N products at most."""
    g_ss = s @ s.mT
    g_st = s @ t.mT
    p_ss = g_ss @ s  # G_ss s_i for every i
    p_st = g_st @ t  # G_st t_i
    q_tt = (t @ t.mT) @ t  # G_tt t_i
    with torch.no_grad():  # the size of the cancelling terms a_i + c_i
        a = (p_ss * s).sum(1)
    c = (q_tt * t).sum(1)
    y_s = p_ss - p_st  # S Delta
    r = (y_s * s).sum(1) - (p_st * s).sum(1) + c
    # Rows whose value is rounding noise of the cancelling terms count as 0.
    keep = r.detach() > _CANCELLATION_ULPS * torch.finfo(r.dtype).eps * (a + c.detach())
    # Double where: the square root never sees a non-positive argument.
    rows = torch.where(keep, torch.where(keep, r, torch.ones_like(r)).sqrt(),
                       torch.zeros_like(r))
    y_t = q_tt - g_st.mT @ s if with_y_t else None  # T (-Delta)
    return rows, keep, y_s, y_t


def _row_distances_dense(s: Tensor, t: Tensor, distance: str, chunk_size: int | None) -> Tensor:
    """The same quantities as :func:`_row_distances_linear`, from blocks of N x N rows."""
    batch, _, n = s.shape
    rows = chunk_size or max(1, _DENSE_BLOCK_ELEMENTS // max(1, batch * n))
    parts = []
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        diff = s[:, :, start:stop].mT @ s - t[:, :, start:stop].mT @ t
        if distance == "squared":
            parts.append(diff.square().sum((1, 2)))
        else:
            parts.append(torch.linalg.vector_norm(diff, dim=-1))
    if distance == "squared":
        return torch.stack(parts).sum(0)
    return torch.cat(parts, dim=1)


def _row_distances(
    s: Tensor, t: Tensor, distance: str, method: str, chunk_size: int | None
) -> Tensor:
    """Dispatch to the dense or the linear algorithm (``method='auto'``: by cost)."""
    use_dense = method == "dense" or (
        method == "auto" and _dense_is_cheaper(s.shape[-1], s.shape[1], t.shape[1], distance)
    )
    if use_dense:
        return _row_distances_dense(s, t, distance, chunk_size)
    return _row_distances_linear(s, t, distance)


def _check_options(
    distance: str, method: str, resize: str, chunk_size: int | None, eps: float, reduction: str
) -> None:
    check_choice("distance", distance, DISTANCES)
    check_choice("method", method, METHODS)
    check_choice("resize", resize, RESIZE_MODES)
    if chunk_size is not None:
        check_positive_int("chunk_size", chunk_size)
    check_real("eps", eps, minimum=0.0, strict=True)
    check_reduction(reduction)


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

    ``method='linear'`` computes this exactly from C x C Gram matrices and
    never allocates an N x N tensor (see the module docstring);
    ``method='dense'`` builds the affinity rows explicitly, in row blocks;
    ``method='auto'`` picks whichever needs fewer multiply-adds for the shapes
    at hand (linear unless the channel count is comparable to N or larger).
    All methods compute in float32 at least, with autocast disabled.

    Args:
        student: the student's (adapted) feature map.
        teacher: the teacher's (translated) feature map.
        distance: ``'l2'`` for the paper's row-wise L2 distance, ``'squared'``
            for its square (a squared-Frobenius loss, smooth everywhere).
        method: ``'auto'``, ``'dense'`` or ``'linear'``; all give the same value.
        resize: the maps must share H x W unless this is ``'student'`` (resize
            the teacher's map bilinearly onto the student's grid) or
            ``'teacher'`` (the other way round). Nothing is resized silently.
        chunk_size: rows per block for the dense method; by default blocks of
            at most :math:`2^{24}` elements.
        eps: lower bound on a position's norm before normalising, so that an
            all-zero feature vector gives zero affinities instead of NaN.
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
    check_feature_pair(student, teacher)
    _check_options(distance, method, resize, chunk_size, eps, reduction)
    student, teacher = align_spatial(student, teacher, resize)

    ctx, (x_s, x_t) = full_precision(student, teacher)
    with ctx:
        s = _flatten_normalized(x_s, eps)
        t = _flatten_normalized(x_t, eps)
        n = s.shape[-1]
        rows = _row_distances(s, t, distance, method, chunk_size)
        # 'squared' rows: (B,) of N^2 sum_i ||A^s_i - A^t_i||^2; 'l2' rows: (B, N) of
        # N ||A^s_i - A^t_i||
        per_image = rows / n**3 if distance == "squared" else rows.mean(dim=1) / n
        return reduce_loss(per_image, reduction)


class AffinityLoss(nn.Module):
    r"""Affinity distillation loss of He et al. (CVPR 2019), as a module.

    Stores the options of :func:`affinity_loss` and calls it in ``forward``;
    see that function for the formula, the algorithm and the arguments.

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
        return affinity_loss(
            student,
            teacher,
            distance=self.distance,
            method=self.method,
            resize=self.resize,
            chunk_size=self.chunk_size,
            eps=self.eps,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        chunk = "" if self.chunk_size is None else f", chunk_size={self.chunk_size}"
        return (
            f"distance={self.distance!r}, method={self.method!r}, resize={self.resize!r}"
            f"{chunk}, eps={self.eps}, reduction={self.reduction!r}"
        )
