r"""CIRKD's mini-batch term: cross-image pixel-relation distillation (Yang et al., CVPR 2022),
exact and memory-linear.

For every ordered pair :math:`(i, j)` of images in a batch (:math:`i = j` included),
the relation maps :math:`S_{ij} = F_{s,i}^\top F_{s,j}` and
:math:`T_{ij} = F_{t,i}^\top F_{t,j}` (N x N, :math:`F` the channel-normalised
features, N = HW positions) are compared row by row with a softened KL divergence.
Written that way it needs :math:`2B^2` N x N matrices; the reference code builds
them all (and offers 2x2 pooling to fit), 4.3 GB each in float32 at output stride 8
on a full Cityscapes frame. This module computes the same value and its exact
gradients without any N x N tensor.

**The identity.** With :math:`a = 1/\tau`, logits :math:`u_k = a\,T_{rk}` and
:math:`v_k = a\,S_{rk}` of one row :math:`r` and :math:`p = \mathrm{softmax}(u)`,

.. math::

    \mathrm{KL}\big(p \,\|\, \mathrm{softmax}(v)\big)
        = \sum_k p_k (u_k - v_k) - \mathrm{LSE}(u) + \mathrm{LSE}(v),

three reductions over the keys :math:`k`, which one pass over tiles of (query rows x
keys) gathers (:func:`_row_stats`): per tile, two products give the logits, and the
sums :math:`z_u = \sum_k e^{u_k - m_u}`, :math:`z_v` and
:math:`w = \sum_k e^{u_k - m_u}(u_k - v_k)` grow. Where :math:`a > 40` the maxima
:math:`m_u, m_v` are running ones and the sums are rescaled when a maximum grows (the
online log-sum-exp of flash attention); below, cosines over :math:`\tau` keep every
exponential within float32's range and :math:`m = 0`. The differences
:math:`u_k - v_k` are formed elementwise, before any sum, and the row's value as
:math:`w / z_u - (m_u - m_v) - \log(z_u / z_v)`, so that no term of size :math:`a`
cancels. Memory: the unit vectors, O(BNC), a few (BN, B) statistics, and one tile of
logits at a time.

**The backward pass** (:class:`_CrossImageKL`, by hand) recomputes each tile's
logits from the unit vectors and the saved log-sum-exps: :math:`\partial/\partial v_k =
q_k - p_k` with :math:`q = \mathrm{softmax}(v)`, and
:math:`\partial/\partial u_k = p_k(\log p_k - \log q_k - \mathrm{KL})` for a
teacher that takes gradients; each tile's gradient meets the keys and the queries
in two products, then the normalisation's backward. Per (query, key) pair that is
:math:`C_t + C_s` multiply-adds forward and :math:`C_t + 3C_s` backward with a frozen
teacher (:math:`3C_t + 3C_s` with a teacher that takes gradients): the cost stays
:math:`O(B^2 N^2 C)`, and the products are the bound. First derivatives only
(``once_differentiable``).

**Why not** :func:`torch.nn.functional.scaled_dot_product_attention`. It returns
:math:`\mathrm{softmax}(QK^\top)V`, which gives the first term
(:math:`\sum_k p_k u_k = a\, t_r \cdot \sum_k p_k t_k`: queries and keys the
teacher's, values the teacher's, and the student's for :math:`\sum_k p_k v_k`), but
not the log-sum-exps (the CPU flash kernel's private entry point returns them), and
its backward pass differentiates weighted values, not a log-sum-exp. Reading the value
from it takes three calls per key image, six products' worth against the two here;
measured on the CPU (``benchmarks/cirkd.py --sdpa``, forward only) they take 1.9x to
3.3x this forward pass, before any backward pass. See the docs' CIRKD page.

**Rounding.** When the student's relations come close to the teacher's, the KL is
:math:`O(a^2\delta^2)` for cosines within :math:`\delta`, while float32 rounds the
sums and the cosines at about :math:`10^{-7}`. The unit vectors are rounded once from
float64 (:func:`_unit_rows`); each row's value (summed over the key images) is
compared with an estimate of its rounding (:func:`_rounding`), and rows below
:data:`_RECOMPUTE_ULPS` times it are recomputed in float64 from the raw inputs,
forward and backward, so that the float32 loss stays within 1e-4 of a float64
evaluation however close the maps are (``tests/test_cirkd.py``). Equal maps give
exactly 0; a value below zero is rounding, and counts as 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from segdistill._checks import check_feature_pair, check_positive_int, check_real
from segdistill._features import Resize, align_grids, check_resize, full_precision, safe_norm
from segdistill._reduction import Reduction, check_reduction, reduce_loss
from segdistill.losses._gram import _column_blocks, _normalization_backward

__all__ = ["CIRKDLoss", "cirkd_loss"]

# Query rows per block by default; each block meets the keys in tiles of at most
# _KEYS_PER_ROW_BLOCK times as many keys (one tile of logits is block_size^2 * 4 elements,
# 1 MiB of float32 at the default: cache-sized on a CPU).
_BLOCK_SIZE = 256
_KEYS_PER_ROW_BLOCK = 4
# Up to this 1 / tau, exp(logit) stays within float32's normal range (e^{+-40}) and the
# pass needs no running maximum.
_PLAIN_EXP = 40.0
# A query row whose float32 value (summed over the key images) is below this many times
# its rounding estimate (:func:`_rounding`) may have lost more than ~6e-5 of it: it is
# recomputed in float64.
_RECOMPUTE_ULPS = 2.0**14


def _unit_rows(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    r"""(B, C, N) raw features -> the (B*N, C) unit vectors, position-major, and the norms
    (B, 1, N) (:func:`~segdistill._features.safe_norm`: a zero vector stays zero, a
    non-finite one becomes NaN).

    Below float64, each unit vector is rounded once from its float64 quotient, so that
    its length is within about an epsilon of 1 (a float32 norm rounds at up to
    :math:`\epsilon \log_2 C`, which would move every self-similarity by as much); the
    float64 sum of squares of float32 values can neither overflow nor underflow. The
    quotients are formed block by block (:func:`~segdistill.losses._gram._column_blocks`),
    never as a whole float64 copy.
    """
    batch, channels, n = x.shape
    norm = safe_norm(x, 1, 2.0, eps)
    if x.dtype == torch.float64:
        return (x / norm).transpose(1, 2).reshape(-1, channels), norm
    wide = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float64)
    # safe_norm's floor (an all-zero vector, or eps > 1) where it raised the norm
    divisor = torch.where(norm > wide * (1 + 1e-5), norm.double(), wide)
    unit = x.new_empty(batch, n, channels)
    for cols in _column_blocks(x):
        unit[:, cols] = (x[..., cols].double() / divisor[..., cols]).transpose(1, 2)
    return unit.view(-1, channels), norm


class _Keys(NamedTuple):
    """The unit vectors of every position of the batch, (B*N, C_s) and (B*N, C_t)."""

    s: Tensor
    t: Tensor


class _Queries(NamedTuple):
    """Query rows: unit vectors (rows, C_s) and (rows, C_t), which may be a subset of the
    batch's positions."""

    s: Tensor
    t: Tensor


