r"""Pixel-wise knowledge distillation on logits (Hinton et al., 2015)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segdistill._checks import (
    check_feature_pair,
    check_real,
    check_same_batch,
    check_same_device,
)
from segdistill._features import align_grids, full_precision
from segdistill._reduction import Reduction, check_reduction, nan_where_nonfinite, reduce_loss
from segdistill.losses._kl import softened_kl

__all__ = ["KDLoss", "kd_loss"]


def _check_options(temperature: float, ignore_index: int | None, reduction: str) -> None:
    check_real("temperature", temperature, minimum=0.0, strict=True)
    if ignore_index is not None and (isinstance(ignore_index, bool)
                                     or not isinstance(ignore_index, int)):
        raise TypeError(f"ignore_index must be an int or None, got {type(ignore_index).__name__}")
    check_reduction(reduction)


def _check_target(target: object, logits: Tensor) -> None:
    """Labels must be a (B, H_l, W_l) integer tensor beside the logits; any grid."""
    if not isinstance(target, Tensor):
        raise TypeError(f"expected target to be a torch.Tensor, got {type(target).__name__}")
    if target.ndim != 3:
        raise ValueError(f"expected target of shape (B, H, W), got a {target.ndim}-D tensor of "
                         f"shape {tuple(target.shape)}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"expected target to hold integer labels, got {target.dtype}")
    check_same_device(logits, target, ("logits", "target"))
    check_same_batch(logits, target, ("logits", "target"))


def _valid_mask(target: Tensor, size: tuple[int, int], ignore_index: int) -> Tensor:
    """True where the label, nearest-resized onto ``size``, is not ``ignore_index``."""
    valid = target != ignore_index
    if tuple(valid.shape[-2:]) != size:
        valid = F.interpolate(valid[:, None].float(), size=size, mode="nearest")[:, 0] > 0.5
    return valid


def kd_loss(
    student: Tensor,
    teacher: Tensor,
    target: Tensor | None = None,
    *,
    temperature: float = 4.0,
    ignore_index: int | None = 255,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Pixel-wise knowledge distillation of Hinton et al. (2015), on segmentation logits.

    At every pixel, the KL divergence from the teacher's softened class
    distribution to the student's, scaled by :math:`T^2` so that gradients keep
    their size as :math:`T` grows:

    .. math::

        \mathcal{L}_{kd} = \frac{T^2}{|P|} \sum_{p \in P}
            \mathrm{KL}\big(\sigma(z^t_p / T) \,\big\|\, \sigma(z^s_p / T)\big)

    with :math:`\sigma` the softmax over classes and :math:`P` the pixels of
    the teacher's logit grid whose label is not ``ignore_index`` (every pixel
    without labels). As in the KD baseline of He et al. (CVPR 2019, Table 3),
    student logits on another grid are bilinearly resized (``align_corners=False``)
    to the teacher's logit size first: that resize is part of this loss's
    definition, not a silent fix. At :math:`T = 1` this is the plain KL
    divergence of the class distributions, averaged over pixels.

    Args:
        student: the student's logits.
        teacher: the teacher's logits, with the same classes.
        target: optional labels; pixels labelled ``ignore_index`` are left
            out. Labels on another grid than the teacher's logits are resized
            onto it by nearest neighbour (``F.interpolate(mode='nearest')``)
            before the ignore mask is taken.
        temperature: :math:`T > 0` (default 4, the middle of the values
            :math:`T \in \{2, 4, 6\}` that KD baselines for segmentation use).
        ignore_index: the label to leave out, or ``None`` to count every pixel
            (the target is still validated).
        reduction: ``'none'`` (a (B, H, W) map, zero at ignored pixels),
            ``'mean'`` over the counted pixels, or ``'sum'``.

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
            class counts that differ, inputs on different devices, a
            non-positive temperature, an unknown reduction.

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
    check_feature_pair(student, teacher, ("student logits", "teacher logits"),
                       same_channels=" (one per class)")
    _check_options(temperature, ignore_index, reduction)
    size = (teacher.shape[-2], teacher.shape[-1])
    valid = None
    if target is not None:
        _check_target(target, teacher)
        if ignore_index is not None:
            valid = _valid_mask(target, size, ignore_index)

    ctx, (s, t) = full_precision(student, teacher)
    with ctx:
        s, t = align_grids(s, t, "teacher")  # KD's definition: onto the teacher's grid
        kl = softened_kl(s, t, temperature, dim=1)
        if valid is None:
            return reduce_loss(kl, reduction)
        # the mask must not hide a NaN or +inf logit (at an ignored pixel, say)
        kl = nan_where_nonfinite(torch.where(valid, kl, torch.zeros_like(kl)), s, t,
                                 allow_neg_inf=True)
        if reduction == "mean":
            return kl.sum() / valid.sum().clamp_min(1)
        return reduce_loss(kl, reduction)


class KDLoss(nn.Module):
    r"""Pixel-wise knowledge distillation (Hinton et al., 2015), as a module.

    Stores the options of :func:`kd_loss` and calls it in ``forward``; see that
    function for the formula and the arguments.

    Args:
        temperature: :math:`T > 0` (default 4).
        ignore_index: label left out when a target is given (default 255), or
            ``None``.
        reduction: ``'none'`` | ``'mean'`` | ``'sum'`` over pixels.

    Shape:
        - student: :math:`(B, K, h, w)` logits.
        - teacher: :math:`(B, K, H, W)` logits.
        - target (optional): :math:`(B, H_l, W_l)` integer labels.
        - output: scalar, or :math:`(B, H, W)` with ``reduction='none'``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> criterion = KDLoss(temperature=2.0)
        >>> criterion
        KDLoss(temperature=2.0, ignore_index=255, reduction='mean')
        >>> round(criterion(torch.randn(2, 5, 4, 4), torch.randn(2, 5, 8, 8)).item(), 4)
        0.601
    """

    def __init__(self, temperature: float = 4.0, ignore_index: int | None = 255,
                 reduction: Reduction = "mean") -> None:
        super().__init__()
        _check_options(temperature, ignore_index, reduction)
        self.temperature = float(temperature)
        self.ignore_index = ignore_index
        self.reduction: Reduction = reduction

    def forward(self, student: Tensor, teacher: Tensor, target: Tensor | None = None) -> Tensor:
        return kd_loss(student, teacher, target, temperature=self.temperature,
                       ignore_index=self.ignore_index, reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, ignore_index={self.ignore_index}, "
                f"reduction={self.reduction!r}")
