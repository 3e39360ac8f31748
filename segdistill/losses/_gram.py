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

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from segdistill._features import safe_norm

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


def _refined(compute: Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]],
             x_s: Tensor, x_t: Tensor) -> Tensor:
    """``compute(x_s, x_t) -> (value, size, scale)`` with the ill-conditioned images
    recomputed in float64 and rounding noise set to zero (autograd paths)."""
    value, size, scale = compute(x_s, x_t)
    eps = torch.finfo(value.dtype).eps
    if _wider(value.dtype):
        index = _ill_conditioned(value, size, scale).nonzero().squeeze(1)
        if index.numel():
            wide, wide_size, _ = compute(x_s[index].double(), x_t[index].double())
            value = value.index_copy(0, index, wide.to(value.dtype))
            size = size.index_copy(0, index, wide_size.to(value.dtype))
            eps = torch.finfo(torch.float64).eps
    keep = ~(value <= _ZERO_ULPS * eps * size)  # NaN stays NaN
    return torch.where(keep, value, torch.zeros_like(value))


def _frobenius_dot(a: Tensor, b: Tensor) -> Tensor:
    """:math:`\\langle A, B \\rangle_F` per image, (B, C, C') x (B, C, C') -> (B,)."""
    return (a * b).sum((1, 2))


# ----------------------------------------------------------------------------- l2 rows


def _stack_normalized(x_s: Tensor, x_t: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor,
                                                                       Tensor, Tensor]:
    """Normalise both maps into one buffer ``z`` (no copies) and return
    ``(z, V, w, inv_s, inv_t)`` with :math:`D = V^\\top w`.

    E-form (equal C): ``z = [T; E; S]``, ``V = [T; E]``, ``w = [E; S]``.
    Otherwise: ``z = [T; S]``, ``V = z`` and ``w = [-T; S]`` (``w`` is ``z``;
    the sign is applied to the small matrices, see :func:`_signed`).
    Under autograd (the double-backward pass) the buffer is built by ``cat``.
    """
    c_s, c_t = x_s.shape[1], x_t.shape[1]
    d_s, d_t = safe_norm(x_s, 1, 2.0, eps), safe_norm(x_t, 1, 2.0, eps)
    if torch.is_grad_enabled():
        s, t = x_s / d_s, x_t / d_t
        z = torch.cat([t, s - t, s] if c_s == c_t else [t, s], dim=1)
    else:
        b, _, n = x_s.shape
        z = x_s.new_empty(b, c_t + c_s + (c_t if c_s == c_t else 0), n)
        t, s = z[:, :c_t], z[:, -c_s:]
        torch.div(x_t, d_t, out=t)
        torch.div(x_s, d_s, out=s)
        if c_s == c_t:
            torch.sub(s, t, out=z[:, c_t:2 * c_t])
    v, w = (z[:, :2 * c_t], z[:, c_t:]) if c_s == c_t else (z, z)
    return z, v, w, d_s.reciprocal(), d_t.reciprocal()


def _signed(m: Tensor, c_t: int, e_form: bool) -> Tensor:
    """``m @ w`` for the plain form's ``w = [-T; S]``: negate the first C_t columns."""
    if e_form:
        return m
    return torch.cat([-m[..., :c_t], m[..., c_t:]], dim=-1)


def _l2_terms(x_s: Tensor, x_t: Tensor, eps: float) -> dict[str, Tensor]:
    """Squared row norms :math:`r_i = \\lVert d_i \\rVert^2` with everything the
    backward pass needs: three C x C Grams and the stacked product
    :math:`(VV^\\top) w = [TD; ED]` (or :math:`[TD; SD]`), seven :math:`C^2 N`
    multiply-adds with equal channel counts."""
    c_s, c_t = x_s.shape[1], x_t.shape[1]
    e_form = c_s == c_t
    z, v, w, inv_s, inv_t = _stack_normalized(x_s, x_t, eps)
    t, s = z[:, :c_t], z[:, -c_s:]
    n = z.shape[-1]
    if e_form:
        e = z[:, c_t:2 * c_t]
        g_tt, g_te, g_ee = t @ t.mT, t @ e.mT, e @ e.mT
        gram = torch.cat([torch.cat([g_tt, g_te], 2), torch.cat([g_te.mT, g_ee], 2)], 1)
        # sum_i ||T'e_i||^2 + ||E's_i||^2 = <G_tt, G_ee> + <G_ee, G_ss>, G_ss = S S'
        g_ss = g_tt + g_te + g_te.mT + g_ee
        size = _frobenius_dot(g_tt, g_ee) + _frobenius_dot(g_ee, g_ss)
        scale = g_ss.square().sum((1, 2)) + g_tt.square().sum((1, 2))
        td_ed = gram @ w  # [T D; E D]
        r = (w * td_ed).sum(1)
    else:
        g_tt, g_ts, g_ss = t @ t.mT, t @ s.mT, s @ s.mT
        gram = torch.cat([torch.cat([g_tt, g_ts], 2), torch.cat([g_ts.mT, g_ss], 2)], 1)
        # sum_i ||S's_i||^2 + ||T't_i||^2 = ||G_ss||^2 + ||G_tt||^2
        size = scale = g_ss.square().sum((1, 2)) + g_tt.square().sum((1, 2))
        td_ed = _signed(gram, c_t, False) @ z  # [T D; S D]
        prod = z * td_ed
        r = prod[:, c_t:].sum(1) - prod[:, :c_t].sum(1)
    return {"z": z, "v": v, "w": w, "td": td_ed, "r": r, "size": size / n, "scale": scale / n,
            "inv_s": inv_s, "inv_t": inv_t}


