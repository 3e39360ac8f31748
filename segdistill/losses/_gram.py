r"""The Gram kernel behind the affinity and the pair-wise losses.

Both losses compare the cosine-similarity matrices :math:`S^\top S` and
:math:`T^\top T` (N x N) of two feature maps, with :math:`S` (:math:`C_s \times N`)
and :math:`T` (:math:`C_t \times N`) the position-normalised features of one
image. With :math:`D = S^\top S - T^\top T` the affinity loss needs the norms of
its columns :math:`d_i` (:func:`row_distances`) and the pair-wise loss its
squared Frobenius norm (:func:`squared_distance`). This module computes both
from C x C Gram matrices, never an N x N tensor (``method='linear'``), or from
blocks of rows of :math:`D` (``method='dense'``), and decides between them by
cost (:func:`dense_is_cheaper`).

**Cancellation.** Written as :math:`D = S^\top S - T^\top T`, every Gram term is
:math:`O(1)` while :math:`D` is :math:`O(\delta)` when the student's unit
vectors are within :math:`\delta` of the teacher's: in float32 the result
drowns in rounding once :math:`\delta^2` nears the machine epsilon, exactly
where distillation converges. Two measures keep the float32 result as accurate
as the float32 dense form:

1. With equal channel counts, :math:`E = S - T` is formed elementwise and
   :math:`D = T^\top E + E^\top S` (the "E-form"). Its Gram blocks
   :math:`TT^\top, TE^\top, EE^\top` give terms that are all :math:`O(\delta^2)`,
   so nothing large cancels, at the same cost.
2. Every image's result is compared with the size of the terms it came from
   (:math:`\sum_i \lVert S^\top s_i\rVert^2 + \lVert T^\top t_i\rVert^2`, or
   :math:`\sum_i \lVert T^\top e_i\rVert^2 + \lVert E^\top s_i\rVert^2` in the
   E-form, both from the C x C Grams), and with the sum of its squared
   cosines, which the float32 normalisation moves by about eps each. An
   image where a row falls below :data:`_RECOMPUTE_ULPS` machine epsilons of
   the first, or :data:`_NORMALIZATION_ULPS` epsilons squared of the second
   (where either would cost more than about 1e-4 of the row's value), is
   recomputed in float64 from the raw inputs, forward and backward. That
   covers unequal channel counts (a teacher with extra zero channels, or an
   orthogonal mix of the student's), equal ones that agree only up to a
   rotation of the channels, and close, correlated maps with many channels. What remains
   below :data:`_ZERO_ULPS` epsilons in the widest precision is zero to that
   precision: it counts as zero, with a zero gradient.

With these, every method stays within 1e-3 (value) and 1e-2 (gradient) of a
float64 dense evaluation for any :math:`\delta` (``tests/test_numerics.py``).

**Non-finite inputs.** A NaN or an infinity in a map makes the normalised
position NaN, which every Gram product of that image spreads: the image's loss
is NaN on every path, never a finite value with a NaN gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from segdistill._features import plain_norm_is_exact, safe_norm

__all__ = ["dense_is_cheaper", "row_distances", "squared_distance", "unit_columns"]

# A row whose value is below this many epsilons of its terms' size (mean per row)
# has lost more than ~1e-4 of its value to cancellation in the working precision:
# its image is recomputed in float64 (2^13 eps = 1e-3 in float32).
_RECOMPUTE_ULPS = 2.0**13
# The normalisation rounds each unit vector's length at ~eps, which moves every
# cosine by ~eps |cos|: a row below (this many eps)^2 of the sum of its squared
# cosines has lost more than ~1e-4 of its value to that (float32: below 1e-6).
_NORMALIZATION_ULPS = 2.0**14
# Below this many epsilons of the terms' size, in the widest precision at hand, a
# row is rounding noise: its true value is zero to that precision.
_ZERO_ULPS = 32.0
# Upper bound on the elements of one dense row block (B x rows x N).
_DENSE_BLOCK_ELEMENTS = 1 << 24
# Elements of one block of the elementwise passes on the CPU (1 MiB in float32), see
# :func:`_column_blocks`.
_BLOCK_ELEMENTS = 1 << 18


def unit_columns(x: Tensor, eps: float) -> Tensor:
    """(B, C, N) -> (B, C, N) with each position's channel vector of unit L2 norm
    (overflow-safe; a zero vector stays zero, a non-finite one becomes NaN)."""
    unit: Tensor = x / safe_norm(x, 1, 2.0, eps)
    return unit


def dense_is_cheaper(n: int, c_s: int, c_t: int, distance: str) -> bool:
    """Compare the multiply-adds per image of the dense and the linear algorithm.

    Dense: the two N x N products per row block, :math:`N^2 (C_s + C_t)`.
    Linear: the Gram blocks, :math:`N (C_s^2 + C_s C_t + C_t^2)`, and for the
    row-wise L2 distance applying the stacked :math:`(C_s + C_t)^2` Gram to
    every position.
    """
    grams = c_s * c_s + c_s * c_t + c_t * c_t
    linear = n * (grams + ((c_s + c_t) ** 2 if distance == "l2" else 0))
    dense = n * n * (c_s + c_t)
    return dense <= linear


def _wider(dtype: torch.dtype) -> bool:
    """Whether to recompute ill-conditioned images in a wider float than ``dtype``.

    Not under ``torch.compile``: choosing the images is a data-dependent branch,
    which a full graph cannot hold. Compiled code keeps the working precision
    (the E-form still holds it to float32 rounding for equal channel counts).
    """
    return dtype != torch.float64 and not torch.compiler.is_compiling()


def _ill_conditioned(value: Tensor, size: Tensor, scale: Tensor) -> Tensor:
    """Images (a (B,) mask) whose ``value`` (rows (B, N) or totals (B,)) the working
    precision cannot resolve: below :data:`_RECOMPUTE_ULPS` epsilons of the terms'
    ``size`` (cancellation) or below :data:`_NORMALIZATION_ULPS` epsilons squared of
    the squared cosines' ``scale`` (normalisation rounding)."""
    eps = torch.finfo(value.dtype).eps
    bad = (value < _RECOMPUTE_ULPS * eps * size) | (
        value < (_NORMALIZATION_ULPS * eps) ** 2 * scale)
    return bad.any(1) if bad.ndim == 2 else bad


