"""The GPU check: one script that a machine with one GPU runs in about seven minutes,
writing Markdown tables into --out (default budget 420 s, every part's usual time).

The parts, in this order (the most valuable first, in case time runs out):

1. ``torchrun-voc.md``: every stage of the pipeline (teacher, student, translator,
   distillation, evaluation, figure, then export to TorchScript, ``torch.export``
   and ONNX) for a few steps on a synthetic VOC tree of VOC's sizes (images of up to
   500 x 500, crop 513, batch 16, bf16 autocast), under torchrun with one process,
   whose collectives (evaluation's all-reduce included) run on NCCL;
2. ``pipeline-voc.md`` and ``pipeline-cityscapes.md``: images/s, GFLOP and peak
   memory of every stage's step, both readings of the teacher's layer, in fp32 and
   bf16 autocast, at VOC (batch 8, 513 x 513) and Cityscapes (batch 2, 1024 x 2048)
   sizes (``benchmarks/pipeline.py``);
3. ``affinity.md``: the affinity and pair-wise losses, forward + backward, time and
   peak memory of the dense, linear and (affinity) fused one-Gram forms at 64 x 64,
   128 x 128 and 128 x 256, in float32 and under bf16 autocast (``--precisions`` adds
   TF32: cuBLAS and cuDNN allowed to use it), through ``benchmarks/affinity.py``'s
   command line, one process (one CUDA context) per loss and precision
   (``--in-process``); and, after the float32 runs, every distillation loss of the
   library (``benchmarks/methods.py``: time, peak memory, the relational losses beside
   their dense readings and matmul bounds) in float32 at Cityscapes' training sizes
   (CIRKD's crop, 512 x 1024, and the pipeline's, 769 x 769, at output stride 8: B = 2,
   C = 512, 64 x 128 and B = 4, C = 256, 97 x 97), its table in the same file;
4. ``steps-cityscapes.md``: one training step of every pipeline method (and CIRKD's
   combinations) beside the plain student's, time, ratio and peak memory, at CIRKD's
   Cityscapes setup per GPU (batch 2 of 512 x 1024, DeepLabV3-ResNet101 teacher,
   DeepLabV3-ResNet18 student, float32; ``benchmarks/method_steps.py``, about a
   minute; the table keeps the rows done if the part is stopped);
5. ``torchrun-cityscapes.md``: as 1., on a synthetic Cityscapes tree (frames of
   1024 x 2048, crop 769, batch 8, evaluated at full resolution);
6. ``summary.md``: the machine, each part's status and time, and the commands.

The whole check keeps to ``--budget-s`` seconds (default 420): each command gets at
most what is left of it (and of its part's own cap, so that one hung part cannot
take everything), a command that runs over is stopped with its process group, a
part that can no longer start is marked skipped, and every table, ``summary.md``
included, is written as soon as its part ends; stopped from outside (SIGTERM,
Ctrl-C), it stops the running command's processes and still writes them. The exit
code is 0 when every part passed. Progress lines carry the time, and a failed
command's error is printed beside them (its whole output is in ``log.txt``).
``--bundle DIR`` keeps ``DIR/summary.md`` and ``DIR/gpu-check.tar.gz`` (every
``.md``, ``.json``, ``.jsonl``, ``.txt`` and ``.png`` under --out but the
synthetic data: tables, logs, each stage's logs, evaluations and export checks,
figures) up to date after every part: two files to copy back from the machine.

Two smaller modes run on the CPU with gloo:

- ``--quick`` (the default when CUDA is missing): the digit scenes' networks and data
  for the pipeline and torchrun parts (no ONNX), the losses' 32 x 32 case under
  bf16 autocast only, every method's ``--quick`` case, and every pipeline method's
  step on the digit scenes (batch 8); the CI test of this script;
- ``--tiny``: the full mode's every code path at tiny sizes: its parts in its order,
  the same tree builders (48 x 48 images, 32 x 64 frames, crop 32), the same flags
  but for sizes, steps and workers, the paper's networks for the pipeline benchmark
  (33 x 33 and 33 x 65 batches), ONNX, the losses at 32 x 32 in each precision,
  every method at 64 x 64 (in-process), and the steps of two pipeline methods
  (``kd``, ``cirkd``) on the CIRKD pair at 64 x 64. Five to seven minutes on a 2-core
  CPU.

    python benchmarks/gpu_check.py --out gpu-check                      # one GPU, ~7 min
    python benchmarks/gpu_check.py --out /tmp/gc --bundle "$OUT"        # and 2 files to copy
    python benchmarks/gpu_check.py --quick --out /tmp/gc                # the CPU smoke test
    python benchmarks/gpu_check.py --tiny --budget-s 1200 --out /tmp/gc # full mode, tiny
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"

PRECISION_ENV = "SEGDISTILL_GPU_CHECK_PRECISION"
"""Read by the ``sitecustomize`` shim below: the precision of every Python process of
the losses part (``benchmarks/affinity.py`` and any worker it starts)."""

PRECISIONS = ("fp32", "bf16", "tf32")
"""The losses part's precisions: float32, bf16 autocast, TF32 (cuBLAS and cuDNN)."""

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

