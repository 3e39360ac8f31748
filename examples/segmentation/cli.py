"""Command line of the reference pipelines.

    python -m examples.segmentation STAGE --dataset {voc,cityscapes} --root DATA --out RUNS [...]

STAGE is one of: teacher, student, translator, distill, evaluate, visualize, all.
Under torchrun every stage runs data-parallel (DDP, one process per GPU).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch.distributed as dist

from examples.segmentation import stages
from examples.segmentation.config import CONFIGS

STAGES = ("teacher", "student", "translator", "distill", "evaluate", "visualize", "all")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m examples.segmentation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--dataset", choices=sorted(CONFIGS), required=True)
    p.add_argument("--root", type=Path, required=True, help="the dataset's root folder")
    p.add_argument("--out", type=Path, default=Path("runs"), help="output folder (runs)")
    p.add_argument("--method", choices=stages.METHODS, default="paper",
                   help="distillation method for 'distill' and 'all' (default: paper)")
    p.add_argument("--models", nargs="+", help="models for 'evaluate'/'visualize', e.g. "
                   "teacher student distill-paper")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--resume", action="store_true", help="continue from the stage's checkpoint")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--pixel", type=int, nargs=2, metavar=("ROW", "COL"),
                   help="the pixel whose affinity map 'visualize' draws (default: centre)")
    p.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)  # tests: a crash
    overrides = p.add_argument_group("config overrides (defaults: the paper's)")
    for flag, kind in (("batch-size", int), ("lr", float), ("crop", int),
                       ("teacher-steps", int), ("student-steps", int), ("distill-steps", int),
                       ("translator-epochs", int), ("translator-channels", int),
                       ("workers", int),
                       ("checkpoint-every", int), ("log-every", int), ("seed", int),
                       ("adaptation-weight", float), ("affinity-weight", float),
                       ("kd-temperature", float), ("eval-batch-size", int)):
        overrides.add_argument(f"--{flag}", type=kind)
    overrides.add_argument("--student", choices=("mobilenet_v2", "lraspp"))
    overrides.add_argument("--amp", choices=("none", "bf16", "fp16"))
    overrides.add_argument("--sync-bn", action="store_true", default=None)
    overrides.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                           default=None, help="random initialisation (no weight download)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    names = ("batch_size", "lr", "crop", "teacher_steps", "student_steps", "distill_steps",
             "translator_epochs", "translator_channels", "workers", "checkpoint_every",
             "log_every", "seed",
             "adaptation_weight", "affinity_weight", "kd_temperature", "eval_batch_size",
             "student", "amp", "sync_bn", "pretrained")
    config = CONFIGS[args.dataset].override(**{n: getattr(args, n) for n in names})
    device, rank, world = stages.setup(args.device)
    run = stages.Run(config, args.root, args.out, device, rank, world, args.resume,
                     args.stop_after, progress=not args.no_progress and sys.stderr.isatty())
    try:
        stages.dataset(run, train=args.stage not in ("evaluate", "visualize"))  # fail fast
        if args.stage == "teacher":
            stages.train_teacher(run)
        elif args.stage == "student":
            stages.train_student(run)
        elif args.stage == "translator":
            stages.train_translator_stage(run)
        elif args.stage == "distill":
            stages.distill(run, args.method)
        elif args.stage == "evaluate":
            for name in args.models or ["teacher", "student", f"distill-{args.method}"]:
                stages.evaluate(run, name)
        elif args.stage == "visualize":
            if run.main:
                path = stages.visualize(
                    run, args.models or ["teacher", "student", f"distill-{args.method}"],
                    pixel=tuple(args.pixel) if args.pixel else None)
                print(f"figure: {path}")
        else:
            stages.run_all(run, args.method)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
