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

Nothing non-finite is saved: a step whose loss, gradients or updated weights
hold an inf or a NaN stops the run (no step is skipped: that would change the
recipe behind the user's back) before anything of it is saved, so the last
checkpoint, the last finite state, stays; the error names the step, what went
non-finite and the flag to change. A resume is explicit: the checkpoint records
the run's settings (:attr:`TrainConfig.record`), and resuming with other
settings is refused with the difference.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sized
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import PolynomialLR
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from examples.segmentation.config import Amp
from examples.segmentation.locks import process_alive
from examples.segmentation.models import param_groups
from segdistill import (
    DistillationWrapper,
    changed_settings,
    discriminator_optimizer,
    load_checkpoint,
    save_checkpoint,
)
from segdistill.hooks import select_output

# torchdata 0.11 calls torch.set_vital, which torch 2.14 deprecates, once per loader:
# nothing for a user to act on
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)

__all__ = ["RESUME_SAFE_FIELDS", "Amp", "KeyedSampler", "TrainConfig", "decode_sample_key", "fit",
           "load_model_state", "progress_bar", "read_log_rows", "rewrite_lines"]

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
    optimizer: str = "sgd"
    """``'sgd'`` (with ``momentum``) or ``'adamw'`` (betas 0.9, 0.999; ``momentum`` unused)."""
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
    record: dict[str, Any] | None = None
    """The settings that describe the run, ``{name: value}``, named as the caller names
    them (the pipeline: its flags, ``{"--lr": 0.007, ...}``): the checkpoint records
    them, with the number of processes, and a resume with any other value is refused.
    ``None``: this config's fields but :data:`RESUME_SAFE_FIELDS`."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "accumulate"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)}")
        for name in ("lr", "momentum", "weight_decay", "poly_power"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be at least 0.0, got {getattr(self, name)}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.amp not in get_args(Amp):
            raise ValueError(f"amp must be one of {', '.join(map(repr, get_args(Amp)))}, "
                             f"got {self.amp!r}")
        if self.checkpoint_every is not None:
            if self.checkpoint_every < 1:
                raise ValueError(f"checkpoint_every must be a positive int, got "
                                 f"{self.checkpoint_every}")
            if self.checkpoint_path is None:
                raise ValueError("checkpoint_every needs a checkpoint_path")


RESUME_SAFE_FIELDS = ("checkpoint_path", "checkpoint_every", "log_path", "log_every",
                      "progress", "record")
"""The fields of :class:`TrainConfig` that a resume may change: where and how often the
run is kept and shown, not what it trains. Not ``num_workers``: the loader's saved
position is per worker process, and torchdata cannot restore it into another number."""


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
            kept = read_log_rows(self.path, lambda row: row["step"] <= start) if start else []
            rewrite_lines(self.path, kept)
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


def read_log_rows(path: Path, keep: Callable[[dict[str, Any]], bool]) -> list[str]:
    """The lines of the JSON-lines log at ``path`` whose row (a dict with an int
    ``step``) ``keep`` accepts.

    A last line that is not such a row (torn: the run was killed, or the disk
    filled, mid-write) is dropped with a warning.

    Raises:
        ValueError: an earlier line is not such a row; the message names the file
            and the line.
    """
    lines = path.read_text().splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not (isinstance(row, dict) and isinstance(row.get("step"), int)):
                raise ValueError("not an object with an int 'step'")
        except ValueError as error:
            if number < len(lines):
                raise ValueError(f"{path}, line {number}, is not a log row ({error}): "
                                 f"{line[:80]!r}; repair or delete that file") from error
            warnings.warn(f"{path}: dropping its torn last line {number}, {line[:80]!r} (a "
                          "run stopped while writing it)", RuntimeWarning, stacklevel=3)
            continue
        if keep(row):
            kept.append(line)
    return kept


def rewrite_lines(path: Path, lines: list[str]) -> None:
    """Replace the text file at ``path`` by ``lines``, atomically (a crash meanwhile
    leaves the old file, never a cut one)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp",
                               dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write("".join(line + "\n" for line in lines))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class _Run:
    """One call of :func:`fit`: what a step needs and what a checkpoint holds."""

    config: TrainConfig
    model: nn.Module
    """The model as given: what the checkpoint saves."""
    train_model: nn.Module
    """What the steps run: ``model``, or ``model`` in DistributedDataParallel."""
    device: torch.device
    rank: int
    distributed: bool
    optimizer: torch.optim.Optimizer
    schedule: PolynomialLR
    scaler: torch.amp.GradScaler
    loader: StatefulDataLoader
    sampler: KeyedSampler
    record: dict[str, Any] = field(default_factory=dict)
    """What the checkpoint records of the run's settings (see :attr:`TrainConfig.record`)."""
    adversary: torch.optim.Optimizer | None = None
    """The optimiser of a term's discriminator (the holistic term's Adam), stepped with
    the student's after the same backward; ``None`` when no term has one."""
    saved: int | None = None
    """The step of the checkpoint on disk that this run wrote or resumed from."""
    step: int = 0
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    micro: list[dict[str, float]] = field(default_factory=list)
    """The values of the batches accumulated so far into the current step."""