BUNDLED = (".md", ".json", ".jsonl", ".txt", ".png")
"""The files ``--bundle`` packs (the synthetic data's folder aside)."""
BUNDLE_MAX_FILE = 4 * 2**20
"""Larger files stay out of the bundle (and are listed in its MANIFEST.txt)."""
MIN_START_S = 10.0
"""A command is not started with less time left than this."""
KILL_GRACE_S = 20.0
"""After SIGTERM (torchrun's agent then stops its workers), SIGKILL this much later."""


# ---- the plan of each mode ------------------------------------------------------------------

Maker = Callable[[Path, tuple[int, int], int, int], Path]


@dataclass(frozen=True)
class Tree:
    """One torchrun case: a synthetic dataset tree (``make``; None for the digit scenes,
    built in memory), its images' size and split sizes, and the dataset's own flags."""

    dataset: str
    make: Maker | None
    size: tuple[int, int]
    train: int
    val: int
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    """What one mode runs: the sizes, steps and flags of every part."""

    mode: Literal["full", "tiny", "quick"]
    device: str
    precisions: tuple[str, ...]
    losses: tuple[tuple[str, tuple[str, ...]], ...]
    """(loss, its benchmarks/affinity.py flags)."""
    loss_flags: tuple[str, ...]
    """benchmarks/affinity.py's flags for every loss: sizes, repeats, --in-process."""
    pipeline: dict[str, tuple[str, ...]]
    """benchmarks/pipeline.py's flags, by dataset."""
    trees: tuple[Tree, ...]
    torchrun_flags: tuple[str, ...]
    """The pipeline's flags for every torchrun case (besides the steps and paths)."""
    steps: int
    """Steps per training stage under torchrun."""
    formats: tuple[str, ...]
    """What the export stage writes."""
    caps: dict[str, float] = field(default_factory=dict)
    """The most seconds each part may take, by key (the global budget aside)."""
    methods_flags: tuple[str, ...] = ()
    """benchmarks/methods.py's flags: sizes, repeats, --in-process, memory budget."""
    method_steps: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """benchmarks/method_steps.py's flags, by setting (its ``--size``)."""

    @property
    def title(self) -> str:
        return {"full": "full (CUDA, NCCL)", "tiny": "tiny (the full mode on the CPU, gloo)",
                "quick": "quick (CPU, gloo)"}[self.mode]


