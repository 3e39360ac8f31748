"""The GPU check: one script that a machine with one GPU runs in under 8 minutes, writing
Markdown tables into --out.

1. ``affinity.md``: the affinity and pair-wise losses on CUDA, forward + backward,
   time and peak memory of the dense, linear and (affinity) fused one-Gram
   forms, at 64 x 64, 128 x 128 and 128 x 256 (``benchmarks/affinity.py``,
   run through its command line), in float32, TF32 (cuBLAS and cuDNN allowed
   to use TF32) and under bf16 autocast;
2. ``pipeline-voc.md`` and ``pipeline-cityscapes.md``: images/s and peak
   memory of every stage's step, both readings of the teacher's layer, at VOC
   (batch 8, 513 x 513) and Cityscapes (batch 2, 1024 x 2048) sizes
   (``benchmarks/pipeline.py``);
3. ``torchrun-voc.md`` and ``torchrun-cityscapes.md``: every stage of the
   pipeline (teacher, student, translator, distillation, evaluation, figure,
   export) for a few steps on synthetic data of the real sizes (VOC images of
   up to 500 x 500, Cityscapes frames of 1024 x 2048, evaluated at full
   resolution), under torchrun with one process, whose collectives run on
   NCCL;
4. ``summary.md``: the machine, each part's status and time, and the commands.

``--quick`` (the default when CUDA is missing) runs the same parts small, on the
CPU, with gloo: the affinity benchmark's 32 x 32 case under bf16 autocast only,
and the digit scenes' networks and data for the pipeline and torchrun parts
(no ONNX). It is the CI test of this script.

    python benchmarks/gpu_check.py --out gpu-check          # one GPU, < 8 minutes
    python benchmarks/gpu_check.py --quick --out /tmp/gc    # the CPU smoke test
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"

PRECISION_ENV = "SEGDISTILL_GPU_CHECK_PRECISION"
"""Read by the ``sitecustomize`` shim below: the precision of every Python process
``benchmarks/affinity.py`` starts (its measurements run in worker subprocesses)."""

# Imported at start-up by each Python process that has its folder on PYTHONPATH; it
# sets the precision, then hands over to any other sitecustomize on the path.
SITECUSTOMIZE = f'''\
import os
_precision = os.environ.get("{PRECISION_ENV}", "fp32")
if _precision != "fp32":
    import torch
    if _precision == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif _precision == "bf16":
        _device = "cuda" if torch.cuda.is_available() else "cpu"
        _AUTOCAST = torch.autocast(_device, dtype=torch.bfloat16)
        _AUTOCAST.__enter__()  # for the whole process: never left
    else:
        raise ValueError(f"unknown precision {{_precision!r}}")
import importlib.machinery, importlib.util, sys
_here = os.path.dirname(os.path.abspath(__file__))
_rest = [p for p in sys.path if os.path.abspath(p or ".") != _here]
_spec = importlib.machinery.PathFinder.find_spec("sitecustomize", _rest)
if _spec is not None and _spec.loader is not None:
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
'''


@dataclass
class Part:
    """One part of the check: its table, status and time."""

    name: str
    table: str
    commands: list[str]
    status: str = "not run"
    seconds: float = 0.0


def _env(extra_path: Sequence[Path] = (), **values: str) -> dict[str, str]:
    """This environment with ``extra_path`` first on PYTHONPATH and the repository last
    (for ``examples``, and for ``segdistill`` where it is not installed)."""
    path = [str(p) for p in extra_path]
    if os.environ.get("PYTHONPATH"):
        path.append(os.environ["PYTHONPATH"])
    path.append(str(REPO))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), **values}


def _run(command: list[str], env: dict[str, str], log: Path, timeout: float,
         cwd: Path | None = None) -> str:
    """Run ``command``, appending its output to ``log``; return 'ok' or why not."""
    start = time.perf_counter()
    with log.open("a") as f:
        f.write(f"\n$ {shlex.join(command)}\n")
        f.flush()
        try:
            proc = subprocess.run(command, env=env, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=timeout, check=False, cwd=cwd)
        except subprocess.TimeoutExpired:
            return f"timed out after {timeout:.0f} s"
        f.write(f"# exit code {proc.returncode} after {time.perf_counter() - start:.0f} s\n")
    return "ok" if proc.returncode == 0 else f"failed (exit code {proc.returncode}; see {log})"


# ---- 1. the losses --------------------------------------------------------------------------

def losses(args: argparse.Namespace, out: Path, log: Path) -> Part:
    """``benchmarks/affinity.py`` for each loss and precision, its tables gathered."""
    part = Part("losses", "affinity.md", [])
    shim = Path(tempfile.mkdtemp(prefix="gpu-check-precision-"))
    (shim / "sitecustomize.py").write_text(SITECUSTOMIZE)
    # quick: one run, under the precision shim (TF32 does not exist on the CPU)
    precisions = ("bf16",) if args.quick else ("fp32", "tf32", "bf16")
    sizes = ["--quick"] if args.quick else ["--sizes", "64x64", "128x128", "128x256"]
    losses_run = (("affinity", ["--fused"]),) if args.quick else \
        (("affinity", ["--fused"]), ("pairwise", ["--loss", "pairwise"]))
    sections = []
    statuses = []
    for loss, flags in losses_run:
        for precision in precisions:
            table = out / "raw" / f"{loss}-{precision}.md"
            command = [sys.executable, str(BENCHMARKS / "affinity.py"), "--device", args.device,
                       *flags, *sizes, "--repeats", "1" if args.quick else "3",
                       "--markdown", str(table)]
            part.commands.append(f"{PRECISION_ENV}={precision} {shlex.join(command)}")
            status = _run(command, _env([shim], **{PRECISION_ENV: precision}), log,
                          args.part_timeout)
            statuses.append(status)
            title = {"fp32": "float32", "tf32": "TF32 (cuBLAS and cuDNN)",
                     "bf16": "bf16 autocast (the library computes the losses in float32 "
                             "under autocast; the fused form is this script's own)"}[precision]
            body = table.read_text() if table.is_file() else f"{status}\n"
            sections.append(f"## {loss}, {title}\n\n{body}")
    part.status = "ok" if all(s == "ok" for s in statuses) else \
        next(s for s in statuses if s != "ok")
    (out / part.table).write_text("\n".join(sections))
    return part


# ---- 2. the pipeline's steps ----------------------------------------------------------------

def pipeline(args: argparse.Namespace, out: Path, log: Path) -> list[Part]:
    """``benchmarks/pipeline.py`` at VOC's and Cityscapes' sizes."""
    if args.quick:  # the digit scenes' networks
        cases = {"digits": ["--networks", "digits", "--size", "48", "48", "--batch", "4",
                            "--rounds", "1", "--amp", "none", "--teacher-layer", "head"]}
    else:
        cases = {"voc": ["--size", "513", "513", "--batch", "8"],
                 "cityscapes": ["--size", "1024", "2048", "--batch", "2"]}
    parts = []
    for dataset, flags in cases.items():
        part = Part(f"pipeline, {dataset}", f"pipeline-{dataset}.md", [])
        command = [sys.executable, str(BENCHMARKS / "pipeline.py"), "--device", args.device,
                   *flags, "--steps", "1" if args.quick else "3", "--markdown",
                   str(out / part.table)]
        part.commands.append(shlex.join(command))
        start = time.perf_counter()
        part.status = _run(command, _env(), log, args.part_timeout)
        part.seconds = time.perf_counter() - start
        parts.append(part)
    return parts


# ---- 3. every stage under torchrun ----------------------------------------------------------

def _png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_voc(root: Path, size: tuple[int, int], train: int, val: int) -> Path:
    """A VOC 2012 tree (with SBD's trainaug labels) of random images and labels."""
    from PIL import Image

    base = root / "VOCdevkit" / "VOC2012"
    rng = np.random.default_rng(0)
    ids = [f"2007_{i:06d}" for i in range(train + val)]
    for k, name in enumerate(ids):
        h, w = size[0] - 7 * (k % 3), size[1] - 11 * (k % 2)  # VOC's sizes vary
        (base / "JPEGImages").mkdir(parents=True, exist_ok=True)
        image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(image).save(base / "JPEGImages" / f"{name}.jpg")
        label = rng.choice(np.array([0, 1, 2, 15, 255], dtype=np.uint8), size=(h, w))
        for folder in ("SegmentationClass", "SegmentationClassAug"):
            png = Image.fromarray(label, mode="P")
            png.putpalette([v for c in range(256) for v in (c, c, c)])
            (base / folder).mkdir(parents=True, exist_ok=True)
            png.save(base / folder / f"{name}.png")
    lists = base / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "train_aug.txt").write_text("\n".join(ids[:train]) + "\n")
    (lists / "val.txt").write_text("\n".join(ids[train:]) + "\n")
    return root