def _l2_backward(terms: dict[str, Tensor], grad_r: Tensor, c_s: int, c_t: int,
                 need: tuple[bool, bool]) -> tuple[Tensor | None, Tensor | None]:
    r"""Gradients of :math:`\sum_i \gamma_i r_i` with respect to the raw maps.

    With :math:`\Gamma = \mathrm{diag}(\gamma)`, :math:`\partial/\partial S =
    2\,(SD\,\Gamma + S\Gamma V^\top w)` and :math:`\partial/\partial T =
    -2\,(TD\,\Gamma + T\Gamma V^\top w)`: four C x C x N products per side,
    then the normalisation's backward :math:`(g - s\,(s \cdot g)) / \lVert x\rVert`.
    """
    e_form = c_s == c_t
    z, v, w, td_ed = terms["z"], terms["v"], terms["w"], terms["td"]
    t, s = z[:, :c_t], z[:, -c_s:]
    gamma = grad_r.unsqueeze(1)
    td = td_ed[:, :c_t]
    # S D = T D + E D in the E-form; the plain form's second block is S D itself
    sd = td + td_ed[:, c_t:] if e_form else td_ed[:, c_t:]
    grads: list[Tensor | None] = []
    for unit, xd, inv, sign, wanted in ((s, sd, terms["inv_s"], 2.0, need[0]),
                                        (t, td, terms["inv_t"], -2.0, need[1])):
        if not wanted:
            grads.append(None)
            continue
        k = _signed((unit * gamma) @ v.mT, c_t, e_form)
        g = torch.baddbmm(xd * gamma, k, w)
        # the normalisation's backward, with the factor 2 and the sign folded in
        dot = (unit * g).sum(1, keepdim=True)
        grads.append(torch.addcmul(g, unit, dot, value=-1.0).mul_(sign * inv))
    return grads[0], grads[1]


def _l2_rows(x_s: Tensor, x_t: Tensor, eps: float) -> tuple[Tensor, Tensor, dict[str, Tensor],
                                                            Tensor, dict[str, Tensor] | None]:
    """Row norms with the float64 recomputation of ill-conditioned images.

    Returns ``(rows, keep, terms, index, wide_terms)``: the norms (B, N), the
    mask of rows above rounding noise, the working-precision terms, the images
    recomputed in float64 and their terms (``None`` if there are none).
    """
    terms = _l2_terms(x_s, x_t, eps)
    r, size = terms["r"], terms["size"].unsqueeze(1)
    eps_r = torch.finfo(r.dtype).eps
    index = r.new_empty(0, dtype=torch.long)
    wide = None
    if _wider(r.dtype):
        index = _ill_conditioned(r, size, terms["scale"].unsqueeze(1)).nonzero().squeeze(1)
    if index.numel():
        wide = _l2_terms(x_s[index].double(), x_t[index].double(), eps)
        r = r.index_copy(0, index, wide["r"].to(r.dtype))
        size = size.index_copy(0, index, wide["size"].unsqueeze(1).to(r.dtype))
        eps_r = torch.finfo(torch.float64).eps
    # Below the noise floor (of the widest precision used) a row is zero. NaN stays NaN.
    keep = ~(r <= _ZERO_ULPS * eps_r * size)
    rows = torch.where(keep, torch.where(keep, r, torch.ones_like(r)).sqrt(),
                       torch.zeros_like(r))
    return rows, keep, terms, index, wide