def make_plan(mode: Literal["full", "tiny", "quick"],
              precisions: Sequence[str] | None = None) -> Plan:
    """The plan of ``mode``; ``precisions`` replaces the losses' default ones."""
    onnx = ("onnx",) if mode != "quick" and _has_onnx() else ()
    formats = ("torchscript", "pt2", *onnx)
    both = (("affinity", ("--fused",)), ("pairwise", ("--loss", "pairwise")))
    if mode == "quick":  # the digit scenes
        return Plan(
            mode, "cpu", tuple(precisions or ("bf16",)), both[:1],
            ("--quick", "--repeats", "1", "--in-process"),
            {"digits": ("--networks", "digits", "--size", "48", "48", "--batch", "4",
                        "--amp", "none", "--teacher-layer", "head", "--steps", "1",
                        "--rounds", "1")},
            (Tree("digits", None, (48, 48), 16, 8,
                  ("--scenes", "16", "8", "--batch-size", "4", "--eval-batch-size", "4")),),
            ("--device", "cpu"), 2, formats,
            methods_flags=("--quick", "--repeats", "1", "--in-process"),
            method_steps={"digits": ("--size", "digits", "--batch", "8", "--repeats", "1",
                                     "--warmup", "1")})
    if mode == "tiny":  # the full mode's flags, at tiny sizes on the CPU
        return Plan(
            mode, "cpu", tuple(precisions or ("fp32", "bf16")), both,
            ("--sizes", "32x32", "--repeats", "1", "--in-process"),
            {"voc": ("--size", "33", "33", "--batch", "2", "--steps", "1", "--rounds", "1"),
             "cityscapes": ("--size", "33", "65", "--batch", "2", "--classes", "19",
                            "--steps", "1", "--rounds", "1")},
            (Tree("voc", make_voc, (48, 48), 4, 2),
             Tree("cityscapes", make_cityscapes, (32, 64), 4, 2)),
            ("--amp", "bf16", "--workers", "1", "--device", "cpu", "--crop", "32",
             "--batch-size", "2"), 1, formats,
            methods_flags=("--sizes", "2x16x64x64", "--repeats", "1", "--in-process"),
            # the CIRKD pair at 64 x 64; two methods, as the pair's steps are slow on a CPU
            method_steps={"cityscapes": ("--size", "cityscapes", "--image", "64", "64",
                                         "--repeats", "1", "--warmup", "1", "--methods",
                                         "kd", "cirkd")})
    return Plan(
        mode, "cuda", tuple(precisions or ("fp32", "bf16")), both,
        ("--sizes", "64x64", "128x128", "128x256", "--repeats", "3", "--in-process"),
        {"voc": ("--size", "513", "513", "--batch", "8", "--steps", "3", "--rounds", "3"),
         "cityscapes": ("--size", "1024", "2048", "--batch", "2", "--classes", "19",
                        "--steps", "3", "--rounds", "3")},
        # a batch of 16 at VOC's crop (513), 8 at Cityscapes' (769)
        (Tree("voc", make_voc, (500, 500), 16, 4),
         Tree("cityscapes", make_cityscapes, (1024, 2048), 8, 2, ("--batch-size", "8"))),
        ("--amp", "bf16", "--workers", "4"), 3, formats,
        caps={"torchrun-voc": 150, "pipeline-voc": 120, "pipeline-cityscapes": 150,
              "losses": 210, "steps-cityscapes": 120, "torchrun-cityscapes": 240},
        # Cityscapes' training crops at output stride 8: CIRKD's (512 x 1024, its 512-channel
        # features, 2 images a GPU) and the pipeline's (769, 4 images)
        methods_flags=("--sizes", "2x512x64x128", "4x256x97x97", "--repeats", "3",
                       "--in-process", "--memory-budget-gb", "64"),
        # CIRKD's Cityscapes setup per GPU: batch 2 of 512 x 1024, DeepLabV3-R101 -> R18
        method_steps={"cityscapes": ("--size", "cityscapes", "--repeats", "5", "--warmup",
                                     "2")})


# ---- running commands within the budget ------------------------------------------------------