_Terms = dict[str, Tensor]


def _refined_terms(compute: Callable[[Tensor, Tensor], _Terms], x_s: Tensor, x_t: Tensor
                   ) -> tuple[Tensor, Tensor, _Terms, Tensor, _Terms | None]:
    """``compute(x_s, x_t)``, whose terms hold the ``'value'`` (rows (B, N) or totals
    (B,)) with the ``'size'`` and ``'scale'`` of :func:`_ill_conditioned` (broadcastable
    to it), with the ill-conditioned images recomputed in float64.

    Returns ``(value, keep, terms, index, wide)``: the value, the mask of entries above
    rounding noise (in the widest precision used; NaN counts as kept), the
    working-precision terms, the images recomputed and their float64 terms (``None``
    if there are none).
    """
    terms = compute(x_s, x_t)
    value, size = terms["value"], terms["size"]
    eps = torch.finfo(value.dtype).eps
    index = value.new_empty(0, dtype=torch.long)
    wide = None
    if _wider(value.dtype):
        index = _ill_conditioned(value, size, terms["scale"]).nonzero().squeeze(1)
    if index.numel():
        wide = compute(x_s[index].double(), x_t[index].double())
        value = value.index_copy(0, index, wide["value"].to(value.dtype))
        size = size.index_copy(0, index, wide["size"].to(value.dtype))
        eps = torch.finfo(torch.float64).eps
    keep = ~(value <= _ZERO_ULPS * eps * size)  # NaN stays NaN
    return value, keep, terms, index, wide


def _refined(compute: Callable[[Tensor, Tensor], _Terms], x_s: Tensor, x_t: Tensor) -> Tensor:
    """:func:`_refined_terms`' value, with rounding noise set to zero (autograd paths)."""
    value, keep, *_ = _refined_terms(compute, x_s, x_t)
    return torch.where(keep, value, torch.zeros_like(value))


def _frobenius_dot(a: Tensor, b: Tensor) -> Tensor:
    """:math:`\\langle A, B \\rangle_F` per image, (B, C, C') x (B, C, C') -> (B,)."""
    return (a * b).sum((1, 2))


# ------------------------------------------------------------------- shared building blocks


