"""The pipeline's stages: teacher, student, translator, distillation, evaluation, figures.

Every stage reads and writes under one output folder::

    OUT/teacher/model.pt            OUT/student/model.pt
    OUT/translator/model.pt         OUT/distill-<method>/model.pt  (the plain student)
    OUT/<stage>/checkpoint.pt       atomic, every --checkpoint-every steps; --resume
    OUT/<stage>/log.jsonl           loss, terms and lr (TensorBoard too when installed)
    OUT/<model>/eval.json           mIoU, per-class IoU, parameters, FLOPs, images/s
    OUT/figures/*.png
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset

from examples.segmentation import models
from examples.segmentation.config import PipelineConfig
from examples.segmentation.data import DATASETS, IGNORE_INDEX, MEAN, STD, SegmentationFiles
from segdistill import (
    ConfusionMatrix,
    DistillationWrapper,
    FeatureHooks,
    Translator,
    count_flops,
    count_parameters,
    load_checkpoint,
    measure_throughput,
    save_checkpoint,
    train_translator,
)
from segdistill.hooks import select_output
from segdistill.training import TrainConfig, fit
from segdistill.visualize import label_palette, pixel_affinity, save_prediction_grid

METHODS = ("paper", "kd", "fitnet", "attention", "pairwise", "cwd")


@dataclass
class Run:
    """Where and how a stage runs."""

    config: PipelineConfig
    root: Path
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


# ---- setup ---------------------------------------------------------------------------------

def setup(device: str | None) -> tuple[torch.device, int, int]:
    """Initialise the process group under torchrun; pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = device != "cpu" and torch.cuda.is_available()
    if world > 1 and not dist.is_initialized():
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


def dataset(run: Run, train: bool) -> SegmentationFiles:
    factory, _ = DATASETS[run.config.dataset]
    split = run.config.train_split if train else run.config.val_split
    return factory(run.root, split, train, run.config.crop, run.config.scale_range,
                   run.config.seed)


def _load_weights(module: nn.Module, path: Path, what: str) -> nn.Module:
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}: run that stage first")
    module.load_state_dict(load_checkpoint(path)["model"])
    return module


def build_teacher(run: Run, trained: bool) -> nn.Module:
    torch.manual_seed(run.config.seed)  # the same initial weights in every run and rank
    net = models.teacher(run.config.num_classes, pretrained=run.config.pretrained and not trained)
    if trained:
        _load_weights(net, run.out / "teacher" / "model.pt", "trained teacher")
    return net.to(run.device)


def build_student(run: Run, weights: str | None = None) -> nn.Module:
    torch.manual_seed(run.config.seed + 1)
    net = models.student(run.config.student, run.config.num_classes,
                         pretrained=run.config.pretrained and weights is None)
    if weights is not None:
        _load_weights(net, run.out / weights / "model.pt", f"{weights} model")
    return net.to(run.device)


def _train_config(run: Run, stage: str, steps: int) -> TrainConfig:
    c = run.config
    if c.batch_size % run.world_size:
        raise ValueError(f"the batch size {c.batch_size} does not split over "
                         f"{run.world_size} processes")
    return TrainConfig(
        steps=steps, batch_size=c.batch_size // run.world_size, lr=c.lr, momentum=c.momentum,
        weight_decay=c.weight_decay, poly_power=c.poly_power, ignore_index=IGNORE_INDEX,
        amp=c.amp, seed=c.seed, num_workers=c.workers,
        checkpoint_path=str(run.out / stage / "checkpoint.pt"),
        checkpoint_every=c.checkpoint_every, log_path=str(run.out / stage / "log.jsonl"),
        log_every=c.log_every, progress=run.progress,
    )


def _sync_bn(run: Run, module: nn.Module) -> nn.Module:
    if not (run.config.sync_bn and run.world_size > 1):
        return module
    if run.device.type != "cuda":
        raise ValueError("--sync-bn needs CUDA devices (SyncBatchNorm does not run on the CPU)")
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)