class _RowNorms(torch.autograd.Function):
    """Row norms :math:`\\lVert d_i \\rVert` from the raw (B, C, N) maps, normalisation
    included, with the hand-written backward pass of :func:`_l2_backward`."""

    @staticmethod
    def forward(ctx: Any, x_s: Tensor, x_t: Tensor, eps: float) -> Tensor:
        rows, keep, terms, index, wide = _l2_rows(x_s, x_t, eps)
        ctx.eps = eps
        ctx.terms, ctx.wide = terms, wide
        ctx.save_for_backward(x_s, x_t, rows, keep, index)
        return rows

    @staticmethod
    def backward(ctx: Any, grad_rows: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x_s, x_t, rows, keep, index = ctx.saved_tensors
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        if torch.is_grad_enabled():
            # create_graph=True: differentiate a graph-building recomputation from
            # the saved inputs, so that second derivatives are exact too.
            inputs = [x for x, wanted in zip((x_s, x_t), need, strict=True) if wanted]
            grads = iter(torch.autograd.grad(_l2_rows(x_s, x_t, ctx.eps)[0], inputs, grad_rows,
                                             create_graph=True))
            return (next(grads) if need[0] else None, next(grads) if need[1] else None, None)
        c_s, c_t = x_s.shape[1], x_t.shape[1]
        # d rows_i / d r_i = 1 / (2 rows_i); zero where the row counts as zero
        gamma = torch.where(keep, grad_rows / torch.where(keep, 2 * rows, torch.ones_like(rows)),
                            torch.zeros_like(rows))
        grad_s, grad_t = _l2_backward(ctx.terms, gamma, c_s, c_t, need)
        if ctx.wide is not None:
            wide_s, wide_t = _l2_backward(ctx.wide, gamma[index].double(), c_s, c_t, need)
            if grad_s is not None and wide_s is not None:
                grad_s = grad_s.index_copy(0, index, wide_s.to(grad_s.dtype))
            if grad_t is not None and wide_t is not None:
                grad_t = grad_t.index_copy(0, index, wide_t.to(grad_t.dtype))
        return grad_s, grad_t, None


# ------------------------------------------------------------------------- squared form


class _SymmetricGram(torch.autograd.Function):
    """:math:`XX^\\top` whose backward is one product, :math:`(G + G^\\top) X`."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x @ x.mT

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        out: Tensor = (grad + grad.mT) @ x
        return out


def _gram(x: Tensor) -> Tensor:
    out: Tensor = _SymmetricGram.apply(x)
    return out


def _squared_terms(x_s: Tensor, x_t: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    r""":math:`\lVert S^\top S - T^\top T\rVert_F^2` per image, the size of the
    terms it is the sum of, and the sum of the squared cosines (see :func:`_refined`)."""
    s, t = unit_columns(x_s, eps), unit_columns(x_t, eps)
    if s.shape[1] == t.shape[1]:
        e = s - t
        g_tt, g_te, g_ee = _gram(t), t @ e.mT, _gram(e)
        # ||T'E + E'S||_F^2 with S = T + E, all terms O(delta^2)
        g_ss = g_tt + g_te + g_te.mT + g_ee
        value = (2 * _frobenius_dot(g_tt, g_ee) + 4 * _frobenius_dot(g_te, g_ee)
                 + _frobenius_dot(g_ee, g_ee) + 2 * _frobenius_dot(g_te, g_te.mT))
        size = _frobenius_dot(g_tt, g_ee) + _frobenius_dot(g_ee, g_ss)
        return value, size, g_ss.square().sum((1, 2)) + g_tt.square().sum((1, 2))
    g_ss, g_st, g_tt = _gram(s), s @ t.mT, _gram(t)
    scale = g_ss.square().sum((1, 2)) + g_tt.square().sum((1, 2))
    # sum_i s_i' G s_i = trace(S' G S) = trace(G S S') = ||G||_F^2
    return scale - 2 * g_st.square().sum((1, 2)), scale, scale


# ---------------------------------------------------------------------------- dense form


def _dense_terms(x_s: Tensor, x_t: Tensor, eps: float, chunk_size: int | None,
                 squared: bool) -> tuple[Tensor, Tensor, Tensor]:
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
        return value.sum(1), size.sum(1), scale.sum(1)
    return value, size, scale


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
        return _safe_sqrt(_refined(
            lambda a, b: _dense_terms(a, b, eps, chunk_size, squared=False), x_s, x_t))
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
        return _refined(lambda a, b: _dense_terms(a, b, eps, chunk_size, squared=True),
                        x_s, x_t)
    return _refined(lambda a, b: _squared_terms(a, b, eps), x_s, x_t)
