"""The pipeline's training loop: the paper's recipe, data-parallel, resumable exactly.

SGD with momentum, torch's :class:`~torch.optim.lr_scheduler.PolynomialLR`,
cross-entropy on the model's logits plus a
:class:`~segdistill.DistillationWrapper`'s weighted terms, optional automatic
mixed precision, DistributedDataParallel when a process group is initialised,
atomic checkpoints every N steps and an exact resume: the same steps,
batches, augmentations and losses, bit for bit, as a run that never stopped.

Exactness rests on two things. torchdata's
:class:`~torchdata.stateful_dataloader.StatefulDataLoader` saves where in the
epoch the sampler is, and restores it. And the sampler yields *sample keys*
``epoch * len(dataset) + index``: a dataset that seeds its augmentation with
the key (see :func:`decode_sample_key`) augments each sample the same way
however the run was interrupted and whatever the number of data workers.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import PolynomialLR
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from segdistill import DistillationWrapper, load_checkpoint, save_checkpoint
from segdistill.hooks import select_output

# torchdata 0.11 calls torch.set_vital, which torch 2.14 deprecates, once per loader:
# nothing for a user to act on
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)

__all__ = ["Amp", "KeyedSampler", "TrainConfig", "decode_sample_key", "fit", "progress_bar"]

Amp = Literal["none", "bf16", "fp16"]
"""Automatic mixed precision: off, bfloat16, or float16 with a gradient scaler."""


def decode_sample_key(key: int, size: int) -> tuple[int, int]:
    """Split a key from :class:`KeyedSampler` into ``(epoch, index)``.

    Example:
        >>> decode_sample_key(23, size=10)
        (2, 3)
    """
    return key // size, key % size


class KeyedSampler(StatefulDistributedSampler):  # type: ignore[misc]
    """torchdata's resumable distributed sampler, yielding sample keys instead of indices.

    Epoch ``e`` visits the dataset in the order of a permutation drawn from a
    generator seeded with ``seed + e`` (as :class:`~torch.utils.data.DistributedSampler`);
    rank ``r`` of ``num_replicas`` takes every ``num_replicas``-th index of it.
    The key ``e * len(dataset) + index`` lets the dataset seed its
    augmentation per sample and per epoch.

    Example:
        >>> sampler = KeyedSampler(range(5), num_replicas=1, rank=0, seed=0)
        >>> sampler.set_epoch(1)
        >>> sorted(k - 5 for k in sampler)  # epoch 1: keys 5..9
        [0, 1, 2, 3, 4]
    """

    def __iter__(self) -> Iterator[int]:
        base = self.epoch * len(self.dataset)
        for index in super().__iter__():
            yield base + index


class _ByKey(Dataset[Any]):
    """Index a dataset that does not read sample keys by ``key % len(dataset)``."""

    def __init__(self, dataset: Dataset[Any], size: int) -> None:
        self.dataset = dataset
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: int) -> Any:
        return self.dataset[key % self.size]


@dataclass
class TrainConfig:
    """What :func:`fit` needs to know; the defaults are the paper's recipe."""

    steps: int
    batch_size: int = 16
    lr: float = 0.007
    momentum: float = 0.9
    weight_decay: float = 4e-5
    no_decay_norm_bias: bool = False
    poly_power: float = 0.9
    accumulate: int = 1
    ignore_index: int = 255
    amp: Amp = "none"
    seed: int = 0
    num_workers: int = 0
    checkpoint_path: str | None = None
    checkpoint_every: int | None = None
    log_path: str | None = None
    log_every: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "accumulate"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)}")
        for name in ("lr", "momentum", "weight_decay", "poly_power"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be at least 0.0, got {getattr(self, name)}")
        if self.amp not in get_args(Amp):
            raise ValueError(f"amp must be one of {', '.join(map(repr, get_args(Amp)))}, "
                             f"got {self.amp!r}")
        if self.checkpoint_every is not None:
            if self.checkpoint_every < 1:
                raise ValueError(f"checkpoint_every must be a positive int, got "
                                 f"{self.checkpoint_every}")
            if self.checkpoint_path is None:
                raise ValueError("checkpoint_every needs a checkpoint_path")


def progress_bar(enabled: bool, total: int, initial: int = 0, desc: str = "train") -> Any:
    """A tqdm bar when ``enabled`` and tqdm is installed, else ``None``."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return None
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                mininterval=1.0, smoothing=0.1, desc=f"{desc} {time.strftime('%H:%M')}")


class _Logger:
    """JSON lines on the main process, and TensorBoard scalars when it is installed."""

    def __init__(self, path: str | None, enabled: bool, start: int) -> None:
        self.path = Path(path) if path and enabled else None
        self.board: Any = None
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # rows after the checkpoint we resume from come again
            kept = [line for line in self.path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= start]
            self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return
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


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    adapters only), with the poly schedule
    :math:`\mathrm{lr}_t = \mathrm{lr}_0 (1 - t / T)^{p}`.

    When a default process group is initialised (``torchrun``), the model is
    wrapped in ``DistributedDataParallel``, each rank reads its shard, and only
    rank 0 logs and writes checkpoints. ``config.amp`` runs the forward pass
    under ``torch.autocast`` in bfloat16, or float16 with a gradient scaler.
    ``config.batch_size`` is the batch of one process's forward pass; with
    ``config.accumulate`` N, a step sums the gradients of N such batches (each
    loss divided by N; DDP synchronises only the last), so a step sees
    ``batch_size * N * world_size`` samples. ``config.no_decay_norm_bias``
    exempts normalisation parameters and biases from weight decay
    (:func:`examples.segmentation.models.param_groups`).

    Temporary files that a killed run left beside the checkpoint
    (``.checkpoint.pt.*.tmp``) are removed when it starts. A checkpoint that
    cannot be read raises an error naming its path; resuming a run whose
    checkpoint is already past ``config.steps`` raises one too, and one that is
    exactly at ``config.steps`` says that the stage is finished.

    Args:
        model: what to train (not wrapped in DDP: this function does that).
        dataset: returns ``(image, label)``. A dataset with a true attribute
            ``uses_sample_keys`` is indexed with the keys of :class:`KeyedSampler`
            (to seed its augmentation from them); any other by ``0..len-1``.
        config: the schedule and the bookkeeping.
        device: where to train.
        resume: continue from ``config.checkpoint_path`` if it exists (model,
            optimiser, schedule, scaler, data loader, random state, log), exactly.
        stop_after: end after this many steps in all (to simulate a crash in
            tests, or to split a run).
        on_step: called with the step and its logged values.

    Returns:
        One dictionary per step: ``step``, ``lr``, ``loss``, ``ce`` and each term.
    """
    if not isinstance(dataset, Sized):
        raise TypeError("expected a map-style dataset with a length")
    device = torch.device(device)
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1

    model.to(device)
    distilling = isinstance(model, DistillationWrapper)
    params = list(model.trainable_parameters() if isinstance(model, DistillationWrapper)
                  else (p for p in model.parameters() if p.requires_grad))
    from examples.segmentation.models import param_groups  # here: models imports config

    trainable = {id(p) for p in params}
    groups = [{**g, "params": [p for p in g["params"] if id(p) in trainable]}
              for g in param_groups(model, config.weight_decay, config.no_decay_norm_bias)]
    optimizer = torch.optim.SGD([g for g in groups if g["params"]], lr=config.lr,
                                momentum=config.momentum, weight_decay=config.weight_decay)
    schedule = PolynomialLR(optimizer, total_iters=config.steps, power=config.poly_power)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")

    size = len(dataset)
    if not getattr(dataset, "uses_sample_keys", False):
        dataset = _ByKey(dataset, size)
    sampler = KeyedSampler(dataset, num_replicas=world, rank=rank, seed=config.seed,
                           drop_last=True)
    loader = StatefulDataLoader(dataset, batch_size=config.batch_size, sampler=sampler,
                                num_workers=config.num_workers, drop_last=True,
                                pin_memory=device.type == "cuda")
    if size // world < config.batch_size:
        raise ValueError(f"a dataset of {size} samples gives no full batch of "
                         f"{config.batch_size} on each of {world} ranks")

    history: list[dict[str, float]] = []
    step = epoch = 0
    if rank == 0 and config.checkpoint_path:
        remove_stale_temporaries(config.checkpoint_path)
    if resume and config.checkpoint_path and os.path.exists(config.checkpoint_path):
        state = read_checkpoint(config.checkpoint_path, device)
        if int(state["step"]) > config.steps:
            raise ValueError(
                f"the checkpoint {config.checkpoint_path} is at step {int(state['step'])}, "
                f"past the {config.steps} steps asked for: its schedule was for more steps; "
                "ask for at least as many, or start afresh without --resume")
        if int(state["step"]) == config.steps and rank == 0:
            print(f"{config.checkpoint_path}: already at step {config.steps} of "
                  f"{config.steps}; nothing left to train")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        scaler.load_state_dict(state["scaler"])
        loader.load_state_dict(state["loader"])
        _set_rng_state(state["rng"])
        step, epoch, history = int(state["step"]), int(state["epoch"]), list(state["history"])
    train_model: nn.Module = model
    if distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    logger = _Logger(config.log_path, rank == 0, step)
    end = config.steps if stop_after is None else min(config.steps, stop_after)
    bar = progress_bar(config.progress and rank == 0, end, step)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.amp)
    micro: list[dict[str, float]] = []  # the accumulated batches of the current step

    def save() -> None:
        if rank == 0 and config.checkpoint_path:
            save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "schedule": schedule.state_dict(), "scaler": scaler.state_dict(),
                             "loader": loader.state_dict(), "rng": _rng_state(),
                             "step": step, "epoch": epoch, "history": history},
                            config.checkpoint_path)

    train_model.train()
    try:
        while step < end:
            sampler.set_epoch(epoch)
            for images, labels in loader:
                lr = float(schedule.get_last_lr()[0])
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                last = len(micro) + 1 == config.accumulate
                sync = (contextlib.nullcontext() if last or not distributed
                        else train_model.no_sync())  # type: ignore[operator]
                with sync:
                    with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                        enabled=amp_dtype is not None):
                        part, loss = _step_loss(train_model, distilling, images, labels,
                                                config.ignore_index)
                    scaler.scale(loss / config.accumulate).backward()  # type: ignore[no-untyped-call]
                micro.append(part)
                if not last:
                    continue
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
                step += 1
                row = {"step": step, "lr": lr,
                       **{k: sum(m[k] for m in micro) / len(micro) for k in micro[0]}}
                micro = []
                history.append(row)
                if step % config.log_every == 0 or step == end:
                    logger.write(row)
                if on_step is not None:
                    on_step(step, row)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}")
                if config.checkpoint_every and step % config.checkpoint_every == 0:
                    save()
                if step >= end:
                    break
            else:  # the epoch ran out: the next one starts from its beginning
                epoch += 1
        save()
    finally:
        logger.close()
        if bar is not None:
            bar.close()
    return history


