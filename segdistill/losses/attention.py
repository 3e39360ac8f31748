r"""Attention transfer (Zagoruyko and Komodakis, ICLR 2017)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from segdistill._checks import check_feature_map, check_feature_pair, check_real
from segdistill._features import (
    Resize,
    align_grids,
    check_resize,
    full_precision,
    normalize_channels,
)
from segdistill._reduction import Reduction, check_reduction, reduce_loss

__all__ = ["AttentionTransferLoss", "attention_map", "attention_transfer_loss"]


def _attention_map(x: Tensor, p: float, eps: float) -> Tensor:
    """(B, C, H, W) -> (B, HW): channel mean of |x|^p, each row L2-normalised.

    The map is scale-invariant, so each image is first divided by its largest
    absolute entry: :math:`|x|^p` then cannot overflow, whatever ``p``.
    """
    scale = x.detach().abs().amax(dim=(1, 2, 3), keepdim=True)
    # a zero map keeps scale 1; NaN > 0 is False, so NaN stays; inf / inf is NaN
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return normalize_channels((x / scale).abs().pow(p).mean(1).flatten(1), dim=1, eps=eps)


def attention_map(features: Tensor, p: float = 2.0, eps: float = 1e-8) -> Tensor:
    r"""Spatial attention map of Zagoruyko and Komodakis (ICLR 2017).

    The channel mean of :math:`|F|^p`, flattened per image and divided by its
    L2 norm:

    .. math::

        Q(F) = \operatorname{vec}\Big(\frac{1}{C} \sum_{c=1}^{C} |F_c|^p\Big),
        \qquad \hat Q(F) = \frac{Q(F)}{\lVert Q(F) \rVert_2}

    Args:
        features: a feature map.
        p: the power (the paper's default 2), at least 1.
        eps: lower bound on the norm before dividing, so that an all-zero map
            gives a zero row instead of NaN.

    Shape:
        - features: :math:`(B, C, H, W)`.
        - output: :math:`(B, HW)`, row-major positions.

    Returns:
        The normalised maps, each row of unit L2 norm (or zero), in at least
        float32.

    Raises:
        TypeError: ``features`` is not a floating-point tensor.
        ValueError: ``features`` is not 4-D or is empty, or ``p`` < 1.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> q = attention_map(torch.randn(2, 8, 3, 3))
        >>> q.shape
        torch.Size([2, 9])
        >>> torch.allclose(q.norm(dim=1), torch.ones(2))  # unit L2 norm per image
        True
    """
    check_feature_map(features, "features")
    check_real("p", p, minimum=1.0)
    check_real("eps", eps, minimum=0.0, strict=True)
    ctx, (x,) = full_precision(features)
    with ctx:
        return _attention_map(x, p, eps)


def _check_options(p: float, resize: str, eps: float, reduction: str) -> None:
    check_real("p", p, minimum=1.0)
    check_resize(resize)
    check_real("eps", eps, minimum=0.0, strict=True)
    check_reduction(reduction)


def _attention_transfer(student: Tensor, teacher: Tensor, p: float, resize: Resize, eps: float,
                        reduction: Reduction) -> Tensor:
    """:func:`attention_transfer_loss` with its options already validated."""
    check_feature_pair(student, teacher)
    student, teacher = align_grids(student, teacher, resize)
    ctx, (s, t) = full_precision(student, teacher)
    with ctx:
        per_image = (_attention_map(s, p, eps) - _attention_map(t, p, eps)).square().mean(1)
        return reduce_loss(per_image, reduction)


def attention_transfer_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    p: float = 2.0,
    resize: Resize = "none",
    eps: float = 1e-8,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Attention transfer loss of Zagoruyko and Komodakis (ICLR 2017, "Paying More
    Attention to Attention").

    With :math:`\hat Q` the normalised attention map of :func:`attention_map`
    (the channel mean of :math:`|F|^p`, flattened, divided by its L2 norm), per
    image

    .. math::

        \mathcal{L}_{at} = \frac{1}{HW}
            \big\lVert \hat Q(\phi_s) - \hat Q(\phi_t) \big\rVert_2^2 ,

    the mean over positions of the squared difference, then reduced over the
    batch. With ``reduction='mean'`` that is the authors' code,
    ``(at(x) - at(y)).pow(2).mean()`` over the batch and the positions; the
    paper's :math:`\lVert\cdot\rVert_2` (not squared) and its sum over
    positions are not what that code computes. Their weight
    :math:`\beta = 1000` goes on the term (see
    :func:`segdistill.presets.attention_transfer`). The channel
    counts may differ; the loss is invariant to a positive scale of either map.

    Args:
        student: the student's features.
        teacher: the teacher's features.
        p: the power in :math:`Q` (default 2), at least 1.
        resize: ``'none'`` requires equal H x W up to one cell of stride rounding;
            ``'student'`` or ``'teacher'`` bilinearly resizes the other map onto
            that one's grid.
        eps: lower bound on a map's norm before dividing, so that an all-zero
            map stays zero instead of becoming NaN.
        reduction: ``'none'`` (per image) | ``'mean'`` | ``'sum'`` over the batch.

    Shape:
        - student: :math:`(B, C_s, H, W)`.
        - teacher: :math:`(B, C_t, H, W)` (or another H x W with ``resize``).
        - output: scalar, or :math:`(B,)` with ``reduction='none'``.

    Returns:
        The loss, in the compute dtype (float32, or float64 for float64 inputs).

    Raises:
        TypeError: an input is not a floating-point tensor.
        ValueError: not 4-D, empty, different batch or (without ``resize``)
            spatial sizes, inputs on different devices, or an unknown option.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> s, t = torch.randn(2, 4, 8, 8), torch.randn(2, 16, 8, 8)
        >>> round(attention_transfer_loss(s, t).item(), 6)
        0.007478
        >>> attention_transfer_loss(5.0 * t, t).item() < 1e-12
        True
    """
    _check_options(p, resize, eps, reduction)
    return _attention_transfer(student, teacher, p, resize, eps, reduction)


class AttentionTransferLoss(nn.Module):
    r"""Attention transfer (Zagoruyko and Komodakis, ICLR 2017), as a module.

    Stores the options of :func:`attention_transfer_loss`, validated once here,
    and computes it in ``forward``; see that function for the formula and the
    arguments.

    Args:
        p: the power in the attention map (default 2).
        resize: ``'none'``, ``'student'`` or ``'teacher'``.
        eps: lower bound on a map's norm before dividing.
        reduction: ``'none'`` | ``'mean'`` | ``'sum'`` over the batch.

    Shape:
        - student: :math:`(B, C_s, H, W)`.
        - teacher: :math:`(B, C_t, H, W)`.
        - output: scalar, or :math:`(B,)` with ``reduction='none'``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> criterion = AttentionTransferLoss()
        >>> criterion
        AttentionTransferLoss(p=2.0, resize='none', eps=1e-08, reduction='mean')
        >>> round(criterion(torch.randn(2, 4, 8, 8), torch.randn(2, 16, 8, 8)).item(), 6)
        0.007478
    """

    def __init__(self, p: float = 2.0, resize: Resize = "none", eps: float = 1e-8,
                 reduction: Reduction = "mean") -> None:
        super().__init__()
        _check_options(p, resize, eps, reduction)
        self.p = float(p)
        self.resize: Resize = resize
        self.eps = eps
        self.reduction: Reduction = reduction

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return _attention_transfer(student, teacher, self.p, self.resize, self.eps,
                                   self.reduction)

    def extra_repr(self) -> str:
        return (f"p={self.p}, resize={self.resize!r}, eps={self.eps}, "
                f"reduction={self.reduction!r}")
