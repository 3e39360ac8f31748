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

**Names.** :math:`G_{ab} = A B^\top` is the C x C Gram of two (C x N) unit maps,
and the code spells it ``g_ab``: ``g_tt`` :math:`= TT^\top`, ``g_te``
:math:`= TE^\top`, ``g_ee`` :math:`= EE^\top`, ``g_ts`` :math:`= TS^\top`,
``g_ss`` :math:`= SS^\top` (:math:`G_{et} = G_{te}^\top`, :math:`G_{st} =
G_{ts}^\top`). The linear path works in one of two forms, each with types of its
own, so that no name means one thing in one form and another in the other:

- the *E-form* (equal channel counts, :math:`E = S - T`): the unit maps stacked as
  ``t_e`` :math:`= [T; E]` (:class:`_EStack`), the Grams :class:`_EGrams`;
- the *S-form* (unequal channel counts): ``t_s`` :math:`= [T; S]`
  (:class:`_SStack`), the Grams :class:`_SGrams`.

**Cancellation.** Written as :math:`D = S^\top S - T^\top T`, every Gram term is
:math:`O(1)` while :math:`D` is :math:`O(\delta)` when the student's unit
vectors are within :math:`\delta` of the teacher's: in float32 the result
drowns in rounding once :math:`\delta^2` nears the machine epsilon, exactly
where distillation converges. Two measures keep the float32 result as accurate
as the float32 dense form:

1. With equal channel counts, :math:`E = S - T` is formed elementwise and
   :math:`D = T^\top E + E^\top S` (the E-form). Its Gram blocks
   :math:`G_{tt}, G_{te}, G_{ee}` give terms that are all :math:`O(\delta^2)`,
   so nothing large cancels, at the same cost.