@dataclass
class _Report:
    """Where each step's values go: the log, ``on_step`` and the progress bar."""

    logger: _Logger
    bar: Any
    on_step: Callable[[int, dict[str, float]], None] | None
    log_every: int
    end: int

    def write(self, row: dict[str, float]) -> None:
        """Log a step's row (every ``log_every`` steps and the last), pass it to
        ``on_step`` and advance the bar."""
        step = int(row["step"])
        if step % self.log_every == 0 or step == self.end:
            self.logger.write(row)
        if self.on_step is not None:
            self.on_step(step, row)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")

    def close(self) -> None:
        """Close the log and the bar."""
        self.logger.close()
        if self.bar is not None:
            self.bar.close()


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
    (``.checkpoint.pt.*.tmp``) are removed when it starts; a live writer's are
    kept. A checkpoint that cannot be read raises an error naming its path;
    resuming a run whose checkpoint is already past ``config.steps`` raises one
    too, and one that is exactly at ``config.steps`` says that the stage is
    finished. A resume with settings other than the checkpoint's
    (:attr:`TrainConfig.record`) is refused, listing what changed; more steps than
    the checkpoint's schedule was planned for among them (a resume continues that
    schedule; it cannot re-plan it).

    A step whose loss (any term of it), gradients or updated weights are not
    finite raises ``FloatingPointError`` before the step is saved: the
    checkpoint on disk stays the last finite state. A batch without a counted
    pixel (every label ``ignore_index``) has a cross-entropy of 0.

    Args:
        model: what to train (not wrapped in DDP: this function does that).
        dataset: returns ``(image, label)``. A dataset with a true attribute
            ``uses_sample_keys`` is indexed with the keys of :class:`KeyedSampler`
            (to seed its augmentation from them); any other by ``0..len-1``.
        config: the schedule and the bookkeeping.
        device: where to train.
        resume: continue from ``config.checkpoint_path`` if it exists (model,
            optimiser, schedule, scaler, data loader, random state, log), exactly;
            a torn last line of the log is dropped with a warning.
        stop_after: end after this many steps in all (to simulate a crash in
            tests, or to split a run).
        on_step: called with the step and its logged values.

    Returns:
        One dictionary per step: ``step``, ``lr``, ``loss``, ``ce`` and each term.

    Raises:
        FloatingPointError: a step went non-finite (the message says which, in what,
            and what to change).
        ValueError: the checkpoint does not fit this run (other settings, more or
            fewer steps, another model); the message names it and what differs.
    """
    device = torch.device(device)
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    loader, sampler = make_loader(dataset, config, device, rank, world)
    model.to(device)
    optimizer, schedule, scaler = make_optimizer(model, config, device)
    run = _Run(config, model, model, device, rank, distributed, optimizer, schedule,
               scaler, loader, sampler, record=run_record(config, world),
               adversary=make_adversary(model))
    if rank == 0 and config.checkpoint_path:
        remove_stale_temporaries(config.checkpoint_path)
    if resume and config.checkpoint_path and os.path.exists(config.checkpoint_path):
        restore(run, config.checkpoint_path)
    if distributed:
        run.train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    end = config.steps if stop_after is None else min(config.steps, stop_after)
    report = _Report(_Logger(config.log_path, rank == 0, run.step),
                     progress_bar(config.progress and rank == 0, end, run.step),
                     on_step, config.log_every, end)
    run.train_model.train()
    try:
        while run.step < end:
            if train_one_epoch(run, report):  # the epoch ran out: the next starts afresh
                run.epoch += 1
        save(run)
    finally:
        report.close()
    return run.history


def make_loader(dataset: Dataset[Any], config: TrainConfig, device: torch.device, rank: int,
                world: int) -> tuple[StatefulDataLoader, KeyedSampler]:
    """The resumable loader of rank ``rank``'s shard of ``dataset`` and its sampler.

    Raises:
        TypeError: ``dataset`` has no length.
        ValueError: a rank's shard holds no full batch.
    """
    if not isinstance(dataset, Sized):
        raise TypeError("expected a map-style dataset with a length")
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
    return loader, sampler


def make_optimizer(model: nn.Module, config: TrainConfig, device: torch.device,
                   ) -> tuple[torch.optim.Optimizer, PolynomialLR, torch.amp.GradScaler]:
    """SGD (or AdamW) over the trainable parameters (a wrapper's: the student's and the
    adapters'), its poly schedule, and the gradient scaler (active under ``amp='fp16'``
    only)."""
    params = (model.trainable_parameters() if isinstance(model, DistillationWrapper)
              else (p for p in model.parameters() if p.requires_grad))
    trainable = {id(p) for p in params}
    groups = [{**g, "params": [p for p in g["params"] if id(p) in trainable]}
              for g in param_groups(model, config.weight_decay, config.no_decay_norm_bias)]
    groups = [g for g in groups if g["params"]]
    optimizer: torch.optim.Optimizer = (
        torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        if config.optimizer == "adamw" else
        torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                        weight_decay=config.weight_decay))
    schedule = PolynomialLR(optimizer, total_iters=config.steps, power=config.poly_power)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    return optimizer, schedule, scaler


def make_adversary(model: nn.Module) -> torch.optim.Optimizer | None:
    """The optimiser of the discriminators a wrapper's terms train against the student
    (:meth:`~segdistill.DistillationWrapper.separately_optimized_parameters`): Adam at
    4e-4, betas (0.9, 0.99), as SKD and CIRKD (:func:`segdistill.discriminator_optimizer`),
    at a constant rate; ``None`` when there are none."""
    if not isinstance(model, DistillationWrapper):
        return None
    params = list(model.separately_optimized_parameters())
    return discriminator_optimizer(params) if params else None


def run_record(config: TrainConfig, world: int) -> dict[str, Any]:
    """What a checkpoint of ``config``'s run records of its settings, and a resume
    compares: :attr:`TrainConfig.record` (by default the config's fields but
    :data:`RESUME_SAFE_FIELDS`) and the number of processes."""
    record = config.record
    if record is None:
        record = {k: v for k, v in asdict(config).items() if k not in RESUME_SAFE_FIELDS}
    return {**record, "processes": world}


def check_resume(path: str, recorded: Mapping[str, Any] | None, current: Mapping[str, Any],
                 planned: int, steps: int) -> None:
    """Refuse to resume from the checkpoint at ``path`` when the settings it recorded
    differ from this run's, listing the differences.

    Args:
        path: the checkpoint, for the message.
        recorded: the settings it recorded (``None``: an older checkpoint, which
            records none; a warning says they cannot be checked).
        current: this run's (:func:`run_record`).
        planned: the steps its schedule was planned for.
        steps: the steps this run asks for.

    Raises:
        ValueError: a setting differs; the message lists each with both values.
    """
    if recorded is None:
        warnings.warn(f"the checkpoint {path} records no settings (an older one): a resume "
                      "cannot check that this run's match it", RuntimeWarning, stacklevel=3)
        return

    changed = changed_settings(recorded, current)
    if not changed:
        return
    schedule = (f" Its poly schedule was planned for {planned} steps (the learning rate "
                f"reaches 0 at step {planned}), and a resume continues it; it cannot re-plan "
                f"it for {steps}: to train {steps} steps, start the stage afresh with them."
                if planned != steps else "")
    raise ValueError(
        f"cannot resume from {path}: it was written with other settings than this run's:\n"
        + "\n".join(changed)
        + f"\nA resume continues the checkpoint's run as it was planned: give the values it "
        f"records, or start the stage afresh without --resume.{schedule} (examples/README.md "
        "lists the flags a resume may change.)")


def load_model_state(module: nn.Module, state: Mapping[str, Any], path: str | os.PathLike[str],
                     hint: str) -> None:
    """``module.load_state_dict(state)``, whose error names the checkpoint ``path``, the
    entries that do not fit and ``hint`` (what to do) instead of torch's ``size mismatch``.

    Raises:
        ValueError: ``state`` does not fit ``module``.
    """
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        own = module.state_dict()
        misfits = [f"{k}: {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} here"
                   for k, v in state.items() if isinstance(v, Tensor)
                   and isinstance(own.get(k), Tensor) and own[k].shape != v.shape]
        misfits += [f"{k} missing" for k in own if k not in state]
        misfits += [f"{k} unexpected" for k in state if k not in own]
        shown = "; ".join(misfits[:3]) + (f"; and {len(misfits) - 3} more"
                                          if len(misfits) > 3 else "")
        raise ValueError(f"the checkpoint {path} holds a model that does not fit this one "
                         f"({shown or error}); {hint}") from error


def restore(run: _Run, path: str) -> None:
    """Continue ``run`` from the checkpoint at ``path``: the model, the optimiser, the
    schedule, the scaler, the loader, the random state, the step, the epoch, the history.

    Raises:
        RuntimeError: the checkpoint cannot be read.
        ValueError: the checkpoint is past ``run.config.steps``, was written with
            other settings (:func:`check_resume`), or holds another model.
    """
    state = read_checkpoint(path, run.device)
    steps, step = run.config.steps, int(state["step"])
    planned = int(state["schedule"].get("total_iters", steps))
    if step > steps:
        raise ValueError(
            f"the checkpoint {path} is at step {step}, past the {steps} steps asked for: "
            f"its schedule was for {planned} steps; ask for those, or start afresh "
            "without --resume")
    check_resume(path, state.get("config"), run.record, planned, steps)
    if step == steps and run.rank == 0:
        print(f"{path}: already at step {steps} of {steps}; nothing left to train")
    load_model_state(run.model, state["model"], path,
                     "was it written with other flags (such as --num-classes, --teacher, "
                     "--student)? Give the ones it was written with, or start the stage "
                     "afresh without --resume")
    run.optimizer.load_state_dict(state["optimizer"])
    if run.adversary is not None:
        if state.get("adversary") is None:
            raise ValueError(f"the checkpoint {path} holds no discriminator optimiser, but this "
                             "run's method trains a discriminator; resume with the method it "
                             "was written with, or start afresh without --resume")
        run.adversary.load_state_dict(state["adversary"])
    run.schedule.load_state_dict(state["schedule"])
    run.scaler.load_state_dict(state["scaler"])
    run.loader.load_state_dict(state["loader"])
    _set_rng_state(state["rng"])
    run.step, run.epoch, run.history = step, int(state["epoch"]), list(state["history"])
    run.saved = step


def save(run: _Run) -> None:
    """Write ``run``'s checkpoint, atomically, on rank 0 when the config names a path."""
    if run.rank == 0 and run.config.checkpoint_path:
        save_checkpoint({"model": run.model.state_dict(),
                         "optimizer": run.optimizer.state_dict(),
                         "adversary": (None if run.adversary is None
                                       else run.adversary.state_dict()),
                         "schedule": run.schedule.state_dict(),
                         "scaler": run.scaler.state_dict(),
                         "loader": run.loader.state_dict(), "rng": _rng_state(),
                         "step": run.step, "epoch": run.epoch, "history": run.history,
                         "config": run.record},
                        run.config.checkpoint_path)
        run.saved = run.step


