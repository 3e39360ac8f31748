"""The pipeline's stages: teacher, student, translator, distillation, evaluation, figures,
export.

Every stage reads and writes under one output folder::

    OUT/teacher/model.pt            OUT/student/model.pt
    OUT/translator/model.pt         OUT/distill-<method>/model.pt  (the plain student)
    OUT/<stage>/checkpoint.pt       atomic, every --checkpoint-every steps; --resume
                                    (distill: student and adapters; the teacher and
                                    translator by path and SHA-256)
    OUT/<stage>/log.jsonl           loss, terms and lr (TensorBoard too when installed)
    OUT/<model>/eval.json           mIoU, per-class IoU, parameters, FLOPs, images/s
    OUT/figures/<dataset>.png
    OUT/<model>/export/             student.torchscript.pt, student.pt2, student.onnx,
                                    sample.pt, export.json
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar, get_args

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from examples.segmentation import data, models, profiling
from examples.segmentation import export as export_formats
from examples.segmentation.config import PipelineConfig
from examples.segmentation.data import IGNORE_INDEX
from examples.segmentation.figures import label_palette, save_prediction_grid
from examples.segmentation.references import reference_frozen, teacher_transforms
from examples.segmentation.training import (
    TrainConfig,
    fit,
    read_checkpoint,
    remove_stale_temporaries,
)
from segdistill import (
    DistillationWrapper,
    FeatureHooks,
    Translator,
    pixel_affinity,
    save_checkpoint,
    train_translator,
)
from segdistill.hooks import select_output

METHODS = ("paper", "kd", "fitnet", "attention", "pairwise", "cwd")
"""Distillation methods: the paper's (adaptation and affinity through the translator) and
the baselines."""


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


# ---- setup ---------------------------------------------------------------------------------

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


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def dataset(run: Run, train: bool) -> Any:
    """The run's training (augmented) or evaluation split."""
    return data.load(run.config, run.root, train)


M = TypeVar("M", bound=nn.Module)


def _load_weights(module: M, path: Path, what: str) -> M:
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}: run that stage first")
    module.load_state_dict(read_checkpoint(path)["model"])
    return module


def build_teacher(run: Run, trained: bool) -> nn.Module:
    """The teacher, fresh (seeded) or with the weights of the teacher stage."""
    torch.manual_seed(run.config.seed)  # the same initial weights in every run and rank
    net = models.TEACHERS[run.config.teacher].build(
        run.config.num_classes, run.config.pretrained and not trained)
    if trained:
        _load_weights(net, run.out / "teacher" / "model.pt", "trained teacher")
    return net.to(run.device)


def build_student(run: Run, weights: str | None = None) -> nn.Module:
    """A fresh (seeded) student, or the one trained under ``OUT/<weights>``."""
    torch.manual_seed(run.config.seed + 1)
    net = models.STUDENTS[run.config.student].build(
        run.config.num_classes, run.config.pretrained and weights is None)
    if weights is not None:
        _load_weights(net, run.out / weights / "model.pt", f"{weights} model")
    return net.to(run.device)


def _train_config(run: Run, stage: str, steps: int) -> TrainConfig:
    c = run.config
    if c.batch_size % (run.world_size * c.accumulate):
        raise ValueError(f"the batch size {c.batch_size} does not split over "
                         f"{run.world_size} processes x {c.accumulate} accumulated batches")
    return TrainConfig(
        steps=steps, batch_size=c.batch_size // (run.world_size * c.accumulate), lr=c.lr,
        momentum=c.momentum,
        weight_decay=c.teacher_weight_decay if stage == "teacher" else c.weight_decay,
        no_decay_norm_bias=not c.decay_norm_bias, accumulate=c.accumulate,
        poly_power=c.poly_power, ignore_index=IGNORE_INDEX, amp=c.amp, seed=c.seed,
        num_workers=c.workers,
        checkpoint_path=str(run.out / stage / "checkpoint.pt"),
        checkpoint_every=c.checkpoint_every, log_path=str(run.out / stage / "log.jsonl"),
        log_every=c.log_every, progress=run.progress,
    )


def sync_bn_enabled(run: Run) -> bool:
    """``--sync-bn`` as given, else (auto) on when more than one process runs on CUDA."""
    if run.config.sync_bn is None:
        return run.world_size > 1 and run.device.type == "cuda"
    return run.config.sync_bn