def remove_stale_temporaries(checkpoint: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files (``.<name>.*.tmp``) that runs killed while writing
    ``checkpoint`` left in its folder; returns them."""
    path = Path(checkpoint)
    stale = sorted(path.parent.glob(f".{path.name}.*.tmp")) if path.parent.is_dir() else []
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def read_checkpoint(path: str | os.PathLike[str],
                    device: str | torch.device = "cpu") -> dict[str, Any]:
    """:func:`segdistill.load_checkpoint` (whose error names ``path`` when the file is
    truncated or not a checkpoint), saying what to do about a broken one."""
    try:
        return load_checkpoint(path, map_location=device)
    except RuntimeError as error:
        raise RuntimeError(f"{error}: delete it to start the stage afresh") from error


def _step_loss(model: nn.Module, distilling: bool, images: Tensor, labels: Tensor,
               ignore_index: int) -> tuple[dict[str, float], Tensor]:
    terms: dict[str, Tensor] = {}
    if distilling:
        out = model(images, target=labels)
        logits, terms, distill = select_output(out.output), out.losses, out.loss
    else:
        logits, distill = select_output(model(images)), None
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear",
                               align_corners=False)
    ce = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index)
    loss = ce if distill is None else ce + distill
    row = {"loss": loss.item(), "ce": ce.item(), **{k: v.item() for k, v in terms.items()}}
    if not math.isfinite(row["loss"]):
        raise FloatingPointError(f"the loss became {row['loss']} ({row})")
    return row, loss
