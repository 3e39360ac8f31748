r"""Attention transfer (Zagoruyko and Komodakis, ICLR 2017)."""

from __future__ import annotations

from torch import Tensor, nn

from segdistill._checks import (
    check_choice,
    check_feature_pair,
    check_real,
)
from segdistill._features import (
    RESIZE_MODES,
    Resize,
    align_spatial,
    full_precision,
    normalize_channels,
)
from segdistill._reduction import Reduction, check_reduction, reduce_loss

__all__ = ["AttentionTransferLoss", "attention_map", "attention_transfer_loss"]


def attention_map(features: Tensor, p: float = 2.0, eps: float = 1e-8) -> Tensor:
    r"""Spatial attention map: the channel mean of :math:`|F|^p`, flattened, L2-normalised.

    Args:
        features: :math:`(B, C, H, W)`.
        p: the power (the paper's default 2).
        eps: lower bound on the norm before dividing.

    Returns:
        :math:`(B, HW)`, each row of unit L2 norm (or zero).
    """
    q = features.abs().pow(p).mean(1).flatten(1)
    return normalize_channels(q, dim=1, eps=eps)


def _check_options(p: float, resize: str, reduction: str) -> None:
    check_real("p", p, minimum=1.0)
    check_choice("resize", resize, RESIZE_MODES)
    check_reduction(reduction)


def attention_transfer_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    p: float = 2.0,
    resize: Resize = "none",
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Attention transfer loss of Zagoruyko and Komodakis (ICLR 2017).

    With :math:`Q(F) = \operatorname{vec}\big(\frac{1}{C}\sum_c |F_c|^p\big)`,

    .. math::

        \mathcal{L}_{at} = \frac{1}{HW}
            \left\lVert \frac{Q(\phi_s)}{\lVert Q(\phi_s) \rVert_2}
            - \frac{Q(\phi_t)}{\lVert Q(\phi_t) \rVert_2} \right\rVert_2^2

    per image: the mean over positions of the squared difference, as in the
    authors' code (``(at(x) - at(y)).pow(2).mean()``); their weight
    :math:`\beta = 1000` goes on the term. Channel counts may differ.

    Args:
        student: the student's features.
        teacher: the teacher's features.
        p: the power in :math:`Q` (default 2), at least 1.
        resize: ``'none'`` requires equal H x W; ``'student'`` or ``'teacher'``
            bilinearly resizes the other map onto that one's grid.
        reduction: ``'none'`` (per image) | ``'mean'`` | ``'sum'`` over the batch.

    Shape:
        - student: :math:`(B, C_s, H, W)`.
        - teacher: :math:`(B, C_t, H, W)`.
        - output: scalar, or :math:`(B,)` with ``reduction='none'``.

    Raises:
        TypeError: an input is not a floating-point tensor.
        ValueError: not 4-D, empty, different batch or (without ``resize``)
            spatial sizes, or an unknown option.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> s, t = torch.randn(2, 4, 8, 8), torch.randn(2, 16, 8, 8)
        >>> round(attention_transfer_loss(s, t).item(), 6)
        0.007478
        >>> attention_transfer_loss(5.0 * t, t).item() < 1e-12
        True
    """
    check_feature_pair(student, teacher)
    _check_options(p, resize, reduction)
    student, teacher = align_spatial(student, teacher, resize)
    ctx, (s, t) = full_precision(student, teacher)
    with ctx:
        per_image = (attention_map(s, p) - attention_map(t, p)).square().mean(1)
        return reduce_loss(per_image, reduction)


class AttentionTransferLoss(nn.Module):
    r"""Attention transfer (Zagoruyko and Komodakis, 2017), as a module.

    Stores the options of :func:`attention_transfer_loss` and calls it in
    ``forward``; see that function for the formula and the arguments.

    Example:
        >>> AttentionTransferLoss()
        AttentionTransferLoss(p=2.0, resize='none', reduction='mean')
    """

    def __init__(self, p: float = 2.0, resize: Resize = "none",
                 reduction: Reduction = "mean") -> None:
        super().__init__()
        _check_options(p, resize, reduction)
        self.p = float(p)
        self.resize: Resize = resize
        self.reduction: Reduction = reduction

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return attention_transfer_loss(student, teacher, p=self.p, resize=self.resize,
                                       reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"p={self.p}, resize={self.resize!r}, reduction={self.reduction!r}"
