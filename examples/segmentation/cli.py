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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, get_args

import torch
import torch.distributed as dist

from examples.segmentation import config as configs
from examples.segmentation import export, stages
from examples.segmentation.evaluation import evaluate
from examples.segmentation.methods import METHODS, check_method
from examples.segmentation.reporting import visualize
from examples.segmentation.run import Run, dataset, setup


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
    p.add_argument("--method", nargs="+", type=_method, default=["knowledge_adaptation"],
                   metavar="METHOD",
                   help="distillation methods for 'distill' and 'all', each run in turn: a "
                   f"preset of segdistill.presets.PRESETS ({', '.join(METHODS)}), or several "
                   "joined by '+' into one wrapper (e.g. cirkd+holistic, as CIRKD's scripts); "
                   "default: knowledge_adaptation, the paper's")
    p.add_argument("--models", nargs="+", help="models for 'evaluate'/'visualize', e.g. "
                   "teacher student distill-knowledge_adaptation ('export': students only; "
                   "default "
                   "distill-<method>)")
    p.add_argument("--formats", nargs="+", choices=get_args(export.Format),
                   default=list(get_args(export.Format)),
                   help="what 'export' writes (default: all; onnx needs the export extra)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the stage's checkpoint, exactly; refused when a flag of "
                   "the stage differs from the checkpoint's, but those examples/README.md lists "
                   "as free (--log-every, --checkpoint-every, --threads, ...)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--pixel", type=int, nargs=2, metavar=("ROW", "COL"),
                   help="the pixel whose affinity map 'visualize' draws (default: the middle "
                   "labelled pixel of each image)")
    p.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)  # tests: a crash
    configs.add_flags(p)
    return p


def _method(text: str) -> str:
    """``--method``'s type: a pipeline method or a combination, or a usage error."""
    try:
        check_method(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error
    return text


def _distilled(args: argparse.Namespace) -> list[str]:
    return [f"distill-{method}" for method in args.method]


def make_run(args: argparse.Namespace) -> Run:
    """The run the parsed arguments describe (and the process group under torchrun)."""
    config = configs.from_flags(args, args.dataset)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device, rank, world = setup(args.device)
    return Run(config, args.root, args.out or Path("runs") / args.dataset, device, rank,
                      world, args.resume, args.stop_after,
                      progress=not args.no_progress and sys.stderr.isatty())


def _models(args: argparse.Namespace, default: Sequence[str]) -> list[str]:
    return list(args.models or default)


def _evaluate(run: Run, args: argparse.Namespace) -> None:
    for name in _models(args, ["teacher", "student", *_distilled(args)]):
        evaluate(run, name)


def _visualize(run: Run, args: argparse.Namespace) -> None:
    if run.main:
        path = visualize(run, _models(args, ["teacher", "student", *_distilled(args)]),
                         pixel=tuple(args.pixel) if args.pixel else None)
        print(f"figure: {path}")


def _export(run: Run, args: argparse.Namespace) -> None:
    for name in _models(args, _distilled(args)):
        stages.export(run, name, args.formats)


def _all(run: Run, args: argparse.Namespace, argv: Sequence[str] | None) -> None:
    command = shlex.join(["python", "-m", "examples.segmentation",
                          *(sys.argv[1:] if argv is None else argv)])
    stages.run_all(run, args.method, command)


COMMANDS: dict[str, Callable[[Run, argparse.Namespace, Sequence[str] | None], Any]] = {
    "teacher": lambda run, args, argv: stages.train_teacher(run),
    "student": lambda run, args, argv: stages.train_student(run),
    "translator": lambda run, args, argv: stages.train_translator_stage(run),
    "distill": lambda run, args, argv: [stages.distill(run, m) for m in args.method],
    "evaluate": lambda run, args, argv: _evaluate(run, args),
    "visualize": lambda run, args, argv: _visualize(run, args),
    "export": lambda run, args, argv: _export(run, args),
    "all": _all,
}
"""What each stage of the command line runs."""

STAGES = tuple(COMMANDS)
"""The command line's stages."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run one stage (or all) as the command line says."""
    args = parser().parse_args(argv)
    run = make_run(args)
    try:
        evaluating = args.stage in ("evaluate", "visualize", "export")
        dataset(run, train=not evaluating)  # fail fast
        COMMANDS[args.stage](run, args, argv)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