@dataclass
class Part:
    """One part of the check: its table, status, time and commands."""

    key: str
    """``losses``, or ``<kind>-<dataset>``: what ``--parts`` names, and the table's stem."""
    name: str
    commands: list[str] = field(default_factory=list)
    status: str = "pending"
    seconds: float = 0.0

    @property
    def kind(self) -> str:
        return self.key.split("-")[0]

    @property
    def table(self) -> str:
        return "affinity.md" if self.key == "losses" else f"{self.key}.md"


class Check:
    """One run of the check: the plan, the output folder, the log, the clock."""

    def __init__(self, args: argparse.Namespace, plan: Plan, out: Path) -> None:
        self.args = args
        self.plan = plan
        self.out = out
        self.log = out / "log.txt"
        self.start = time.perf_counter()
        self.deadline: float = self.start + args.budget_s
        self.part_deadline: float = self.deadline
        self.parts: list[Part] = []

    def left(self) -> float:
        """Seconds left to the current part (its cap, and the global budget)."""
        return min(self.deadline, self.part_deadline) - time.perf_counter()

    def say(self, message: str) -> None:
        """A progress line: wall-clock time and seconds since the start."""
        elapsed = time.perf_counter() - self.start
        print(f"[{time.strftime('%H:%M:%S')} {elapsed:5.0f} s] {message}", flush=True)

    def run(self, part: Part, command: list[str], env: dict[str, str],
            cwd: Path | None = None, shown: str | None = None,
            cap: float = float("inf")) -> str:
        """Run ``command`` within the time left (and at most ``cap`` seconds), its output
        appended to the log; 'ok', or why not. On a timeout its whole process group is
        stopped."""
        part.commands.append(shown or shlex.join(command))
        timeout = min(self.left(), cap)
        if timeout < MIN_START_S:
            return f"skipped (time budget: {max(timeout, 0):.0f} s left)"
        self.say(f"  $ {shlex.join(command)[:160]}")
        start = time.perf_counter()
        with self.log.open("a") as f:
            f.write(f"\n$ {shlex.join(command)}\n")
            f.flush()
            offset = f.tell()
            proc = subprocess.Popen(command, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    cwd=cwd, start_new_session=True)
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _stop_group(proc)
                status = f"timed out after {timeout:.0f} s"
            except BaseException:  # Ctrl-C: take the process group down with us
                _stop_group(proc)
                raise
            else:
                status = "ok" if code == 0 else f"failed (exit code {code})"
            f.write(f"# {status}, {time.perf_counter() - start:.0f} s\n")
        if status != "ok":  # why, for whoever reads only this script's output
            with self.log.open() as f:
                f.seek(offset)
                shown_lines = failure_lines(f.read())
            print("\n".join(f"    | {line[:200]}" for line in shown_lines), flush=True)
        return status

    # ---- the outputs ----------------------------------------------------------------------

    def summary(self, done: bool) -> str:
        """summary.md's text."""
        total = time.perf_counter() - self.start
        argv = sys.argv[1:] if self.args.argv is None else self.args.argv
        command = shlex.join(["python", "benchmarks/gpu_check.py", *argv])
        state = f"{total:.0f} s in all" if done else f"still running after {total:.0f} s"
        lines = [f"# GPU check, {self.plan.title}", "", f"Machine: {self.args.machine}", "",
                 f"Command: `{command}`; {state} (budget {self.args.budget_s:.0f} s)", "",
                 "| part | status | time (s) | table |", "|---|---|---:|---|"]
        for p in self.parts:
            table = p.table if (self.out / p.table).is_file() else "-"
            lines.append(f"| {p.name} | {p.status} | {p.seconds:.0f} | {table} |")
        lines += ["", "Commands:", ""] + [f"    {c}" for p in self.parts for c in p.commands]
        return "\n".join(lines) + "\n"

    def write(self, done: bool = False) -> None:
        """Rewrite summary.md, and with ``--bundle`` its copy and the tarball."""
        text = self.summary(done)
        _atomic_write(self.out / "summary.md", text.encode())
        if self.args.bundle is not None:
            bundle = self.args.bundle.resolve()
            bundle.mkdir(parents=True, exist_ok=True)
            _atomic_write(bundle / "summary.md", text.encode())
            _atomic_write(bundle / "gpu-check.tar.gz", pack(self.out, skip=bundle))


