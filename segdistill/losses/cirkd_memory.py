r"""CIRKD's memory term: pixels against class banks of teacher embeddings from past images
(Yang et al., CVPR 2022)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from segdistill._checks import (
    check_feature_map,
    check_positive_int,
    check_real,
    check_same_batch,
    check_same_device,
    check_shape,
)
from segdistill._features import (
    Resize,
    align_grids,
    check_resize,
    full_precision,
    normalize_channels,
)
from segdistill._labels import check_ignore_index, counted_pixels, labels_on_grid
from segdistill._reduction import Reduction, check_reduction, nan_where_nonfinite, reduce_loss
from segdistill.losses._kl import softened_kl

__all__ = ["CIRKDMemory", "memory_contrast_loss"]

# The random streams of a step: each draw has its own, keyed by (seed, step, stream, index),
# so that no draw depends on how many numbers another one took.
_INIT, _BANK, _PIXELS, _ANCHORS = range(4)
_MASK64 = (1 << 64) - 1


def _stream_seed(*keys: int) -> int:
    """A 63-bit seed mixed from integer keys (the splitmix64 finaliser, once per key)."""
    h = 0
    for key in keys:
        h = (h + (key & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


def _generator(*keys: int) -> torch.Generator:
    """A CPU generator for the stream ``keys``: the same numbers on every device and rank."""
    return torch.Generator().manual_seed(_stream_seed(*keys))


def _check_options(temperature: float, kd_temperature: float, reduction: str) -> None:
    check_real("temperature", temperature, minimum=0.0, strict=True)
    check_real("kd_temperature", kd_temperature, minimum=0.0, strict=True)
    check_reduction(reduction)


def _memory_contrast(student: Tensor, teacher: Tensor, bank: Tensor, temperature: float,
                     kd_temperature: float) -> Tensor:
    """Per-anchor loss ``(N,)`` of unit anchors against ``bank``; the teacher gets no gradient."""
    bank = bank.detach().to(student.dtype)
    t_logits = teacher.detach() @ bank.mT / temperature
    s_logits = student @ bank.mT / temperature
    return softened_kl(s_logits, t_logits, kd_temperature, dim=1)


def memory_contrast_loss(
    student: Tensor,
    teacher: Tensor,
    bank: Tensor,
    *,
    temperature: float = 0.1,
    kd_temperature: float = 1.0,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""The contrast distillation of CIRKD's memory term (Yang et al., CVPR 2022), for given
    anchors and a given bank.

    Each anchor's similarities to the bank's entries, divided by the
    contrast temperature :math:`\tau`, are a distribution over the bank; the
    loss is the KL divergence from the teacher anchor's distribution to the
    student anchor's, softened by :math:`T` and scaled by :math:`T^2`:

    .. math::

        \ell_i = T^2\, \mathrm{KL}\Big(\sigma\big(\hat t_i^\top M / (\tau T)\big)
            \,\Big\|\, \sigma\big(\hat s_i^\top M / (\tau T)\big)\Big),
        \qquad \hat x = x / \lVert x \rVert_2

    with :math:`M` the ``(M, C)`` bank (its rows taken as given:
    :class:`CIRKDMemory` samples unit rows from its queues) and :math:`\sigma`
    the softmax over the bank. ``reduction='mean'`` is the reference's
    ``kl_div(..., reduction='batchmean')``: the sum over anchors divided by
    their number. The teacher side and the bank get no gradient (the
    reference detaches the teacher's logits).

    Args:
        student: the student's anchor embeddings (after the projection head);
            L2-normalised here.
        teacher: the teacher's embeddings of the same pixels; L2-normalised here.
        bank: the contrast bank.
        temperature: :math:`\tau > 0` of the similarities (default 0.1).
        kd_temperature: :math:`T > 0` of the distillation (default 1, the
            reference's, which makes :math:`T^2 = 1`).
        reduction: ``'none'`` (per anchor) | ``'mean'`` | ``'sum'``.

    Shape:
        - student: :math:`(N, C)`.
        - teacher: :math:`(N, C)`.
        - bank: :math:`(M, C)`.
        - output: scalar, or :math:`(N,)` with ``reduction='none'``.

    Returns:
        The loss, in float32 at least (float64 for float64 inputs).

    Raises:
        TypeError: an input is not a floating-point tensor.
        ValueError: not 2-D, empty, anchors of different counts or channels,
            a bank with other channels, inputs on different devices, a
            non-positive temperature or an unknown reduction.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> s, t = torch.randn(6, 8), torch.randn(6, 8)
        >>> bank = torch.nn.functional.normalize(torch.randn(20, 8), dim=1)
        >>> round(memory_contrast_loss(s, t, bank).item(), 4)
        4.1953
        >>> memory_contrast_loss(3.0 * t, t, bank).abs().item() < 1e-6  # scale-invariant
        True
    """
    _check_options(temperature, kd_temperature, reduction)
    dims = check_shape(student, "student anchors", ("N", "C"))
    t_dims = check_shape(teacher, "teacher anchors", ("N", "C"))
    m_dims = check_shape(bank, "bank", ("M", "C"))
    if dims != t_dims:
        raise ValueError(f"expected student and teacher anchors of one shape, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if m_dims["C"] != dims["C"]:
        raise ValueError(f"expected a bank with the anchors' {dims['C']} channels, got "
                         f"{m_dims['C']}")
    check_same_device(student, teacher, ("student anchors", "teacher anchors"))
    check_same_device(student, bank, ("student anchors", "bank"))
    ctx, (s, t, m) = full_precision(student, teacher, bank)
    with ctx:
        kl = _memory_contrast(normalize_channels(s, 1), normalize_channels(t, 1), m,
                              temperature, kd_temperature)
        return reduce_loss(kl, reduction)


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return seed


def _per_class(name: str, total: int, classes: int, memory_name: str, memory: int) -> int:
    """Bank entries per class, as the reference sets them: ``total // classes + 1``."""
    count = check_positive_int(name, total) // classes + 1
    if count > memory:
        raise ValueError(f"{name} // num_classes + 1 = {count} bank entries per class exceed "
                         f"{memory_name}={memory}; lower {name} or raise {memory_name}")
    return count


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather(x: Tensor) -> list[Tensor]:
    """``x`` from every rank, in rank order (one all_gather; equal shapes on every rank)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return parts


def _batch_offset(batch: int, device: torch.device) -> int:
    """The global index of this rank's first image: the batches of the ranks before it."""
    if not _distributed():
        return 0
    sizes = _gather(torch.tensor([batch], device=device))
    return sum(int(s) for s in sizes[:dist.get_rank()])


def _gather_rows(rows: Tensor) -> Tensor:
    """Every rank's rows, concatenated in rank order: counts first, then the rows padded to
    the longest, so that each all_gather has one shape on every rank."""
    if not _distributed():
        return rows
    counts = [int(c) for c in _gather(torch.tensor([rows.shape[0]], device=rows.device))]
    if max(counts) == 0:  # nothing new anywhere (every pixel ignored)
        return rows
    padded = rows.new_zeros(max(counts), rows.shape[1])
    padded[:rows.shape[0]] = rows
    return torch.cat([part[:n] for part, n in zip(_gather(padded), counts, strict=True)])


def _write(queue: Tensor, ptr: Tensor, entries: Tensor, classes: Tensor) -> None:
    """Append ``entries`` to the ring buffers ``queue[c]`` of their ``classes``, in order.

    Each class's entries go to consecutive slots from its pointer, modulo the
    queue's length, and its pointer moves past them. Where a step brings a
    class more entries than its queue holds, only the last ones are written
    (the earlier would be overwritten within the step anyway): no slot is
    written twice, so the result does not depend on the order of the writes.
    """
    length = queue.shape[1]
    classes, order = torch.sort(classes, stable=True)  # by class, each in its given order
    entries = entries[order]
    counts = torch.bincount(classes, minlength=queue.shape[0])
    starts = counts.cumsum(0) - counts
    rank = torch.arange(classes.numel(), device=classes.device) - starts[classes]
    keep = rank >= counts[classes] - length
    slots = (ptr[classes] + rank) % length
    queue[classes[keep], slots[keep]] = entries[keep].to(queue.dtype)
    ptr.copy_((ptr + counts) % length)


class CIRKDMemory(nn.Module):
    r"""CIRKD's memory-based pixel-to-pixel and pixel-to-region distillation, with its queues
    and projection head (Yang et al., CVPR 2022, "Cross-Image Relational Knowledge
    Distillation for Semantic Segmentation").

    The student's feature goes through a projection head :math:`h` (1x1 conv,
    BN, ReLU, 1x1 conv to the teacher's channels, convolutions without bias as
    in the reference); both sides are L2-normalised over channels. For every
    class :math:`c` the module keeps two queues of the teacher's unit
    embeddings from past steps: ``pixel_memory`` pixels and ``region_memory``
    regions (an image's class mean, normalised). Each step samples a bank
    from them, :math:`P = \lfloor 4096 / K \rfloor + 1` pixel and
    :math:`R = \lfloor 1024 / K \rfloor + 1` region slots per class, the same
    slots for every class as in the reference, and every counted pixel
    :math:`i` (label not ``ignore_index``) is an anchor:

    .. math::

        \mathcal{L} = \frac{1}{|A|} \sum_{i \in A} \Big(
            \lambda_p\, T^2\, \mathrm{KL}\big(\sigma(\hat t_i^\top M_p / \tau T)
                \,\big\|\, \sigma(\hat s_i^\top M_p / \tau T)\big)
          + \lambda_r\, T^2\, \mathrm{KL}\big(\sigma(\hat t_i^\top M_r / \tau T)
                \,\big\|\, \sigma(\hat s_i^\top M_r / \tau T)\big) \Big)

    with :math:`\hat s_i = h(\phi_s)_i / \lVert h(\phi_s)_i \rVert`,
    :math:`\hat t_i` the teacher's unit embedding, :math:`M_p` and
    :math:`M_r` the ``(KP, C)`` and ``(KR, C)`` banks, :math:`\tau = 0.1`,
    :math:`T = 1` and :math:`\lambda_p = \lambda_r = 0.1` (the reference's
    Cityscapes weights; its VOC script uses 0.01 for both). Each loss is
    :func:`memory_contrast_loss` on the sampled bank. With every pixel ignored
    the loss is 0, still connected to the head (so DDP finds its parameters
    used); the reference returns 0 times the mean of an empty tensor there,
    which is NaN.

    **The queues.** In training mode, every call first enqueues the teacher's
    embeddings of its batch, then samples the bank (the reference's order, so
    this step's entries can be in this step's bank): per image and class
    present, the normalised mean of its pixels into the region queue, and up
    to ``pixels_per_class`` of its pixels, drawn at random, into the pixel
    queue (in raster order). Ignored pixels are never enqueued, nor is any
    image whose teacher features hold a NaN or an infinity (its loss is NaN;
    enqueued, its entries would make the loss NaN at every later step that
    samples them, until overwritten). Each queue is a ring buffer:
    entries go to consecutive slots from the class's pointer, wrapping at the
    end (the reference instead writes a block that would cross the end into
    the queue's last slots and restarts at 0, which overwrites recent entries;
    with 16 entries a write into 20,000 slots the two agree except after a
    class had fewer than 16 pixels in an image). The queues start as random
    unit vectors, as in the reference, so the first steps are finite: the
    early banks contrast against noise until the queues fill.

    **Modes.** The queues update, and the step counter advances, in training
    mode only, whatever the grad mode (like BatchNorm's running statistics);
    in eval mode the loss is computed on the current queues, sampled for the
    current step, and nothing changes.

    **Randomness.** Every draw comes from a generator derived from the
    ``seed`` and ``step`` buffers (and, for the pixels an image enqueues, its
    index in the global batch); none reads the global RNG (only the head's
    initial weights do, like any layer's), and a run resumed from a
    ``state_dict`` repeats the uninterrupted run exactly. The
    queues, their pointers, the seed and the step are buffers, so they
    checkpoint with the module (about :math:`4 K (L_p + L_r) C` bytes: 430 MB
    for Cityscapes at 256 channels, as in the reference).

    **Distributed.** The module runs on one process without
    ``torch.distributed``. Under it (initialised, world size > 1) each
    training step gathers every rank's new entries (two small all_gathers of
    counts and one of padded rows) and enqueues them in rank order, so the
    queues stay identical on every rank, and equal to those of one process
    fed the concatenated batch. Every rank must then call the module the same
    number of times in training mode. The head uses ``nn.BatchNorm2d`` (the
    reference's ``SyncBatchNorm`` fails without a process group); convert it
    with ``nn.SyncBatchNorm.convert_sync_batchnorm`` for batch statistics
    over all ranks. Wrap the module (or the wrapper that holds it) in DDP so
    the head's gradients are averaged; its default ``broadcast_buffers=True``
    copies rank 0's queues every step, which is correct but costs their size
    in traffic (they agree already).

    Args:
        student_channels: :math:`C_s`.
        teacher_channels: :math:`C_t`, the embedding's channels.
        num_classes: :math:`K`.
        pixel_memory: pixel queue length per class (default 20,000).
        region_memory: region queue length per class (default 2,000).
        pixels_per_class: new pixels per class per image per step, at most
            (default 16).
        pixel_contrast: pixel bank size; ``pixel_contrast // K + 1`` per class
            (default 4096).
        region_contrast: region bank size; ``region_contrast // K + 1`` per
            class (default 1024).
        temperature: :math:`\tau > 0` of the similarities (default 0.1).
        kd_temperature: :math:`T > 0` of the distillation (default 1).
        pixel_weight: :math:`\lambda_p \ge 0` (default 0.1; 0 skips the term).
        region_weight: :math:`\lambda_r \ge 0` (default 0.1; 0 skips the term).
        max_anchors: ``None`` (default, as the reference: every counted
            pixel), or at most this many anchors per call, drawn at random
            from the counted pixels: the logits take :math:`|A| K (P + R)`
            floats (the pixel logits alone 270 MB for two 64 x 128 maps and 19
            classes).
        ignore_index: the label never used (default 255), or ``None``.
        resize: the grid rule between the projected student map and the
            teacher's (see :func:`~segdistill._features.align_grids`).
        reduction: ``'mean'`` over the anchors (the reference's ``batchmean``),
            ``'sum'``, or ``'none'``: a :math:`(B, H, W)` map, zero at pixels
            that are not anchors.
        validate_args: check the label values (one host sync); without it,
            labels outside ``[0, K)`` are left out like ``ignore_index``.
        seed: the seed of every random draw (default 0); a buffer.

    Shape:
        - student: :math:`(B, C_s, h, w)`.
        - teacher: :math:`(B, C_t, H, W)`.
        - target: :math:`(B, H_l, W_l)` integer labels on any grid
          (nearest-resized onto the loss's grid).
        - output: scalar, or :math:`(B, H, W)` with ``reduction='none'``.

    Raises:
        TypeError: a non-integer option; in ``forward``, no labels, non-floating
            features, or labels that are not integer.
        ValueError: an option out of range, both weights 0, a bank larger than
            its queue; in ``forward``, features with other channels than
            declared, batches or devices that differ, labels outside
            ``[0, K)`` that are not ``ignore_index``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> memory = CIRKDMemory(4, 6, num_classes=3, pixel_memory=40, region_memory=8,
        ...                      pixel_contrast=30, region_contrast=12)  # banks of 11 + 5 a class
        >>> memory  # doctest: +ELLIPSIS
        CIRKDMemory(
          student_channels=4, teacher_channels=6, num_classes=3, pixel_memory=40, ...
          (projector): Sequential(...)
        )
        >>> s, t = torch.randn(2, 4, 4, 4), torch.randn(2, 6, 4, 4)
        >>> labels = torch.randint(0, 3, (2, 8, 8))
        >>> labels[:, :4] = 255  # the top half is ignored
        >>> round(memory(s, t, labels).item(), 4)
        1.4793
        >>> memory.pixel_ptr.tolist(), memory.region_ptr.tolist(), memory.step.item()
        ([7, 6, 3], [2, 2, 2], 1)
        >>> _ = memory.eval()  # eval mode: the queues and the step stay as they are
        >>> round(memory(s, t, labels).item(), 4), memory.step.item()
        (1.4733, 1)
    """

    pixel_queue: Tensor
    pixel_ptr: Tensor
    region_queue: Tensor
    region_ptr: Tensor
    seed: Tensor
    step: Tensor

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        num_classes: int,
        *,
        pixel_memory: int = 20000,
        region_memory: int = 2000,
        pixels_per_class: int = 16,
        pixel_contrast: int = 4096,
        region_contrast: int = 1024,
        temperature: float = 0.1,
        kd_temperature: float = 1.0,
        pixel_weight: float = 0.1,
        region_weight: float = 0.1,
        max_anchors: int | None = None,
        ignore_index: int | None = 255,
        resize: Resize = "none",
        reduction: Reduction = "mean",
        validate_args: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        _check_options(temperature, kd_temperature, reduction)
        check_ignore_index(ignore_index)
        check_resize(resize)
        self.student_channels = check_positive_int("student_channels", student_channels)
        self.teacher_channels = check_positive_int("teacher_channels", teacher_channels)
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.pixels_per_class = check_positive_int("pixels_per_class", pixels_per_class)
        memory = {"pixel_memory": check_positive_int("pixel_memory", pixel_memory),
                  "region_memory": check_positive_int("region_memory", region_memory)}
        self.pixel_samples = _per_class("pixel_contrast", pixel_contrast, num_classes,
                                        "pixel_memory", pixel_memory)
        self.region_samples = _per_class("region_contrast", region_contrast, num_classes,
                                         "region_memory", region_memory)
        self.pixel_contrast, self.region_contrast = pixel_contrast, region_contrast
        self.temperature = float(temperature)
        self.kd_temperature = float(kd_temperature)
        self.pixel_weight = check_real("pixel_weight", pixel_weight, minimum=0.0)
        self.region_weight = check_real("region_weight", region_weight, minimum=0.0)
        if self.pixel_weight == 0 and self.region_weight == 0:
            raise ValueError("pixel_weight and region_weight are both 0: nothing to distil")
        self.max_anchors = (None if max_anchors is None
                            else check_positive_int("max_anchors", max_anchors))
        self.ignore_index = ignore_index
        self.resize: Resize = resize
        self.reduction: Reduction = reduction
        self.validate_args = bool(validate_args)
        self.projector = nn.Sequential(
            nn.Conv2d(student_channels, teacher_channels, 1, bias=False),
            nn.BatchNorm2d(teacher_channels),
            nn.ReLU(),
            nn.Conv2d(teacher_channels, teacher_channels, 1, bias=False),
        )
        init = _generator(_check_seed(seed), _INIT)
        for kind, length in (("pixel", memory["pixel_memory"]),
                             ("region", memory["region_memory"])):
            noise = torch.randn(num_classes, length, teacher_channels, generator=init)
            self.register_buffer(f"{kind}_queue", F.normalize(noise, dim=2))
            self.register_buffer(f"{kind}_ptr", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.long))
        self.register_buffer("step", torch.tensor(0, dtype=torch.long))

    # ---- sampling -------------------------------------------------------------------------

    def contrast_indices(self, step: int | None = None) -> tuple[Tensor, Tensor]:
        """The queue slots the bank of ``step`` takes (default: the current step), the
        same for every class: ``(pixel_samples,)`` and ``(region_samples,)`` indices,
        drawn without replacement from the seed and the step alone."""
        step = int(self.step) if step is None else step
        generator = _generator(int(self.seed), step, _BANK)
        pixel = torch.randperm(self.pixel_queue.shape[1], generator=generator)
        region = torch.randperm(self.region_queue.shape[1], generator=generator)
        device = self.pixel_queue.device
        return (pixel[:self.pixel_samples].to(device), region[:self.region_samples].to(device))

    def sample_bank(self, step: int | None = None) -> tuple[Tensor, Tensor]:
        """The pixel and region banks of ``step`` from the current queues:
        ``(K * pixel_samples, C)`` and ``(K * region_samples, C)``, class by class.

        A training call samples after it enqueues, so right after the call at
        step ``k`` (``step`` is then ``k + 1``), ``sample_bank(k)`` returns the
        banks it used.
        """
        pixel, region = self.contrast_indices(step)
        return (self.pixel_queue[:, pixel].flatten(0, 1),
                self.region_queue[:, region].flatten(0, 1))

    # ---- the step -------------------------------------------------------------------------

    def forward(self, student: Tensor, teacher: Tensor, target: Tensor) -> Tensor:
        self._check_inputs(student, teacher, target)
        ctx, (s, t) = full_precision(self.projector(student), teacher)
        with ctx:
            s, t = align_grids(s, t, self.resize)
            labels = self._labels(target, t)
            s, t = normalize_channels(s, 1), normalize_channels(t.detach(), 1)
            step = int(self.step)
            if self.training:
                self._enqueue(t, labels, step)
                self.step += 1
            loss, anchors = self._loss_map(s, t, labels, step)
            loss = nan_where_nonfinite(loss, student, teacher)
            if self.reduction == "mean":
                return loss.sum() / max(anchors, 1)
            return reduce_loss(loss, self.reduction)

    def _check_inputs(self, student: Tensor, teacher: Tensor, target: Tensor) -> None:
        for name, x, channels in (("student", student, self.student_channels),
                                  ("teacher", teacher, self.teacher_channels)):
            dims = check_feature_map(x, name)
            if dims["C"] != channels:
                raise ValueError(f"expected {name} features with {channels} channels, "
                                 f"got {dims['C']}")
        check_same_device(student, teacher, ("student", "teacher"))
        check_same_batch(student, teacher, ("student", "teacher"))
        if student.device != self.pixel_queue.device:
            raise ValueError(f"expected features on the module's device "
                             f"{self.pixel_queue.device}, got {student.device}")
        if target is None:
            raise TypeError("CIRKDMemory needs the labels: call it as (student, teacher, "
                            "target); through a DistillationTerm, pass uses_target=True")

    def _labels(self, target: Tensor, teacher: Tensor) -> Tensor:
        """The labels on the loss's grid, ``(B, H*W)``, with ``K`` where a pixel is not
        counted (ignored or, without validation, out of range)."""
        classes = self.num_classes
        batch, _, height, width = teacher.shape
        like = teacher.new_empty(()).expand(batch, classes, height, width)
        valid = counted_pixels(target, like, self.ignore_index, self.validate_args)
        labels = labels_on_grid(target, (height, width)).long()  # the mask's grid step
        counted = (labels >= 0) & (labels < classes)
        if valid is not None:
            counted &= valid
        return torch.where(counted, labels, classes).flatten(1)

    def _loss_map(self, s: Tensor, t: Tensor, labels: Tensor, step: int) -> tuple[Tensor, int]:
        """The weighted per-anchor loss on the ``(B, H, W)`` grid, zero elsewhere, and the
        number of anchors."""
        batch, channels, height, width = s.shape
        s_flat = s.permute(0, 2, 3, 1).reshape(-1, channels)
        t_flat = t.permute(0, 2, 3, 1).reshape(-1, channels)
        anchors = (labels.flatten() < self.num_classes).nonzero()[:, 0]
        if self.max_anchors is not None and anchors.numel() > self.max_anchors:
            rank = dist.get_rank() if _distributed() else 0
            pick = torch.randperm(anchors.numel(),
                                  generator=_generator(int(self.seed), step, _ANCHORS, rank))
            anchors = anchors[pick[:self.max_anchors].to(anchors.device)].sort().values
        s_a, t_a = s_flat[anchors], t_flat[anchors]
        loss = s.new_zeros(anchors.shape)
        for weight, bank in zip((self.pixel_weight, self.region_weight), self.sample_bank(step),
                                strict=True):
            if weight > 0:
                loss = loss + weight * _memory_contrast(s_a, t_a, bank, self.temperature,
                                                        self.kd_temperature)
        grid = s.new_zeros(batch * height * width).index_put((anchors,), loss)
        return grid.view(batch, height, width), anchors.numel()

    # ---- the queues -----------------------------------------------------------------------

    @torch.no_grad()
    def _enqueue(self, teacher: Tensor, labels: Tensor, step: int) -> None:
        """Append this step's teacher embeddings (gathered from every rank) to the queues."""
        classes = self.num_classes
        feats = teacher.flatten(2).transpose(1, 2)  # (B, HW, C), unit vectors
        finite = feats.isfinite().flatten(1).all(1)
        labels = torch.where(finite[:, None], labels, classes)
        offset = _batch_offset(feats.shape[0], feats.device)
        rows = _gather_rows(torch.cat([self._region_rows(feats, labels),
                                       self._pixel_rows(feats, labels, step, offset)]))
        codes = rows[:, -1].long()  # c: a pixel of class c; K + c: a region of class c
        pixel = codes < classes
        _write(self.pixel_queue, self.pixel_ptr, rows[pixel, :-1], codes[pixel])
        _write(self.region_queue, self.region_ptr, rows[~pixel, :-1], codes[~pixel] - classes)

    def _region_rows(self, feats: Tensor, labels: Tensor) -> Tensor:
        """One row per image and class present, in (image, class) order: the unit class
        mean, then the code ``K + c``."""
        batch, pixels, channels = feats.shape
        classes = self.num_classes
        index = labels[..., None].expand(batch, pixels, channels)
        sums = feats.new_zeros(batch, classes + 1, channels).scatter_add_(1, index, feats)
        present = torch.zeros(batch, classes + 1, dtype=torch.bool, device=feats.device)
        present = present.scatter_(1, labels, True)[:, :classes]
        regions = normalize_channels(sums[:, :classes][present], 1)  # a sum points as its mean
        codes = present.nonzero()[:, 1] + classes
        return torch.cat([regions, codes[:, None].to(regions.dtype)], 1)

    def _pixel_rows(self, feats: Tensor, labels: Tensor, step: int, offset: int) -> Tensor:
        """Up to ``pixels_per_class`` random pixels per image and class, in (image, pixel)
        order: the embedding, then the code ``c``. Image ``b``'s draw is keyed by its
        global index ``offset + b``, so it does not depend on how the batch is split."""
        batch, pixels, _ = feats.shape
        classes = self.num_classes
        seed = int(self.seed)
        keys = torch.stack([
            torch.randperm(pixels, generator=_generator(seed, step, _PIXELS, offset + b))
            for b in range(batch)
        ]).to(labels.device)
        order = (labels * pixels + keys).argsort(dim=1)  # by class, at random within one
        in_order = labels.gather(1, order)
        counts = torch.zeros(batch, classes + 1, dtype=torch.long, device=labels.device)
        counts.scatter_add_(1, labels, torch.ones_like(labels))
        starts = counts.cumsum(1) - counts
        rank = torch.arange(pixels, device=labels.device) - starts.gather(1, in_order)
        take = (rank < self.pixels_per_class) & (in_order < classes)
        chosen = torch.zeros_like(take).scatter_(1, order, take)
        return torch.cat([feats[chosen], labels[chosen][:, None].to(feats.dtype)], 1)

    def extra_repr(self) -> str:
        return (f"student_channels={self.student_channels}, "
                f"teacher_channels={self.teacher_channels}, num_classes={self.num_classes}, "
                f"pixel_memory={self.pixel_queue.shape[1]}, "
                f"region_memory={self.region_queue.shape[1]}, "
                f"pixels_per_class={self.pixels_per_class}, "
                f"pixel_contrast={self.pixel_contrast}, region_contrast={self.region_contrast}, "
                f"temperature={self.temperature}, kd_temperature={self.kd_temperature}, "
                f"pixel_weight={self.pixel_weight}, region_weight={self.region_weight}, "
                f"max_anchors={self.max_anchors}, ignore_index={self.ignore_index}, "
                f"resize={self.resize!r}, reduction={self.reduction!r}")
