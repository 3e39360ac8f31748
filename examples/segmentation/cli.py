"""Command line of the reference pipeline.

    python -m examples.segmentation STAGE --dataset {voc,cityscapes,pascal_context,digits}
        [--root DATA] [...]

STAGE is one of: teacher, student, translator, distill, evaluate, visualize, export,
all.
``all --dataset digits`` is the demo: the whole pipeline on a CPU in minutes,
on digit scenes built in memory (no --root). Under torchrun every stage runs
data-parallel (DDP, one process per GPU). Every field of the configuration is
a flag (see the last group below); the defaults are the dataset's.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import get_args

import torch
import torch.distributed as dist

from examples.segmentation import config as configs
from examples.segmentation import export, stages

STAGES = ("teacher", "student", "translator", "distill", "evaluate", "visualize", "export",
          "all")


def parser() -> argparse.ArgumentParser:
    """The parser: the stage, where the data and the outputs are, and a flag per config
    field."""
    p = argparse.ArgumentParser(prog="python -m examples.segmentation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--dataset", choices=sorted(configs.CONFIGS), required=True)
    p.add_argument("--root", type=Path, help="the dataset's root folder (VOC, Cityscapes, Pascal "
                   "Context)")
    p.add_argument("--out", type=Path, help="output folder (default runs/<dataset>)")
    p.add_argument("--method", choices=stages.METHODS, default="paper",
                   help="distillation method for 'distill' and 'all' (default: paper)")
    p.add_argument("--models", nargs="+", help="models for 'evaluate'/'visualize', e.g. "
                   "teacher student distill-paper ('export': students only; default "
                   "distill-<method>)")
    p.add_argument("--formats", nargs="+", choices=get_args(export.Format),
                   default=list(get_args(export.Format)),
                   help="what 'export' writes (default: all; onnx needs the export extra)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--resume", action="store_true", help="continue from the stage's checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--pixel", type=int, nargs=2, metavar=("ROW", "COL"),
                   help="the pixel whose affinity map 'visualize' draws (default: the middle "
                   "labelled pixel of each image)")
    p.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)  # tests: a crash
    configs.add_flags(p)
    return p


def make_run(args: argparse.Namespace) -> stages.Run:
    """The run the parsed arguments describe (and the process group under torchrun)."""
    config = configs.from_flags(args, args.dataset)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device, rank, world = stages.setup(args.device)
    return stages.Run(config, args.root, args.out or Path("runs") / args.dataset, device, rank,
                      world, args.resume, args.stop_after,
                      progress=not args.no_progress and sys.stderr.isatty())


def main(argv: Sequence[str] | None = None) -> int:
    """Run one stage (or all) as the command line says."""
    args = parser().parse_args(argv)
    run = make_run(args)
    try:
        evaluating = args.stage in ("evaluate", "visualize", "export")
        stages.dataset(run, train=not evaluating)  # fail fast
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
        elif args.stage == "export":
            for name in args.models or [f"distill-{args.method}"]:
                stages.export(run, name, args.formats)
        else:
            command = shlex.join(["python", "-m", "examples.segmentation",
                                  *(sys.argv[1:] if argv is None else argv)])
            stages.run_all(run, args.method, command)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