def _train(run: Run, stage: str, model: nn.Module, steps: int, weights: nn.Module) -> Path:
    fit(_sync_bn(run, model), dataset(run, train=True), _train_config(run, stage, steps),
        device=run.device, resume=run.resume, stop_after=run.stop_after)
    path = run.out / stage / "model.pt"
    if run.main and (run.stop_after is None or run.stop_after >= steps):
        save_checkpoint({"model": weights.state_dict()}, path)
    _barrier()
    return path


# ---- stages --------------------------------------------------------------------------------

def train_teacher(run: Run) -> Path:
    """(a) DeepLabV3-ResNet50 at output stride 8, cross-entropy."""
    net = build_teacher(run, trained=False)
    return _train(run, "teacher", net, run.config.teacher_steps, net)


def train_student(run: Run) -> Path:
    """(b) The student baseline, cross-entropy only."""
    net = build_student(run)
    return _train(run, "student", net, run.config.student_steps, net)


def train_translator_stage(run: Run) -> Path:
    """(c) The translator on the frozen teacher's features (rank 0; the others wait)."""
    path = run.out / "translator" / "model.pt"
    if run.main:
        teacher = build_teacher(run, trained=True)
        c = run.config
        data = dataset(run, train=True)
        loader = DataLoader(data, batch_size=max(1, c.batch_size // run.world_size),
                            shuffle=True, num_workers=c.workers, drop_last=True,
                            generator=torch.Generator().manual_seed(c.seed))
        result = train_translator(
            teacher, loader, models.TEACHER_LAYER, _translator(run),
            epochs=c.translator_epochs,
            lr=c.translator_lr, weight_decay=c.translator_weight_decay, device=run.device,
            max_steps=run.stop_after, checkpoint_path=run.out / "translator" / "checkpoint.pt",
            checkpoint_every=c.checkpoint_every, resume=run.resume, progress=run.progress,
        )
        save_checkpoint({"model": result.translator.state_dict(),
                         "history": result.history}, path)
    _barrier()
    return path


def distillation_wrapper(run: Run, method: str) -> DistillationWrapper:
    """The wrapper of one method around the trained teacher and a fresh student."""
    c = run.config
    teacher = build_teacher(run, trained=True)
    student = build_student(run)
    layer, channels = models.STUDENT_LAYERS[c.student]
    features = {"teacher_layer": models.TEACHER_LAYER, "student_layer": layer}
    if method == "paper":
        translator = _load_weights(_translator(run),
                                   run.out / "translator" / "model.pt", "trained translator")
        return DistillationWrapper.knowledge_adaptation(
            teacher, student, **features, translator=translator.to(run.device),
            student_channels=channels, adaptation_weight=c.adaptation_weight,
            affinity_weight=c.affinity_weight)
    if method == "kd":
        return DistillationWrapper.kd(teacher, student, temperature=c.kd_temperature,
                                      ignore_index=IGNORE_INDEX)
    if method == "fitnet":
        return DistillationWrapper.fitnet(teacher, student, **features,
                                          student_channels=channels,
                                          teacher_channels=models.TEACHER_CHANNELS)
    if method == "attention":
        return DistillationWrapper.attention_transfer(teacher, student, **features)
    if method == "pairwise":
        return DistillationWrapper.pairwise(teacher, student, **features, resize="student")
    if method == "cwd":
        return DistillationWrapper.cwd(teacher, student)
    raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")


def distill(run: Run, method: str) -> Path:
    """(d) The student trained with the teacher through ``method``."""
    wrapper = distillation_wrapper(run, method).to(run.device)
    return _train(run, f"distill-{method}", wrapper, run.config.distill_steps, wrapper.student)


def _translator(run: Run) -> Translator:
    return Translator(models.TEACHER_CHANNELS, run.config.translator_channels)


def _model_for(run: Run, name: str) -> nn.Module:
    if name == "teacher":
        return build_teacher(run, trained=True)
    return build_student(run, weights=name)


@torch.no_grad()
def evaluate(run: Run, name: str) -> dict[str, Any]:
    """(e) Single-scale val mIoU (ignore 255), per-class IoU, parameters, FLOPs, images/s."""
    model = _model_for(run, name).eval()
    data = dataset(run, train=False)
    shard = Subset(data, range(run.rank, len(data), run.world_size))
    cm = ConfusionMatrix(run.config.num_classes, ignore_index=IGNORE_INDEX)
    batch = run.config.eval_batch_size
    for image, label in DataLoader(shard, batch_size=batch, num_workers=run.config.workers):
        logits = select_output(model(image.to(run.device)))
        cm.update(logits.argmax(1).cpu(), label)
    cm.all_reduce()
    _, class_names = DATASETS[run.config.dataset]
    crop = torch.zeros(1, 3, run.config.crop, run.config.crop, device=run.device)
    result = {
        "model": name, "miou": cm.miou(), "pixel_accuracy": cm.pixel_accuracy(),
        "iou": {c: (None if math.isnan(v) else v)
                for c, v in zip(class_names, cm.iou().tolist(), strict=True)},
        "params": count_parameters(model), "flops": count_flops(model, crop),
        "images_per_second": measure_throughput(
            model, torch.zeros(batch, 3, run.config.crop, run.config.crop, device=run.device),
            warmup=1, repeats=3),
        "input": [run.config.crop, run.config.crop], "device": str(run.device),
    }
    if run.main:
        path = run.out / name / "eval.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        print(format_eval(result))
    return result


def format_eval(result: dict[str, Any]) -> str:
    """The evaluation as a Markdown table."""
    lines = [f"## {result['model']}: mIoU {100 * result['miou']:.2f} %, "
             f"{result['params'] / 1e6:.2f} M parameters, "
             f"{result['flops'] / 1e9:.1f} GFLOPs at {result['input'][0]} x {result['input'][1]}, "
             f"{result['images_per_second']:.1f} images/s on {result['device']}",
             "", "| class | IoU (%) |", "|---|---:|"]
    for name, value in result["iou"].items():
        lines.append(f"| {name} | {'n/a' if value is None else f'{100 * value:.2f}'} |")
    return "\n".join(lines)


@torch.no_grad()
def visualize(run: Run, models_to_show: list[str], count: int = 4,
              pixel: tuple[int, int] | None = None) -> Path:
    """PNG grid: image, ground truth, each model's prediction, and the affinity map of one
    pixel in each model's distilled features (the teacher's through the translator)."""
    data = dataset(run, train=False)
    images, labels = zip(*(data[i] for i in range(min(count, len(data)))), strict=True)
    predictions: dict[str, list[np.ndarray]] = {}
    affinities: dict[str, list[np.ndarray]] = {}
    pixels = [pixel or (lab.shape[0] // 2, lab.shape[1] // 2) for lab in labels]
    translator = None
    translator_path = run.out / "translator" / "model.pt"
    if translator_path.is_file():
        translator = _load_weights(_translator(run), translator_path,
                                   "translator").to(run.device).eval()
    for name in models_to_show:
        model = _model_for(run, name).eval()
        path = models.TEACHER_LAYER if name == "teacher" else \
            models.STUDENT_LAYERS[run.config.student][0]
        hooks = FeatureHooks(model, {"f": path})
        predictions[name], affinities[name] = [], []
        for image, pix in zip(images, pixels, strict=True):
            logits = select_output(model(image[None].to(run.device)))
            feats = hooks.pop()["f"]
            if name == "teacher" and translator is not None:
                feats = translator.encode(feats)
            predictions[name].append(logits.argmax(1)[0].cpu().numpy())
            affinities[name].append(pixel_affinity(feats, pix, image.shape[-2:]))
        hooks.remove()
    shown = [((img * STD + MEAN).clamp(0, 1).permute(1, 2, 0).numpy()) for img in images]
    out = run.out / "figures" / f"{run.config.dataset}_predictions.png"
    return save_prediction_grid(out, shown, [lab.numpy() for lab in labels], predictions,
                                label_palette(run.config.num_classes, IGNORE_INDEX),
                                affinities, pixels,
                                title=f"{run.config.dataset} val: predictions and affinity "
                                      "maps of the marked pixel")


def run_all(run: Run, method: str) -> dict[str, Any]:
    """Every stage in order, then evaluation of the three models and the figure."""
    train_teacher(run)
    train_student(run)
    if method == "paper":
        train_translator_stage(run)
    distill(run, method)
    results = {name: evaluate(run, name) for name in ("teacher", "student", f"distill-{method}")}
    if run.main:
        visualize(run, list(results))
    return results