class _RowStats(NamedTuple):
    """Per query row and key image, (rows, B) each."""

    kl: Tensor  # the row's KL divergence
    lse_t: Tensor  # LSE of the teacher's logits
    lse_s: Tensor  # LSE of the student's logits
    rounding: Tensor  # the estimate of its rounding error (:func:`_rounding`)


def _tiles(rows: int, n: int, images: int, block_size: int
           ) -> Iterator[tuple[slice, slice, slice, tuple[int, int, int]]]:
    """The blocks of one pass: query rows, key images, keys (a contiguous range of the
    (B*N, C) key rows), and the shape (rows, images, keys) of the block's logits.

    A tile of keys holds at most :data:`_KEYS_PER_ROW_BLOCK` times ``block_size`` keys:
    several whole images when N is small, a part of one image otherwise, so that every
    softmax (over one image's keys) is taken over whole images or gathered online.
    """
    width = _KEYS_PER_ROW_BLOCK * block_size
    group, keys = max(1, width // n), min(n, width)
    for r0 in range(0, rows, block_size):
        r = slice(r0, min(r0 + block_size, rows))
        height = r.stop - r0
        for j0 in range(0, images, group):
            j1 = min(j0 + group, images)
            for k0 in range(0, n, keys):
                k1 = min(k0 + keys, n)
                yield (r, slice(j0, j1), slice(j0 * n + k0, (j1 - 1) * n + k1),
                       (height, j1 - j0, k1 - k0))


def _logits(q: Tensor, k: Tensor, inv_tau: float, shape: tuple[int, int, int]) -> Tensor:
    """One block of logits, the cosines of the unit vectors ``q`` (rows, C) and ``k``
    (keys, C) times ``inv_tau`` (inside the product: no scaled copy of the inputs)."""
    return torch.addmm(q.new_zeros(()), q, k.mT, beta=0, alpha=inv_tau).view(shape)


def _rounding(eps: float, inv_tau: float, kl: Tensor, gap: Tensor, log_ratio: Tensor,
              mean_diff: Tensor) -> Tensor:
    r"""An estimate of the rounding error of a row's value in a precision of machine
    epsilon ``eps``: an epsilon of each of its three terms (the mean difference of the
    logits, the gap between the two running maxima, the log of the ratio of the two
    sums) and a few for the sums themselves; and the cosines' own rounding (about
    :math:`\epsilon` each, so :math:`a\epsilon` in a logit) through the distance between
    the two softmaxes, which Pinsker's inequality bounds by :math:`\sqrt{2\,\mathrm{KL}}`.
    Measured against float64, the error stays below this estimate
    (``tests/test_cirkd.py`` checks the consequence: 1e-4 of the value)."""
    terms = mean_diff.abs() + gap.abs() + log_ratio.abs() + 4.0
    return eps * (terms + 2 * inv_tau * (2 * kl.abs()).sqrt())


def _row_stats(queries: _Queries, keys: _Keys, n: int, inv_tau: float,
               block_size: int) -> _RowStats:
    """The KL divergence of every (query row, key image) pair, with the log-sum-exps the
    backward pass needs, in one blocked pass (with an online log-sum-exp where
    :math:`1/\tau` exceeds :data:`_PLAIN_EXP`)."""
    rows, images = queries.s.shape[0], keys.s.shape[0] // n
    # The logits are cosines over tau, within [-1/tau, 1/tau]: up to _PLAIN_EXP their
    # exponentials neither overflow nor underflow, and need no running maximum (which
    # then stays 0)
    online = inv_tau > _PLAIN_EXP
    m_t = queries.s.new_full((rows, images), -math.inf if online else 0.0)
    m_s = m_t.clone()
    z_t, z_s, w = torch.zeros_like(m_t), torch.zeros_like(m_t), torch.zeros_like(m_t)
    for r, j, k, tile in _tiles(rows, n, images, block_size):
        u = _logits(queries.t[r], keys.t[k], inv_tau, tile)
        v = _logits(queries.s[r], keys.s[k], inv_tau, tile)
        diff = u - v
        for logits, m, z, weighted in ((u, m_t, z_t, w), (v, m_s, z_s, None)):
            if online:  # rescale what the earlier tiles gathered to the new maximum
                old = m[r, j]
                new = torch.maximum(old, logits.amax(-1))
                rescale = (old - new).exp_()  # 0 on the first tile (old = -inf)
                z[r, j] *= rescale
                if weighted is not None:
                    weighted[r, j] *= rescale
                m[r, j] = new
                logits.sub_(new.unsqueeze(-1))
            e = logits.exp_()
            z[r, j] += e.sum(-1)
            if weighted is not None:
                weighted[r, j] += e.mul_(diff).sum(-1)
    mean_diff, gap, log_ratio = w / z_t, m_t - m_s, (z_t / z_s).log()
    kl = mean_diff - gap - log_ratio
    rounding = _rounding(torch.finfo(kl.dtype).eps, inv_tau, kl, gap, log_ratio, mean_diff)
    return _RowStats(kl, m_t + z_t.log(), m_s + z_s.log(), rounding)


def _row_grads(queries: _Queries, keys: _Keys, n: int, inv_tau: float, block_size: int,
               stats: _RowStats, weight: Tensor, need: tuple[bool, bool]
               ) -> tuple[_Queries, _Keys]:
    """Gradients of :math:`\\sum_r \\text{weight}_r \\sum_j \\mathrm{KL}_{rj}` with respect
    to the query rows' and the keys' unit vectors (empty where not needed), one blocked
    pass that recomputes the logits."""
    need_s, need_t = need
    rows, images = queries.s.shape[0], keys.s.shape[0] // n
    # a side without a gradient gets empty (0, C) buffers: no memory, and adds nothing
    dq_s, dk_s = (torch.zeros_like(x) if need_s else x[:0] for x in (queries.s, keys.s))
    dq_t, dk_t = (torch.zeros_like(x) if need_t else x[:0] for x in (queries.t, keys.t))
    for r, j, k, tile in _tiles(rows, n, images, block_size):
        scale = weight[r].view(-1, 1, 1)
        log_p = _logits(queries.t[r], keys.t[k], inv_tau, tile).sub_(
            stats.lse_t[r, j].unsqueeze(-1))
        log_q = _logits(queries.s[r], keys.s[k], inv_tau, tile).sub_(
            stats.lse_s[r, j].unsqueeze(-1))
        # dKL/du = p (log p - log q - KL), formed before log p becomes p
        g_t = (log_p - log_q).sub_(stats.kl[r, j].unsqueeze(-1)) if need_t else None
        p, q = log_p.exp_(), log_q.exp_()
        flat = (tile[0], tile[1] * tile[2])
        # the logits are (q . k) / tau: both products carry the 1 / tau
        if need_s:  # dKL/dv = q - p
            g_s = q.sub_(p).mul_(scale).view(flat)
            dq_s[r].addmm_(g_s, keys.s[k], alpha=inv_tau)
            dk_s[k].addmm_(g_s.mT, queries.s[r], alpha=inv_tau)
        if g_t is not None:
            g_t = g_t.mul_(p).mul_(scale).view(flat)
            dq_t[r].addmm_(g_t, keys.t[k], alpha=inv_tau)
            dk_t[k].addmm_(g_t.mT, queries.t[r], alpha=inv_tau)
    return _Queries(dq_s, dq_t), _Keys(dk_s, dk_t)


def _position_grads(keys: _Keys, index: Tensor | None, stats: _RowStats, weight: Tensor,
                    n: int, inv_tau: float, block_size: int, need: tuple[bool, bool]
                    ) -> tuple[Tensor | None, Tensor | None]:
    """The gradients with respect to every position's unit vectors, (B*N, C_s) and
    (B*N, C_t) (``None`` where not needed), from the query rows ``index`` (``None``: all)
    with their ``stats`` and ``weight``: each position is a key of every row and the
    query of its own."""
    queries = _Queries(keys.s, keys.t) if index is None else \
        _Queries(keys.s[index], keys.t[index])
    dq, dk = _row_grads(queries, keys, n, inv_tau, block_size, stats, weight, need)
    grads: list[Tensor | None] = []
    for d_query, d_key, wanted in ((dq.s, dk.s, need[0]), (dq.t, dk.t, need[1])):
        if not wanted:
            grads.append(None)
        elif index is None:
            grads.append(d_key.add_(d_query))
        else:
            grads.append(d_key.index_add_(0, index, d_query))
    return grads[0], grads[1]


def _wider(dtype: torch.dtype) -> bool:
    """Whether to recompute ill-conditioned rows in float64: not for float64 inputs, and
    not under ``torch.compile`` (choosing the rows is a data-dependent branch, which a
    full graph cannot hold; compiled code keeps the working precision)."""
    return dtype != torch.float64 and not torch.compiler.is_compiling()


class _Refined(NamedTuple):
    """:func:`_refined_stats`'s result."""

    stats: _RowStats  # every row, in the working precision
    wide_index: Tensor  # (k,) the rows recomputed in float64
    wide_stats: _RowStats | None  # their float64 statistics; None if k = 0
    kl: Tensor  # (B*N, B) the values, the wide rows from float64, at least zero


def _wide(x: Tensor, eps: float) -> Tensor:
    return _unit_rows(x.double(), eps)[0]


def _refined_stats(keys: _Keys, x_s: Tensor, x_t: Tensor, n: int, inv_tau: float,
                   block_size: int, eps: float) -> _Refined:
    """:func:`_row_stats` of every position, with the rows the working precision cannot
    resolve recomputed in float64 from the raw maps."""
    stats = _row_stats(_Queries(keys.s, keys.t), keys, n, inv_tau, block_size)
    kl = stats.kl
    wide_index = kl.new_empty(0, dtype=torch.long)
    wide_stats = None
    if _wider(kl.dtype):  # a row's total over the key images against its total rounding
        wide_index = (kl.sum(1) < _RECOMPUTE_ULPS * stats.rounding.sum(1)).nonzero().squeeze(1)
    if wide_index.numel():
        wide_keys = _Keys(_wide(x_s, eps), _wide(x_t, eps))
        wide_stats = _row_stats(_Queries(wide_keys.s[wide_index], wide_keys.t[wide_index]),
                                wide_keys, n, inv_tau, block_size)
        kl = kl.index_copy(0, wide_index, wide_stats.kl.to(kl.dtype))
    # a KL is never negative: below zero is rounding (NaN stays NaN)
    return _Refined(stats, wide_index, wide_stats, kl.clamp_min(0.0))


class _CrossImageKL(torch.autograd.Function):
    """Per query image :math:`i`, :math:`\\sum_j \\sum_r \\mathrm{KL}_{ir,j} / (BN)` from
    the raw (B, C, N) maps, with the hand-written, recomputing backward pass of
    :func:`_row_grads`."""

    @staticmethod
    def forward(ctx: Any, x_s: Tensor, x_t: Tensor, inv_tau: float, block_size: int,
                eps: float) -> Tensor:
        batch, _, n = x_s.shape
        (u_s, norm_s), (u_t, norm_t) = _unit_rows(x_s, eps), _unit_rows(x_t, eps)
        keys = _Keys(u_s, u_t)
        refined = _refined_stats(keys, x_s, x_t, n, inv_tau, block_size, eps)
        ctx.args = (inv_tau, block_size, eps, x_s.device.type)
        ctx.stats, ctx.wide_stats = refined.stats, refined.wide_stats
        ctx.save_for_backward(x_s, x_t, u_s, u_t, norm_s, norm_t, refined.wide_index)
        return refined.kl.view(batch, -1).sum(1) / (batch * n)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None,
                                                  None]:
        # backward() may be called inside an autocast region, whose state the backward
        # pass inherits: keep the products in the precision of the saved inputs
        with torch.autocast(device_type=ctx.args[3], enabled=False):
            return _CrossImageKL._backward(ctx, grad)

    @staticmethod
    def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None,
                                                   None]:
        x_s, x_t, u_s, u_t, norm_s, norm_t, wide_index = ctx.saved_tensors
        inv_tau, block_size, eps, _ = ctx.args
        need = (bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]))
        batch, _, n = x_s.shape
        weight = (grad / (batch * n)).repeat_interleave(n)  # per query row
        keys = _Keys(u_s, u_t)
        if wide_index.numel() == 0:
            g_s, g_t = _position_grads(keys, None, ctx.stats, weight, n, inv_tau, block_size,
                                       need)
        else:  # the working-precision rows here, the float64 rows below, each over every key
            narrow = torch.ones_like(weight, dtype=torch.bool).index_fill_(0, wide_index, False)
            index = narrow.nonzero().squeeze(1)
            g_s, g_t = _position_grads(keys, index, _RowStats(*(x[index] for x in ctx.stats)),
                                       weight[index], n, inv_tau, block_size, need)
            wide = _position_grads(_Keys(_wide(x_s, eps), _wide(x_t, eps)), wide_index,
                                   ctx.wide_stats, weight[wide_index].double(), n, inv_tau,
                                   block_size, need)
            g_s, g_t = (None if g is None or w is None else g.add_(w.to(g.dtype))
                        for g, w in zip((g_s, g_t), wide, strict=True))
        grads: list[Tensor | None] = []
        for g, x, norm in ((g_s, x_s, norm_s), (g_t, x_t, norm_t)):
            if g is not None:  # (B*N, C) -> (B, C, N), through the normalisation
                g = _normalization_backward(g.view(batch, n, -1).transpose(1, 2), x, norm, 1.0)
            grads.append(g)
        return grads[0], grads[1], None, None, None