def make_cityscapes(root: Path, size: tuple[int, int], train: int, val: int) -> Path:
    """A Cityscapes tree (leftImg8bit, gtFine labelIds) of random frames and labels."""
    rng = np.random.default_rng(1)
    for split, n in (("train", train), ("val", val)):
        for k in range(n):
            city = ("aachen", "bremen")[k % 2]
            name = f"{city}_{k:06d}_000019"
            _png(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png",
                 rng.integers(0, 255, (*size, 3), dtype=np.uint8))
            ids = np.array([0, 7, 8, 11, 21, 24, 26, 33], dtype=np.uint8)
            _png(root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png",
                 rng.choice(ids, size=size))
    return root


def torchrun(args: argparse.Namespace, out: Path, log: Path) -> list[Part]:
    """Every stage, then export, under torchrun (one process; NCCL on CUDA, gloo on the
    CPU) on synthetic trees of the datasets' layouts."""
    data = out / "data"
    if args.quick:  # the digit scenes, built in memory
        trees = {"digits": (None, (48, 48), 16, 8)}
        flags = ["--scenes", "16", "8", "--batch-size", "4", "--eval-batch-size", "4",
                 "--device", "cpu"]
        steps = "2"
    else:
        # a batch of 16 at VOC's crop, 8 at Cityscapes' (bf16 autocast)
        trees = {"voc": (make_voc, (500, 500), 16, 4),
                 "cityscapes": (make_cityscapes, (1024, 2048), 8, 2)}
        flags = ["--amp", "bf16", "--workers", "4"]
        steps = "3"
    parts = []
    for dataset, (make, size, train, val) in trees.items():
        part = Part(f"torchrun, {dataset}", f"torchrun-{dataset}.md", [])
        start = time.perf_counter()
        root = ["--root", str(make(data / dataset, size, train, val))] if make else []
        runs = out / "runs" / dataset
        common = ["--dataset", dataset, *root, "--out", str(runs),
                  "--no-pretrained", "--no-progress", "--teacher-steps", steps,
                  "--student-steps", steps, "--distill-steps", steps, "--translator-steps",
                  steps, "--checkpoint-every", steps, "--log-every", "1", *flags]
        if dataset == "cityscapes":
            common += ["--batch-size", "8"]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", "1", "-m", "examples.segmentation"]
        # ONNX (minutes on a small CPU) is left to the tests in quick mode
        formats = ["torchscript", "pt2"] + (["onnx"] if _has_onnx() and not args.quick else [])
        models = ["distill-paper"] if args.quick else ["student", "distill-paper"]
        statuses = []
        for stage in (["all"], ["export", "--models", *models, "--formats", *formats]):
            command = [*launcher, *stage, *common]
            part.commands.append(shlex.join(command))
            # the one-process group is created as under several (init_process_group),
            # so evaluation's all-reduce runs on NCCL
            statuses.append(_run(command, _env(), log, args.part_timeout, cwd=out))
            if statuses[-1] != "ok":
                break
        part.status = next((s for s in statuses if s != "ok"), "ok")
        part.seconds = time.perf_counter() - start
        summary = runs / "summary.md"
        exports = [runs / m / "export" / "export.json" for m in ("student", "distill-paper")]
        lines = [f"## Every stage under torchrun, {dataset}: synthetic {size[0]} x {size[1]} "
                 f"images, {train} train, {val} val, {steps} steps per stage", "",
                 summary.read_text() if summary.is_file() else f"no summary: {part.status}"]
        for path in exports:
            if path.is_file():
                lines += ["", f"Export check: `{path.relative_to(out)}`", "", "```json",
                          path.read_text(), "```"]
        (out / part.table).write_text("\n".join(lines) + "\n")
        parts.append(part)
    return parts


