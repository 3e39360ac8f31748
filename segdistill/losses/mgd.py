r"""Masked generative distillation (Yang et al., ECCV 2022)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from segdistill._checks import check_feature_map, check_feature_pair, check_positive_int, check_real
from segdistill._features import Resize, align_grids, check_resize, full_precision
from segdistill._reduction import Reduction, check_reduction, nan_where_nonfinite, reduce_loss

__all__ = ["MGDLoss", "mgd_loss", "random_mask"]

_SAME_CHANNELS = ("; MGDLoss(student_channels, teacher_channels) adds the 1x1 convolution "
                  "that maps one onto the other")


def _check_mask_ratio(mask_ratio: float) -> float:
    ratio = check_real("mask_ratio", mask_ratio, minimum=0.0)
    if ratio > 1.0:
        raise ValueError(f"mask_ratio must be at most 1.0, got {ratio}")
    return ratio


def _draw_mask(features: Tensor, mask_ratio: float, rng: torch.Generator | None) -> Tensor:
    """:func:`random_mask` with its arguments already validated."""
    b, _, h, w = features.shape
    if rng is not None and rng.device != features.device:
        raise ValueError(f"expected rng on the features' device {features.device}, got a "
                         f"torch.Generator on {rng.device}")
    draw = torch.rand((b, 1, h, w), generator=rng, device=features.device)
    return draw < mask_ratio


def random_mask(features: Tensor, mask_ratio: float = 0.75, *,
                rng: torch.Generator | None = None) -> Tensor:
    r"""The random mask of masked generative distillation (Yang et al., ECCV 2022).

    One uniform draw :math:`R_{b,i,j} \in [0, 1)` per position of each image,
    shared by all the channels; a position is masked where
    :math:`R_{b,i,j} < \lambda`, so a fraction :math:`\lambda` of the
    positions is masked on average (all of them at :math:`\lambda = 1`, none at
    0). The draws are made on ``features``' device, from ``rng`` (a
    ``torch.Generator`` on that device) or from the device's default
    generator: a seeded mask on the CPU and one on a GPU differ. The
    reference code (``yzd-v/MGD``) draws on the CPU from the global
    generator, copies the draws to the GPU every step, and masks where
    :math:`R > 1 - \lambda`: the same distribution, but not the same positions
    for the same seed.

    Args:
        features: any :math:`(B, C, H, W)` map on the grid to mask; only its
            batch, grid and device are used.
        mask_ratio: :math:`\lambda \in [0, 1]`, the fraction masked (default
            0.75, the reference's value for segmentation).
        rng: the generator to draw from, for reproducible masks.

    Shape:
        - features: :math:`(B, C, H, W)`.
        - output: :math:`(B, 1, H, W)`, bool, ``True`` where masked.

    Returns:
        The mask, on ``features``' device.

    Raises:
        TypeError: ``features`` is not a floating-point tensor, ``mask_ratio``
            is not a real number, ``rng`` is not a ``torch.Generator``.
        ValueError: ``features`` is not 4-D or is empty, ``mask_ratio`` is
            outside ``[0, 1]``, ``rng`` is on another device.

    Example:
        >>> mask = random_mask(torch.zeros(2, 8, 16, 16), rng=torch.Generator().manual_seed(0))
        >>> mask.shape, mask.dtype, round(mask.float().mean().item(), 4)
        (torch.Size([2, 1, 16, 16]), torch.bool, 0.752)
    """
    check_feature_map(features, "features")
    ratio = _check_mask_ratio(mask_ratio)
    _check_rng(rng)
    return _draw_mask(features, ratio, rng)


def _check_rng(rng: object) -> None:
    if rng is not None and not isinstance(rng, torch.Generator):
        raise TypeError(f"expected rng to be a torch.Generator or None, got "
                        f"{type(rng).__name__}")


def _require_mask(mask: object) -> Tensor:
    """``mask`` if it is a tensor; the functional form has no default mask."""
    if not isinstance(mask, Tensor):
        hint = "; draw one with random_mask(features, mask_ratio)" if mask is None else ""
        raise TypeError(f"expected mask to be a bool tensor (True where masked), got "
                        f"{type(mask).__name__}{hint}")
    return mask


def _check_generator(generator: object) -> None:
    if not callable(generator):
        raise TypeError(f"expected generator to be a module or a callable, got "
                        f"{type(generator).__name__}")


def _check_mask(mask: Tensor, grid: Tensor) -> Tensor:
    """``mask`` if it is a bool (B, 1, H, W) tensor on ``grid``'s batch, grid and device."""
    if mask.dtype != torch.bool:
        raise TypeError(f"expected mask to be a bool tensor (True where masked), got a "
                        f"{mask.dtype} tensor")
    b, _, h, w = grid.shape
    if tuple(mask.shape) != (b, 1, h, w):
        raise ValueError(
            f"expected mask of shape (B, 1, H, W) = {(b, 1, h, w)}, one value per position "
            f"of the grid the loss computes on, got {tuple(mask.shape)}"
        )
    if mask.device != grid.device:
        raise ValueError(f"expected mask and features on the same device, got {mask.device} "
                         f"and {grid.device}")
    return mask


def _mgd(student: Tensor, teacher: Tensor, generator: Callable[[Tensor], Tensor],
         mask: Tensor | None, mask_ratio: float, rng: torch.Generator | None, resize: Resize,
         reduction: Reduction) -> Tensor:
    """:func:`mgd_loss` with its options already validated; ``mask=None`` draws one with
    :func:`random_mask` on the grid the loss computes on."""
    check_feature_pair(student, teacher, same_channels=_SAME_CHANNELS)
    student, teacher = align_grids(student, teacher, resize)
    mask = _draw_mask(student, mask_ratio, rng) if mask is None else _check_mask(mask, student)
    # a product, not a where: a NaN or an infinity at a masked position must not vanish
    generated: object = generator(student * (~mask).to(student.dtype))
    if not isinstance(generated, Tensor) or generated.shape != teacher.shape:
        got = tuple(generated.shape) if isinstance(generated, Tensor) else type(generated).__name__
        raise ValueError(f"expected the generator to return the teacher's shape "
                         f"{tuple(teacher.shape)}, got {got}")
    ctx, (g, t) = full_precision(generated, teacher)
    with ctx:
        per_image = (g - t).square().sum((1, 2, 3))
        # a -inf student value can come out finite through the generator's ReLU
        return reduce_loss(nan_where_nonfinite(per_image, student, g, t), reduction)


def mgd_loss(
    student: Tensor,
    teacher: Tensor,
    generator: Callable[[Tensor], Tensor],
    mask: Tensor,
    *,
    resize: Resize = "none",
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Masked generative distillation of Yang et al. (ECCV 2022, "Masked Generative
    Distillation"), on dense features.

    The student's feature :math:`S` (already with the teacher's channels) is
    zeroed at the masked positions, and a generator :math:`\mathcal{G}` must
    rebuild the teacher's whole feature :math:`T` from what is left:

    .. math::

        \mathcal{L}_{mgd} = \frac{1}{B} \sum_{b=1}^{B} \sum_{c,i,j}
            \Big(T_{b,c,i,j} - \mathcal{G}\big(S \odot (1 - M)\big)_{b,c,i,j}\Big)^2

    with :math:`M_{b,1,i,j} = 1` at the masked positions, shared by all the
    channels. This is the reference's normalisation (``yzd-v/MGD``: the sum
    of squared errors divided by the batch size, ``reduction='mean'``); its
    weight :math:`\alpha = 2 \times 10^{-5}` (for segmentation) belongs to the
    term that uses the loss, not to the loss.

    The function is deterministic: it takes the mask (draw one with
    :func:`random_mask`) and the generator as arguments, so that it can be
    compared with a plain computation and reused with any generator.
    :class:`MGDLoss` owns the alignment convolution and the paper's generator,
    and draws a new mask on every call.

    Args:
        student: the student's feature, with the teacher's channels.
        teacher: the teacher's feature.
        generator: maps the masked :math:`(B, C, H, W)` student feature to a
            map of the teacher's shape (an ``nn.Module`` or any callable). It
            runs under the caller's autocast like any layer; the error itself
            is computed in float32 at least.
        mask: ``True`` at the positions to zero, on the grid the loss computes
            on (the student's, unless ``resize='teacher'``).
        resize: the grid the loss computes on: ``'none'`` (default; equal
            grids up to one cell of stride rounding, else ``ValueError``),
            ``'teacher'`` (the student's feature bilinearly resized onto the
            teacher's grid before masking) or ``'student'``.
        reduction: over the batch of per-image sums: ``'none'`` (one value per
            image), ``'mean'`` (default, the reference) or ``'sum'``.

    Shape:
        - student: :math:`(B, C, h, w)`.
        - teacher: :math:`(B, C, H, W)`.
        - mask: :math:`(B, 1, H', W')` bool, :math:`H' \times W'` the common grid.
        - output: scalar, or :math:`(B,)` with ``reduction='none'``.

    Returns:
        The loss, in float32 at least (float64 for float64 inputs). A NaN or
        an infinity in an image of either input makes that image's loss NaN.

    Raises:
        TypeError: a non-floating feature, a mask that is not a bool tensor.
        ValueError: features that are not 4-D or empty, batch or channel
            counts that differ (the message points to :class:`MGDLoss`),
            inputs on different devices, grids that differ with
            ``resize='none'``, a mask of the wrong shape or device, a
            generator output of the wrong shape, an unknown option.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> student, teacher = torch.randn(2, 8, 6, 6), torch.randn(2, 8, 6, 6)
        >>> generator = torch.nn.Conv2d(8, 8, 3, padding=1)
        >>> mask = random_mask(student, 0.75, rng=torch.Generator().manual_seed(0))
        >>> round(mgd_loss(student, teacher, generator, mask).item(), 4)
        319.7747
        >>> nothing_masked = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
        >>> mgd_loss(teacher, teacher, torch.nn.Identity(), nothing_masked).item()
        0.0
    """
    check_resize(resize)
    check_reduction(reduction)
    _check_generator(generator)
    return _mgd(student, teacher, generator, _require_mask(mask), 0.0, None, resize, reduction)


class MGDLoss(nn.Module):
    r"""Masked generative distillation (Yang et al., ECCV 2022) with its learnable parts.

    Where the channel counts differ, a 1x1 convolution (with a bias, as in the
    reference) maps the student's channels onto the teacher's; where they
    agree it is ``nn.Identity``. The generator is the paper's: a 3x3
    convolution, a ReLU and a 3x3 convolution, all at the teacher's channels,
    padding 1. On every call a new mask is drawn with :func:`random_mask` (or
    the given ``mask`` is used) and :func:`mgd_loss` is computed. Both parts
    are trained with the student: give their parameters to the optimizer.
    Under ``torch.autocast`` they run in the autocast dtype like any other
    layer, while the error itself is computed in float32.

    The reference weights the loss by :math:`\alpha = 2 \times 10^{-5}` for
    segmentation; put it on the term (``DistillationTerm(weight=2e-5)``).

    Args:
        student_channels: :math:`C_s`.
        teacher_channels: :math:`C_t`.
        mask_ratio: :math:`\lambda \in [0, 1]`, the fraction of positions
            masked (default 0.75).
        resize: ``'none'`` (default), ``'student'`` or ``'teacher'``.
        reduction: ``'none'`` | ``'mean'`` | ``'sum'`` over the batch of
            per-image sums.
        rng: a ``torch.Generator`` on the features' device to draw the masks
            from (reproducible runs), or ``None`` for the device's default
            generator. It is not moved by ``.to()``, nor saved in the state
            dict; ``torch.compile(fullgraph=True)`` cannot trace a draw from
            it (compile without ``fullgraph``, or pass the masks).

    Shape:
        - student: :math:`(B, C_s, h, w)`.
        - teacher: :math:`(B, C_t, H, W)`.
        - mask (optional): :math:`(B, 1, H', W')` bool, on the common grid.
        - output: scalar, or :math:`(B,)` with ``reduction='none'``.

    Raises:
        TypeError: a channel count is not an int, ``rng`` is not a
            ``torch.Generator``.
        ValueError: a channel count is below 1, ``mask_ratio`` is outside
            ``[0, 1]``; in ``forward``, student features whose channel count
            is not ``student_channels``, ``rng`` on another device than the
            features.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> criterion = MGDLoss(4, 8, rng=torch.Generator().manual_seed(0))
        >>> criterion
        MGDLoss(
          student_channels=4, teacher_channels=8, mask_ratio=0.75, resize='none', reduction='mean'
          (align): Conv2d(4, 8, kernel_size=(1, 1), stride=(1, 1))
          (generator): Sequential(
            (0): Conv2d(8, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
            (1): ReLU()
            (2): Conv2d(8, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
          )
        )
        >>> round(criterion(torch.randn(2, 4, 6, 6), torch.randn(2, 8, 6, 6)).item(), 4)
        291.7853
    """

    def __init__(self, student_channels: int, teacher_channels: int, mask_ratio: float = 0.75,
                 resize: Resize = "none", reduction: Reduction = "mean",
                 rng: torch.Generator | None = None) -> None:
        super().__init__()
        self.student_channels = check_positive_int("student_channels", student_channels)
        self.teacher_channels = check_positive_int("teacher_channels", teacher_channels)
        self.mask_ratio = _check_mask_ratio(mask_ratio)
        check_resize(resize)
        check_reduction(reduction)
        _check_rng(rng)
        self.resize: Resize = resize
        self.reduction: Reduction = reduction
        self.rng = rng
        self.align: nn.Module = (
            nn.Identity() if student_channels == teacher_channels
            else nn.Conv2d(student_channels, teacher_channels, 1)
        )
        self.generator = nn.Sequential(
            nn.Conv2d(teacher_channels, teacher_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(teacher_channels, teacher_channels, 3, padding=1),
        )

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        dims = check_feature_map(student, "student")
        if dims["C"] != self.student_channels:
            raise ValueError(f"expected student features with {self.student_channels} channels, "
                             f"got {dims['C']}")
        return _mgd(self.align(student), teacher, self.generator, mask, self.mask_ratio,
                    self.rng, self.resize, self.reduction)

    def extra_repr(self) -> str:
        return (f"student_channels={self.student_channels}, "
                f"teacher_channels={self.teacher_channels}, mask_ratio={self.mask_ratio}, "
                f"resize={self.resize!r}, reduction={self.reduction!r}")