def _check_options(temperature: float, resize: str, block_size: int | None, eps: float,
                   reduction: str) -> None:
    check_real("temperature", temperature, minimum=0.0, strict=True)
    check_resize(resize)
    if block_size is not None:
        check_positive_int("block_size", block_size)
    check_real("eps", eps, minimum=0.0, strict=True)
    check_reduction(reduction)


def _cirkd(student: Tensor, teacher: Tensor, temperature: float, resize: Resize,
           block_size: int | None, eps: float, reduction: Reduction) -> Tensor:
    """:func:`cirkd_loss` with its options already validated."""
    check_feature_pair(student, teacher)
    student, teacher = align_grids(student, teacher, resize)
    ctx, (x_s, x_t) = full_precision(student, teacher)
    with ctx:
        per_image: Tensor = _CrossImageKL.apply(x_s.flatten(2), x_t.flatten(2),
                                                1.0 / temperature, block_size or _BLOCK_SIZE,
                                                eps)
        return reduce_loss(per_image, reduction)


def cirkd_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    temperature: float = 0.1,
    resize: Resize = "none",
    block_size: int | None = None,
    eps: float = 1e-8,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""CIRKD's mini-batch pixel-relation loss (Yang et al., CVPR 2022, "Cross-Image
    Relational Knowledge Distillation for Semantic Segmentation"), exact and
    memory-linear.

    With :math:`f_{s,i,r}` and :math:`f_{t,i,r}` the channel-normalised student and
    teacher feature vectors at position :math:`r` of image :math:`i`, every position of
    every image is related to every position of every image of the batch, its own
    included:

    .. math::

        \mathcal{L}_{i} = \frac{1}{BN} \sum_{j=1}^{B} \sum_{r=1}^{N}
            \mathrm{KL}\Big(\sigma\big(\tfrac{1}{\tau} f_{t,i,r}^\top F_{t,j}\big)
            \,\Big\|\, \sigma\big(\tfrac{1}{\tau} f_{s,i,r}^\top F_{s,j}\big)\Big),

    :math:`\sigma` the softmax over the N positions of image :math:`j`. The mean over
    the batch, :math:`\frac{1}{B}\sum_i \mathcal{L}_i`, is the reference code's loss
    (``CriterionMiniBatchCrossImagePair``: for each of the :math:`B^2` pairs a
    ``kl_div(..., reduction='batchmean')``, i.e. the sum over the N rows over N, then
    the mean over the pairs), with its temperature of 0.1 and, like it, without a
    :math:`\tau^2` factor. The relation maps are N x N whatever the channels, so the
    two maps may have different channel counts: the reference feeds both networks'
    last feature maps before the classifier unprojected (512 channels for its ResNet
    students and teacher, 128 for its MobileNetV2 student against 512).

    Computed without any N x N tensor, forward or backward, to within 1e-4 of a float64
    evaluation in float32, however close the two maps are (see the module docstring):
    memory :math:`O(BNC)` plus one tile of logits; time that of the
    :math:`O(B^2N^2C)` products. A NaN or an infinity in any image gives NaN for every
    image (each is related to every other). The gradients are exact for both maps;
    second derivatives are not provided.

    Args:
        student: the student's feature map.
        teacher: the teacher's feature map (any channel count).
        temperature: :math:`\tau > 0` (default 0.1, the reference's).
        resize: ``'none'`` requires the same H x W up to one cell of stride rounding;
            ``'student'`` or ``'teacher'`` bilinearly resizes the other map onto that
            one's grid.
        block_size: query rows per block (default 256); each block meets the keys
            in tiles of up to 4 times as many. It changes speed and memory, not the value.
        eps: lower bound on a position's norm, relative to its largest entry, so that
            an all-zero feature vector has zero cosines instead of NaN.
        reduction: ``'none'`` (:math:`\mathcal{L}_i` per image :math:`i`, the rows'
            image) | ``'mean'`` | ``'sum'`` over the batch.

    Shape:
        - student: :math:`(B, C_s, H, W)`.
        - teacher: :math:`(B, C_t, H, W)` (or another H x W with ``resize``).
        - output: scalar, or :math:`(B,)` with ``reduction='none'``.

    Returns:
        The loss, in the compute dtype (float32, or float64 for float64 inputs).

    Raises:
        TypeError: an input is not a floating-point tensor, or an option has the wrong
            type.
        ValueError: an input is not 4-D or is empty, the batch sizes or (without
            ``resize``) the spatial sizes differ, the inputs are on different devices,
            or an option has an invalid value.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> student, teacher = torch.randn(2, 16, 8, 8), torch.randn(2, 32, 8, 8)
        >>> loss = cirkd_loss(student, teacher)
        >>> round(loss.item(), 4)
        2.0068
        >>> torch.allclose(cirkd_loss(student, teacher, block_size=5), loss)  # speed, not value
        True
        >>> cirkd_loss(teacher, teacher).item()
        0.0
    """
    _check_options(temperature, resize, block_size, eps, reduction)
    return _cirkd(student, teacher, temperature, resize, block_size, eps, reduction)


class CIRKDLoss(nn.Module):
    r"""CIRKD's mini-batch pixel-relation loss (Yang et al., CVPR 2022), as a module.

    Stores the options of :func:`cirkd_loss`, validated once here, and computes it in
    ``forward``; see that function for the formula, the algorithm and the arguments.

    Args:
        temperature: :math:`\tau > 0` (default 0.1).
        resize: ``'none'``, ``'student'`` or ``'teacher'``.
        block_size: query rows per block, or ``None`` for the default (256).
        eps: lower bound on a position's norm before normalising.
        reduction: ``'none'`` | ``'mean'`` | ``'sum'`` over the batch.

    Shape:
        - student: :math:`(B, C_s, H, W)`.
        - teacher: :math:`(B, C_t, H, W)`.
        - output: scalar, or :math:`(B,)` with ``reduction='none'``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> criterion = CIRKDLoss()
        >>> criterion
        CIRKDLoss(temperature=0.1, resize='none', eps=1e-08, reduction='mean')
        >>> round(criterion(torch.randn(2, 16, 8, 8), torch.randn(2, 32, 8, 8)).item(), 4)
        2.0068
    """

    def __init__(self, temperature: float = 0.1, resize: Resize = "none",
                 block_size: int | None = None, eps: float = 1e-8,
                 reduction: Reduction = "mean") -> None:
        super().__init__()
        _check_options(temperature, resize, block_size, eps, reduction)
        self.temperature = float(temperature)
        self.resize: Resize = resize
        self.block_size = block_size
        self.eps = eps
        self.reduction: Reduction = reduction

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return _cirkd(student, teacher, self.temperature, self.resize, self.block_size,
                      self.eps, self.reduction)

    def extra_repr(self) -> str:
        block = "" if self.block_size is None else f", block_size={self.block_size}"
        return (f"temperature={self.temperature}, resize={self.resize!r}{block}, "
                f"eps={self.eps}, reduction={self.reduction!r}")
