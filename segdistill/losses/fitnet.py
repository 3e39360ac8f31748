r"""FitNet hints: the student's features regressed onto the teacher's (Romero et al., 2015)."""

from __future__ import annotations

from torch import Tensor, nn

from segdistill._checks import (
    check_feature_map,
    check_feature_pair,
    check_positive_int,
)
from segdistill._features import Resize, align_grids, check_resize, full_precision
from segdistill._reduction import Reduction, check_reduction, nan_where_nonfinite, reduce_loss

__all__ = ["FitNetLoss", "fitnet_loss"]

_SAME_CHANNELS = ("; FitNetLoss(student_channels, teacher_channels) adds the 1x1 regressor "
                  "that maps one onto the other")


def _fitnet(student: Tensor, teacher: Tensor, resize: Resize, reduction: Reduction) -> Tensor:
    """:func:`fitnet_loss` with its options already validated."""
    check_feature_pair(student, teacher, same_channels=_SAME_CHANNELS)
    ctx, (s, t) = full_precision(student, teacher)
    with ctx:
        s, t = align_grids(s, t, resize)
        return reduce_loss(nan_where_nonfinite((s - t).square(), s, t), reduction)


def fitnet_loss(student: Tensor, teacher: Tensor, *, resize: Resize = "teacher",
                reduction: Reduction = "mean") -> Tensor:
    r"""FitNet hint loss of Romero et al. (ICLR 2015), for dense features.

    The student's (regressed) features are bilinearly resized
    (``align_corners=False``) to the teacher's H x W (the default
    ``resize='teacher'``), as in the FitNet baseline of He et al. (CVPR 2019,
    Table 3), and matched with a squared L2 distance averaged over elements (a
    mean squared error):

    .. math::

        \mathcal{L}_{fit} = \frac{1}{BCHW}
            \big\lVert \mathrm{up}\big(r(\phi_s)\big) - \phi_t \big\rVert_2^2

    This function takes :math:`r(\phi_s)` with the teacher's channel count;
    :class:`FitNetLoss` owns the 1x1 regressor :math:`r`.

    Args:
        student: the student's features after the regressor.
        teacher: the teacher's features.
        resize: the grid the loss computes on: ``'teacher'`` (default),
            ``'student'``, or ``'none'`` (equal grids up to one cell of stride
            rounding, else ``ValueError``).
        reduction: ``'none'`` (per element, on the common grid) | ``'mean'`` | ``'sum'``.

    Shape:
        - student: :math:`(B, C, h, w)`.
        - teacher: :math:`(B, C, H, W)`.
        - output: scalar, or :math:`(B, C, H, W)` with ``reduction='none'``.

    Returns:
        The loss, in the compute dtype (float32, or float64 for float64 inputs).

    Raises:
        TypeError: an input is not a floating-point tensor.
        ValueError: not 4-D, empty, different batch or channel counts (the
            message points to :class:`FitNetLoss`), inputs on different
            devices, or an unknown reduction.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> teacher = torch.randn(2, 8, 8, 8)
        >>> round(fitnet_loss(torch.randn(2, 8, 4, 4), teacher).item(), 4)
        1.6116
        >>> fitnet_loss(teacher, teacher, reduction="sum").item()
        0.0
    """
    check_resize(resize)
    check_reduction(reduction)
    return _fitnet(student, teacher, resize, reduction)


class FitNetLoss(nn.Module):
    r"""FitNet hint loss with its learnable 1x1 regressor (Romero et al., 2015).

    Where the channel counts differ, a 1x1 convolution without bias maps the
    student's channels onto the teacher's; where they agree the regressor is
    ``nn.Identity``. The bias is left out by choice (Romero et al. leave the
    regressor's form open): a pure linear map of the channels, like the
    bias-free convolutions of :class:`~segdistill.Adapter`. The regressor is
    applied before resizing (a 1x1 convolution and bilinear interpolation
    commute, and the small grid is cheaper), then :func:`fitnet_loss` is
    called. It is a trainable part of the student side: give its parameters
    to the optimizer. Under ``torch.autocast`` it runs in the autocast dtype
    like any other layer, while the loss itself is computed in float32.

    Args:
        student_channels: :math:`C_s`.
        teacher_channels: :math:`C_t`.
        resize: ``'teacher'`` (default), ``'student'`` or ``'none'``.
        reduction: ``'none'`` | ``'mean'`` | ``'sum'`` over the elements.

    Shape:
        - student: :math:`(B, C_s, h, w)`.
        - teacher: :math:`(B, C_t, H, W)`.
        - output: scalar, or :math:`(B, C_t, H, W)` with ``reduction='none'``.

    Raises:
        TypeError: a channel count is not an int.
        ValueError: a channel count is below 1; in ``forward``, student
            features whose channel count is not ``student_channels``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> criterion = FitNetLoss(48, 64)
        >>> criterion
        FitNetLoss(
          student_channels=48, teacher_channels=64, resize='teacher', reduction='mean'
          (regressor): Conv2d(48, 64, kernel_size=(1, 1), stride=(1, 1), bias=False)
        )
        >>> round(criterion(torch.randn(2, 48, 4, 4), torch.randn(2, 64, 8, 8)).item(), 4)
        1.1773
    """

    def __init__(self, student_channels: int, teacher_channels: int,
                 resize: Resize = "teacher", reduction: Reduction = "mean") -> None:
        super().__init__()
        self.student_channels = check_positive_int("student_channels", student_channels)
        self.teacher_channels = check_positive_int("teacher_channels", teacher_channels)
        check_resize(resize)
        check_reduction(reduction)
        self.resize: Resize = resize
        self.reduction: Reduction = reduction
        self.regressor: nn.Module = (
            nn.Identity() if student_channels == teacher_channels
            else nn.Conv2d(student_channels, teacher_channels, 1, bias=False)
        )

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        dims = check_feature_map(student, "student")
        if dims["C"] != self.student_channels:
            raise ValueError(f"expected student features with {self.student_channels} channels, "
                             f"got {dims['C']}")
        return _fitnet(self.regressor(student), teacher, self.resize, self.reduction)

    def extra_repr(self) -> str:
        return (f"student_channels={self.student_channels}, "
                f"teacher_channels={self.teacher_channels}, resize={self.resize!r}, "
                f"reduction={self.reduction!r}")
