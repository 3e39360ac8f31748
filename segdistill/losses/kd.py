r"""Pixel-wise knowledge distillation on logits (Hinton et al., 2015)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from segdistill._checks import check_feature_pair, check_real
from segdistill._features import Resize, align_grids, check_resize, full_precision
from segdistill._labels import check_ignore_index, counted_pixels
from segdistill._reduction import Reduction, check_reduction, nan_where_nonfinite, reduce_loss
from segdistill.losses._kl import softened_kl

__all__ = ["KDLoss", "kd_loss"]


def _check_options(temperature: float, ignore_index: int | None, resize: str,
                   reduction: str) -> None:
    check_real("temperature", temperature, minimum=0.0, strict=True)
    check_ignore_index(ignore_index)
    check_resize(resize)
    check_reduction(reduction)


def _kd(student: Tensor, teacher: Tensor, target: Tensor | None, temperature: float,
        ignore_index: int | None, resize: Resize, reduction: Reduction,
        validate_args: bool) -> Tensor:
    """:func:`kd_loss` with its options already validated."""
    check_feature_pair(student, teacher, ("student logits", "teacher logits"),
                       same_channels=" (one per class)")
    ctx, (s, t) = full_precision(student, teacher)
    with ctx:
        s, t = align_grids(s, t, resize)
        valid = counted_pixels(target, t, ignore_index, validate_args)
        kl = softened_kl(s, t, temperature, dim=1)
        if valid is None:
            return reduce_loss(kl, reduction)
        # the mask must not hide a NaN or +inf logit (at an ignored pixel, say)
        kl = nan_where_nonfinite(torch.where(valid, kl, torch.zeros_like(kl)), s, t,
                                 allow_neg_inf=True)
        if reduction == "mean":
            return kl.sum() / valid.sum().clamp_min(1)
        return reduce_loss(kl, reduction)


def kd_loss(
    student: Tensor,
    teacher: Tensor,
    target: Tensor | None = None,
    *,
    temperature: float = 4.0,
    ignore_index: int | None = 255,
    resize: Resize = "teacher",
    reduction: Reduction = "mean",
    validate_args: bool = True,
) -> Tensor:
    r"""Pixel-wise knowledge distillation of Hinton et al. (2015), on segmentation logits.

    At every pixel, the KL divergence from the teacher's softened class
    distribution to the student's, scaled by :math:`T^2` so that gradients keep
    their size as :math:`T` grows:

    .. math::

        \mathcal{L}_{kd} = \frac{T^2}{|P|} \sum_{p \in P}
            \mathrm{KL}\big(\sigma(z^t_p / T) \,\big\|\, \sigma(z^s_p / T)\big)

    with :math:`\sigma` the softmax over classes and :math:`P` the pixels of
    the logit grid whose label is not ``ignore_index`` (every pixel without
    labels). As in the KD baseline of He et al. (CVPR 2019, Table 3), student
    logits on another grid are bilinearly resized (``align_corners=False``)
    to the teacher's logit size first (the default ``resize='teacher'``).
    At :math:`T = 1` this is the plain KL divergence of the class
    distributions, averaged over pixels.

    Labels follow the library's one rule (:mod:`segdistill._labels`): integer
    ``(B, H_l, W_l)`` on any grid, nearest-resized onto the grid the loss
    computes on; every value in ``[0, K)`` or ``ignore_index``.

    Args:
        student: the student's logits.
        teacher: the teacher's logits, with the same classes.
        target: optional labels; pixels labelled ``ignore_index`` are left out.
        temperature: :math:`T > 0` (default 4, the middle of the values
            :math:`T \in \{2, 4, 6\}` that KD baselines for segmentation use).
        ignore_index: the label to leave out, or ``None`` to count every pixel
            (the target is still validated).
        resize: the grid the loss computes on: ``'teacher'`` (default, the
            student's logits resized onto the teacher's), ``'student'`` (the
            teacher's onto the student's), or ``'none'`` (equal grids up to
            one cell of stride rounding, else ``ValueError``).
        reduction: ``'none'`` (a (B, H, W) map, zero at ignored pixels),
            ``'mean'`` over the counted pixels, or ``'sum'``.
        validate_args: check that every label is in ``[0, K)`` or
            ``ignore_index`` (one host sync per call); ``False`` skips it.

    Shape:
        - student: :math:`(B, K, h, w)`.
        - teacher: :math:`(B, K, H, W)`.
        - target: :math:`(B, H_l, W_l)`, integer.
        - output: scalar, or :math:`(B, H, W)` with ``reduction='none'``.

    Returns:
        The loss, in float32 at least. With every pixel ignored it is 0.

    Raises:
        TypeError: non-floating logits, a target that is not a tensor of
            integer labels, a non-integer ``ignore_index``.
        ValueError: shapes that are not 4-D (logits) or 3-D (labels), batch or
            class counts that differ, inputs on different devices, labels
            outside ``[0, K)`` that are not ``ignore_index``, a non-positive
            temperature, an unknown option.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> teacher, student = torch.randn(2, 5, 8, 8), torch.randn(2, 5, 4, 4)
        >>> round(kd_loss(student, teacher, temperature=2.0).item(), 4)
        0.5853
        >>> labels = torch.randint(0, 5, (2, 16, 16))  # nearest-resized to 8 x 8
        >>> labels[:, :8] = 255  # the top half is ignored
        >>> round(kd_loss(student, teacher, labels, temperature=2.0).item(), 4)
        0.5161
        >>> kd_loss(student, teacher, labels, reduction="none")[:, :4].abs().max().item()
        0.0
        >>> kd_loss(teacher, teacher).item()
        0.0
    """
    _check_options(temperature, ignore_index, resize, reduction)
    return _kd(student, teacher, target, temperature, ignore_index, resize, reduction,
               validate_args)


class KDLoss(nn.Module):
    r"""Pixel-wise knowledge distillation (Hinton et al., 2015), as a module.

    Stores the options of :func:`kd_loss`, validated once here, and computes
    it in ``forward``; see that function for the formula and the arguments.

    Args:
        temperature: :math:`T > 0` (default 4).
        ignore_index: label left out when a target is given (default 255), or
            ``None``.
        resize: ``'teacher'`` (default), ``'student'`` or ``'none'``.
        reduction: ``'none'`` | ``'mean'`` | ``'sum'`` over pixels.
        validate_args: check the label values on every call (one host sync).

    Shape:
        - student: :math:`(B, K, h, w)` logits.
        - teacher: :math:`(B, K, H, W)` logits.
        - target (optional): :math:`(B, H_l, W_l)` integer labels.
        - output: scalar, or :math:`(B, H, W)` with ``reduction='none'``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> criterion = KDLoss(temperature=2.0)
        >>> criterion
        KDLoss(temperature=2.0, ignore_index=255, resize='teacher', reduction='mean')
        >>> round(criterion(torch.randn(2, 5, 4, 4), torch.randn(2, 5, 8, 8)).item(), 4)
        0.601
    """

    def __init__(self, temperature: float = 4.0, ignore_index: int | None = 255,
                 resize: Resize = "teacher", reduction: Reduction = "mean",
                 validate_args: bool = True) -> None:
        super().__init__()
        _check_options(temperature, ignore_index, resize, reduction)
        self.temperature = float(temperature)
        self.ignore_index = ignore_index
        self.resize: Resize = resize
        self.reduction: Reduction = reduction
        self.validate_args = bool(validate_args)

    def forward(self, student: Tensor, teacher: Tensor, target: Tensor | None = None) -> Tensor:
        return _kd(student, teacher, target, self.temperature, self.ignore_index, self.resize,
                   self.reduction, self.validate_args)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, ignore_index={self.ignore_index}, "
                f"resize={self.resize!r}, reduction={self.reduction!r}")