def _has_onnx() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))


# ---- the driver ------------------------------------------------------------------------------

def machine(device: str) -> str:
    sys.path.append(str(REPO))  # for `examples`
    from examples.segmentation.profiling import cpu_model

    cpu = cpu_model()
    gpu = ""
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        gpu = (f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA "
               f"{torch.version.cuda}, ")
    return (f"{gpu}{cpu} ({os.cpu_count()} cores), torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the tables")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes on the CPU with gloo (the default without CUDA)")
    parser.add_argument("--parts", nargs="+", choices=("losses", "pipeline", "torchrun"),
                        default=["losses", "pipeline", "torchrun"], help="the parts to run")
    parser.add_argument("--part-timeout", type=float, default=300.0,
                        help="give up on one command after this many seconds (default 300)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        args.quick = True
    args.device = "cpu" if args.quick else "cuda"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out.resolve()
    (out / "raw").mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    log.write_text("")
    start = time.perf_counter()
    parts: list[Part] = []
    for name in args.parts:
        begin, done = time.perf_counter(), len(parts)
        if name == "losses":
            parts.append(losses(args, out, log))
            parts[-1].seconds = time.perf_counter() - begin
        elif name == "pipeline":
            parts += pipeline(args, out, log)
        else:
            parts += torchrun(args, out, log)
        for part in parts[done:]:
            print(f"{part.name}: {part.status} ({part.seconds:.0f} s) -> {out / part.table}",
                  flush=True)
    total = time.perf_counter() - start
    mode = "quick (CPU, gloo)" if args.quick else "full (CUDA, NCCL)"
    command = shlex.join(["python", "benchmarks/gpu_check.py",
                          *(sys.argv[1:] if argv is None else argv)])
    lines = [f"# GPU check, {mode}", "", f"Machine: {machine(args.device)}", "",
             f"Command: `{command}`; {total:.0f} s in all", "",
             "| part | status | time (s) | table |", "|---|---|---:|---|"]
    lines += [f"| {p.name} | {p.status} | {p.seconds:.0f} | {p.table} |" for p in parts]
    lines += ["", "Commands:", ""] + [f"    {c}" for p in parts for c in p.commands]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(p.status == "ok" for p in parts) else 1


if __name__ == "__main__":
    sys.exit(main())