def _buffered() -> bool:
    """Whether to write into preallocated buffers (``out=``, in place): not under
    autograd (a graph-building recomputation for double backward) nor under
    ``torch.compile``, which traces plain out-of-place ops and fuses them itself."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _column_blocks(x: Tensor) -> Iterator[slice]:
    """Slices of the last dimension of a (B, C, N) tensor for elementwise passes.

    On the CPU, blocks of columns whose B x C x width slices stay in the cache
    (:data:`_BLOCK_ELEMENTS` elements): a pass that reads, combines and writes a
    block before moving on never sends its temporaries to memory, and on a
    memory-bound CPU a fresh full-size buffer costs about as much as the pass
    itself. Elsewhere (CUDA) one block: the caching allocator makes temporaries
    cheap and every launch counts.
    """
    batch, channels, n = x.shape
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        yield slice(None)
        return
    width = max(1, _BLOCK_ELEMENTS // max(1, batch * channels))
    for start in range(0, n, width):
        yield slice(start, start + width)


def _column_dot(a: Tensor, b: Tensor) -> Tensor:
    r"""Per-position dot products :math:`\sum_c a_{c,i} b_{c,i}`: (B, C, N) x (B, C, N)
    -> (B, N), by :func:`_column_blocks` outside autograd."""
    if not _buffered():
        return (a * b).sum(1)
    out = a.new_empty(a.shape[0], a.shape[-1])
    for cols in _column_blocks(a):
        torch.sum(a[..., cols] * b[..., cols], 1, out=out[:, cols])
    return out


def _norms(x: Tensor, eps: float) -> Tensor:
    """:func:`~segdistill._features.safe_norm` along the channels, (B, C, N) -> (B, 1, N).

    Outside autograd the squared norms come from one cache-friendly pass
    (:func:`_column_dot`, several times faster on the CPU than
    ``linalg.vector_norm`` along a strided dimension); where one of them leaves
    the range in which squaring is exact (or is NaN), ``safe_norm``'s scaled
    path takes over. An all-zero vector is the one exception it lets through:
    its divisor is ``eps``, as in ``safe_norm``.
    """
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or eps > 1.0:
        return safe_norm(x, 1, 2.0, eps)
    squared = _column_dot(x, x).unsqueeze(1)
    info = torch.finfo(squared.dtype)
    if plain_norm_is_exact(x, squared, 1, max(eps * eps, info.tiny / info.eps),
                           info.max * info.eps):
        return squared.sqrt().clamp_min(eps)
    return safe_norm(x, 1, 2.0, eps)


def _unit_blocks(x_s: Tensor, x_t: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Normalise both maps into one (B, C_t + C_s, N) buffer ``z`` and return
    ``(z, norm_s, norm_t)``.

    ``z = [T; E]`` with :math:`E = S - T` formed elementwise when the channel
    counts are equal (the E-form), ``z = [T; S]`` otherwise. The norms are
    (B, 1, N). Outside :func:`_buffered` code the buffer is built by ``cat``.
    """
    c_t = x_t.shape[1]
    e_form = x_s.shape[1] == c_t
    norm_s, norm_t = _norms(x_s, eps), _norms(x_t, eps)
    if not _buffered():
        t, s = x_t / norm_t, x_s / norm_s
        return torch.cat([t, s - t if e_form else s], dim=1), norm_s, norm_t
    batch, c_s, n = x_s.shape
    z = x_s.new_empty(batch, c_t + c_s, n)
    t, second = z[:, :c_t], z[:, c_t:]
    for cols in _column_blocks(z):
        t_block = torch.div(x_t[..., cols], norm_t[..., cols], out=t[..., cols])
        block = torch.div(x_s[..., cols], norm_s[..., cols], out=second[..., cols])
        if e_form:
            block.sub_(t_block)
    return z, norm_s, norm_t


def _blocks(*rows: tuple[Tensor, Tensor]) -> Tensor:
    """Stack small (B, C, C') blocks into one matrix, one ``(left, right)`` per block row."""
    return torch.cat([torch.cat(row, dim=2) for row in rows], dim=1)


def _normalization_backward(g: Tensor, x: Tensor, norm: Tensor, factor: float) -> Tensor:
    r"""In place: ``g``, the gradient with respect to the unit vectors
    :math:`u = x / \lVert x \rVert`, becomes ``factor`` times the gradient with
    respect to ``x``, :math:`(g - u\,(u \cdot g)) / \lVert x \rVert`, in one pass
    over :func:`_column_blocks` (``u`` is formed block by block, never whole)."""
    inv = norm.reciprocal()
    for cols in _column_blocks(g):
        block, inv_block = g[..., cols], inv[..., cols]
        unit = x[..., cols] * inv_block
        along = (unit * block).sum(1, keepdim=True)
        block.addcmul_(unit, along, value=-1.0).mul_(inv_block * factor)
    return g


