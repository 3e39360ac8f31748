r"""Intra-class feature variation distillation (Wang et al., ECCV 2020)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from segdistill._checks import check_feature_pair, check_positive_int, check_real
from segdistill._features import (
    Resize,
    align_grids,
    check_resize,
    full_precision,
    normalize_channels,
)
from segdistill._labels import check_ignore_index, counted_pixels, labels_on_grid
from segdistill._reduction import Reduction, check_reduction, nan_where_nonfinite, reduce_loss
from segdistill.losses._gram import _own_graph

__all__ = ["IFVDLoss", "ifvd_loss"]

# The reference's guard on a class's pixel count. A prototype is only used by
# the pixels of its class, so its count is at least 1 and the guard merely
# scales the prototype by count / (count + 1e-6), which no cosine can see.
_COUNT_EPS = 1e-6


def _check_options(num_classes: int, ignore_index: int | None, resize: str, eps: float,
                   reduction: str) -> None:
    check_positive_int("num_classes", num_classes)
    check_ignore_index(ignore_index)
    check_resize(resize)
    check_real("eps", eps, minimum=0.0, strict=True)
    check_reduction(reduction)


class _Classes(NamedTuple):
    """Which class each pixel of a ``(B, N)`` label map is in, in the forms the maps use."""

    one_hot: Tensor  # (B, K, N) in the compute dtype
    counts: Tensor  # (B, K, 1), pixels per class
    pixel_class: Tensor  # (B, 1, N), each pixel's class (0 where it has none)
    in_class: Tensor  # (B, N), False at ignored pixels


def _classes(target: Tensor, valid: Tensor | None, num_classes: int, size: tuple[int, int],
             dtype: torch.dtype) -> _Classes:
    """The labels on ``size`` (:func:`~segdistill._labels.labels_on_grid`, the grid step
    of :func:`counted_pixels` too, so both read the same source pixel), as classes; a
    pixel that ``valid`` leaves out is in none, even when ``ignore_index`` is in
    ``[0, K)``."""
    labels = labels_on_grid(target, size).long().flatten(1)
    classes = torch.arange(num_classes, device=labels.device)
    member = labels[:, None, :] == classes[None, :, None]
    if valid is not None:
        member &= valid.flatten(1)[:, None, :]
    in_class = member.any(1)
    one_hot = member.to(dtype)
    pixel_class = torch.where(in_class, labels, torch.zeros_like(labels))[:, None, :]
    return _Classes(one_hot, one_hot.sum(2, keepdim=True), pixel_class, in_class)


def _similarity_to_centres(x: Tensor, classes: _Classes, eps: float) -> Tensor:
    """Each pixel's cosine with its class's prototype, within one ``(B, C, H, W)`` map; 1
    where the pixel is in no class. ``(B, N)``."""
    pixels = x.flatten(2).transpose(1, 2)  # (B, N, C)
    prototypes = torch.bmm(classes.one_hot, pixels) / (classes.counts + _COUNT_EPS)
    # an absent class's zero prototype is never read, but the second derivative of its
    # norm would be NaN: any non-zero vector serves in its place
    prototypes = torch.where(classes.counts > 0, prototypes, torch.ones_like(prototypes))
    k = prototypes.shape[1]
    # one normalisation pass over prototypes and pixels together: one host sync, not two
    unit = normalize_channels(torch.cat([prototypes, pixels], dim=1), dim=2, eps=eps)
    similarity = torch.bmm(unit[:, :k], unit[:, k:].transpose(1, 2))  # (B, K, N)
    cosine = similarity.gather(1, classes.pixel_class)[:, 0]
    return torch.where(classes.in_class, cosine, torch.ones_like(cosine))


def _squared_difference(x_s: Tensor, x_t: Tensor, classes: _Classes, eps: float) -> Tensor:
    """``(map_s - map_t)^2`` at every pixel, ``(B, H, W)``."""
    b, _, h, w = x_s.shape
    difference = _similarity_to_centres(x_s, classes, eps) - _similarity_to_centres(
        x_t, classes, eps)
    return difference.square().view(b, h, w)


def _ifvd(student: Tensor, teacher: Tensor, target: Tensor, num_classes: int,
          ignore_index: int | None, resize: Resize, eps: float, reduction: Reduction,
          validate_args: bool) -> Tensor:
    """:func:`ifvd_loss` with its options already validated."""
    check_feature_pair(student, teacher)
    if target is None:
        raise TypeError("IFVD needs labels: expected target to be a (B, H, W) tensor of "
                        "integer labels, got None")
    ctx, (s, t) = full_precision(student, teacher)
    with ctx:
        s, t = align_grids(s, t, resize)
        b, _, h, w = s.shape
        # counted_pixels reads only the batch, the class count and the grid of its
        # second argument: a one-element view carries them without allocating K maps
        classes_on_grid = s.new_zeros(()).expand(b, num_classes, h, w)
        valid = counted_pixels(target, classes_on_grid, ignore_index, validate_args)
        classes = _classes(target, valid, num_classes, (h, w), s.dtype)
        # on a graph of its own: autograd's bmm backward would otherwise follow the
        # autocast state of the code calling backward() and round the gradients
        squared = _own_graph(lambda a, c: _squared_difference(a, c, classes, eps), s, t)
        # the ones at ignored pixels must not hide a NaN or an infinity there
        return reduce_loss(nan_where_nonfinite(squared, s, t), reduction)


def ifvd_loss(
    student: Tensor,
    teacher: Tensor,
    target: Tensor,
    *,
    num_classes: int,
    ignore_index: int | None = 255,
    resize: Resize = "none",
    eps: float = 1e-8,
    reduction: Reduction = "mean",
    validate_args: bool = True,
) -> Tensor:
    r"""Intra-class feature variation distillation of Wang et al. (ECCV 2020,
    "Intra-class Feature Variation Distillation for Semantic Segmentation").

    Each pixel's feature is compared with its class's prototype, the mean
    feature of that class in the same image; the student learns to reproduce
    the teacher's map of these cosines, i.e. how far each pixel strays from
    its class centre:

    .. math::

        \mathcal{L}_{ifv} = \frac{1}{BHW} \sum_{b=1}^{B} \sum_{p=1}^{HW}
            \big(M^s_{b,p} - M^t_{b,p}\big)^2, \qquad
        M_{b,p} = \cos\big(f_{b,p},\, c_{b,y_{b,p}}\big), \qquad
        c_{b,k} = \frac{\sum_{q} [y_{b,q} = k]\, f_{b,q}}{\sum_q [y_{b,q} = k] + 10^{-6}}

    computed within each model's own features :math:`f` (so the student and
    the teacher may have different channel counts), with :math:`y` the labels
    nearest-resized onto the feature grid and :math:`M_{b,p} = 1` at pixels
    labelled ``ignore_index`` (the reference leaves them their own feature as
    centre). This is winycg/CIRKD's ``CriterionIFV``, the benchmark's IFVD
    (weight 20, on the last feature map before the classifier):

    - a class absent from an image has no prototype that any pixel uses, so
      it changes nothing;
    - the prototypes are not detached: the gradient reaches every pixel of a
      class through its prototype, as in the reference. The reference's
      ``feat_T.detach()`` is dead code (the result is unused); this loss
      does not detach the teacher either, whose features come without
      gradient when the teacher runs under ``no_grad`` (as in the wrapper);
    - the cosine normalises each vector by its own norm clamped at ``eps``
      (:func:`torch.nn.functional.cosine_similarity` since PyTorch 1.12),
      with the norm taken after dividing by the vector's largest entry so the
      map is exactly scale-invariant (as every scale-invariant loss here).
      PyTorch 1.8, which the reference ran, clamped the product of the norms
      instead; the forms differ only for vectors of norm below ``eps``, where
      the reference pulls the cosine towards 0. A zero vector has cosine 0;
    - an ignored pixel gets exactly 1 on both sides, with zero gradient. The
      reference gets :math:`\cos(f, f)`, which is 1 up to rounding but 0 for
      an all-zero feature (a dead ReLU pixel), so there an ignored pixel
      whose feature is zero on one side only adds 1 to the sum: a defect we
      do not reproduce.

    The mean is over all :math:`B \cdot H \cdot W` pixels, ignored ones
    included (they add 0), as the reference's ``MSELoss``. The class loop of
    the reference is a batched one-hot product instead: all prototypes at
    once, and each pixel's cosine read off its class's row. Memory beyond a
    normalised copy of each map is :math:`O(BKN + BKC)` for :math:`N = HW`
    pixels (the one-hot and the cosines with every prototype, the
    prototypes); time :math:`O(BKNC)`. Both products are matrix products,
    deterministic on GPUs; they are differentiated on a graph of their own,
    so ``backward()`` called inside an autocast region still gives the
    float32 gradients.

    Labels follow the library's one rule (:mod:`segdistill._labels`): integer
    ``(B, H_l, W_l)`` on any grid, nearest-resized onto the grid the loss
    computes on; every value in ``[0, num_classes)`` or ``ignore_index``.

    Args:
        student: the student's features.
        teacher: the teacher's features, with any channel count.
        target: the labels (required: the prototypes are class means).
        num_classes: :math:`K`, the number of classes (the features have
            :math:`C` channels, not :math:`K`, so it must be given).
        ignore_index: the label whose pixels are left out (cosine 1 on both
            sides), or ``None`` for every label to be a class.
        resize: the grid the loss computes on: ``'none'`` (default; equal grids
            up to one cell of stride rounding, else ``ValueError``),
            ``'student'`` or ``'teacher'`` (the other map bilinearly resized
            onto that one's grid).
        eps: the clamp of each norm in the cosine (> 0); it decides only the
            zero vector (cosine 0, gradient scaled by ``1 / eps``).
        reduction: ``'none'`` (the ``(B, H, W)`` map of squared differences,
            0 at ignored pixels), ``'mean'`` over all pixels, or ``'sum'``.
        validate_args: check that every label is in ``[0, num_classes)`` or
            ``ignore_index`` (one host sync per call); ``False`` skips it, and
            a label outside the classes is then treated as ignored.

    Shape:
        - student: :math:`(B, C_s, H, W)`.
        - teacher: :math:`(B, C_t, H, W)`.
        - target: :math:`(B, H_l, W_l)`, integer.
        - output: scalar, or :math:`(B, H, W)` with ``reduction='none'``.

    Returns:
        The loss, in the compute dtype (float32, or float64 for float64 inputs).

    Raises:
        TypeError: non-floating features, no target or one that is not a
            tensor of integer labels, a non-integer ``num_classes`` or
            ``ignore_index``.
        ValueError: features not 4-D or empty, labels not 3-D, different
            batch sizes or devices, grids that differ (with ``resize='none'``),
            labels outside ``[0, num_classes)`` that are not ``ignore_index``,
            ``num_classes < 1``, a non-positive ``eps``, an unknown option.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> student, teacher = torch.randn(2, 8, 4, 4), torch.randn(2, 16, 4, 4)
        >>> labels = torch.randint(0, 3, (2, 16, 16))  # nearest-resized to 4 x 4
        >>> round(ifvd_loss(student, teacher, labels, num_classes=3).item(), 4)
        0.1524
        >>> labels[:, :8] = 255  # the top half is ignored
        >>> ifvd_loss(student, teacher, labels, num_classes=3, reduction="none")[:, :2].max()
        tensor(0.)
        >>> round(ifvd_loss(student, teacher, labels, num_classes=3).item(), 4)
        0.084
        >>> ifvd_loss(teacher, teacher, labels, num_classes=3).item()
        0.0
    """
    _check_options(num_classes, ignore_index, resize, eps, reduction)
    return _ifvd(student, teacher, target, num_classes, ignore_index, resize, eps, reduction,
                 validate_args)


class IFVDLoss(nn.Module):
    r"""Intra-class feature variation distillation (Wang et al., ECCV 2020), as a module.

    Stores the options of :func:`ifvd_loss`, validated once here, and computes
    it in ``forward``; see that function for the formula and the arguments.
    Through a :class:`~segdistill.DistillationTerm`, pass ``uses_target=True``
    so that the wrapper's labels reach it.

    Args:
        num_classes: :math:`K`, the number of classes.
        ignore_index: label left out (default 255), or ``None``.
        resize: ``'none'`` (default), ``'student'`` or ``'teacher'``.
        eps: the clamp of each norm in the cosine (default 1e-8).
        reduction: ``'none'`` | ``'mean'`` | ``'sum'`` over pixels.
        validate_args: check the label values on every call (one host sync).

    Shape:
        - student: :math:`(B, C_s, H, W)` features.
        - teacher: :math:`(B, C_t, H, W)` features.
        - target: :math:`(B, H_l, W_l)` integer labels.
        - output: scalar, or :math:`(B, H, W)` with ``reduction='none'``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> criterion = IFVDLoss(num_classes=3)
        >>> criterion
        IFVDLoss(num_classes=3, ignore_index=255, resize='none', eps=1e-08, reduction='mean')
        >>> student, teacher = torch.randn(2, 8, 4, 4), torch.randn(2, 16, 4, 4)
        >>> round(criterion(student, teacher, torch.randint(0, 3, (2, 16, 16))).item(), 4)
        0.1524
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255,
                 resize: Resize = "none", eps: float = 1e-8, reduction: Reduction = "mean",
                 validate_args: bool = True) -> None:
        super().__init__()
        _check_options(num_classes, ignore_index, resize, eps, reduction)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.resize: Resize = resize
        self.eps = float(eps)
        self.reduction: Reduction = reduction
        self.validate_args = bool(validate_args)

    def forward(self, student: Tensor, teacher: Tensor, target: Tensor) -> Tensor:
        return _ifvd(student, teacher, target, self.num_classes, self.ignore_index, self.resize,
                     self.eps, self.reduction, self.validate_args)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
                f"resize={self.resize!r}, eps={self.eps}, reduction={self.reduction!r}")
