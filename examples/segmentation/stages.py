"""The pipeline's stages: teacher, student, translator, distillation, export, and all of
them in order (evaluation and figures: :mod:`~examples.segmentation.evaluation`,
:mod:`~examples.segmentation.reporting`).

Every stage reads and writes under one output folder::

    OUT/teacher/model.pt            OUT/student/model.pt
    OUT/translator/model.pt         OUT/distill-<method>/model.pt  (the plain student)
    OUT/<stage>/checkpoint.pt       atomic, every --checkpoint-every steps; --resume
                                    (distill: student and adapters; the teacher and
                                    translator by path and SHA-256)
    OUT/<stage>/log.jsonl           loss, terms and lr (TensorBoard too when installed)
    OUT/<stage>/run.lock            while the stage runs: one run per folder
    OUT/<model>/eval.json           mIoU, per-class IoU, parameters, FLOPs, images/s
    OUT/figures/<dataset>.png
    OUT/<model>/export/             student.torchscript.pt, student.pt2, student.onnx,
                                    sample.pt, export.json
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, get_args

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from examples.segmentation import export as export_formats
from examples.segmentation.evaluation import evaluate, validator
from examples.segmentation.methods import distillation_wrapper, needs_translator
from examples.segmentation.references import reference_frozen, teacher_transforms
from examples.segmentation.reporting import footer, format_summary, visualize
from examples.segmentation.run import (
    Run,
    barrier,
    build_student,
    build_teacher,
    dataset,
    new_translator,
    resume_record,
    stage_lock,
    sync_bn,
    teacher_feature,
    train_config,
)
from examples.segmentation.training import fit, remove_stale_temporaries
from segdistill import TranslatorTrainingConfig, save_checkpoint, train_translator


def train(run: Run, stage: str, kind: str, model: nn.Module, steps: int,
          weights: nn.Module) -> list[dict[str, float]]:
    """Train ``model`` for ``steps`` in ``OUT/<stage>`` (``fit``, with ``--val-every``'s
    validation, holding the folder's lock) and save ``weights`` (the trained network
    inside ``model``) as its ``model.pt`` once the stage is complete. ``kind``
    (``teacher``, ``student``, ``distill``) says which flags a resume compares
    (:func:`~examples.segmentation.run.resume_record`)."""
    with stage_lock(run, stage):
        history = fit(sync_bn(run, model), dataset(run, train=True),
                      train_config(run, stage, steps, kind), device=run.device,
                      resume=run.resume, stop_after=run.stop_after,
                      on_step=validator(run, stage, weights))
        if run.main and (run.stop_after is None or run.stop_after >= steps):
            save_checkpoint({"model": weights.state_dict()}, run.out / stage / "model.pt")
    barrier()
    return history


# ---- stages --------------------------------------------------------------------------------

def train_teacher(run: Run) -> list[dict[str, float]]:
    """(a) The teacher (output stride 8 for VOC and Cityscapes), cross-entropy.

    Returns:
        The loss of every step (as :func:`~examples.segmentation.training.fit`).
    """
    net = build_teacher(run, trained=False)
    return train(run, "teacher", "teacher", net, run.config.teacher_steps, net)


def train_student(run: Run, name: str = "student") -> list[dict[str, float]]:
    """(b) The student baseline, cross-entropy only, written to ``OUT/<name>``."""
    net = build_student(run)
    return train(run, name, "student", net, run.config.student_steps, net)


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
        with stage_lock(run, "translator"):
            history = _train_translator(run)
    if group is not None:
        dist.barrier(group=group)
        dist.destroy_process_group(group)
    return history


def _train_translator(run: Run) -> list[float]:
    """Rank 0's part of :func:`train_translator_stage`: train, and write ``model.pt``."""
    c = run.config
    remove_stale_temporaries(run.out / "translator" / "checkpoint.pt")
    teacher = build_teacher(run, trained=True)
    loader = DataLoader(dataset(run, train=True), batch_size=c.batch_size, shuffle=True,
                        num_workers=c.workers, drop_last=True,
                        generator=torch.Generator().manual_seed(c.seed))
    steps = [s for s in (run.stop_after, c.translator_steps) if s is not None]
    result = train_translator(
        teacher, loader, teacher_feature(run).layer, new_translator(run),
        TranslatorTrainingConfig(
            epochs=c.translator_epochs, lr=c.translator_lr,
            weight_decay=c.translator_weight_decay, device=run.device,
            max_steps=min(steps) if steps else None,
            checkpoint_path=run.out / "translator" / "checkpoint.pt",
            checkpoint_every=c.checkpoint_every, resume=run.resume,
            progress=run.progress, record=translator_record(run)),
    )
    save_checkpoint({"model": result.translator.state_dict(), "history": result.history},
                    run.out / "translator" / "model.pt")
    return result.history


def translator_record(run: Run) -> dict[str, Any]:
    """The flags the translator's checkpoint records and a ``--resume`` compares: the
    stage's (:func:`~examples.segmentation.run.resume_record`) but its length
    (``--translator-epochs``, ``--translator-steps``), which a resume may extend: at a
    constant learning rate more steps continue the same run."""
    free = {"--translator-epochs", "--translator-steps"}
    return {k: v for k, v in resume_record(run, "translator").items() if k not in free}


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
    history = train(run, name or f"distill-{method}", "distill", wrapper,
                    run.config.distill_steps, wrapper.student)
    wrapper.remove_hooks()
    return history


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
                         "pass --models with a student's folder, e.g. distill-knowledge_adaptation")
    export_formats.check_formats(formats)
    result: dict[str, Any] = {}
    if run.main:
        model = build_student(run, weights=name)
        image = dataset(run, train=False)[0][0]
        result = export_formats.export_student(
            model, torch.stack([image, image.flip(-1)]), run.out / name / "export", formats,
            reference_device=run.device)
        print(export_formats.format_export(name, result))
    barrier()
    return result


def run_all(run: Run, methods: str | Sequence[str],
            command: str = "") -> list[dict[str, Any]]:
    """Every stage in order (the translator only when a method needs it; one distillation
    per method), then the evaluation of the teacher, the student and each distilled
    student, and the figure.

    Prints a summary table with the time it all took and the machine, and writes
    it to ``OUT/summary.md`` with ``command``, the command line that ran it.
    """
    methods = [methods] if isinstance(methods, str) else list(methods)
    start = time.perf_counter()
    train_teacher(run)
    train_student(run)
    if any(needs_translator(method) for method in methods):
        train_translator_stage(run)
    for method in methods:
        distill(run, method)
    names = ["teacher", "student", *(f"distill-{method}" for method in methods)]
    results = [evaluate(run, name, echo=False) for name in names]
    if run.main:
        figure = visualize(run, [r["model"] for r in results])
        summary = f"{format_summary(results)}\n\n{footer(time.perf_counter() - start)}"
        (run.out / "summary.md").write_text(f"{summary}  \nCommand: `{command}`\n")
        print(f"{summary}\nper-class IoU: {run.out}/<model>/eval.json\nfigure: {figure}")
    return results