# ----------------------------------------------------------------------------- l2 rows


def _l2_terms(x_s: Tensor, x_t: Tensor, eps: float) -> _Terms:
    r"""Squared row norms :math:`r_i = \lVert d_i \rVert^2` with everything the
    backward pass needs: three C x C Grams and the stacked product
    :math:`P = [TD;\, ED]` (or :math:`[TD;\, SD]`), seven :math:`C^2 N`
    multiply-adds with equal channel counts.

    E-form: with :math:`D = T^\top E + E^\top S` and :math:`S = T + E`,
    :math:`P = \begin{bmatrix} G_{te} & G_{tt} + G_{te} \\ G_{ee} & G_{et} + G_{ee}
    \end{bmatrix} \begin{bmatrix} T \\ E \end{bmatrix}` and
    :math:`r_i = e_i \cdot (TD)_i + s_i \cdot (ED)_i`. Otherwise
    :math:`P = \begin{bmatrix} -G_{tt} & G_{ts} \\ -G_{st} & G_{ss} \end{bmatrix}
    \begin{bmatrix} T \\ S \end{bmatrix}` and :math:`r_i = s_i \cdot (SD)_i - t_i
    \cdot (TD)_i`. :math:`s_i` is read as :math:`x_i / \lVert x_i \rVert`, so
    only ``z`` and ``P`` are stored.
    """
    c_t = x_t.shape[1]
    z, norm_s, norm_t = _unit_blocks(x_s, x_t, eps)
    t, second = z[:, :c_t], z[:, c_t:]
    n = z.shape[-1]
    if x_s.shape[1] == c_t:
        e = second
        g_tt, g_te, g_ee = t @ t.mT, t @ e.mT, e @ e.mT
        p = _blocks((g_te, g_tt + g_te), (g_ee, g_te.mT + g_ee)) @ z  # [TD; ED]
        r = _column_dot(e, p[:, :c_t]) + _column_dot(x_s, p[:, c_t:]) / norm_s.squeeze(1)
        # sum_i ||T'e_i||^2 + ||E's_i||^2 = <G_tt, G_ee> + <G_ee, G_ss>, G_ss = S S'
        g_ss = g_tt + g_te + g_te.mT + g_ee
        size = _frobenius_dot(g_tt, g_ee) + _frobenius_dot(g_ee, g_ss)
    else:
        s = second
        g_tt, g_ts, g_ss = t @ t.mT, t @ s.mT, s @ s.mT
        p = _blocks((-g_tt, g_ts), (-g_ts.mT, g_ss)) @ z  # [TD; SD]
        r = _column_dot(s, p[:, c_t:]) - _column_dot(t, p[:, :c_t])
        # sum_i ||S's_i||^2 + ||T't_i||^2 = ||G_ss||^2 + ||G_tt||^2
        size = g_ss.square().sum((1, 2)) + g_tt.square().sum((1, 2))
    scale = g_ss.square().sum((1, 2)) + g_tt.square().sum((1, 2))
    return {"z": z, "p": p, "value": r, "size": (size / n).unsqueeze(1),
            "scale": (scale / n).unsqueeze(1), "norm_s": norm_s, "norm_t": norm_t}