def _sync_bn(run: Run, module: nn.Module) -> nn.Module:
    if not (sync_bn_enabled(run) and run.world_size > 1):
        return module
    if run.device.type != "cuda":
        raise ValueError("--sync-bn needs CUDA devices (SyncBatchNorm does not run on the CPU)")
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)  # type: ignore[no-untyped-call,no-any-return]


def _validator(run: Run, stage: str, weights: nn.Module) -> Any:
    """With ``--val-every K``: a ``fit`` callback that evaluates ``weights`` on the val split
    every K steps (on every process, each its shard), appends to ``OUT/<stage>/val.jsonl`` and
    keeps the best val mIoU's weights in ``OUT/<stage>/best.pt``."""
    every = run.config.val_every
    if not every:
        return None
    folder = run.out / stage
    best_path = folder / "best.pt"
    best = [-math.inf]
    if run.resume and best_path.is_file():
        best[0] = float(read_checkpoint(best_path)["miou"])
    val = dataset(run, train=False)

    def on_step(step: int, row: dict[str, float]) -> None:
        if step % every:
            return
        was_training = weights.training
        weights.eval()
        values = _evaluate_model(run, weights, val)
        weights.train(was_training)
        miou = float(values["miou"])
        if run.main:
            folder.mkdir(parents=True, exist_ok=True)
            log = folder / "val.jsonl"  # rows past a resumed checkpoint come again
            rows = [r for r in log.read_text().splitlines() if json.loads(r)["step"] < step] \
                if log.is_file() else []
            log.write_text("".join(r + "\n" for r in
                                   [*rows, json.dumps({"step": step, "miou": miou})]))
            if miou > best[0]:
                save_checkpoint({"model": weights.state_dict(), "step": step, "miou": miou},
                                best_path)
        best[0] = max(best[0], miou)

    return on_step


def _train(run: Run, stage: str, model: nn.Module, steps: int,
           weights: nn.Module) -> list[dict[str, float]]:
    history = fit(_sync_bn(run, model), dataset(run, train=True),
                  _train_config(run, stage, steps), device=run.device, resume=run.resume,
                  stop_after=run.stop_after, on_step=_validator(run, stage, weights))
    if run.main and (run.stop_after is None or run.stop_after >= steps):
        save_checkpoint({"model": weights.state_dict()}, run.out / stage / "model.pt")
    _barrier()
    return history


# ---- stages --------------------------------------------------------------------------------

def train_teacher(run: Run) -> list[dict[str, float]]:
    """(a) The teacher (output stride 8 for VOC and Cityscapes), cross-entropy.

    Returns:
        The loss of every step (as :func:`~examples.segmentation.training.fit`).
    """
    net = build_teacher(run, trained=False)
    return _train(run, "teacher", net, run.config.teacher_steps, net)


def train_student(run: Run, name: str = "student") -> list[dict[str, float]]:
    """(b) The student baseline, cross-entropy only, written to ``OUT/<name>``."""
    net = build_student(run)
    return _train(run, name, net, run.config.student_steps, net)


def teacher_layer(run: Run) -> tuple[str, int]:
    """The module path and channels of the teacher's feature map that ``--teacher-layer``
    names (:meth:`~examples.segmentation.models.Architecture.layer`)."""
    return models.TEACHERS[run.config.teacher].layer(run.config.teacher_layer)


def _translator(run: Run) -> Translator:
    return Translator(teacher_layer(run)[1], run.config.translator_channels)


def train_translator_stage(run: Run) -> list[float]:
    """(c) The translator on the frozen teacher's features.

    Under torchrun rank 0 trains it alone, at the configured (global) batch, while the
    others wait at a barrier of their own group whose timeout is
    ``--translator-timeout`` minutes (NCCL's default of 10 minutes is shorter than one
    epoch of a 2048-channel translator). examples/README.md says why not data-parallel.
    """
    c = run.config
    group: Any = None
    if dist.is_initialized() and run.world_size > 1:
        group = dist.new_group(timeout=timedelta(minutes=c.translator_timeout))
    history: list[float] = []
    if run.main:
        remove_stale_temporaries(run.out / "translator" / "checkpoint.pt")
        teacher = build_teacher(run, trained=True)
        loader = DataLoader(dataset(run, train=True), batch_size=c.batch_size, shuffle=True,
                            num_workers=c.workers, drop_last=True,
                            generator=torch.Generator().manual_seed(c.seed))
        steps = [s for s in (run.stop_after, c.translator_steps) if s is not None]
        result = train_translator(
            teacher, loader, teacher_layer(run)[0], _translator(run),
            epochs=c.translator_epochs, lr=c.translator_lr,
            weight_decay=c.translator_weight_decay, device=run.device,
            max_steps=min(steps) if steps else None,
            checkpoint_path=run.out / "translator" / "checkpoint.pt",
            checkpoint_every=c.checkpoint_every, resume=run.resume, progress=run.progress,
        )
        history = result.history
        save_checkpoint({"model": result.translator.state_dict(), "history": history},
                        run.out / "translator" / "model.pt")
    if group is not None:
        dist.barrier(group=group)
        dist.destroy_process_group(group)
    return history