def train_one_epoch(run: _Run, report: _Report) -> bool:
    """Train on the batches left in ``run.epoch`` until ``report.end`` steps.

    Returns:
        Whether the epoch ran out (rather than the run reaching its end).
    """
    run.sampler.set_epoch(run.epoch)
    every = run.config.checkpoint_every
    for images, labels in run.loader:
        lr = float(run.schedule.get_last_lr()[0])
        run.micro.append(train_one_batch(run, images, labels))
        if len(run.micro) < run.config.accumulate:
            continue
        row = optimizer_step(run, lr)
        report.write(row)
        if every and run.step % every == 0:
            save(run)
        if run.step >= report.end:
            return False
    return True


def train_one_batch(run: _Run, images: Tensor, labels: Tensor) -> dict[str, float]:
    """The forward and backward pass of one batch, its loss divided by
    ``config.accumulate``; DDP synchronises the gradients on a step's last batch only.

    Returns:
        The batch's loss, cross-entropy and terms.

    Raises:
        FloatingPointError: the loss is not finite (before the backward pass).
    """
    images = images.to(run.device, non_blocking=True)
    labels = labels.to(run.device, non_blocking=True)
    last = len(run.micro) + 1 == run.config.accumulate
    sync = (contextlib.nullcontext() if last or not run.distributed
            else run.train_model.no_sync())  # type: ignore[operator]
    amp_dtype = _AMP_DTYPES.get(run.config.amp)
    with sync:
        with torch.autocast(run.device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            part, loss = step_loss(run.train_model, isinstance(run.model, DistillationWrapper),
                                    images, labels, run.config.ignore_index)
        if not math.isfinite(part["loss"]):
            raise _diverged(run, _loss_account(part, run), "before its backward pass",
                            updated=run.step > 0)
        run.scaler.scale(loss / run.config.accumulate).backward()  # type: ignore[no-untyped-call]
    return part


def optimizer_step(run: _Run, lr: float) -> dict[str, float]:
    """Step the optimiser (through the scaler) and the schedule on the accumulated
    gradients; record the step.

    Returns:
        The step's row of the history: ``step``, ``lr``, and the mean over the
        accumulated batches of the loss, the cross-entropy and each term.

    Raises:
        FloatingPointError: a gradient is not finite (checked before the update,
            unless ``amp='fp16'``, whose scaler skips such steps itself), or the
            update made a weight or a buffer non-finite (checked before anything
            is saved).
    """
    loss = sum(m["loss"] for m in run.micro) / len(run.micro)
    trainable = {n: p for n, p in run.model.named_parameters() if p.requires_grad}
    if not run.scaler.is_enabled():
        bad = _non_finite({n: p.grad for n, p in trainable.items() if p.grad is not None})
        if bad:
            raise _diverged(run, f"the gradients became non-finite ({_names(bad)}), the loss "
                            f"being {loss:.4g}", "before its update was applied",
                            updated=run.step > 0)
    run.scaler.step(run.optimizer)
    if run.adversary is not None:
        run.scaler.step(run.adversary)
    run.scaler.update()
    bad = _non_finite({**trainable, **dict(run.model.named_buffers())})
    if bad:
        raise _diverged(run, f"the model's weights went non-finite ({_names(bad)}), the "
                        f"loss being {loss:.4g}", "before they were saved", updated=True)
    run.optimizer.zero_grad(set_to_none=True)
    if run.adversary is not None:
        run.adversary.zero_grad(set_to_none=True)
    run.schedule.step()
    run.step += 1
    micro, run.micro = run.micro, []
    row = {"step": run.step, "lr": lr,
           **{k: sum(m[k] for m in micro) / len(micro) for k in micro[0]}}
    run.history.append(row)
    return row


def _non_finite(tensors: Mapping[str, Tensor]) -> list[str]:
    """The names of the floating tensors holding an inf or a NaN, with one host sync."""
    floats = {n: t for n, t in tensors.items() if t.is_floating_point()}
    if not floats:
        return []
    finite = torch.stack([t.detach().isfinite().all() for t in floats.values()])
    if bool(finite.all()):
        return []
    return [n for n, ok in zip(floats, finite.tolist(), strict=True) if not ok]


def _names(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:3])
    return f"{len(names)} tensors: {shown}{', ...' if len(names) > 3 else ''}"