def _l2_backward(terms: _Terms, gamma: Tensor, x_s: Tensor, x_t: Tensor,
                 need: tuple[bool, bool]) -> tuple[Tensor | None, Tensor | None]:
    r"""Gradients of :math:`\sum_i \gamma_i r_i` with respect to the raw maps.

    With :math:`\Gamma = \mathrm{diag}(\gamma)` and :math:`D = V^\top W` (E-form
    :math:`V = [T; E]`, :math:`W = [E; S]`; otherwise :math:`V = [T; S]`,
    :math:`W = [-T; S]`), :math:`\partial/\partial S = 2\,(SD\,\Gamma + K_s W)`
    and :math:`\partial/\partial T = -2\,(TD\,\Gamma + K_t W)` with
    :math:`K_u = U \Gamma V^\top`: two C x C x N products per side (the second
    applies :math:`K_u W`, rewritten on ``z``), then the normalisation's backward.
    Each side's gradient is built in one fresh buffer.
    """
    c_t = x_t.shape[1]
    e_form = x_s.shape[1] == c_t
    z, p = terms["z"], terms["p"]
    gamma = gamma.unsqueeze(1)
    grads: list[Tensor | None] = []
    for x, norm, factor, wanted in ((x_s, terms["norm_s"], 2.0, need[0]),
                                    (x_t, terms["norm_t"], -2.0, need[1])):
        if not wanted:
            grads.append(None)
            continue
        g = torch.mul(x, gamma / norm)  # U Gamma
        k = g @ z.mT  # U Gamma V'
        k1, k2 = k[..., :c_t], k[..., c_t:]
        # K W on z: E-form k1 E + k2 S = [k2, k1 + k2] [T; E]; else [-k1, k2] [T; S]
        k = torch.cat([k2, k1 + k2] if e_form else [-k1, k2], dim=-1)
        for cols in _column_blocks(g):  # g = (T D or S D) Gamma
            first, second, weight = p[:, :c_t, cols], p[:, c_t:, cols], gamma[..., cols]
            if x is x_t:  # T D
                torch.mul(first, weight, out=g[..., cols])
            elif e_form:  # S D = T D + E D
                torch.add(first, second, out=g[..., cols]).mul_(weight)
            else:  # S D
                torch.mul(second, weight, out=g[..., cols])
        grads.append(_normalization_backward(g.baddbmm_(k, z), x, norm, factor))
    return grads[0], grads[1]


def _l2_rows(x_s: Tensor, x_t: Tensor, eps: float
             ) -> tuple[Tensor, Tensor, _Terms, Tensor, _Terms | None]:
    """Row norms (B, N) with the float64 recomputation of ill-conditioned images; the
    rest of the tuple as in :func:`_refined_terms`. Below the noise floor a row is
    zero; NaN stays NaN."""
    r, keep, terms, index, wide = _refined_terms(
        lambda a, b: _l2_terms(a, b, eps), x_s, x_t)
    rows = torch.where(keep, torch.where(keep, r, torch.ones_like(r)).sqrt(),
                       torch.zeros_like(r))
    return rows, keep, terms, index, wide


_Grads = tuple[Tensor | None, Tensor | None, None]
_Backward = Callable[[_Terms, Tensor, Tensor, Tensor, tuple[bool, bool]],
                     tuple[Tensor | None, Tensor | None]]


def _second_order(value: Callable[[Tensor, Tensor], Tensor], grad: Tensor, x_s: Tensor,
                  x_t: Tensor, need: tuple[bool, bool]) -> _Grads:
    """The gradients under ``create_graph=True``: differentiate a graph-building
    recomputation ``value(x_s, x_t)`` from the saved inputs, so that second
    derivatives are exact too."""
    inputs = [x for x, wanted in zip((x_s, x_t), need, strict=True) if wanted]
    grads = iter(torch.autograd.grad(value(x_s, x_t), inputs, grad, create_graph=True))
    return (next(grads) if need[0] else None, next(grads) if need[1] else None, None)


def _first_order(backward: _Backward, ctx: Any, gamma: Tensor, x_s: Tensor, x_t: Tensor,
                 index: Tensor, need: tuple[bool, bool]) -> _Grads:
    """``backward`` on the working-precision terms, with the images in ``index``
    replaced by their float64 recomputation."""
    grad_s, grad_t = backward(ctx.terms, gamma, x_s, x_t, need)
    if ctx.wide is not None:
        wide = backward(ctx.wide, gamma[index].double(), x_s[index].double(),
                        x_t[index].double(), need)
        grad_s, grad_t = (g.index_copy(0, index, w.to(g.dtype))
                          if g is not None and w is not None else g
                          for g, w in zip((grad_s, grad_t), wide, strict=True))
    return grad_s, grad_t, None


