r"""DIST: correlation-based distillation from a stronger teacher (Huang et al., NeurIPS 2022)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from segdistill._checks import check_feature_pair, check_real
from segdistill._features import Resize, align_grids, check_resize, full_precision

__all__ = ["DISTLoss", "dist_loss"]

_EPS = 1e-8  # added to the product of the two norms, as the reference does


def _check_options(beta: float, gamma: float, temperature: float, resize: str,
                   reduction: str) -> None:
    check_real("beta", beta, minimum=0.0)
    check_real("gamma", gamma, minimum=0.0)
    check_real("temperature", temperature, minimum=0.0, strict=True)
    check_resize(resize)
    if not isinstance(reduction, str) or reduction != "mean":
        raise ValueError(
            "reduction must be 'mean' for DIST: its intra-class term correlates every pixel "
            "of the batch, so there are no per-pixel or per-image terms to keep or to sum, "
            f"got {reduction!r}"
        )


def _pearson(x: Tensor, y: Tensor, dim: int | tuple[int, ...]) -> Tensor:
    """The Pearson correlation of ``x`` and ``y`` along ``dim``: the cosine of the centred
    vectors, with :data:`_EPS` added to the product of their norms (a constant vector
    has correlation 0 with anything, and a zero gradient)."""
    x = x - x.mean(dim, keepdim=True)
    y = y - y.mean(dim, keepdim=True)
    norms = torch.linalg.vector_norm(x, dim=dim) * torch.linalg.vector_norm(y, dim=dim)
    rho: Tensor = (x * y).sum(dim) / (norms + _EPS)
    return rho


def _dist(student: Tensor, teacher: Tensor, beta: float, gamma: float, temperature: float,
          resize: Resize) -> Tensor:
    """:func:`dist_loss` with its options already validated."""
    check_feature_pair(student, teacher, ("student logits", "teacher logits"),
                       same_channels=" (one per class)")
    ctx, (s, t) = full_precision(student, teacher)
    with ctx:
        s, t = align_grids(s, t, resize)
        p_s = torch.softmax(s / temperature, dim=1)
        p_t = torch.softmax(t / temperature, dim=1)
        # (B, K, H, W) needs no flattening: the class axis is dim 1, the pixels the rest
        inter = 1.0 - _pearson(p_s, p_t, dim=1).mean()
        intra = 1.0 - _pearson(p_s, p_t, dim=(0, 2, 3)).mean()
        return (beta * inter + gamma * intra) * temperature**2


def dist_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
    resize: Resize = "none",
    reduction: Literal["mean"] = "mean",
) -> Tensor:
    r"""DIST of Huang et al. (NeurIPS 2022, "Knowledge Distillation from A Stronger
    Teacher"), in its segmentation form.

    Instead of matching probabilities exactly (KL divergence), DIST asks the
    student's class probabilities to be *linearly correlated* with the
    teacher's, which tolerates the larger gap to a much stronger teacher. The
    logits are read as :math:`N = BHW` rows of :math:`K` class scores,
    :math:`P = \sigma(Z / \tau)` (softmax over classes), and

    .. math::

        \mathcal{L}_{dist} = \tau^2 \Big[
            \beta \Big(1 - \frac{1}{N} \sum_{n=1}^{N} \rho\big(P^s_{n,:}, P^t_{n,:}\big)\Big)
            + \gamma \Big(1 - \frac{1}{K} \sum_{k=1}^{K} \rho\big(P^s_{:,k}, P^t_{:,k}\big)\Big)
        \Big],
        \qquad
        \rho(u, v) = \frac{(u - \bar u) \cdot (v - \bar v)}
            {\lVert u - \bar u \rVert_2 \, \lVert v - \bar v \rVert_2 + \epsilon}

    with :math:`\epsilon = 10^{-8}`. The first (inter-class) term correlates
    the :math:`K` class probabilities of each pixel; the second (intra-class)
    term correlates, for each class, its probabilities over **all the pixels of
    the batch**, as the authors' segmentation code (``hunto/DIST_KD``,
    ``segmentation/losses/dist_kd.py``) computes it after flattening the
    logits to :math:`(BHW, K)`. mmrazor's ``DISTLoss`` and torchdistill's
    DIST do not flatten: fed 4-D logits, their intra-class term correlates
    each class over the *batch* at every pixel separately (:math:`B` values,
    often 2 per GPU), a different and much noisier loss; this function
    follows the paper and DIST_KD's segmentation form. Under data-parallel
    training, as in the reference, the intra-class term is over each
    process's own batch.

    The reference segmentation code has no temperature (:math:`\tau = 1`, the
    default here, with weights :math:`\beta = \gamma = 1`); its
    classification code divides the logits by :math:`\tau` and multiplies
    each term by :math:`\tau^2`, which is what ``temperature`` does. Every
    pixel counts, as in the reference: there is no ignore label.

    Args:
        student: the student's logits.
        teacher: the teacher's logits, with the same classes.
        beta: :math:`\beta \ge 0`, the weight of the inter-class term
            (default 1).
        gamma: :math:`\gamma \ge 0`, the weight of the intra-class term
            (default 1).
        temperature: :math:`\tau > 0` (default 1, the segmentation reference).
        resize: the grid the loss computes on: ``'none'`` (default; equal
            grids up to one cell of stride rounding, else ``ValueError``),
            ``'teacher'`` (the student's logits bilinearly resized onto the
            teacher's grid) or ``'student'``.
        reduction: only ``'mean'``: the loss is one number for the batch,
            because the intra-class term correlates all its pixels at once;
            there is no per-pixel or per-image term that ``'none'`` could
            return or ``'sum'`` could add up. The option exists so that a
            caller passing the library's default keeps working, and anything
            else fails loudly.

    Shape:
        - student: :math:`(B, K, h, w)`.
        - teacher: :math:`(B, K, H, W)`.
        - output: scalar.

    Returns:
        The loss, in float32 at least (float64 for float64 inputs), between
        0 and :math:`2 \tau^2 (\beta + \gamma)`; 0 when the student's
        probabilities equal the teacher's (up to :math:`\epsilon`).

    Raises:
        TypeError: non-floating logits, or a non-real option.
        ValueError: logits that are not 4-D or empty, batch or class counts
            that differ, inputs on different devices, grids that differ with
            ``resize='none'``, a negative ``beta`` or ``gamma``, a non-positive
            temperature, a reduction other than ``'mean'``, or an unknown
            ``resize``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> student, teacher = torch.randn(2, 5, 4, 4), torch.randn(2, 5, 4, 4)
        >>> round(dist_loss(student, teacher).item(), 4)  # unrelated: about 1 + 1
        2.0755
        >>> round(dist_loss(0.5 * teacher + 0.2 * student, teacher).item(), 4)
        0.2568
        >>> abs(dist_loss(teacher + 3.0, teacher).item()) < 1e-6  # a shift of every class
        True
    """
    _check_options(beta, gamma, temperature, resize, reduction)
    return _dist(student, teacher, beta, gamma, temperature, resize)


class DISTLoss(nn.Module):
    r"""DIST (Huang et al., NeurIPS 2022), segmentation form, as a module.

    Stores the options of :func:`dist_loss`, validated once here, and computes
    it in ``forward``; see that function for the formula and the arguments.

    Args:
        beta: :math:`\beta \ge 0`, inter-class weight (default 1).
        gamma: :math:`\gamma \ge 0`, intra-class weight (default 1).
        temperature: :math:`\tau > 0` (default 1).
        resize: ``'none'`` (default), ``'student'`` or ``'teacher'``.
        reduction: only ``'mean'`` (the loss is one number per batch).

    Shape:
        - student: :math:`(B, K, h, w)` logits.
        - teacher: :math:`(B, K, H, W)` logits.
        - output: scalar.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> criterion = DISTLoss()
        >>> criterion
        DISTLoss(beta=1.0, gamma=1.0, temperature=1.0, resize='none', reduction='mean')
        >>> round(criterion(torch.randn(2, 5, 4, 4), torch.randn(2, 5, 4, 4)).item(), 4)
        2.0755
    """

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0,
                 resize: Resize = "none", reduction: Literal["mean"] = "mean") -> None:
        super().__init__()
        _check_options(beta, gamma, temperature, resize, reduction)
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.temperature = float(temperature)
        self.resize: Resize = resize
        self.reduction: Literal["mean"] = reduction

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return _dist(student, teacher, self.beta, self.gamma, self.temperature, self.resize)

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, gamma={self.gamma}, temperature={self.temperature}, "
                f"resize={self.resize!r}, reduction={self.reduction!r}")
