r"""Channel-wise distillation (Shu et al., ICCV 2021)."""

from __future__ import annotations

from torch import Tensor, nn

from segdistill._checks import check_feature_pair, check_real
from segdistill._features import Resize, align_grids, check_resize, full_precision
from segdistill._reduction import Reduction, check_reduction, reduce_loss
from segdistill.losses._kl import softened_kl

__all__ = ["CWDLoss", "cwd_loss"]


def _check_options(temperature: float, resize: str, reduction: str) -> None:
    check_real("temperature", temperature, minimum=0.0, strict=True)
    check_resize(resize)
    check_reduction(reduction)


def _cwd(student: Tensor, teacher: Tensor, temperature: float, resize: Resize,
         reduction: Reduction) -> Tensor:
    """:func:`cwd_loss` with its options already validated."""
    check_feature_pair(student, teacher, same_channels="")
    student, teacher = align_grids(student, teacher, resize)
    ctx, (s, t) = full_precision(student, teacher)
    with ctx:
        kl = softened_kl(s.flatten(2), t.flatten(2), temperature, dim=-1)  # (B, C)
        return reduce_loss(kl.mean(1), reduction)


def cwd_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    temperature: float = 4.0,
    resize: Resize = "none",
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Channel-wise distillation of Shu et al. (ICCV 2021, "Channel-wise Knowledge
    Distillation for Dense Prediction").

    Each channel becomes a distribution over the :math:`N = HW` positions by a
    spatial softmax at temperature :math:`T`; the loss is the KL divergence
    from the teacher's to the student's, averaged over channels:

    .. math::

        \mathcal{L}_{cwd} = \frac{T^2}{C} \sum_{c=1}^{C} \sum_{i=1}^{N}
            \phi(y^t_c)_i \log \frac{\phi(y^t_c)_i}{\phi(y^s_c)_i},
        \qquad \phi(y_c)_i = \frac{\exp(y_{c,i} / T)}{\sum_j \exp(y_{c,j} / T)}

    per image, then reduced over the batch. With ``reduction='mean'`` this is
    the reference implementation (mmrazor's ``ChannelWiseDivergence``: the
    sum over the batch and the channels times :math:`T^2 / (BC)`). Usually
    applied to logits (the paper's setting for segmentation); any maps with
    equal channels work. Adding a constant to a whole channel of either map
    changes nothing (the softmax is shift-invariant).

    Args:
        student: the student's map.
        teacher: the teacher's map, with the same channels.
        temperature: :math:`T > 0` (default 4; the authors' released configs
            for logits also use 1, so it is worth tuning).
        resize: ``'none'`` requires equal H x W up to one cell of stride rounding;
            ``'student'`` or ``'teacher'`` bilinearly resizes the other map onto
            that one's grid.
        reduction: ``'none'`` (per image) | ``'mean'`` | ``'sum'`` over the batch.

    Shape:
        - student: :math:`(B, C, H, W)`.
        - teacher: :math:`(B, C, H, W)`.
        - output: scalar, or :math:`(B,)` with ``reduction='none'``.

    Returns:
        The loss, in the compute dtype (float32, or float64 for float64 inputs).

    Raises:
        TypeError: an input is not a floating-point tensor.
        ValueError: not 4-D, empty, different batch, channel or (without
            ``resize``) spatial sizes, inputs on different devices, a
            non-positive temperature, or an unknown option.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> s, t = torch.randn(2, 5, 8, 8), torch.randn(2, 5, 8, 8)
        >>> round(cwd_loss(s, t).item(), 4)
        1.0324
        >>> abs(cwd_loss(t + 3.0, t).item()) < 1e-6  # a per-channel shift changes nothing
        True
    """
    _check_options(temperature, resize, reduction)
    return _cwd(student, teacher, temperature, resize, reduction)


class CWDLoss(nn.Module):
    r"""Channel-wise distillation (Shu et al., ICCV 2021), as a module.

    Stores the options of :func:`cwd_loss`, validated once here, and computes it
    in ``forward``; see that function for the formula and the arguments.

    Args:
        temperature: :math:`T > 0` (default 4).
        resize: ``'none'``, ``'student'`` or ``'teacher'``.
        reduction: ``'none'`` | ``'mean'`` | ``'sum'`` over the batch.

    Shape:
        - student: :math:`(B, C, H, W)`.
        - teacher: :math:`(B, C, H, W)`.
        - output: scalar, or :math:`(B,)` with ``reduction='none'``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> criterion = CWDLoss()
        >>> criterion
        CWDLoss(temperature=4.0, resize='none', reduction='mean')
        >>> round(criterion(torch.randn(2, 5, 8, 8), torch.randn(2, 5, 8, 8)).item(), 4)
        1.0324
    """

    def __init__(self, temperature: float = 4.0, resize: Resize = "none",
                 reduction: Reduction = "mean") -> None:
        super().__init__()
        _check_options(temperature, resize, reduction)
        self.temperature = float(temperature)
        self.resize: Resize = resize
        self.reduction: Reduction = reduction

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return _cwd(student, teacher, self.temperature, self.resize, self.reduction)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, resize={self.resize!r}, "
                f"reduction={self.reduction!r}")