def distillation_wrapper(run: Run, method: str) -> DistillationWrapper:
    """The wrapper of one method around the trained teacher and a fresh student."""
    c = run.config
    teacher = build_teacher(run, trained=True)
    student = build_student(run)
    (t_layer, t_channels), s_arch = teacher_layer(run), models.STUDENTS[c.student]
    features = {"teacher_layer": t_layer, "student_layer": s_arch.features}
    if method == "paper":
        translator = _load_weights(_translator(run), run.out / "translator" / "model.pt",
                                   "trained translator")
        return DistillationWrapper.knowledge_adaptation(
            teacher, student, **features, translator=translator.to(run.device),
            student_channels=s_arch.channels, adaptation_weight=c.adaptation_weight,
            affinity_weight=c.affinity_weight)
    if method == "kd":
        return DistillationWrapper.kd(teacher, student, temperature=c.kd_temperature,
                                      ignore_index=IGNORE_INDEX)
    if method == "fitnet":
        return DistillationWrapper.fitnet(teacher, student, **features,
                                          student_channels=s_arch.channels,
                                          teacher_channels=t_channels, resize="teacher")
    if method == "attention":
        return DistillationWrapper.attention_transfer(teacher, student, **features,
                                                      resize="teacher")
    if method == "pairwise":
        return DistillationWrapper.pairwise(teacher, student, **features, resize="student")
    if method == "cwd":
        return DistillationWrapper.cwd(teacher, student)
    raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")


def distill(run: Run, method: str, name: str | None = None) -> list[dict[str, float]]:
    """(d) The student trained with the teacher through ``method``, written to
    ``OUT/<name>`` (default ``distill-<method>``)."""
    wrapper = distillation_wrapper(run, method).to(run.device)
    # checkpoints hold the student and the adapters; the frozen teacher and translator
    # are referenced by path and SHA-256 (checked on --resume), not copied
    files: dict[str, tuple[nn.Module, Path]] = {
        "teacher": (wrapper.teacher, run.out / "teacher" / "model.pt")}
    for transform in teacher_transforms(wrapper):  # the paper's: the translator's encoder
        files["translator"] = (transform, run.out / "translator" / "model.pt")
    reference_frozen(wrapper, files)
    history = _train(run, name or f"distill-{method}", wrapper, run.config.distill_steps,
                     wrapper.student)
    wrapper.remove_hooks()
    return history


def _model_for(run: Run, name: str) -> nn.Module:
    if name == "teacher":
        return build_teacher(run, trained=True)
    return build_student(run, weights=name)


def segmentation_metrics(num_classes: int) -> MetricCollection:
    """mIoU (over the classes present in the labels or the predictions), per-class IoU
    (NaN for a class in neither) and pixel accuracy, the ignore label left out.

    torchmetrics keeps one confusion matrix for the three and sums it over all
    processes when they are computed.
    """
    common: dict[str, Any] = {"num_classes": num_classes, "ignore_index": IGNORE_INDEX,
                              "validate_args": False}
    return MetricCollection({
        "miou": MulticlassJaccardIndex(average="macro", **common),
        "iou": MulticlassJaccardIndex(average="none", zero_division=math.nan, **common),
        "pixel_accuracy": MulticlassAccuracy(average="micro", **common),
    })


