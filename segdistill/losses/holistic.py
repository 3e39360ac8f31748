r"""SKD's holistic term: adversarial distillation through a discriminator (Liu et al., CVPR 2019).

A discriminator :math:`D` scores segmentation maps; it is trained with a hinge
loss to score the teacher's maps high and the student's low, and the student is
trained to raise its own score. The discriminator is a second network with an
optimiser of its own (Adam, not the student's SGD), so the term has two losses:

- the *generator term* :math:`-\operatorname{mean} D(z_s)` for the student,
  evaluated with :math:`D`'s parameters detached (``HolisticLoss.forward``);
- the *discriminator loss* :math:`\operatorname{mean}\,\mathrm{relu}(1 - D(z_t))
  + \operatorname{mean}\,\mathrm{relu}(1 + D(z_s))` for :math:`D`, evaluated on
  detached logits (``HolisticLoss.discriminator_loss``).

Neither loss sends gradients to the other's parameters, so one backward of their
sum trains both (:func:`attach_discriminator_loss`): the form that DDP, gradient
accumulation and a gradient scaler need no special handling for.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from segdistill._checks import (
    check_feature_map,
    check_feature_pair,
    check_positive_int,
    check_real,
    check_same_batch,
    check_same_device,
)
from segdistill._features import Resize, align_grids, check_resize, full_precision
from segdistill._reduction import Reduction, check_reduction, nan_where_nonfinite, reduce_loss

__all__ = [
    "Discriminator",
    "HolisticLoss",
    "attach_discriminator_loss",
    "discriminator_optimizer",
    "holistic_discriminator_loss",
    "holistic_generator_loss",
]

# Four stride-2 convolutions (kernel 4, padding 1) halve the grid four times, and the
# last 4 x 4 convolution has no padding: 64 pixels is the smallest side with an output.
_MIN_SIZE = 64
_SLOPE = 0.1  # the LeakyReLU slope of the reference discriminator
_EPS = 1e-12  # the reference's (and torch's) guard in the power iteration's normalisation


# ---------------------------------------------------------------------------- the network


class _SpectralNormConv2d(nn.Conv2d):
    """A convolution whose weight is divided by an estimate of its largest singular
    value (Miyato et al., ICLR 2018), refined by one power iteration per forward in
    training mode, as in SAGAN and the SKD discriminator.

    Written here rather than with ``torch.nn.utils.parametrizations.spectral_norm``
    because a parametrized module cannot be pickled (only its ``state_dict`` can),
    and the library's modules pickle. The state is the same: buffers ``weight_u``
    and ``weight_v``, updated without gradients; the gradient flows through
    :math:`\\sigma = u^\\top W v` with :math:`u, v` held fixed.
    """

    weight_u: Tensor
    weight_v: Tensor

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 padding: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding)
        matrix = self.weight.detach().flatten(1)
        u = F.normalize(torch.randn(matrix.shape[0]), dim=0, eps=_EPS)
        v = F.normalize(torch.randn(matrix.shape[1]), dim=0, eps=_EPS)
        for _ in range(15):  # torch's warm start, so that the first sigma is already close
            u, v = _power_iteration(matrix, u)
        self.register_buffer("weight_u", u)
        self.register_buffer("weight_v", v)

    def forward(self, x: Tensor) -> Tensor:
        matrix = self.weight.flatten(1)
        with torch.autocast(x.device.type, enabled=False):
            if self.training:
                with torch.no_grad():
                    u, v = _power_iteration(matrix.detach(), self.weight_u)
                    self.weight_u.copy_(u)
                    self.weight_v.copy_(v)
            # copies: a later forward updates the buffers in place before this backward
            u, v = self.weight_u.clone(), self.weight_v.clone()
            sigma = torch.dot(u, torch.mv(matrix, v))
        out: Tensor = self._conv_forward(x, self.weight / sigma, self.bias)
        return out


def _power_iteration(matrix: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    v = F.normalize(torch.mv(matrix.t(), u), dim=0, eps=_EPS)
    return F.normalize(torch.mv(matrix, v), dim=0, eps=_EPS), v


class _SelfAttention(nn.Module):
    """SAGAN's self-attention (Zhang et al., ICML 2019), as the SKD discriminator has it:
    1x1 query and key projections to ``channels // 8``, a 1x1 value projection, an
    unscaled softmax over the positions, and a residual scaled by ``gamma`` (from 0)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        inner = max(1, channels // 8)
        self.query = nn.Conv2d(channels, inner, 1)
        self.key = nn.Conv2d(channels, inner, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q = self.query(x).reshape(b, -1, h * w)
        k = self.key(x).reshape(b, -1, h * w)
        v = self.value(x).reshape(b, c, h * w)
        attention = torch.softmax(q.transpose(1, 2) @ k, dim=-1)  # (B, N, N), rows: queries
        attended = (v @ attention.transpose(1, 2)).reshape(b, c, h, w)
        out: Tensor = self.gamma * attended + x
        return out


class Discriminator(nn.Module):
    r"""The SKD discriminator (Liu et al., CVPR 2019): a spectral-normalised
    convolutional network with two self-attention layers, scoring segmentation maps.

    The architecture of CIRKD's ``utils/sagan.py`` and of SKD's
    ``networks/sagan_models.py``, at width :math:`w` (the reference's
    ``conv_dim``, 64):

    ====================================  ==========================
    layer                                 channels out
    ====================================  ==========================
    BatchNorm2d on the input              :math:`K` (+ image)
    SN conv 4x4, stride 2, LeakyReLU 0.1  :math:`w`
    SN conv 4x4, stride 2, LeakyReLU 0.1  :math:`2w`
    SN conv 4x4, stride 2, LeakyReLU 0.1  :math:`4w`
    self-attention                        :math:`4w`
    SN conv 4x4, stride 2, LeakyReLU 0.1  :math:`8w`
    self-attention                        :math:`8w`
    conv 4x4, no padding (no SN)          1
    ====================================  ==========================

    The output is a map of scores, :math:`\lfloor H/16 \rfloor - 3` by
    :math:`\lfloor W/16 \rfloor - 3` (1 x 5 for CIRKD's 64 x 128 logits of a
    512 x 1024 crop), which the losses average. SN is spectral
    normalisation: one power iteration per forward in training mode (the
    reference also iterates in eval mode; here eval mode uses the stored
    estimate, as ``torch.nn.utils`` does). The input batch norm is the
    reference's ``preprocess_GAN_mode=1``, the only mode CIRKD runs; convert
    it with ``nn.SyncBatchNorm.convert_sync_batchnorm`` under DDP, as CIRKD does.

    Two departures from the reference, both where it cannot run: the
    self-attention layers take :math:`4w` and :math:`8w` channels (the
    reference fixes 256 and 512, which breaks at any width but 64), and
    ``image_channels`` conditions the score on the image (the paper's
    conditional discriminator, "the segmentation map and the conditional RGB
    image are concatenated"; both reference codes feed the logits alone, which
    ``image_channels=0`` reproduces). Images are resized onto the map's grid
    (bilinear, antialiased, ``align_corners=False``) and concatenated after
    the map's channels.

    Args:
        num_classes: :math:`K`, the channels of the maps.
        image_channels: the channels of the conditioning image (3 for RGB),
            or 0 (default) for the reference's unconditional discriminator.
        width: :math:`w` (default 64, the reference's).

    Shape:
        - maps: :math:`(B, K, H, W)` with :math:`H, W \ge 64`.
        - images: :math:`(B, C_{img}, H', W')`, any size; only when
          ``image_channels > 0``.
        - output: :math:`(B, 1, \lfloor H/16 \rfloor - 3, \lfloor W/16 \rfloor - 3)`.

    Raises:
        TypeError: a count is not an int; in ``forward``, a map or an image
            that is not a floating-point tensor.
        ValueError: a count out of range; in ``forward``, maps with other than
            ``num_classes`` channels or smaller than 64 x 64, images missing,
            unexpected, or with the wrong channels or batch.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> disc = Discriminator(5, width=8)
        >>> disc(torch.randn(2, 5, 64, 96)).shape
        torch.Size([2, 1, 1, 3])
        >>> [disc.conv1.out_channels, disc.conv4.out_channels, disc.attention2.value.in_channels]
        [8, 64, 64]
        >>> Discriminator(5, image_channels=3, width=8).conv1.in_channels
        8
    """

    def __init__(self, num_classes: int, *, image_channels: int = 0, width: int = 64) -> None:
        super().__init__()
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.image_channels = _check_image_channels(image_channels)
        self.width = check_positive_int("width", width)
        self.input_norm = nn.BatchNorm2d(num_classes + image_channels)
        self.conv1 = _SpectralNormConv2d(num_classes + image_channels, width, 4, 2, 1)
        self.conv2 = _SpectralNormConv2d(width, 2 * width, 4, 2, 1)
        self.conv3 = _SpectralNormConv2d(2 * width, 4 * width, 4, 2, 1)
        self.attention1 = _SelfAttention(4 * width)
        self.conv4 = _SpectralNormConv2d(4 * width, 8 * width, 4, 2, 1)
        self.attention2 = _SelfAttention(8 * width)
        self.head = nn.Conv2d(8 * width, 1, 4)

    def forward(self, maps: Tensor, images: Tensor | None = None) -> Tensor:
        x = self._input(maps, images)
        x = F.leaky_relu(self.conv1(self.input_norm(x)), _SLOPE)
        x = F.leaky_relu(self.conv2(x), _SLOPE)
        x = self.attention1(F.leaky_relu(self.conv3(x), _SLOPE))
        x = self.attention2(F.leaky_relu(self.conv4(x), _SLOPE))
        out: Tensor = self.head(x)
        return out

    def _input(self, maps: Tensor, images: Tensor | None) -> Tensor:
        """The checked maps, with the images resized onto their grid and appended."""
        dims = check_feature_map(maps, "maps")
        if dims["C"] != self.num_classes:
            raise ValueError(f"expected maps with {self.num_classes} channels (one per class), "
                             f"got {dims['C']}")
        if dims["H"] < _MIN_SIZE or dims["W"] < _MIN_SIZE:
            raise ValueError(
                f"expected maps of at least {_MIN_SIZE} x {_MIN_SIZE} for the discriminator "
                f"(four stride-2 convolutions, then a 4 x 4 one), got ({dims['H']}, "
                f"{dims['W']}); feed it logits at a finer grid (a larger crop, or "
                "resize='student' / 'teacher' towards the larger map)"
            )
        if self.image_channels == 0:
            if images is not None:
                raise ValueError("this discriminator was built with image_channels=0 and takes "
                                 "no images; build it with image_channels=3 to condition on them")
            return maps
        if images is None:
            raise ValueError(f"this discriminator scores (map, image) pairs "
                             f"(image_channels={self.image_channels}): pass the input images")
        image_dims = check_feature_map(images, "images")
        if image_dims["C"] != self.image_channels:
            raise ValueError(f"expected images with {self.image_channels} channels, got "
                             f"{image_dims['C']}")
        check_same_batch(maps, images, ("maps", "images"))
        check_same_device(maps, images, ("maps", "images"))
        images = F.interpolate(images.to(maps.dtype), size=maps.shape[-2:], mode="bilinear",
                               align_corners=False, antialias=True)
        return torch.cat([maps, images], dim=1)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, image_channels={self.image_channels}, "
                f"width={self.width}")


def _check_image_channels(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"image_channels must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"image_channels must be at least 0, got {value}")
    return value


# ------------------------------------------------------------------------------ the losses


def _check_scores(scores: object, name: str) -> Tensor:
    if not isinstance(scores, Tensor):
        raise TypeError(f"expected {name} to be a torch.Tensor, got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"expected {name} to have a floating-point dtype, got {scores.dtype}")
    if scores.ndim == 0 or scores.numel() == 0:
        raise ValueError(f"expected {name} with a batch dimension and at least one score, got "
                         f"shape {tuple(scores.shape)}")
    return scores


def _per_image(scores: Tensor) -> Tensor:
    """``(B, ...)`` scores as ``(B, n)``: one row per image."""
    return scores.reshape(scores.shape[0], -1)


def _generator(d_student: Tensor, reduction: Reduction) -> Tensor:
    """:func:`holistic_generator_loss` with its options already validated."""
    _check_scores(d_student, "d_student")
    ctx, (s,) = full_precision(_per_image(d_student))
    with ctx:
        return reduce_loss(nan_where_nonfinite(-s.mean(1), s), reduction)


def _hinge(d_student: Tensor, d_teacher: Tensor, reduction: Reduction) -> Tensor:
    """:func:`holistic_discriminator_loss` with its options already validated."""
    _check_scores(d_student, "d_student")
    _check_scores(d_teacher, "d_teacher")
    if d_student.shape != d_teacher.shape:
        raise ValueError(f"expected d_student and d_teacher of one shape (the discriminator's "
                         f"scores of equal-sized maps), got {tuple(d_student.shape)} and "
                         f"{tuple(d_teacher.shape)}")
    check_same_device(d_student, d_teacher, ("d_student", "d_teacher"))
    ctx, (s, t) = full_precision(_per_image(d_student), _per_image(d_teacher))
    with ctx:
        # a clamp hides an infinite score (relu(1 - inf) = 0): such an image is NaN instead
        loss = F.relu(1.0 - t).mean(1) + F.relu(1.0 + s).mean(1)
        return reduce_loss(nan_where_nonfinite(loss, s, t), reduction)


def holistic_generator_loss(d_student: Tensor, *, reduction: Reduction = "mean") -> Tensor:
    r"""The student's adversarial term of SKD (Liu et al., CVPR 2019), in CIRKD's hinge form.

    Minus the mean score that the discriminator gives the student's maps: the
    student learns to make its segmentation maps score like the teacher's.

    .. math::

        \mathcal{L}_{G} = -\frac{1}{B} \sum_{b} \frac{1}{|D_b|} \sum_{i} D(z^s_b)_i

    with :math:`D(z^s_b)` the discriminator's score map of image :math:`b`.
    The same in CIRKD's ``CriterionAdvForG`` for its hinge and WGAN forms.
    Give it scores computed with the discriminator's parameters detached
    (:class:`HolisticLoss` does), so that the student's step leaves them
    alone.

    Args:
        d_student: the discriminator's scores of the student's maps.
        reduction: ``'none'`` (one value per image), ``'mean'`` or ``'sum'``
            over the batch.

    Shape:
        - d_student: :math:`(B, \ldots)`, e.g. the :math:`(B, 1, h, w)` of
          :class:`Discriminator`.
        - output: scalar, or :math:`(B,)` with ``reduction='none'``.

    Returns:
        The term, in float32 at least; NaN for an image with a NaN or an
        infinite score.

    Raises:
        TypeError: ``d_student`` is not a floating-point tensor.
        ValueError: a 0-D or empty tensor, or an unknown reduction.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> round(holistic_generator_loss(torch.randn(2, 1, 2, 3)).item(), 4)
        0.2618
        >>> holistic_generator_loss(torch.ones(2, 1, 1, 5), reduction="none")
        tensor([-1., -1.])
    """
    check_reduction(reduction)
    return _generator(d_student, reduction)


def holistic_discriminator_loss(d_student: Tensor, d_teacher: Tensor, *,
                                reduction: Reduction = "mean") -> Tensor:
    r"""The discriminator's hinge loss of SKD's holistic term, as CIRKD trains it.

    The discriminator learns to score the teacher's maps above 1 and the
    student's below -1:

    .. math::

        \mathcal{L}_{D} = \frac{1}{B} \sum_{b} \Big(
            \frac{1}{|D_b|} \sum_i \mathrm{relu}\big(1 - D(z^t_b)_i\big)
            + \frac{1}{|D_b|} \sum_i \mathrm{relu}\big(1 + D(z^s_b)_i\big) \Big)

    CIRKD's ``CriterionAdv('hinge')`` (``losses/adv.py``), which its
    baselines run (weight 0.1, Adam at 4e-4, no gradient penalty). SKD's own
    code defaults to the WGAN-GP form (Wasserstein loss plus a gradient
    penalty of weight 10); the hinge form needs no penalty, spectral
    normalisation bounding the discriminator instead. Give it scores of
    detached logits, so that the discriminator's step leaves the student alone.

    Args:
        d_student: the discriminator's scores of the student's maps.
        d_teacher: its scores of the teacher's maps, of the same shape.
        reduction: ``'none'`` (one value per image), ``'mean'`` or ``'sum'``
            over the batch.

    Shape:
        - d_student, d_teacher: :math:`(B, \ldots)`, equal.
        - output: scalar, or :math:`(B,)` with ``reduction='none'``.

    Returns:
        The loss, in float32 at least; NaN for an image with a NaN or an
        infinite score (a clamp would otherwise hide it).

    Raises:
        TypeError: an input is not a floating-point tensor.
        ValueError: 0-D or empty scores, shapes or devices that differ, or
            an unknown reduction.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> d_s, d_t = torch.randn(2, 1, 2, 3), torch.randn(2, 1, 2, 3)
        >>> round(holistic_discriminator_loss(d_s, d_t).item(), 4)
        1.9029
        >>> holistic_discriminator_loss(-torch.ones(1, 4), torch.ones(1, 4)).item()  # separated
        0.0
    """
    check_reduction(reduction)
    return _hinge(d_student, d_teacher, reduction)


def attach_discriminator_loss(loss: Tensor, discriminator_loss: Tensor) -> Tensor:
    r"""``loss``, unchanged in value, whose backward also back-propagates
    ``discriminator_loss``: one backward trains the student and the discriminator.

    Returns :math:`\mathcal{L} + (\mathcal{L}_D - \mathrm{sg}(\mathcal{L}_D))`,
    with :math:`\mathrm{sg}` the stop-gradient: the second part is exactly 0
    for a finite :math:`\mathcal{L}_D` (NaN for a NaN one) and has the
    gradient of :math:`\mathcal{L}_D`. Since the generator term reaches no
    discriminator parameter and the discriminator loss no student parameter
    (:class:`HolisticLoss` detaches each), every parameter gets exactly the
    gradient of its own loss, in the one backward the training loop already
    runs. Under DDP both are all-reduced by it, gradient accumulation and
    ``no_sync`` cover both, and a ``GradScaler`` scales both (call
    ``scaler.step`` on each optimiser, then ``scaler.update()`` once).

    Args:
        loss: what the loop back-propagates (the weighted generator term, or
            the whole student loss).
        discriminator_loss: the discriminator's loss, already weighted.

    Returns:
        A tensor equal to ``loss``.

    Example:
        >>> w = torch.ones(1, requires_grad=True)
        >>> total = attach_discriminator_loss(torch.tensor(2.0), (3 * w).sum())
        >>> total.item(), total.backward(), w.grad.item()
        (2.0, None, 3.0)
    """
    return loss + (discriminator_loss - discriminator_loss.detach())


def discriminator_optimizer(parameters: Iterable[nn.Parameter], *, lr: float = 4e-4,
                            betas: tuple[float, float] = (0.9, 0.99)) -> torch.optim.Adam:
    """The discriminator's optimiser as CIRKD's ``train_kd.py`` builds it: Adam at a
    constant 4e-4 with betas (0.9, 0.99), no weight decay, no schedule.

    Args:
        parameters: the discriminator's parameters
            (``HolisticLoss.separately_optimized_parameters()``).
        lr: the learning rate.
        betas: Adam's betas.

    Example:
        >>> criterion = HolisticLoss(3, width=2)
        >>> opt = discriminator_optimizer(criterion.separately_optimized_parameters())
        >>> opt.defaults["lr"], opt.defaults["betas"]
        (0.0004, (0.9, 0.99))
    """
    return torch.optim.Adam(parameters, lr=check_real("lr", lr, minimum=0.0, strict=True),
                            betas=betas)


# ------------------------------------------------------------------------------ the module


class HolisticLoss(nn.Module):
    r"""SKD's holistic distillation (Liu et al., CVPR 2019): a module that owns the
    discriminator and computes both adversarial losses.

    ``forward`` returns the student's generator term
    (:func:`holistic_generator_loss`) with the discriminator's parameters
    detached: the student gets gradients through :math:`D`, :math:`D` none.
    :meth:`discriminator_loss` returns the discriminator's hinge loss
    (:func:`holistic_discriminator_loss`, times ``discriminator_weight``) on
    detached logits: :math:`D` gets gradients, the student none.

    The module does not step the discriminator; the training loop does, with
    an optimiser of its own on :meth:`separately_optimized_parameters`
    (:func:`discriminator_optimizer`: Adam, 4e-4, betas (0.9, 0.99)), which
    the student's optimiser must not hold. Why not an optimiser inside the
    module: a step inside ``forward`` would run a backward inside a DDP
    forward, could not see the loop's gradient scaler, would step on every
    accumulated micro-batch, and its state would sit outside the loop's
    checkpoint. With :func:`attach_discriminator_loss` the loop's one
    backward computes both gradients, so DDP synchronises them, accumulation
    and ``no_sync`` apply to both, and the checkpoint holds the
    discriminator in the model's ``state_dict`` and its optimiser beside the
    student's.

    Per step the discriminator runs three times, as in CIRKD's
    ``train_kd.py``: on the student's logits for the generator term, then on
    the detached student's and the teacher's for its own loss (each batch
    normalised on its own, not together).

    As CIRKD and SKD's code do, the discriminator scores the raw logits
    (through its input batch norm), and by default the logits alone
    (``image_channels=0``); ``image_channels=3`` gives the paper's conditional
    form, scoring (logits, image) pairs. CIRKD's weights: 0.001 on the
    generator term (the term's weight) and 0.1 on the discriminator loss.

    Args:
        num_classes: :math:`K`, the logits' channels.
        image_channels: 0 (default, the reference code) or the images'
            channels (3), to condition the discriminator on them.
        width: the discriminator's width (default 64, the reference's).
        discriminator_weight: the factor on the discriminator's hinge loss
            (default 0.1, CIRKD's ``--lambda-d``). Adam's steps hardly depend
            on it (they are invariant to a constant gradient scale up to its
            ``eps``).
        resize: the grid rule between the student's and the teacher's logits
            (see :func:`~segdistill._features.align_grids`); default ``'none'``.
        reduction: ``'none'`` (one value per image) | ``'mean'`` | ``'sum'``
            over the batch, for both losses.
        min_size: ``None`` (default, the reference) or a side of at least 64: logits
            whose shorter side is below it are bilinearly upsampled (aspect kept) until
            it is, before the discriminator, for images smaller than the
            discriminator's 64 x 64 (the pipeline's 48 x 48 digit scenes). Not in the
            reference code.

    Shape:
        - student_logits: :math:`(B, K, h, w)`.
        - teacher_logits: :math:`(B, K, H, W)`; the common grid at least 64 x 64.
        - images: :math:`(B, C_{img}, H_i, W_i)`, only with ``image_channels > 0``.
        - output: scalar, or :math:`(B,)` with ``reduction='none'``.

    Raises:
        TypeError: an option of the wrong type; in ``forward``, inputs that
            are not floating-point tensors.
        ValueError: an option out of range; in ``forward``, logits with other
            than ``num_classes`` classes, batches or devices that differ,
            grids that do not fit under ``resize`` or are smaller than
            64 x 64, images missing or unexpected.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> criterion = HolisticLoss(5, width=8)
        >>> criterion  # doctest: +ELLIPSIS
        HolisticLoss(
          num_classes=5, image_channels=0, width=8, discriminator_weight=0.1, resize='none', ...
          (discriminator): Discriminator(
            num_classes=5, image_channels=0, width=8
            ...
        )
        >>> student = torch.randn(2, 5, 64, 64, requires_grad=True)
        >>> teacher = torch.randn(2, 5, 64, 64)
        >>> generator = criterion(student, teacher)
        >>> round(generator.item(), 4)
        0.0155
        >>> generator.backward()
        >>> student.grad.abs().sum() > 0, criterion.discriminator.head.weight.grad is None
        (tensor(True), True)
        >>> round(criterion.discriminator_loss(student, teacher).item(), 4)
        0.2025
    """

    def __init__(self, num_classes: int, *, image_channels: int = 0, width: int = 64,
                 discriminator_weight: float = 0.1, resize: Resize = "none",
                 reduction: Reduction = "mean", min_size: int | None = None) -> None:
        super().__init__()
        if min_size is not None and check_positive_int("min_size", min_size) < _MIN_SIZE:
            raise ValueError(f"expected min_size >= {_MIN_SIZE} (the discriminator's smallest "
                             f"input) or None, got {min_size}")
        self.min_size = min_size
        self.discriminator_weight = check_real("discriminator_weight", discriminator_weight,
                                               minimum=0.0)
        check_resize(resize)
        check_reduction(reduction)
        self.resize: Resize = resize
        self.reduction: Reduction = reduction
        self.discriminator = Discriminator(num_classes, image_channels=image_channels,
                                           width=width)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor,
                images: Tensor | None = None) -> Tensor:
        """The student's generator term, through the discriminator with its
        parameters detached (its batch-norm statistics and spectral-norm
        estimates still update, as in the reference)."""
        s, _ = self._logits(student_logits, teacher_logits)
        detached = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        scores = cast(Tensor, functional_call(self.discriminator, detached, (s, images)))
        return _generator(scores, self.reduction)

    def discriminator_loss(self, student_logits: Tensor, teacher_logits: Tensor,
                           images: Tensor | None = None) -> Tensor:
        """The discriminator's hinge loss, times ``discriminator_weight``, on the
        detached logits (and images): back-propagating it trains the
        discriminator alone."""
        s, t = self._logits(student_logits, teacher_logits)
        images = None if images is None else images.detach()
        d_student = self.discriminator(s.detach(), images)
        d_teacher = self.discriminator(t.detach(), images)
        return self.discriminator_weight * _hinge(d_student, d_teacher, self.reduction)

    def separately_optimized_parameters(self) -> Iterator[nn.Parameter]:
        """The discriminator's parameters: for its own optimiser, never the student's."""
        return self.discriminator.parameters()

    def _logits(self, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        """Both logits checked and on one grid, the teacher's in the student's dtype
        (a half-precision teacher beside a float32 student)."""
        check_feature_pair(student, teacher, ("student logits", "teacher logits"),
                           same_channels=" (one per class)")
        s, t = align_grids(student, teacher, self.resize)
        h, w = s.shape[-2:]
        if self.min_size is not None and min(h, w) < self.min_size:
            scale = self.min_size / min(h, w)
            size = (max(self.min_size, math.ceil(h * scale - 1e-9)),
                    max(self.min_size, math.ceil(w * scale - 1e-9)))
            s = F.interpolate(s, size=size, mode="bilinear", align_corners=False)
            t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
        return s, t.to(s.dtype)

    def extra_repr(self) -> str:
        d = self.discriminator
        return (f"num_classes={d.num_classes}, image_channels={d.image_channels}, "
                f"width={d.width}, discriminator_weight={self.discriminator_weight}, "
                f"resize={self.resize!r}, reduction={self.reduction!r}"
                + ("" if self.min_size is None else f", min_size={self.min_size}"))

