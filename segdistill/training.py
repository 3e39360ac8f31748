"""A training loop for segmenters and distillation wrappers: the paper's recipe, resumable.

SGD with momentum and the poly schedule, cross-entropy on the model's logits
plus a :class:`~segdistill.DistillationWrapper`'s weighted terms, optional
automatic mixed precision, DistributedDataParallel when a process group is
initialised, atomic checkpoints every N steps and an exact resume: the same
steps, batches, augmentations and losses as a run that never stopped.

Exactness rests on :class:`EpochSampler`: the order of every epoch and the
random augmentation of every sample are functions of ``(seed, epoch, index)``
alone, so neither a restart in the middle of an epoch nor the number of data
workers changes them.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from segdistill._checks import check_choice, check_positive_int, check_real
from segdistill.checkpoint import load_checkpoint, save_checkpoint
from segdistill.hooks import select_output
from segdistill.wrapper import DistillationWrapper

__all__ = ["EpochSampler", "TrainConfig", "decode_sample_key", "fit", "poly_lr"]

AMP_MODES: tuple[str, ...] = ("none", "bf16", "fp16")


def poly_lr(base_lr: float, step: int, total_steps: int, power: float = 0.9) -> float:
    r"""The poly schedule: :math:`\mathrm{lr} = \mathrm{lr}_0 (1 - t / T)^{p}`.

    Example:
        >>> poly_lr(0.007, 0, 100), round(poly_lr(0.007, 50, 100), 6)
        (0.007, 0.003751)
    """
    return float(base_lr * (1.0 - min(step, total_steps) / total_steps) ** power)


def decode_sample_key(key: int, size: int) -> tuple[int, int]:
    """Split a key from :class:`EpochSampler` into ``(epoch, index)``."""
    return key // size, key % size


class EpochSampler(Sampler[int]):
    """Shuffled epochs, sharded across ranks, that can start in the middle of one.

    Epoch ``e`` visits the dataset in the order of a permutation drawn from a
    generator seeded with ``seed + e``; rank ``r`` of ``world_size`` takes
    every ``world_size``-th index of it (the tail that does not divide evenly
    is dropped, so every rank takes as many steps). The sampler yields *keys*
    ``epoch * len(dataset) + index``: a dataset that seeds its augmentation
    with the key (see :func:`decode_sample_key`) augments each sample the same
    way however the run was interrupted and whatever the number of workers.

    Args:
        size: the dataset's length.
        batch_size: samples per step on this rank (to count steps per epoch).
        seed: the seed of the shuffles.
        rank: this process's rank.
        world_size: the number of processes.

    Example:
        >>> sampler = EpochSampler(5, batch_size=2, seed=0)
        >>> keys = list(sampler)
        >>> sorted(k % 5 for k in keys)  # one epoch, 2 batches of 2: the tail is dropped
        [0, 1, 3, 4]
        >>> sampler.set_position(step=1)  # resume after one step: the same later batches
        >>> list(sampler) == keys[2:]
        True
    """

    def __init__(self, size: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        self.size = check_positive_int("size", size)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.world_size = check_positive_int("world_size", world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.rank = rank
        self.seed = seed
        self.steps_per_epoch = size // (world_size * batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"a dataset of {size} samples gives no full batch of {batch_size} on each of "
                f"{world_size} ranks"
            )
        self.epoch = 0
        self.offset = 0

    def set_position(self, step: int) -> None:
        """Start at global step ``step``: its epoch, and the batch within it."""
        self.epoch, within = divmod(step, self.steps_per_epoch)
        self.offset = within * self.batch_size

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=g)
        per_rank = self.steps_per_epoch * self.batch_size
        mine = order[self.rank::self.world_size][:per_rank]
        base = self.epoch * self.size
        for index in mine[self.offset:].tolist():
            yield base + index

    def __len__(self) -> int:
        return self.steps_per_epoch * self.batch_size - self.offset


@dataclass
class TrainConfig:
    """What :func:`fit` needs to know; the defaults are the paper's recipe."""

    steps: int
    batch_size: int = 16
    lr: float = 0.007
    momentum: float = 0.9
    weight_decay: float = 4e-5
    poly_power: float = 0.9
    ignore_index: int = 255
    amp: str = "none"
    seed: int = 0
    num_workers: int = 0
    checkpoint_path: str | None = None
    checkpoint_every: int | None = None
    log_path: str | None = None
    log_every: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        check_positive_int("steps", self.steps)
        check_positive_int("batch_size", self.batch_size)
        for name in ("lr", "momentum", "weight_decay", "poly_power"):
            check_real(name, getattr(self, name), minimum=0.0)
        check_choice("amp", self.amp, AMP_MODES)
        check_positive_int("log_every", self.log_every)
        if self.checkpoint_every is not None:
            check_positive_int("checkpoint_every", self.checkpoint_every)
            if self.checkpoint_path is None:
                raise ValueError("checkpoint_every needs a checkpoint_path")