ERROR_LINE = re.compile(r"^(\[rank\d+\]: )?([A-Za-z_][\w.]*)(Error|Exception|Interrupt)\b")


def failure_lines(output: str, context: int = 8) -> list[str]:
    """The lines that say why a command failed: those before and at the first exception
    line (torchrun's worker's, not the agent's report after it), then the last few."""
    lines = output.splitlines()
    first = next((i for i, line in enumerate(lines) if ERROR_LINE.match(line)), None)
    if first is None:
        return lines[-12:]
    head = lines[max(first - context, 0):first + 1]
    tail = [line for line in lines[-3:] if line not in head]
    return [*head, *(["..."] if tail else []), *tail]


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group (torchrun's agent then stops its workers, which run
    in sessions of their own), SIGKILL to what is left of it a while later."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        with contextlib.suppress(ProcessLookupError):  # what is left of the group goes now
            os.killpg(proc.pid, signal.SIGKILL)
        return


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def pack(out: Path, skip: Path | None = None) -> bytes:
    """A gzipped tarball, under ``gpu-check/``, of every file under ``out`` that ends in
    one of :data:`BUNDLED`, except the synthetic data (``out/data``), anything under
    ``skip``, and files over :data:`BUNDLE_MAX_FILE` (listed in ``MANIFEST.txt``)."""
    buffer = io.BytesIO()
    left_out = []
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(out.rglob("*")):
            relative = path.relative_to(out)
            if (not path.is_file() or path.suffix not in BUNDLED or relative.parts[0] == "data"
                    or path.name.startswith(".")
                    or (skip is not None and path.resolve().is_relative_to(skip))):
                continue
            if path.stat().st_size > BUNDLE_MAX_FILE:
                left_out.append(f"{relative} ({path.stat().st_size:,} bytes)")
                continue
            tar.add(path, arcname=f"gpu-check/{relative}")
        manifest = ("Left out, over the size limit:\n" + "".join(f"{f}\n" for f in left_out)
                    if left_out else "Nothing left out.\n").encode()
        info = tarfile.TarInfo("gpu-check/MANIFEST.txt")
        info.size, info.mtime = len(manifest), int(time.time())
        tar.addfile(info, io.BytesIO(manifest))
    return buffer.getvalue()


def _env(extra_path: Sequence[Path] = (), **values: str) -> dict[str, str]:
    """This environment with ``extra_path`` first on PYTHONPATH and the repository last
    (for ``examples``, and for ``segdistill`` where it is not installed)."""
    path = [str(p) for p in extra_path]
    if os.environ.get("PYTHONPATH"):
        path.append(os.environ["PYTHONPATH"])
    path.append(str(REPO))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), **values}


# ---- the losses ------------------------------------------------------------------------------

PRECISION_TITLES = {
    "fp32": "float32",
    "tf32": "TF32 (cuBLAS and cuDNN)",
    "bf16": "bf16 autocast (the library computes the losses in float32 under autocast; the "
            "fused form is this script's own)",
}


def loss_command(plan: Plan, flags: Sequence[str], stem: Path) -> list[str]:
    """The command that measures one loss (``flags``) in one process, writing
    ``stem.md`` and ``stem.json``."""
    return [sys.executable, str(BENCHMARKS / "affinity.py"), "--device", plan.device, *flags,
            *plan.loss_flags, "--markdown", f"{stem}.md", "--json", f"{stem}.json"]


METHODS_RUN = "every method"
"""The losses part's run of ``benchmarks/methods.py``, beside the losses' names."""


def methods_command(plan: Plan, stem: Path) -> list[str]:
    """The command that measures every method (``benchmarks/methods.py``) in one process,
    writing ``stem.md`` and ``stem.json``."""
    return [sys.executable, str(BENCHMARKS / "methods.py"), "--device", plan.device,
            *plan.methods_flags, "--markdown", f"{stem}.md", "--json", f"{stem}.json"]