class _RowNorms(torch.autograd.Function):
    """Row norms :math:`\\lVert d_i \\rVert` from the raw (B, C, N) maps, normalisation
    included, with the hand-written backward pass of :func:`_l2_backward`."""

    @staticmethod
    def forward(ctx: Any, x_s: Tensor, x_t: Tensor, eps: float) -> Tensor:
        rows, keep, terms, index, wide = _l2_rows(x_s, x_t, eps)
        ctx.eps, ctx.device_type = eps, x_s.device.type
        ctx.terms, ctx.wide = terms, wide
        ctx.save_for_backward(x_s, x_t, rows, keep, index)
        return rows

    @staticmethod
    def backward(ctx: Any, grad_rows: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        # backward() may be called inside an autocast region, whose state the backward
        # pass inherits: keep the products in the precision of the saved inputs
        with torch.autocast(device_type=ctx.device_type, enabled=False):
            return _RowNorms._backward(ctx, grad_rows)

    @staticmethod
    def _backward(ctx: Any, grad_rows: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x_s, x_t, rows, keep, index = ctx.saved_tensors
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        if torch.is_grad_enabled():
            return _second_order(lambda a, b: _l2_rows(a, b, ctx.eps)[0], grad_rows, x_s, x_t,
                                 need)
        # d rows_i / d r_i = 1 / (2 rows_i); zero where the row counts as zero
        gamma = torch.where(keep, grad_rows / torch.where(keep, 2 * rows, torch.ones_like(rows)),
                            torch.zeros_like(rows))
        return _first_order(_l2_backward, ctx, gamma, x_s, x_t, index, need)


# ------------------------------------------------------------------------- squared form


def _squared_terms(x_s: Tensor, x_t: Tensor, eps: float) -> _Terms:
    r""":math:`\lVert S^\top S - T^\top T\rVert_F^2` per image from the three C x C
    Grams, the size of the terms it is the sum of and the sum of the squared
    cosines (see :func:`_refined`), with ``z`` and the Grams for the backward pass."""
    c_t = x_t.shape[1]
    z, norm_s, norm_t = _unit_blocks(x_s, x_t, eps)
    t, second = z[:, :c_t], z[:, c_t:]
    if x_s.shape[1] == c_t:
        e = second
        g_tt, g_te, g_ee = t @ t.mT, t @ e.mT, e @ e.mT
        # ||T'E + E'S||_F^2 with S = T + E, all terms O(delta^2)
        g_ss = g_tt + g_te + g_te.mT + g_ee
        value = (2 * _frobenius_dot(g_tt, g_ee) + 4 * _frobenius_dot(g_te, g_ee)
                 + _frobenius_dot(g_ee, g_ee) + 2 * _frobenius_dot(g_te, g_te.mT))
        size = _frobenius_dot(g_tt, g_ee) + _frobenius_dot(g_ee, g_ss)
        scale = g_ss.square().sum((1, 2)) + g_tt.square().sum((1, 2))
        grams = (g_tt, g_te, g_ee)
    else:
        s = second
        g_tt, g_ts, g_ss = t @ t.mT, t @ s.mT, s @ s.mT
        size = scale = g_ss.square().sum((1, 2)) + g_tt.square().sum((1, 2))
        # sum_i s_i' G s_i = trace(S' G S) = trace(G S S') = ||G||_F^2
        value = scale - 2 * g_ts.square().sum((1, 2))
        grams = (g_tt, g_ts, g_ss)
    return {"value": value, "size": size, "scale": scale, "z": z, "norm_s": norm_s,
            "norm_t": norm_t, "g1": grams[0], "g2": grams[1], "g3": grams[2]}


def _squared_backward(terms: _Terms, gamma: Tensor, x_s: Tensor, x_t: Tensor,
                      need: tuple[bool, bool]) -> tuple[Tensor | None, Tensor | None]:
    r"""Gradients of :math:`\sum_b \gamma_b \lVert D_b \rVert_F^2`: :math:`4\,SD` and
    :math:`-4\,TD`, one C x 2C x N product per side on ``z`` (E-form
    :math:`SD = [G_{te} + G_{ee},\ G_{ss}]\,[T; E]` and
    :math:`TD = [G_{te},\ G_{tt} + G_{te}]\,[T; E]`; otherwise
    :math:`SD = [-G_{st},\ G_{ss}]\,[T; S]` and :math:`TD = [-G_{tt},\ G_{ts}]\,[T; S]`),
    with :math:`4\gamma` folded into the small matrix, then the normalisation's
    backward."""
    z, g1, g2, g3 = terms["z"], terms["g1"], terms["g2"], terms["g3"]
    weight = 4 * gamma.view(-1, 1, 1)
    if x_s.shape[1] == x_t.shape[1]:  # g1, g2, g3 = G_tt, G_te, G_ee
        on_s = (g2 + g3, g1 + g2 + g2.mT + g3)
        on_t = (g2, g1 + g2)
    else:  # g1, g2, g3 = G_tt, G_ts, G_ss
        on_s = (-g2.mT, g3)
        on_t = (-g1, g2)
    grads: list[Tensor | None] = []
    for x, norm, blocks, factor, wanted in ((x_s, terms["norm_s"], on_s, 1.0, need[0]),
                                            (x_t, terms["norm_t"], on_t, -1.0, need[1])):
        g = (torch.cat(blocks, dim=2) * weight) @ z if wanted else None
        grads.append(None if g is None else _normalization_backward(g, x, norm, factor))
    return grads[0], grads[1]


class _SquaredDistance(torch.autograd.Function):
    """:math:`\\lVert S^\\top S - T^\\top T\\rVert_F^2` per image from the raw (B, C, N)
    maps, with the float64 recomputation of :func:`_refined` and the hand-written
    backward pass of :func:`_squared_backward`."""

    @staticmethod
    def forward(ctx: Any, x_s: Tensor, x_t: Tensor, eps: float) -> Tensor:
        value, keep, terms, index, wide = _refined_terms(
            lambda a, b: _squared_terms(a, b, eps), x_s, x_t)
        ctx.eps, ctx.device_type, ctx.terms, ctx.wide = eps, x_s.device.type, terms, wide
        ctx.save_for_backward(x_s, x_t, keep, index)
        return torch.where(keep, value, torch.zeros_like(value))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        with torch.autocast(device_type=ctx.device_type, enabled=False):  # as in _RowNorms
            return _SquaredDistance._backward(ctx, grad)

    @staticmethod
    def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x_s, x_t, keep, index = ctx.saved_tensors
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        if torch.is_grad_enabled():
            return _second_order(lambda a, b: _refined(
                lambda c, d: _squared_terms(c, d, ctx.eps), a, b), grad, x_s, x_t, need)
        gamma = torch.where(keep, grad, torch.zeros_like(grad))
        return _first_order(_squared_backward, ctx, gamma, x_s, x_t, index, need)


# ---------------------------------------------------------------------------- dense form


def _dense_terms(x_s: Tensor, x_t: Tensor, eps: float, chunk_size: int | None,
                 squared: bool) -> _Terms:
    """Rows of :math:`D` in blocks (E-form with equal channels): squared row norms
    (B, N), or with ``squared`` their sum (B,); with the size of the two products
    each row is the sum of, and the bound :math:`2N` on the squared cosines."""
    s, t = unit_columns(x_s, eps), unit_columns(x_t, eps)
    e = s - t if s.shape[1] == t.shape[1] else None
    batch, _, n = s.shape
    rows = chunk_size or max(1, _DENSE_BLOCK_ELEMENTS // max(1, batch * n))
    values, sizes = [], []
    for start in range(0, n, rows):
        block = slice(start, min(start + rows, n))
        if e is None:
            first, second = s[:, :, block].mT @ s, -(t[:, :, block].mT @ t)
        else:  # D = T'E + E'S
            first, second = t[:, :, block].mT @ e, e[:, :, block].mT @ s
        values.append((first + second).square().sum(-1))
        with torch.no_grad():
            sizes.append(first.square().sum(-1) + second.square().sum(-1))
    value, size = torch.cat(values, dim=1), torch.cat(sizes, dim=1)
    scale = torch.full_like(size, 2.0 * n)
    if squared:
        value, size, scale = value.sum(1), size.sum(1), scale.sum(1)
    return {"value": value, "size": size, "scale": scale}


class _OwnGraph(torch.autograd.Function):
    """``fn(x_s, x_t)`` differentiated on an autograd graph of its own, whose backward
    pass runs with autocast off.

    The dense path is differentiated by autograd, and autograd's matmul backward
    follows the autocast state of the code that calls ``backward()``: inside a
    bf16 region its gradients would be rounded to bf16 although the forward pass
    ran in float32. Under ``create_graph=True`` the graph is rebuilt from the
    inputs (:func:`_second_order`), so second derivatives stay exact.
    """

    @staticmethod
    def forward(ctx: Any, fn: Callable[[Tensor, Tensor], Tensor], x_s: Tensor,
                x_t: Tensor) -> Tensor:
        leaves = [x.detach().requires_grad_(x.requires_grad) for x in (x_s, x_t)]
        with torch.enable_grad():
            out = fn(*leaves)
        ctx.fn, ctx.out, ctx.leaves, ctx.device_type = fn, out, leaves, x_s.device.type
        ctx.save_for_backward(x_s, x_t)
        return out.detach()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor | None, Tensor | None]:
        x_s, x_t = ctx.saved_tensors
        need = (ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        with torch.autocast(device_type=ctx.device_type, enabled=False):
            if torch.is_grad_enabled():
                grad_s, grad_t, _ = _second_order(ctx.fn, grad, x_s, x_t, need)
                return None, grad_s, grad_t
            inputs = [x for x, wanted in zip(ctx.leaves, need, strict=True) if wanted]
            out, ctx.out = ctx.out, None  # freed as it is differentiated, as autograd does
            if out is None:  # a second backward pass (the caller retained the graph)
                with torch.enable_grad():
                    out = ctx.fn(*ctx.leaves)
            grads = iter(torch.autograd.grad(out, inputs, grad))
            return None, next(grads) if need[0] else None, next(grads) if need[1] else None


def _own_graph(fn: Callable[[Tensor, Tensor], Tensor], x_s: Tensor, x_t: Tensor) -> Tensor:
    """:class:`_OwnGraph` where there is a gradient to take and nothing compiles."""
    if torch.compiler.is_compiling() or not (
            torch.is_grad_enabled() and (x_s.requires_grad or x_t.requires_grad)):
        return fn(x_s, x_t)
    out: Tensor = _OwnGraph.apply(fn, x_s, x_t)
    return out


def _dense(x_s: Tensor, x_t: Tensor, eps: float, chunk_size: int | None,
           squared: bool) -> Tensor:
    """The dense form: :func:`_dense_terms` refined (:func:`_refined`), on a graph of
    its own (:func:`_own_graph`)."""
    return _own_graph(lambda a, b: _refined(
        lambda c, d: _dense_terms(c, d, eps, chunk_size, squared), a, b), x_s, x_t)


def _safe_sqrt(r: Tensor) -> Tensor:
    """Square root whose gradient is zero (not infinite) where ``r`` is zero."""
    live = (r > 0) | r.isnan()  # NaN stays NaN
    root = torch.where(live, r, torch.ones_like(r)).sqrt()
    return torch.where(live, root, torch.zeros_like(r))


def _use_dense(x_s: Tensor, x_t: Tensor, distance: str, method: str) -> bool:
    return method == "dense" or (
        method == "auto"
        and dense_is_cheaper(x_s.shape[-1], x_s.shape[1], x_t.shape[1], distance)
    )


def row_distances(x_s: Tensor, x_t: Tensor, *, eps: float, method: str,
                  chunk_size: int | None = None) -> Tensor:
    """:math:`\\lVert d_i \\rVert = N \\lVert A^s_i - A^t_i \\rVert_2` per image and row.

    Args:
        x_s: the student's raw features, flattened.
        x_t: the teacher's raw features, flattened.
        eps: the zero-vector guard of :func:`~segdistill._features.safe_norm`.
        method: ``'auto'``, ``'dense'`` or ``'linear'``.
        chunk_size: rows per dense block.

    Shape:
        - x_s: :math:`(B, C_s, N)`; x_t: :math:`(B, C_t, N)`; output: :math:`(B, N)`.
    """
    if _use_dense(x_s, x_t, "l2", method):
        return _safe_sqrt(_dense(x_s, x_t, eps, chunk_size, squared=False))
    rows: Tensor = _RowNorms.apply(x_s, x_t, eps)
    return rows


def squared_distance(x_s: Tensor, x_t: Tensor, *, eps: float, method: str,
                     chunk_size: int | None = None) -> Tensor:
    """:math:`\\lVert S^\\top S - T^\\top T \\rVert_F^2 = N^2 \\sum_i \\lVert A^s_i - A^t_i
    \\rVert_2^2` per image; arguments as in :func:`row_distances`.

    Shape:
        - x_s: :math:`(B, C_s, N)`; x_t: :math:`(B, C_t, N)`; output: :math:`(B,)`.
    """
    if _use_dense(x_s, x_t, "squared", method):
        return _dense(x_s, x_t, eps, chunk_size, squared=True)
    value: Tensor = _SquaredDistance.apply(x_s, x_t, eps)
    return value