class _ByKey(Dataset[Any]):
    """Index a dataset that does not read sample keys by ``key % len(dataset)``."""

    def __init__(self, dataset: Dataset[Any], size: int) -> None:
        self.dataset = dataset
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: int) -> Any:
        return self.dataset[key % self.size]


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _logits(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    return select_output(output, None, "the model's output")


class _Logger:
    """JSON lines on the main process, and TensorBoard scalars when it is installed."""

    def __init__(self, path: str | None, enabled: bool, start: int) -> None:
        self.path = Path(path) if path and enabled else None
        self.board: Any = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                # rows after the checkpoint we resume from are about to be written again
                kept = [line for line in self.path.read_text().splitlines()
                        if line and json.loads(line)["step"] <= start]
                self.path.write_text("".join(line + "\n" for line in kept))
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                self.board = SummaryWriter(str(self.path.parent / "tensorboard"))

    def write(self, row: dict[str, Any]) -> None:
        if self.path is None:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.board is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.board.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def fit(
    model: nn.Module,
    dataset: Dataset[Any],
    config: TrainConfig,
    *,
    device: str | torch.device = "cpu",
    resume: bool = False,
    stop_after: int | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    r"""Train ``model`` on ``dataset`` for ``config.steps`` steps.

    ``model`` is a segmenter (its output a tensor, or a mapping with ``'out'``
    such as torchvision's) or a :class:`~segdistill.DistillationWrapper`. The
    loss is the cross-entropy of the logits (bilinearly resized to the labels'
    size if they differ) plus the wrapper's weighted terms. The optimiser is
    SGD with momentum over the trainable parameters (for a wrapper: student and
    adapters only), its learning rate following :func:`poly_lr`.

    When a default process group is initialised (``torchrun``), the model is
    wrapped in ``DistributedDataParallel``, each rank reads its shard, and only
    rank 0 logs and writes checkpoints. ``config.amp`` runs the forward pass
    under ``torch.autocast`` in bfloat16, or float16 with a gradient scaler.

    Args:
        model: what to train, on ``device`` already or not.
        dataset: returns ``(image, label)``. A dataset with a true attribute
            ``uses_sample_keys`` is indexed with the keys of :class:`EpochSampler`
            (to seed its augmentation from them, for an exact resume); any other
            is indexed ``0..len-1``.
        config: the schedule and the bookkeeping.
        device: where to train.
        resume: continue from ``config.checkpoint_path`` if it exists
            (model, optimiser, scaler, step, log), exactly.
        stop_after: end after this many steps in all (to simulate a crash in
            tests, or to split a run).
        on_step: called with the step and its logged values.

    Returns:
        One dictionary per step: ``step``, ``lr``, ``loss`` and each term.
    """
    if not isinstance(dataset, Sized):
        raise TypeError("expected a map-style dataset with a length")
    device = torch.device(device)
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1

    model.to(device)
    inner = model
    params = list(inner.trainable_parameters() if isinstance(inner, DistillationWrapper)
                  else (p for p in inner.parameters() if p.requires_grad))
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    history: list[dict[str, float]] = []
    start = 0
    if resume and config.checkpoint_path and os.path.exists(config.checkpoint_path):
        state = load_checkpoint(config.checkpoint_path, map_location=device)
        inner.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start, history = int(state["step"]), list(state["history"])
    train_model: nn.Module = model
    if distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    size = len(dataset)
    if not getattr(dataset, "uses_sample_keys", False):
        dataset = _ByKey(dataset, size)
    sampler = EpochSampler(size, config.batch_size, config.seed, rank, world)
    logger = _Logger(config.log_path, rank == 0, start)
    end = min(config.steps, stop_after) if stop_after is not None else config.steps
    bar = _progress_bar(config.progress and rank == 0, start, end)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.amp)

    def save(step: int) -> None:
        if rank == 0 and config.checkpoint_path:
            save_checkpoint({"model": inner.state_dict(), "optimizer": optimizer.state_dict(),
                             "scaler": scaler.state_dict(), "step": step,
                             "history": history}, config.checkpoint_path)

    step = start
    train_model.train()
    try:
        while step < end:
            sampler.set_position(step)
            loader = DataLoader(dataset, batch_size=config.batch_size, sampler=sampler,
                                num_workers=config.num_workers, drop_last=True,
                                pin_memory=device.type == "cuda")
            for images, labels in loader:
                if step >= end:
                    break
                lr = poly_lr(config.lr, step, config.steps, config.poly_power)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                    enabled=amp_dtype is not None):
                    row, loss = _step_loss(train_model, images, labels, config.ignore_index)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
                scaler.step(optimizer)
                scaler.update()
                step += 1
                row = {"step": step, "lr": lr, **row}
                history.append(row)
                if step % config.log_every == 0 or step == end:
                    logger.write(row)
                if on_step is not None:
                    on_step(step, row)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}")
                if config.checkpoint_every and step % config.checkpoint_every == 0:
                    save(step)
        save(step)
    finally:
        logger.close()
        if bar is not None:
            bar.close()
    return history


def _step_loss(model: nn.Module, images: Tensor, labels: Tensor,
               ignore_index: int) -> tuple[dict[str, float], Tensor]:
    inner = _unwrap(model)
    extra: dict[str, Tensor] = {}
    if isinstance(inner, DistillationWrapper):
        out = model(images, target=labels)
        logits, extra, distill = _logits(out.output), out.losses, out.loss
    else:
        logits, distill = _logits(model(images)), None
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear",
                               align_corners=False)
    ce = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index)
    loss = ce if distill is None else ce + distill
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"the loss became {loss.item()} (cross-entropy {ce.item()}, "
                                 f"terms { {k: v.item() for k, v in extra.items()} })")
    row = {"loss": loss.item(), "ce": ce.item(), **{k: v.item() for k, v in extra.items()}}
    return row, loss


def _progress_bar(enabled: bool, start: int, end: int) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=end, initial=start, unit="step", dynamic_ncols=True,
                mininterval=1.0, smoothing=0.1, desc=f"train {time.strftime('%H:%M')}")
