r"""Knowledge adaptation loss (He et al., CVPR 2019, eq. 2)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from segdistill._checks import check_choice, check_feature_pair, check_real
from segdistill._features import (
    Resize,
    align_grids,
    check_resize,
    full_precision,
    normalize_channels,
)
from segdistill._reduction import Reduction, check_reduction, reduce_loss

__all__ = ["AdaptationLoss", "adaptation_loss"]

Normalize = Literal["position", "sample"]
NORMALIZE_MODES: tuple[str, ...] = ("position", "sample")


def _check_options(
    p: float, q: float, normalize: str, resize: str, eps: float, reduction: str
) -> None:
    check_real("p", p, minimum=1.0, allow_inf=True)
    check_real("q", q, minimum=1.0, allow_inf=True)
    check_choice("normalize", normalize, NORMALIZE_MODES)
    check_resize(resize)
    check_real("eps", eps, minimum=0.0, strict=True)
    check_reduction(reduction)


def _adaptation(student: Tensor, teacher: Tensor, p: float, q: float, normalize: Normalize,
                resize: Resize, eps: float, reduction: Reduction) -> Tensor:
    """:func:`adaptation_loss` with its options already validated."""
    check_feature_pair(student, teacher,
                       same_channels=" (an Adapter maps the student's onto the teacher's)")
    student, teacher = align_grids(student, teacher, resize)
    ctx, (x_s, x_t) = full_precision(student, teacher)
    with ctx:
        if normalize == "sample":  # one vector per image instead of one per position
            x_s, x_t = x_s.flatten(1), x_t.flatten(1)
        diff = normalize_channels(x_t, 1, q, eps) - normalize_channels(x_s, 1, q, eps)
        terms = torch.linalg.vector_norm(diff, ord=p, dim=1)
        return reduce_loss(terms, reduction)


def adaptation_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    p: float = 1.0,
    q: float = 2.0,
    normalize: Normalize = "position",
    resize: Resize = "none",
    eps: float = 1e-8,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Knowledge adaptation loss of He et al. (CVPR 2019), eq. (2).

    Compares the student's adapted features :math:`C_f(\phi_s)` with the
    teacher's translated features :math:`E(\phi_t)` after normalising each by
    its :math:`q`-norm:

    .. math::

        \mathcal{L}_{adapt} = \frac{1}{|I|} \sum_{j \in I}
            \left\lVert \frac{E(\phi_t)_j}{\lVert E(\phi_t)_j \rVert_q}
            - \frac{C_f(\phi_s)_j}{\lVert C_f(\phi_s)_j \rVert_q} \right\rVert_p .

    The paper leaves the index set :math:`I` open. With
    ``normalize='position'`` (the default, our reading) :math:`j` runs over
    every spatial position of every image and each position's channel vector
    is normalised. With ``normalize='sample'`` :math:`j` runs over images and
    each image's whole C x H x W map is flattened and normalised, which is how
    torchdistill reads the paper.

    Args:
        student: the student's features through the adapter :math:`C_f`.
        teacher: the teacher's features through the translator's encoder.
        p: order of the norm of the difference (default 1), at least 1.
        q: order of the normalising norm (default 2), at least 1.
        normalize: ``'position'`` or ``'sample'``, see above.
        resize: ``'none'`` requires equal H x W up to one cell of stride rounding;
            ``'student'`` or ``'teacher'`` bilinearly resizes the other map onto
            that one's grid.
        eps: lower bound on a norm before dividing by it (taken after the
            vector is divided by its largest entry), so that an all-zero
            feature vector stays zero instead of becoming NaN; any non-zero
            vector is normalised exactly, at any scale (no overflow at 1e20,
            no underflow at 1e-20). A NaN or an infinity gives NaN.
        reduction: ``'none'`` | ``'mean'`` | ``'sum'`` over the index set.

    Shape:
        - student: :math:`(B, C, H, W)`.
        - teacher: :math:`(B, C, H, W)`, the same C (the adapter maps the
          student's channels onto the teacher's).
        - output: scalar; with ``reduction='none'`` :math:`(B, H, W)` for
          ``normalize='position'`` and :math:`(B,)` for ``'sample'``.

    Returns:
        The loss, in the compute dtype (float32, or float64 for float64 inputs).

    Raises:
        TypeError: an input is not a floating-point tensor.
        ValueError: an input is not 4-D or is empty, the batch, channel or
            spatial sizes differ, the inputs are on different devices, or an
            option has an unknown value.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> student, teacher = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
        >>> round(adaptation_loss(student, teacher).item(), 4)
        3.3777
        >>> adaptation_loss(student, teacher, reduction="none").shape
        torch.Size([2, 4, 4])
        >>> round(adaptation_loss(3.0 * teacher, teacher).item(), 6)  # scale-invariant
        0.0
    """
    _check_options(p, q, normalize, resize, eps, reduction)
    return _adaptation(student, teacher, p, q, normalize, resize, eps, reduction)


class AdaptationLoss(nn.Module):
    r"""Knowledge adaptation loss of He et al. (CVPR 2019), eq. (2), as a module.

    Stores the options of :func:`adaptation_loss`, validated once here, and
    computes it in ``forward``; see that function for the formula and the
    arguments.

    Args:
        p: order of the norm of the difference (default 1).
        q: order of the normalising norm (default 2).
        normalize: ``'position'`` (default) or ``'sample'``.
        resize: ``'none'``, ``'student'`` or ``'teacher'``.
        eps: lower bound on a norm before dividing by it.
        reduction: ``'none'`` | ``'mean'`` | ``'sum'``.

    Shape:
        - student: :math:`(B, C, H, W)`.
        - teacher: :math:`(B, C, H, W)`.
        - output: scalar, or per-term with ``reduction='none'``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> criterion = AdaptationLoss(p=2.0)
        >>> criterion
        AdaptationLoss(p=2.0, q=2.0, normalize='position', resize='none', eps=1e-08,
                       reduction='mean')
        >>> round(criterion(torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)).item(), 4)
        1.4267
    """

    def __init__(
        self,
        p: float = 1.0,
        q: float = 2.0,
        normalize: Normalize = "position",
        resize: Resize = "none",
        eps: float = 1e-8,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__()
        _check_options(p, q, normalize, resize, eps, reduction)
        self.p = float(p)
        self.q = float(q)
        self.normalize: Normalize = normalize
        self.resize: Resize = resize
        self.eps = eps
        self.reduction: Reduction = reduction

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return _adaptation(student, teacher, self.p, self.q, self.normalize, self.resize,
                           self.eps, self.reduction)

    def extra_repr(self) -> str:
        return (
            f"p={self.p}, q={self.q}, normalize={self.normalize!r}, resize={self.resize!r}, "
            f"eps={self.eps}, reduction={self.reduction!r}"
        )