def _loss_account(part: dict[str, float], run: _Run) -> str:
    """Which terms of a batch's loss are not finite."""
    terms = [f"{k} = {v}" for k, v in part.items() if k != "loss" and not math.isfinite(v)]
    batch = (f" in batch {len(run.micro) + 1} of the {run.config.accumulate} it accumulates"
             if run.config.accumulate > 1 else "")
    return (f"the loss became {part['loss']}{batch}, "
            + (f"from {', '.join(terms)}" if terms else f"a sum of finite terms ({part})"))


def _diverged(run: _Run, what: str, when: str, updated: bool) -> FloatingPointError:
    """The error of a step that went non-finite: which step and what, that nothing of it
    was saved, and the flag to change (``updated``: whether an update, which the learning
    rate scales, came before)."""
    path = run.config.checkpoint_path
    kept = (f"the checkpoint {path} of step {run.saved}, the last finite state, is kept"
            if path and run.saved is not None else "no checkpoint of this run was written")
    if not updated:
        fix = ("this is the first step, before any update: check the inputs and the initial "
               "weights for infs and NaNs")
    else:
        fix = (f"lower the learning rate (--lr, now {run.config.lr:g})"
               + (" or train in bfloat16 (--amp bf16), whose range float16 lacks"
                  if run.config.amp == "fp16" else "")
               + ", and start the stage afresh (without --resume)")
    return FloatingPointError(f"step {run.step + 1}: {what}; the run stops {when}, and "
                              f"{kept}. To go on, {fix}")