def losses(check: Check, part: Part) -> None:
    """``benchmarks/affinity.py`` for each loss and precision, and ``benchmarks/methods.py``
    in float32 (one process each, every case in it), their tables gathered into
    affinity.md as each ends."""
    plan, out = check.plan, check.out
    shim = Path(tempfile.mkdtemp(prefix="gpu-check-precision-"))
    (shim / "sitecustomize.py").write_text(SITECUSTOMIZE)
    sections = []
    statuses = []
    precisions = sorted(plan.precisions, key=PRECISIONS.index)
    runs = [(loss, precision, out / "raw" / f"{loss}-{precision}")  # fp32, bf16, then TF32
            for precision in precisions for loss, _ in plan.losses]
    # every method, in float32, after the float32 runs of the two losses (or after all)
    runs.insert(len(plan.losses) if "fp32" in precisions else len(runs),
                (METHODS_RUN, "fp32", out / "raw" / "methods-fp32"))
    flags = dict(plan.losses)
    for k, (loss, precision, stem) in enumerate(runs):
        command = methods_command(plan, stem) if loss == METHODS_RUN else \
            loss_command(plan, flags[loss], stem)
        # at most twice its share of the time left, so that one hung run leaves the others
        # theirs
        status = check.run(part, command, _env([shim], **{PRECISION_ENV: precision}),
                           shown=f"{PRECISION_ENV}={precision} {shlex.join(command)}",
                           cap=2 * check.left() / (len(runs) - k))
        statuses.append(status)
        table = Path(f"{stem}.md")
        # a run stopped half-way leaves the rows it finished
        body = table.read_text() if table.is_file() else ""
        note = "" if status == "ok" else f"{status}\n\n"
        sections.append(f"## {loss}, {PRECISION_TITLES[precision]}\n\n{note}{body}")
        (out / part.table).write_text("\n".join(sections))
        check.say(f"  {loss}, {precision}: {status}")
    shutil.rmtree(shim, ignore_errors=True)
    part.status = next((s for s in statuses if s != "ok"), "ok")


# ---- the pipeline's steps --------------------------------------------------------------------

def pipeline_command(plan: Plan, dataset: str, table: Path) -> list[str]:
    """The command of the pipeline benchmark at ``dataset``'s sizes, writing ``table``."""
    return [sys.executable, str(BENCHMARKS / "pipeline.py"), "--device", plan.device,
            *plan.pipeline[dataset], "--markdown", str(table)]


def pipeline(check: Check, part: Part, dataset: str) -> None:
    """``benchmarks/pipeline.py`` at ``dataset``'s sizes."""
    command = pipeline_command(check.plan, dataset, check.out / part.table)
    part.status = check.run(part, command, _env())


# ---- every method's training step ------------------------------------------------------------

def steps_command(plan: Plan, size: str, table: Path, raw: Path) -> list[str]:
    """The command of ``benchmarks/method_steps.py`` at ``size`` (its ``--size``), writing
    ``table`` and ``raw`` (JSON)."""
    return [sys.executable, str(BENCHMARKS / "method_steps.py"), "--device", plan.device,
            *plan.method_steps[size], "--markdown", str(table), "--json", str(raw)]


def method_steps(check: Check, part: Part, size: str) -> None:
    """One training step of every pipeline method beside the plain student's, at ``size``:
    time, ratio and peak memory (the table keeps the rows done if the part is stopped)."""
    command = steps_command(check.plan, size, check.out / part.table,
                            check.out / "raw" / f"{part.key}.json")
    part.status = check.run(part, command, _env())


# ---- every stage under torchrun --------------------------------------------------------------

def _png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, compress_level=1)  # random pixels do not compress


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


LAUNCHER = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m",
            "examples.segmentation")
