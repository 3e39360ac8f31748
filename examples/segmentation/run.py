"""Where and how a pipeline stage runs: the :class:`Run`, the process group, the data,
and the networks of the run (each with its feature map for distillation declared once in
:mod:`examples.segmentation.models`)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from examples.segmentation import data, models
from examples.segmentation.config import RESUME_SAFE, STAGE_FIELDS, PipelineConfig
from examples.segmentation.data import IGNORE_INDEX
from examples.segmentation.locks import folder_lock
from examples.segmentation.training import TrainConfig, load_model_state, read_checkpoint
from segdistill import FeatureSpec, Translator


@dataclass
class Run:
    """Where and how a stage runs."""

    config: PipelineConfig
    root: Path | None
    out: Path
    device: torch.device
    rank: int = 0
    world_size: int = 1
    resume: bool = False
    stop_after: int | None = None
    progress: bool = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def with_config(self, **values: Any) -> Run:
        """The same run with config fields replaced."""
        return replace(self, config=self.config.override(**values))


def setup(device: str | None) -> tuple[torch.device, int, int]:
    """Initialise the process group under torchrun; pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = device != "cpu" and torch.cuda.is_available()
    # under torchrun even one process gets a process group, so that its collectives run
    # as with several (benchmarks/gpu_check.py checks NCCL so on one GPU)
    if (world > 1 or "TORCHELASTIC_RUN_ID" in os.environ) and not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if want_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local), rank, world
    return torch.device(device or "cpu"), rank, world


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def stage_lock(run: Run, stage: str) -> Iterator[None]:
    """Hold ``OUT/<stage>/run.lock`` while the stage runs, on the main process (the only
    one that writes there): a second run on the folder fails at once, naming the first
    (:func:`~examples.segmentation.locks.folder_lock`)."""
    with folder_lock(run.out / stage) if run.main else contextlib.nullcontext():
        yield


def dataset(run: Run, train: bool) -> Any:
    """The run's training (augmented) or evaluation split."""
    return data.load(run.config, run.root, train)


M = TypeVar("M", bound=nn.Module)


def load_weights(module: M, path: Path, what: str) -> M:
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}: run that stage first")
    load_model_state(module, read_checkpoint(path)["model"], path,
                     "was it trained with other flags (such as --num-classes, --teacher, "
                     "--student)? Give the ones it was trained with")
    return module


def build_teacher(run: Run, trained: bool) -> nn.Module:
    """The teacher, fresh (seeded) or with the weights of the teacher stage."""
    torch.manual_seed(run.config.seed)  # the same initial weights in every run and rank
    net = models.TEACHERS[run.config.teacher].build(
        run.config.num_classes, run.config.pretrained and not trained)
    if trained:
        load_weights(net, run.out / "teacher" / "model.pt", "trained teacher")
    return net.to(run.device)


def build_student(run: Run, weights: str | None = None) -> nn.Module:
    """A fresh (seeded) student, or the one trained under ``OUT/<weights>``."""
    torch.manual_seed(run.config.seed + 1)
    net = models.STUDENTS[run.config.student].build(
        run.config.num_classes, run.config.pretrained and weights is None)
    if weights is not None:
        load_weights(net, run.out / weights / "model.pt", f"{weights} model")
    return net.to(run.device)


def model_for(run: Run, name: str) -> nn.Module:
    if name == "teacher":
        return build_teacher(run, trained=True)
    return build_student(run, weights=name)


def teacher_feature(run: Run) -> FeatureSpec:
    """The teacher's feature map that ``--teacher-layer`` names
    (:meth:`~examples.segmentation.models.Architecture.layer`)."""
    return models.TEACHERS[run.config.teacher].layer(run.config.teacher_layer)


def student_feature(run: Run) -> FeatureSpec:
    """The student's last feature map, which the adapters and feature baselines read."""
    return models.STUDENTS[run.config.student].features


def new_translator(run: Run) -> Translator:
    """A fresh translator for the teacher's feature map (``--translator-channels``)."""
    spec = teacher_feature(run)
    if spec.channels is None:  # pragma: no cover - every architecture declares them
        raise ValueError(f"the teacher's feature {spec.layer!r} declares no channels")
    return Translator(spec.channels, run.config.translator_channels)


def resume_record(run: Run, kind: str) -> dict[str, Any]:
    """The flags that describe a training stage of ``kind`` (``teacher``, ``student``,
    ``distill``): what its checkpoints record and a ``--resume`` compares. Every field of
    the config, less :data:`~examples.segmentation.config.RESUME_SAFE` and those of other
    stages (:data:`~examples.segmentation.config.STAGE_FIELDS`)."""
    return {"--" + f.name.replace("_", "-"): getattr(run.config, f.name)
            for f in fields(PipelineConfig)
            if f.name not in RESUME_SAFE and kind in STAGE_FIELDS.get(f.name, (kind,))}


def train_config(run: Run, stage: str, steps: int, kind: str | None = None) -> TrainConfig:
    """The training of the stage written to ``OUT/<stage>``, of ``kind`` (``teacher``,
    ``student`` or ``distill``; default: ``stage`` up to its first ``-``)."""
    c = run.config
    if c.batch_size % (run.world_size * c.accumulate):
        raise ValueError(f"the batch size {c.batch_size} does not split over "
                         f"{run.world_size} processes x {c.accumulate} accumulated batches")
    return TrainConfig(
        steps=steps, batch_size=c.batch_size // (run.world_size * c.accumulate), lr=c.lr,
        momentum=c.momentum, optimizer=c.optimizer,
        weight_decay=c.teacher_weight_decay if stage == "teacher" else c.weight_decay,
        no_decay_norm_bias=not c.decay_norm_bias, accumulate=c.accumulate,
        poly_power=c.poly_power, ignore_index=IGNORE_INDEX, amp=c.amp, seed=c.seed,
        num_workers=c.workers,
        checkpoint_path=str(run.out / stage / "checkpoint.pt"),
        checkpoint_every=c.checkpoint_every, log_path=str(run.out / stage / "log.jsonl"),
        log_every=c.log_every, progress=run.progress,
        record=resume_record(run, kind or stage.partition("-")[0]),
    )


def sync_bn_enabled(run: Run) -> bool:
    """``--sync-bn`` as given, else (auto) on when more than one process runs on CUDA."""
    if run.config.sync_bn is None:
        return run.world_size > 1 and run.device.type == "cuda"
    return run.config.sync_bn


def sync_bn(run: Run, module: nn.Module) -> nn.Module:
    if not (sync_bn_enabled(run) and run.world_size > 1):
        return module
    if run.device.type != "cuda":
        raise ValueError("--sync-bn needs CUDA devices (SyncBatchNorm does not run on the CPU)")
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)  # type: ignore[no-untyped-call,no-any-return]


def autocast(run: Run) -> Any:
    """``torch.autocast`` at ``--amp``'s type on the run's device (off for ``none``)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run.config.amp)
    return torch.autocast(run.device.type, dtype=dtype or torch.float32,
                          enabled=dtype is not None)