def remove_stale_temporaries(checkpoint: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files (``.<name>.*.tmp``) that runs killed while writing
    ``checkpoint`` left in its folder; returns them.

    A temporary file names its writer's process
    (:func:`segdistill.save_checkpoint`): one whose writer still runs (another run
    saving into the folder) is kept; one that names none (from an older version)
    counts as stale.
    """
    path = Path(checkpoint)
    found = sorted(path.parent.glob(f".{path.name}.*.tmp")) if path.parent.is_dir() else []
    stale = [tmp for tmp in found if not _written_by_another_live_process(tmp, path.name)]
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def _written_by_another_live_process(tmp: Path, name: str) -> bool:
    pid, dot, _ = tmp.name[len(name) + 2:-len(".tmp")].partition(".")
    return (bool(dot) and pid.isdigit() and int(pid) != os.getpid()
            and process_alive(int(pid)))


def read_checkpoint(path: str | os.PathLike[str],
                    device: str | torch.device = "cpu") -> dict[str, Any]:
    """:func:`segdistill.load_checkpoint` (whose error names ``path`` when the file is
    truncated or not a checkpoint), saying what to do about a broken one."""
    try:
        return load_checkpoint(path, map_location=device)
    except RuntimeError as error:
        raise RuntimeError(f"{error}: delete it to start the stage afresh") from error


def _cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """The mean cross-entropy over the counted pixels, and 0 (with zero gradients) for a
    batch with none, of which torch's mean is 0 / 0."""
    if bool((labels != ignore_index).any()):
        return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index)
    return logits.float().sum() * 0.0


def step_loss(model: nn.Module, distilling: bool, images: Tensor, labels: Tensor,
              ignore_index: int) -> tuple[dict[str, float], Tensor]:
    """One batch's training loss: the cross-entropy of the logits (upsampled to the labels'
    grid where they differ) plus, when ``distilling`` (``model`` is a wrapper), the
    distillation terms; and its row for the log (``loss``, ``ce``, each term)."""
    terms: dict[str, Tensor] = {}
    if distilling:
        out = model(images, target=labels)
        logits, terms, distill = select_output(out.output), out.losses, out.loss
    else:
        logits, distill = select_output(model(images)), None
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear",
                               align_corners=False)
    ce = _cross_entropy(logits, labels, ignore_index)
    loss = ce if distill is None else ce + distill
    row = {"loss": loss.item(), "ce": ce.item(), **{k: v.item() for k, v in terms.items()}}
    return row, loss