"""torchrun with one process, running the pipeline; the one-process group is created as
under several (``init_process_group``), so that evaluation's all-reduce runs on NCCL."""


def torchrun_commands(plan: Plan, tree: Tree, root: Path | None, runs: Path
                      ) -> list[list[str]]:
    """The commands of the torchrun part on ``tree`` (its data at ``root``; None for the
    digit scenes): every stage (``all``), then the export stage."""
    steps = str(plan.steps)
    common = ["--dataset", tree.dataset, *(["--root", str(root)] if root else []), "--out",
              str(runs), "--no-pretrained", "--no-progress", "--teacher-steps", steps,
              "--student-steps", steps, "--distill-steps", steps, "--translator-steps",
              steps, "--checkpoint-every", steps, "--log-every", "1", *plan.torchrun_flags,
              *tree.flags]
    return [[sys.executable, *LAUNCHER, *stage, *common]
            for stage in (["all"], ["export", "--models", "distill-knowledge_adaptation",
                                    "--formats", *plan.formats])]


def torchrun(check: Check, part: Part, tree: Tree) -> None:
    """Every stage, then export, under torchrun (one process; NCCL on CUDA, gloo on the
    CPU) on a synthetic tree of the dataset's layout; the run's summary and export check
    in the part's table."""
    out, dataset, steps = check.out, tree.dataset, check.plan.steps
    root = None
    if tree.make is not None:
        check.say(f"  building a synthetic {dataset} tree of {tree.train} + {tree.val} "
                  f"images of {tree.size[0]} x {tree.size[1]}")
        data = out / "data" / dataset
        shutil.rmtree(data, ignore_errors=True)
        root = tree.make(data, tree.size, tree.train, tree.val)
    runs = out / "runs" / dataset
    shutil.rmtree(runs, ignore_errors=True)  # no stale summary or export check
    status = "ok"
    for command in torchrun_commands(check.plan, tree, root, runs):
        status = check.run(part, command, _env(), cwd=out)
        if status != "ok":
            break
    part.status = status
    summary = runs / "summary.md"
    export = runs / "distill-knowledge_adaptation" / "export" / "export.json"
    lines = [f"## Every stage under torchrun, {dataset}: synthetic {tree.size[0]} x "
             f"{tree.size[1]} images, {tree.train} train, {tree.val} val, {steps} steps per "
             "stage", "", summary.read_text() if summary.is_file() else
             f"no summary: {part.status}"]
    if export.is_file():
        lines += ["", f"Export check: `{export.relative_to(out)}`", "", "```json",
                  export.read_text(), "```"]
    (out / part.table).write_text("\n".join(lines) + "\n")


def _has_onnx() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))


# ---- the driver ------------------------------------------------------------------------------

def machine(device: str) -> str:
    """The GPU (on CUDA), the CPU, and the versions: summary.md's machine line."""
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