2. Every image's result is compared with the size of the terms it came from
   (:math:`\sum_i \lVert S^\top s_i\rVert^2 + \lVert T^\top t_i\rVert^2`, or
   :math:`\sum_i \lVert T^\top e_i\rVert^2 + \lVert E^\top s_i\rVert^2` in the
   E-form, both from the C x C Grams: the ``term_size`` of the terms), and with
   the sum of its squared cosines (``squared_cosines``), which the float32
   normalisation moves by about eps each. An
   image where a row falls below :data:`_RECOMPUTE_ULPS` machine epsilons of
   the first, or :data:`_NORMALIZATION_ULPS` epsilons squared of the second
   (where either would cost more than about 1e-4 of the row's value), is
   recomputed in float64 from the raw inputs, forward and backward
   (:func:`_refine`). That
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
from typing import Any, NamedTuple, TypeVar

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


# ------------------------------------------------------------------------- the terms
#
# Every path computes per image a ``value`` (squared row norms (B, N), or their total
# (B,)) with the two references of :func:`_ill_conditioned`, broadcastable to it:
# ``term_size``, the size of the terms the value is the sum of (cancellation), and
# ``squared_cosines``, the sum of the squared cosines (normalisation rounding), and
# with whatever its backward pass needs.


class _EStack(NamedTuple):
    """E-form unit maps (equal channel counts C), built by :func:`_unit_stack`."""

    t_e: Tensor  # [T; E], (B, 2C, N), with E = S - T formed elementwise
    norm_s: Tensor  # the student's norms at every position, (B, 1, N)
    norm_t: Tensor  # the teacher's, (B, 1, N)


class _SStack(NamedTuple):
    """S-form unit maps (unequal channel counts), built by :func:`_unit_stack`."""

    t_s: Tensor  # [T; S], (B, C_t + C_s, N)
    norm_s: Tensor  # the student's norms at every position, (B, 1, N)
    norm_t: Tensor  # the teacher's, (B, 1, N)


class _EGrams(NamedTuple):
    """The E-form's C x C Grams, (B, C, C) each."""

    g_tt: Tensor  # T T'
    g_te: Tensor  # T E' (its transpose is G_et = E T')
    g_ee: Tensor  # E E'
    g_ss: Tensor  # S S' = G_tt + G_te + G_et + G_ee, S = T + E


class _SGrams(NamedTuple):
    """The S-form's Grams: (B, C_t, C_t), (B, C_t, C_s), (B, C_s, C_s)."""

    g_tt: Tensor  # T T'
    g_ts: Tensor  # T S' (its transpose is G_st = S T')
    g_ss: Tensor  # S S'


class _L2EForm(NamedTuple):
    """:func:`_l2_terms` in the E-form."""

    value: Tensor  # squared row norms r_i, (B, N)
    term_size: Tensor  # (B, 1)
    squared_cosines: Tensor  # (B, 1)
    units: _EStack
    td_ed: Tensor  # [TD; ED], (B, 2C, N)


class _L2SForm(NamedTuple):
    """:func:`_l2_terms` in the S-form."""

    value: Tensor  # squared row norms r_i, (B, N)
    term_size: Tensor  # (B, 1)
    squared_cosines: Tensor  # (B, 1)
    units: _SStack
    td_sd: Tensor  # [TD; SD], (B, C_t + C_s, N)


class _SquaredEForm(NamedTuple):
    """:func:`_squared_terms` in the E-form."""

    value: Tensor  # ||D||_F^2, (B,)
    term_size: Tensor  # (B,)
    squared_cosines: Tensor  # (B,)
    units: _EStack
    grams: _EGrams


class _SquaredSForm(NamedTuple):
    """:func:`_squared_terms` in the S-form."""

    value: Tensor  # ||D||_F^2, (B,)
    term_size: Tensor  # (B,)
    squared_cosines: Tensor  # (B,)
    units: _SStack
    grams: _SGrams


class _DenseTerms(NamedTuple):
    """:func:`_dense_terms`: (B, N) rows, or (B,) totals with ``squared``."""

    value: Tensor
    term_size: Tensor
    squared_cosines: Tensor  # an upper bound, 2N per row


_L2Terms = _L2EForm | _L2SForm
_SquaredTerms = _SquaredEForm | _SquaredSForm
_Terms = _L2Terms | _SquaredTerms | _DenseTerms


class _Refinement(NamedTuple):
    """:func:`_refine`'s result."""

    value: Tensor  # the value, the images in ``wide_index`` from their float64 terms
    keep: Tensor  # entries above rounding noise in the widest precision (NaN: kept)
    terms: _Terms  # the working-precision terms of every image
    wide_index: Tensor  # (k,) the images recomputed in float64
    wide_terms: _Terms | None  # their float64 terms; None if k = 0


def _wider(dtype: torch.dtype) -> bool:
    """Whether to recompute ill-conditioned images in a wider float than ``dtype``.

    Not under ``torch.compile``: choosing the images is a data-dependent branch,
    which a full graph cannot hold. Compiled code keeps the working precision
    (the E-form still holds it to float32 rounding for equal channel counts).
    """
    return dtype != torch.float64 and not torch.compiler.is_compiling()


def _ill_conditioned(value: Tensor, term_size: Tensor, squared_cosines: Tensor) -> Tensor:
    """Images (a (B,) mask) whose ``value`` (rows (B, N) or totals (B,)) the working
    precision cannot resolve: below :data:`_RECOMPUTE_ULPS` epsilons of the terms'
    ``term_size`` (cancellation) or below :data:`_NORMALIZATION_ULPS` epsilons squared
    of the ``squared_cosines`` (normalisation rounding)."""
    eps = torch.finfo(value.dtype).eps
    bad = (value < _RECOMPUTE_ULPS * eps * term_size) | (
        value < (_NORMALIZATION_ULPS * eps) ** 2 * squared_cosines)
    return bad.any(1) if bad.ndim == 2 else bad


def _refine(compute: Callable[[Tensor, Tensor], _Terms], x_s: Tensor, x_t: Tensor
            ) -> _Refinement:
    """``compute(x_s, x_t)``, with the ill-conditioned images (:func:`_ill_conditioned`)
    recomputed in float64 and the entries above rounding noise marked (``keep``)."""
    terms = compute(x_s, x_t)
    value, term_size = terms.value, terms.term_size
    eps = torch.finfo(value.dtype).eps
    wide_index = value.new_empty(0, dtype=torch.long)
    wide_terms = None
    if _wider(value.dtype):
        wide_index = _ill_conditioned(value, term_size, terms.squared_cosines
                                      ).nonzero().squeeze(1)
    if wide_index.numel():
        wide_terms = compute(x_s[wide_index].double(), x_t[wide_index].double())
        value = value.index_copy(0, wide_index, wide_terms.value.to(value.dtype))
        term_size = term_size.index_copy(0, wide_index, wide_terms.term_size.to(value.dtype))
        eps = torch.finfo(torch.float64).eps
    keep = ~(value <= _ZERO_ULPS * eps * term_size)  # NaN stays NaN
    return _Refinement(value, keep, terms, wide_index, wide_terms)


def _refined_value(compute: Callable[[Tensor, Tensor], _Terms], x_s: Tensor, x_t: Tensor
                   ) -> Tensor:
    """:func:`_refine`'s value, with rounding noise set to zero (autograd paths)."""
    refined = _refine(compute, x_s, x_t)
    return torch.where(refined.keep, refined.value, torch.zeros_like(refined.value))


def _frobenius_dot(a: Tensor, b: Tensor) -> Tensor:
    """:math:`\\langle A, B \\rangle_F` per image, (B, C, C') x (B, C, C') -> (B,)."""
    return (a * b).sum((1, 2))


def _squared_cosines(g_ss: Tensor, g_tt: Tensor) -> Tensor:
    r"""The sum of the squared cosines of both maps, :math:`\lVert S^\top S\rVert_F^2 +
    \lVert T^\top T\rVert_F^2 = \lVert G_{ss}\rVert_F^2 + \lVert G_{tt}\rVert_F^2`, (B,)."""
    return g_ss.square().sum((1, 2)) + g_tt.square().sum((1, 2))


def _e_form_term_size(grams: _EGrams) -> Tensor:
    r"""E-form size of the terms, (B,): :math:`\sum_i \lVert T^\top e_i\rVert^2 +
    \lVert E^\top s_i\rVert^2 = \langle G_{tt}, G_{ee}\rangle + \langle G_{ee},
    G_{ss}\rangle`."""
    return _frobenius_dot(grams.g_tt, grams.g_ee) + _frobenius_dot(grams.g_ee, grams.g_ss)


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


def _unit_stack(x_s: Tensor, x_t: Tensor, eps: float) -> _EStack | _SStack:
    """Normalise both maps into one (B, C_t + C_s, N) buffer: ``[T; E]`` with
    :math:`E = S - T` formed elementwise when the channel counts are equal (the
    E-form, :class:`_EStack`), ``[T; S]`` otherwise (:class:`_SStack`).

    Outside :func:`_buffered` code the buffer is built by ``cat``.
    """
    c_t = x_t.shape[1]
    e_form = x_s.shape[1] == c_t
    norm_s, norm_t = _norms(x_s, eps), _norms(x_t, eps)
    if not _buffered():
        t, s = x_t / norm_t, x_s / norm_s
        stack = torch.cat([t, s - t if e_form else s], dim=1)
    else:
        batch, c_s, n = x_s.shape
        stack = x_s.new_empty(batch, c_t + c_s, n)
        t, e_or_s = stack[:, :c_t], stack[:, c_t:]
        for cols in _column_blocks(stack):
            t_block = torch.div(x_t[..., cols], norm_t[..., cols], out=t[..., cols])
            block = torch.div(x_s[..., cols], norm_s[..., cols], out=e_or_s[..., cols])
            if e_form:
                block.sub_(t_block)
    return _EStack(stack, norm_s, norm_t) if e_form else _SStack(stack, norm_s, norm_t)


def _e_grams(t: Tensor, e: Tensor) -> _EGrams:
    """The E-form's Grams from the two halves of ``[T; E]``."""
    g_tt, g_te, g_ee = t @ t.mT, t @ e.mT, e @ e.mT
    return _EGrams(g_tt, g_te, g_ee, g_tt + g_te + g_te.mT + g_ee)


def _s_grams(t: Tensor, s: Tensor) -> _SGrams:
    """The S-form's Grams from the two halves of ``[T; S]``."""
    return _SGrams(t @ t.mT, t @ s.mT, s @ s.mT)


def _block_matrix(*rows: tuple[Tensor, Tensor]) -> Tensor:
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


def _l2_terms(x_s: Tensor, x_t: Tensor, eps: float) -> _L2Terms:
    r"""Squared row norms :math:`r_i = \lVert d_i \rVert^2` with everything the
    backward pass needs: three C x C Grams and the stacked product
    :math:`P = [TD;\, ED]` (``td_ed``, E-form) or :math:`[TD;\, SD]` (``td_sd``,
    S-form), seven :math:`C^2 N` multiply-adds with equal channel counts.

    E-form: with :math:`D = T^\top E + E^\top S` and :math:`S = T + E`,
    :math:`P = \begin{bmatrix} G_{te} & G_{tt} + G_{te} \\ G_{ee} & G_{et} + G_{ee}
    \end{bmatrix} \begin{bmatrix} T \\ E \end{bmatrix}` and
    :math:`r_i = e_i \cdot (TD)_i + s_i \cdot (ED)_i`. S-form:
    :math:`P = \begin{bmatrix} -G_{tt} & G_{ts} \\ -G_{st} & G_{ss} \end{bmatrix}
    \begin{bmatrix} T \\ S \end{bmatrix}` and :math:`r_i = s_i \cdot (SD)_i - t_i
    \cdot (TD)_i`. In the E-form :math:`s_i` is read as :math:`x_i / \lVert x_i
    \rVert`, so only the stack and ``P`` are stored.
    """
    c_t = x_t.shape[1]
    n = x_t.shape[-1]
    units = _unit_stack(x_s, x_t, eps)
    if isinstance(units, _EStack):
        t, e = units.t_e[:, :c_t], units.t_e[:, c_t:]
        e_grams = _e_grams(t, e)
        g_tt, g_te, g_ee = e_grams.g_tt, e_grams.g_te, e_grams.g_ee
        td_ed = _block_matrix((g_te, g_tt + g_te), (g_ee, g_te.mT + g_ee)) @ units.t_e
        td, ed = td_ed[:, :c_t], td_ed[:, c_t:]
        r = _column_dot(e, td) + _column_dot(x_s, ed) / units.norm_s.squeeze(1)
        squared_cosines = _squared_cosines(e_grams.g_ss, g_tt)
        return _L2EForm(r, (_e_form_term_size(e_grams) / n).unsqueeze(1),
                        (squared_cosines / n).unsqueeze(1), units, td_ed)
    t, s = units.t_s[:, :c_t], units.t_s[:, c_t:]
    s_grams = _s_grams(t, s)
    g_tt, g_ts, g_ss = s_grams
    td_sd = _block_matrix((-g_tt, g_ts), (-g_ts.mT, g_ss)) @ units.t_s
    td, sd = td_sd[:, :c_t], td_sd[:, c_t:]
    r = _column_dot(s, sd) - _column_dot(t, td)
    # sum_i ||S's_i||^2 + ||T't_i||^2 = ||G_ss||^2 + ||G_tt||^2: the squared cosines
    squared_cosines = (_squared_cosines(g_ss, g_tt) / n).unsqueeze(1)
    return _L2SForm(r, squared_cosines, squared_cosines, units, td_sd)


def _l2_backward(terms: _L2Terms, gamma: Tensor, x_s: Tensor, x_t: Tensor,
                 need: tuple[bool, bool]) -> tuple[Tensor | None, Tensor | None]:
    r"""Gradients of :math:`\sum_i \gamma_i r_i` with respect to the raw maps.

    With :math:`\Gamma = \mathrm{diag}(\gamma)` and :math:`D = V^\top W` (E-form
    :math:`V = [T; E]`, :math:`W = [E; S]`; S-form :math:`V = [T; S]`,
    :math:`W = [-T; S]`), :math:`\partial/\partial S = 2\,(SD\,\Gamma + K_s W)`
    and :math:`\partial/\partial T = -2\,(TD\,\Gamma + K_t W)` with
    :math:`K_u = U \Gamma V^\top`: two C x C x N products per side (the second
    applies :math:`K_u W`, rewritten on :math:`V`), then the normalisation's backward.
    Each side's gradient is built in one fresh buffer.
    """
    c_t = x_t.shape[1]
    e_form = isinstance(terms, _L2EForm)
    if isinstance(terms, _L2EForm):
        v = terms.units.t_e
        td, ed = terms.td_ed[:, :c_t], terms.td_ed[:, c_t:]
    else:
        v = terms.units.t_s
        td, sd = terms.td_sd[:, :c_t], terms.td_sd[:, c_t:]
    gamma = gamma.unsqueeze(1)
    grads: list[Tensor | None] = []
    for student, x, norm, factor, wanted in (
            (True, x_s, terms.units.norm_s, 2.0, need[0]),
            (False, x_t, terms.units.norm_t, -2.0, need[1])):
        if not wanted:
            grads.append(None)
            continue
        g = torch.mul(x, gamma / norm)  # U Gamma
        k_u = g @ v.mT  # K_u = U Gamma V' = [ku_t, ku_e] or [ku_t, ku_s], ku_x = U Gamma X'
        ku_t = k_u[..., :c_t]
        if e_form:  # K_u W = ku_t E + ku_e S = [ku_e, ku_t + ku_e] [T; E]
            ku_e = k_u[..., c_t:]
            ku_w = torch.cat([ku_e, ku_t + ku_e], dim=-1)
        else:  # K_u W = -ku_t T + ku_s S = [-ku_t, ku_s] [T; S]
            ku_s = k_u[..., c_t:]
            ku_w = torch.cat([-ku_t, ku_s], dim=-1)
        for cols in _column_blocks(g):  # g = (S D or T D) Gamma
            weight, out = gamma[..., cols], g[..., cols]
            if not student:  # T D
                torch.mul(td[..., cols], weight, out=out)
            elif e_form:  # S D = T D + E D
                torch.add(td[..., cols], ed[..., cols], out=out).mul_(weight)
            else:  # S D
                torch.mul(sd[..., cols], weight, out=out)
        grads.append(_normalization_backward(g.baddbmm_(ku_w, v), x, norm, factor))
    return grads[0], grads[1]


def _row_norms(refined: _Refinement) -> Tensor:
    """The row norms :math:`\\sqrt{r_i}` (B, N) of refined :func:`_l2_terms`: zero below
    the noise floor; NaN stays NaN."""
    r, keep = refined.value, refined.keep
    return torch.where(keep, torch.where(keep, r, torch.ones_like(r)).sqrt(),
                       torch.zeros_like(r))


_Grads = tuple[Tensor | None, Tensor | None, None]
_TermsT = TypeVar("_TermsT")


def _second_order(value: Callable[[Tensor, Tensor], Tensor], grad: Tensor, x_s: Tensor,
                  x_t: Tensor, need: tuple[bool, bool]) -> _Grads:
    """The gradients under ``create_graph=True``: differentiate a graph-building
    recomputation ``value(x_s, x_t)`` from the saved inputs, so that second
    derivatives are exact too."""
    inputs = [x for x, wanted in zip((x_s, x_t), need, strict=True) if wanted]
    grads = iter(torch.autograd.grad(value(x_s, x_t), inputs, grad, create_graph=True))
    return (next(grads) if need[0] else None, next(grads) if need[1] else None, None)


def _first_order(backward: Callable[[_TermsT, Tensor, Tensor, Tensor, tuple[bool, bool]],
                                    tuple[Tensor | None, Tensor | None]],
                 terms: _TermsT, wide_terms: _TermsT | None, wide_index: Tensor,
                 gamma: Tensor, x_s: Tensor, x_t: Tensor, need: tuple[bool, bool]) -> _Grads:
    """``backward`` on the working-precision ``terms``, with the images in
    ``wide_index`` replaced by their float64 recomputation from ``wide_terms``."""
    grad_s, grad_t = backward(terms, gamma, x_s, x_t, need)
    if wide_terms is not None:
        wide = backward(wide_terms, gamma[wide_index].double(), x_s[wide_index].double(),
                        x_t[wide_index].double(), need)
        grad_s, grad_t = (g.index_copy(0, wide_index, w.to(g.dtype))
                          if g is not None and w is not None else g
                          for g, w in zip((grad_s, grad_t), wide, strict=True))
    return grad_s, grad_t, None


class _RowNorms(torch.autograd.Function):
    """Row norms :math:`\\lVert d_i \\rVert` from the raw (B, C, N) maps, normalisation
    included, with the hand-written backward pass of :func:`_l2_backward`."""

    @staticmethod
    def forward(ctx: Any, x_s: Tensor, x_t: Tensor, eps: float) -> Tensor:
        refined = _refine(lambda a, b: _l2_terms(a, b, eps), x_s, x_t)
        rows = _row_norms(refined)
        ctx.eps, ctx.device_type = eps, x_s.device.type
        ctx.terms, ctx.wide_terms = refined.terms, refined.wide_terms
        ctx.save_for_backward(x_s, x_t, rows, refined.keep, refined.wide_index)
        return rows

    @staticmethod
    def backward(ctx: Any, grad_rows: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        # backward() may be called inside an autocast region, whose state the backward
        # pass inherits: keep the products in the precision of the saved inputs
        with torch.autocast(device_type=ctx.device_type, enabled=False):
            return _RowNorms._backward(ctx, grad_rows)

    @staticmethod
    def _backward(ctx: Any, grad_rows: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x_s, x_t, rows, keep, wide_index = ctx.saved_tensors
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        if torch.is_grad_enabled():
            return _second_order(lambda a, b: _row_norms(_refine(
                lambda c, d: _l2_terms(c, d, ctx.eps), a, b)), grad_rows, x_s, x_t, need)
        # d rows_i / d r_i = 1 / (2 rows_i); zero where the row counts as zero
        gamma = torch.where(keep, grad_rows / torch.where(keep, 2 * rows, torch.ones_like(rows)),
                            torch.zeros_like(rows))
        return _first_order(_l2_backward, ctx.terms, ctx.wide_terms, wide_index, gamma,
                            x_s, x_t, need)


# ------------------------------------------------------------------------- squared form


def _squared_terms(x_s: Tensor, x_t: Tensor, eps: float) -> _SquaredTerms:
    r""":math:`\lVert S^\top S - T^\top T\rVert_F^2` per image from the three C x C
    Grams, the size of the terms it is the sum of and the sum of the squared
    cosines (see :func:`_refine`), with the unit stack and the Grams for the backward
    pass."""
    c_t = x_t.shape[1]
    units = _unit_stack(x_s, x_t, eps)
    if isinstance(units, _EStack):
        grams = _e_grams(units.t_e[:, :c_t], units.t_e[:, c_t:])
        g_tt, g_te, g_ee = grams.g_tt, grams.g_te, grams.g_ee
        # ||T'E + E'S||_F^2 with S = T + E, all terms O(delta^2)
        value = (2 * _frobenius_dot(g_tt, g_ee) + 4 * _frobenius_dot(g_te, g_ee)
                 + _frobenius_dot(g_ee, g_ee) + 2 * _frobenius_dot(g_te, g_te.mT))
        return _SquaredEForm(value, _e_form_term_size(grams),
                             _squared_cosines(grams.g_ss, g_tt), units, grams)
    s_grams = _s_grams(units.t_s[:, :c_t], units.t_s[:, c_t:])
    squared_cosines = _squared_cosines(s_grams.g_ss, s_grams.g_tt)
    # sum_i s_i' G s_i = trace(S' G S) = trace(G S S') = ||G||_F^2: the terms' size is
    # the squared cosines
    value = squared_cosines - 2 * s_grams.g_ts.square().sum((1, 2))
    return _SquaredSForm(value, squared_cosines, squared_cosines, units, s_grams)


def _squared_backward(terms: _SquaredTerms, gamma: Tensor, x_s: Tensor, x_t: Tensor,
                      need: tuple[bool, bool]) -> tuple[Tensor | None, Tensor | None]:
    r"""Gradients of :math:`\sum_b \gamma_b \lVert D_b \rVert_F^2`: :math:`4\,SD` and
    :math:`-4\,TD`, one C x 2C x N product per side on the unit stack (E-form
    :math:`SD = [G_{te} + G_{ee},\ G_{ss}]\,[T; E]` and
    :math:`TD = [G_{te},\ G_{tt} + G_{te}]\,[T; E]`; S-form
    :math:`SD = [-G_{st},\ G_{ss}]\,[T; S]` and :math:`TD = [-G_{tt},\ G_{ts}]\,[T; S]`),
    with :math:`4\gamma` folded into the small matrix, then the normalisation's
    backward."""
    weight = 4 * gamma.view(-1, 1, 1)
    if isinstance(terms, _SquaredEForm):
        stack, e_grams = terms.units.t_e, terms.grams
        on_s = (e_grams.g_te + e_grams.g_ee, e_grams.g_ss)  # SD on [T; E]
        on_t = (e_grams.g_te, e_grams.g_tt + e_grams.g_te)  # TD on [T; E]
    else:
        stack, s_grams = terms.units.t_s, terms.grams
        on_s = (-s_grams.g_ts.mT, s_grams.g_ss)  # SD on [T; S]
        on_t = (-s_grams.g_tt, s_grams.g_ts)  # TD on [T; S]
    grads: list[Tensor | None] = []
    for x, norm, blocks, factor, wanted in ((x_s, terms.units.norm_s, on_s, 1.0, need[0]),
                                            (x_t, terms.units.norm_t, on_t, -1.0, need[1])):
        g = (torch.cat(blocks, dim=2) * weight) @ stack if wanted else None
        grads.append(None if g is None else _normalization_backward(g, x, norm, factor))
    return grads[0], grads[1]


class _SquaredDistance(torch.autograd.Function):
    """:math:`\\lVert S^\\top S - T^\\top T\\rVert_F^2` per image from the raw (B, C, N)
    maps, with the float64 recomputation of :func:`_refine` and the hand-written
    backward pass of :func:`_squared_backward`."""

    @staticmethod
    def forward(ctx: Any, x_s: Tensor, x_t: Tensor, eps: float) -> Tensor:
        refined = _refine(lambda a, b: _squared_terms(a, b, eps), x_s, x_t)
        ctx.eps, ctx.device_type = eps, x_s.device.type
        ctx.terms, ctx.wide_terms = refined.terms, refined.wide_terms
        ctx.save_for_backward(x_s, x_t, refined.keep, refined.wide_index)
        return torch.where(refined.keep, refined.value, torch.zeros_like(refined.value))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        with torch.autocast(device_type=ctx.device_type, enabled=False):  # as in _RowNorms
            return _SquaredDistance._backward(ctx, grad)

    @staticmethod
    def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x_s, x_t, keep, wide_index = ctx.saved_tensors
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        if torch.is_grad_enabled():
            return _second_order(lambda a, b: _refined_value(
                lambda c, d: _squared_terms(c, d, ctx.eps), a, b), grad, x_s, x_t, need)
        gamma = torch.where(keep, grad, torch.zeros_like(grad))
        return _first_order(_squared_backward, ctx.terms, ctx.wide_terms, wide_index, gamma,
                            x_s, x_t, need)


# ---------------------------------------------------------------------------- dense form


def _dense_terms(x_s: Tensor, x_t: Tensor, eps: float, chunk_size: int | None,
                 squared: bool) -> _DenseTerms:
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
        if e is None:  # D = S'S - T'T
            first, second = s[:, :, block].mT @ s, -(t[:, :, block].mT @ t)
        else:  # D = T'E + E'S
            first, second = t[:, :, block].mT @ e, e[:, :, block].mT @ s
        values.append((first + second).square().sum(-1))
        with torch.no_grad():
            sizes.append(first.square().sum(-1) + second.square().sum(-1))
    value, term_size = torch.cat(values, dim=1), torch.cat(sizes, dim=1)
    squared_cosines = torch.full_like(term_size, 2.0 * n)
    if squared:
        value, term_size, squared_cosines = (
            value.sum(1), term_size.sum(1), squared_cosines.sum(1))
    return _DenseTerms(value, term_size, squared_cosines)


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
    """The dense form: :func:`_dense_terms` refined (:func:`_refined_value`), on a graph of
    its own (:func:`_own_graph`)."""
    return _own_graph(lambda a, b: _refined_value(
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