def _autocast(run: Run) -> Any:
    """``torch.autocast`` at ``--amp``'s type on the run's device (off for ``none``)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run.config.amp)
    return torch.autocast(run.device.type, dtype=dtype or torch.float32,
                          enabled=dtype is not None)


@torch.no_grad()
def _evaluate_model(run: Run, model: nn.Module, val: Any) -> dict[str, torch.Tensor]:
    """The metrics of ``model`` (in eval mode) on ``val``, each process scoring its shard
    under ``--amp``'s autocast. The confusion counts live on ``run.device`` and are summed
    over the processes there (NCCL reduces CUDA tensors only)."""
    shard = Subset(val, range(run.rank, len(val), run.world_size))
    with run.device:  # the states, made on the device; .to() keeps them there on a reset
        metrics = segmentation_metrics(run.config.num_classes).to(run.device)
    batch = run.config.eval_batch_size
    for image, label in DataLoader(shard, batch_size=batch, num_workers=run.config.workers):
        with _autocast(run):
            logits = select_output(model(image.to(run.device)))
        metrics.update(logits.argmax(1), label.to(run.device))
    values: dict[str, torch.Tensor] = metrics.compute()
    return values


@torch.no_grad()
def evaluate(run: Run, name: str, echo: bool = True) -> dict[str, Any]:
    """(e) Single-scale val mIoU (ignore 255), per-class IoU, parameters, FLOPs, images/s,
    written to ``OUT/<name>/eval.json`` (and printed when ``echo``).

    FLOPs and images/s are measured at the evaluation resolution, the size of the first
    val image (Cityscapes: 1024 x 2048), images/s at ``--eval-batch-size`` and under
    ``--amp``'s autocast.
    """
    model = _model_for(run, name).eval()
    val = dataset(run, train=False)
    values = _evaluate_model(run, model, val)
    channels, height, width = val[0][0].shape
    batch = run.config.eval_batch_size
    with _autocast(run):
        images_per_second = profiling.throughput(
            model, torch.zeros(batch, channels, height, width, device=run.device))
    result = {
        "model": name, "miou": float(values["miou"]),
        "pixel_accuracy": float(values["pixel_accuracy"]),
        "iou": {c: (None if math.isnan(v) else v) for c, v in
                zip(data.CLASS_NAMES[run.config.dataset], values["iou"].tolist(), strict=True)},
        "params": profiling.count_parameters(model),
        "flops": profiling.count_flops(model, torch.zeros(1, channels, height, width,
                                                          device=run.device)),
        "images_per_second": images_per_second,
        "input": [height, width], "device": str(run.device), "amp": run.config.amp,
    }
    if run.main:
        path = run.out / name / "eval.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        if echo:
            print(format_eval(result))
    return result


def export(run: Run, name: str,
           formats: Sequence[str] = get_args(export_formats.Format)) -> dict[str, Any]:
    """(g) The student trained under ``OUT/<name>`` to TorchScript, ``torch.export`` and
    ONNX in ``OUT/<name>/export/``, each loaded back and checked against the eager model
    on a batch of two copies (one flipped) of the first val image and a random image of
    another size (:func:`~examples.segmentation.export.export_student`; the float64
    outputs that set the tolerance of an ill-conditioned model run on the run's device).
    Runs on rank 0, on the CPU; the others wait."""
    if name == "teacher":
        raise ValueError("export writes a student (the deployed model), not the teacher; "
                         "pass --models with a student's folder, e.g. distill-paper")
    export_formats.check_formats(formats)
    result: dict[str, Any] = {}
    if run.main:
        model = build_student(run, weights=name)
        image = dataset(run, train=False)[0][0]
        result = export_formats.export_student(
            model, torch.stack([image, image.flip(-1)]), run.out / name / "export", formats,
            reference_device=run.device)
        print(export_formats.format_export(name, result))
    _barrier()
    return result


def format_eval(result: dict[str, Any]) -> str:
    """One evaluation as a Markdown table of per-class IoU."""
    lines = [f"## {result['model']}: mIoU {100 * result['miou']:.2f} %, "
             f"{result['params'] / 1e6:.2f} M parameters, "
             f"{result['flops'] / 1e9:.3g} GFLOPs at {result['input'][0]} x {result['input'][1]}, "
             f"{result['images_per_second']:.1f} images/s on {result['device']}",
             "", "| class | IoU (%) |", "|---|---:|"]
    for name, value in result["iou"].items():
        lines.append(f"| {name} | {'n/a' if value is None else f'{100 * value:.2f}'} |")
    return "\n".join(lines)


def format_summary(results: Sequence[dict[str, Any]]) -> str:
    """Several evaluations as one Markdown table: mIoU, parameters, FLOPs, images/s."""
    lines = ["| model | val mIoU (%) | params | MFLOPs / image | images/s |",
             "|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['model']} | {100 * r['miou']:.2f} | {r['params']:,} | "
                     f"{r['flops'] / 1e6:,.1f} | {r['images_per_second']:,.0f} |")
    return "\n".join(lines)


def _default_pixel(label: torch.Tensor) -> tuple[int, int]:
    """The middle one of the labelled foreground pixels (not background, not ignored), or
    the centre of the image if there is none."""
    fg = torch.nonzero((label > 0) & (label != IGNORE_INDEX))
    if len(fg):
        row, col = fg[len(fg) // 2].tolist()
        return int(row), int(col)
    return label.shape[0] // 2, label.shape[1] // 2


@torch.no_grad()
def visualize(run: Run, shown: Sequence[str] | Mapping[str, str], count: int = 4,
              pixel: tuple[int, int] | None = None, path: Path | None = None) -> Path:
    """(f) PNG grid: image, ground truth, each model's prediction, and the affinity map of
    one pixel in each model's last features (the teacher's through the translator's
    encoder, as the student sees them), as in the paper's Figure 3.

    Args:
        run: the run.
        shown: the models' folders under ``OUT``, or a mapping of titles to folders.
        count: how many val images.
        pixel: the (row, column) of the affinity maps; by default, per image, the middle
            labelled foreground pixel.
        path: the PNG; by default ``OUT/figures/<dataset>.png``.
    """
    folders = dict(shown) if isinstance(shown, Mapping) else {name: name for name in shown}
    val = dataset(run, train=False)
    images, labels = zip(*(val[i] for i in range(min(count, len(val)))), strict=True)
    pixels = [pixel or _default_pixel(label) for label in labels]
    translator = None
    translator_path = run.out / "translator" / "model.pt"
    if translator_path.is_file():
        translator = _load_weights(_translator(run), translator_path, "translator")
        translator.to(run.device).eval()
    predictions: dict[str, list[Any]] = {}
    affinities: dict[str, list[Any]] = {}
    for title, folder in folders.items():
        model = _model_for(run, folder).eval()
        teacher = folder == "teacher"
        layer = teacher_layer(run)[0] if teacher else models.STUDENTS[run.config.student].features
        hooks = FeatureHooks(model, {"f": layer})
        predictions[title], affinities[title] = [], []
        for image, pix in zip(images, pixels, strict=True):
            logits = select_output(model(image[None].to(run.device)))
            feats = hooks.pop()["f"]
            if teacher and translator is not None:
                feats = translator.encode(feats)
            predictions[title].append(logits.argmax(1)[0].cpu().numpy())
            affinities[title].append(pixel_affinity(feats, pix, image.shape[-2:]).cpu().numpy())
        hooks.remove()
    out = path or run.out / "figures" / f"{run.config.dataset}.png"
    return save_prediction_grid(
        out, [data.picture(run.config, img) for img in images],
        [lab.numpy() for lab in labels], predictions,
        label_palette(run.config.num_classes, IGNORE_INDEX), affinities, pixels,
        title=f"{run.config.dataset} val: predictions, and the cosine of the marked pixel's "
              "features with every other position's")


def machine() -> dict[str, Any]:
    """The CPU, the threads torch uses, and the versions: the footer of every result."""
    return {"cpu": profiling.cpu_model(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def footer(seconds: float) -> str:
    """``'<seconds> s on <CPU> (<threads> threads), torch ..., Python ...'``, with the
    machine's load average over the last 5 minutes: how busy it was besides this run."""
    m = machine()
    load = f", load average {os.getloadavg()[1]:.1f}" if hasattr(os, "getloadavg") else ""
    return (f"{seconds:.0f} s on {m['cpu']} ({m['threads']} threads{load}), "
            f"torch {m['torch']}, Python {m['python']}")


def run_all(run: Run, method: str, command: str = "") -> list[dict[str, Any]]:
    """Every stage in order, then the evaluation of the three models, and the figure.

    Prints a summary table with the time it all took and the machine, and writes
    it to ``OUT/summary.md`` with ``command``, the command line that ran it.
    """
    start = time.perf_counter()
    train_teacher(run)
    train_student(run)
    if method == "paper":
        train_translator_stage(run)
    distill(run, method)
    results = [evaluate(run, name, echo=False)
               for name in ("teacher", "student", f"distill-{method}")]
    if run.main:
        figure = visualize(run, [r["model"] for r in results])
        summary = f"{format_summary(results)}\n\n{footer(time.perf_counter() - start)}"
        (run.out / "summary.md").write_text(f"{summary}  \nCommand: `{command}`\n")
        print(f"{summary}\nper-class IoU: {run.out}/<model>/eval.json\nfigure: {figure}")
    return results