def schedule(plan: Plan) -> list[tuple[Part, Callable[[Check, Part], None]]]:
    """Every part of ``plan`` in the order they run: torchrun on the first tree, the
    pipeline benchmark at each dataset's sizes, the losses, every method's step, torchrun
    on the other trees."""
    def on_tree(tree: Tree) -> Callable[[Check, Part], None]:
        return lambda check, part: torchrun(check, part, tree)

    def at_size(dataset: str) -> Callable[[Check, Part], None]:
        return lambda check, part: pipeline(check, part, dataset)

    def steps_at(size: str) -> Callable[[Check, Part], None]:
        return lambda check, part: method_steps(check, part, size)

    first, *rest = plan.trees
    return [(Part(f"torchrun-{first.dataset}", f"torchrun, {first.dataset}"), on_tree(first)),
            *[(Part(f"pipeline-{d}", f"pipeline, {d}"), at_size(d)) for d in plan.pipeline],
            (Part("losses", "losses"), losses),
            *[(Part(f"steps-{s}", f"method steps, {s}"), steps_at(s)) for s in plan.method_steps],
            *[(Part(f"torchrun-{t.dataset}", f"torchrun, {t.dataset}"), on_tree(t))
              for t in rest]]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for the tables, logs and synthetic data")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="the digit scenes on the CPU with gloo (the default without CUDA)")
    mode.add_argument("--tiny", action="store_true",
                      help="the full mode's every code path at tiny sizes on the CPU with gloo")
    parser.add_argument("--parts", nargs="+", metavar="PART",
                        help="only these parts: a kind (losses, pipeline, torchrun) or one "
                        "part (e.g. torchrun-voc, pipeline-cityscapes); default: all")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS,
                        help="the losses' precisions (default: fp32 bf16; quick: bf16)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="the whole check's time budget in seconds (default 420)")
    parser.add_argument("--part-timeout", type=float, default=None,
                        help="the most seconds one part may take (default: the full mode's "
                        "own caps, 120 to 240 s per part; otherwise no cap but the budget)")
    parser.add_argument("--bundle", type=Path, metavar="DIR",
                        help="keep DIR/summary.md and DIR/gpu-check.tar.gz (the tables, logs "
                        "and figures) up to date after each part")
    args = parser.parse_args(argv)
    args.argv = None if argv is None else list(argv)
    if not (args.quick or args.tiny) and not torch.cuda.is_available():
        args.quick = True
    args.mode = "quick" if args.quick else "tiny" if args.tiny else "full"
    plan = make_plan(args.mode, args.precisions)
    keys = [p.key for p, _ in schedule(plan)]
    kinds = sorted({p.kind for p, _ in schedule(plan)})
    unknown = [p for p in args.parts or () if p not in keys and p not in kinds]
    if unknown:
        parser.error(f"unknown parts {unknown}; the {args.mode} mode has {kinds} and {keys}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; 0 if every part ran and passed."""
    args = parse_args(argv)
    plan = make_plan(args.mode, args.precisions)
    out: Path = args.out.resolve()
    if args.bundle is not None and out.is_relative_to(args.bundle.resolve()):
        raise SystemExit(f"--out {out} must not lie in --bundle {args.bundle}: the bundle "
                         "folder holds only summary.md and the tarball")
    (out / "raw").mkdir(parents=True, exist_ok=True)
    args.machine = machine(plan.device)
    chosen = [(p, run) for p, run in schedule(plan)
              if args.parts is None or p.key in args.parts or p.kind in args.parts]
    check = Check(args, plan, out)
    check.log.write_text("")
    check.parts = [p for p, _ in chosen]
    check.say(f"GPU check, {plan.title}, {len(chosen)} parts, budget {args.budget_s:.0f} s; "
              f"{args.machine}")
    check.write()
    # stopped from outside (SIGTERM, Ctrl-C): stop the running command's process group
    # (Check.run), mark the part, and still write the summary and the bundle
    signal.signal(signal.SIGTERM, _terminate)
    try:
        for part, run in chosen:
            cap = args.part_timeout if args.part_timeout is not None else \
                plan.caps.get(part.key, float("inf"))
            begin = time.perf_counter()
            check.part_deadline = begin + cap
            if check.left() < MIN_START_S:
                part.status = f"skipped (time budget: {max(check.left(), 0):.0f} s left)"
            else:
                check.say(f"{part.name}: starting ({min(cap, check.left()):.0f} s at most)")
                part.status = "running"
                check.write()
                try:
                    run(check, part)
                except Exception as error:  # this script's own failure: keep the others
                    part.status = f"failed ({type(error).__name__}: {error})"
                except BaseException:
                    part.status = "interrupted"
                    raise
                finally:
                    part.seconds = time.perf_counter() - begin
            table = out / part.table
            check.say(f"{part.name}: {part.status} ({part.seconds:.0f} s)"
                      + (f" -> {table}" if table.is_file() else ""))
            check.write()
    finally:
        check.write(done=True)
        print(check.summary(done=True), flush=True)
    return 0 if all(p.status == "ok" for p in check.parts) else 1


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
