"""Benchmark of ``segdistill.affinity_loss``: time and peak memory, dense against linear.

For each case (batch B, channels C, feature map H x W, so N = H * W positions) and
each method, this measures one forward + backward pass of the affinity loss, with
a student map that requires grad and a teacher map that does not (a frozen
teacher, as in distillation):

- ``dense``: the library's dense method, which materialises the N x N affinity
  matrices in row blocks;
- ``linear``: the exact algorithm that only builds C x C Gram matrices;
- ``dense_full`` (only with ``--dense-full``): the dense method with one block
  of all N rows, i.e. the whole N x N matrices at once, as eqs. (3)-(4) read.

Time is the median of ``--repeats`` passes after one warm-up pass. Every
(case, method) runs in a fresh subprocess, so that its peak memory is its own:
on the CPU, "peak extra memory" is the rise of the process's peak resident set
size over the resident set size once the inputs exist; on CUDA it is
``torch.cuda.max_memory_allocated`` over the memory allocated once the inputs
exist. Dense cases whose estimated need (about 6 N x N float32 matrices per
image) exceeds ``--memory-budget-gb`` are skipped, and a subprocess that dies
(for instance killed for memory) shows as "failed" in the table.

Run from the repository root:

    python benchmarks/affinity.py                 # the default cases, on the CPU
    python benchmarks/affinity.py --device cuda   # the same on a GPU
    python benchmarks/affinity.py --quick         # 32 x 32 only, a smoke test
    python benchmarks/affinity.py --json results.json --distance squared
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

# (B, C, H, W, methods). The last case is a 1024 x 2048 Cityscapes frame at output
# stride 8, where even one N x N matrix per image (4.3 GB) is out of reach for dense.
CASES: list[tuple[int, int, int, int, tuple[str, ...]]] = [
    (4, 256, 32, 32, ("dense", "linear")),
    (4, 256, 64, 64, ("dense", "linear")),
    (4, 256, 128, 128, ("dense", "linear")),
    (2, 256, 128, 256, ("linear",)),
]
QUICK_SIZES = ("32x32",)
# Forward + backward keeps a few N x N float32 matrices per image alive (the
# products, their difference, and the gradients); 6 errs on the safe side.
DENSE_MATRICES_PER_IMAGE = 6
GB = 1e9
MB = 2**20


@dataclass(frozen=True)
class Case:
    """One (shape, method) measurement, as handed to a worker subprocess."""

    batch: int
    channels: int
    height: int
    width: int
    method: str
    distance: str
    device: str
    repeats: int

    @property
    def n(self) -> int:
        return self.height * self.width

    @property
    def label(self) -> str:
        return f"{self.batch}, {self.channels}, {self.height}x{self.width}"


# ---------------------------------------------------------------- worker side


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _make_step(case: Case) -> Callable[[], None]:
    """Build the inputs and return one forward + backward pass over them."""
    from segdistill import affinity_loss

    torch.manual_seed(0)
    shape = (case.batch, case.channels, case.height, case.width)
    student = torch.randn(shape, device=case.device, requires_grad=True)
    teacher = torch.randn(shape, device=case.device)
    method, chunk = case.method, None
    if method == "dense_full":
        method, chunk = "dense", case.n

    def step() -> None:
        loss = affinity_loss(
            student, teacher, distance=case.distance, method=method, chunk_size=chunk
        )
        loss.backward()
        student.grad = None  # each pass allocates its gradient afresh, as in training

    return step


def _sync(cuda: bool) -> None:
    # CUDA kernels run asynchronously: without this the clock stops before they finish
    if cuda:
        torch.cuda.synchronize()


def measure(case: Case) -> dict[str, float]:
    """Time and peak extra memory of forward + backward for one case, in this process."""
    cuda = case.device.startswith("cuda")
    step = _make_step(case)
    _sync(cuda)
    if cuda:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_bytes()
    step()  # warm-up: one-off allocations and kernel selection stay out of the timings
    _sync(cuda)
    times = []
    for _ in range(case.repeats):
        start = time.perf_counter()
        step()
        _sync(cuda)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes()
    return {"seconds": statistics.median(times), "peak_extra_bytes": max(peak - base, 0)}


# ---------------------------------------------------------------- driver side


def dense_need_bytes(case: Case) -> int:
    """Rough memory dense needs for forward + backward, in bytes (float32)."""
    return DENSE_MATRICES_PER_IMAGE * case.batch * case.n * case.n * 4


def _failure(proc: subprocess.CompletedProcess[str]) -> str:
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        hint = ", likely out of memory" if name == "SIGKILL" else ""
        return f"failed (killed by {name}{hint})"
    lines = proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"]
    return f"failed ({lines[-1][:80]})"


def run_case(case: Case, budget_gb: float, timeout_s: float) -> dict[str, Any]:
    """Measure one case in a fresh subprocess, unless dense would not fit the budget."""
    if case.method.startswith("dense") and dense_need_bytes(case) > budget_gb * GB:
        return {"status": f"skipped (needs ~{dense_need_bytes(case) / GB:.0f} GB)"}
    command = [sys.executable, __file__, "--worker", json.dumps(asdict(case))]
    try:
        proc = subprocess.run(
            command, capture_output=True, text=True, check=False, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return {"status": f"failed (timed out after {timeout_s:.0f} s)"}
    if proc.returncode != 0:
        return {"status": _failure(proc)}
    try:
        return {"status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1])}
    except (IndexError, json.JSONDecodeError):
        return {"status": "failed (no result on stdout)"}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def header(device: str) -> str:
    """One line: the machine, torch's threads and version, the device, the command."""
    where = device
    if device.startswith("cuda") and torch.cuda.is_available():
        where = f"{device} ({torch.cuda.get_device_name(device)})"
    command = shlex.join([sys.executable, *sys.argv])
    return (
        f"Machine: {_cpu_model()}, {torch.get_num_threads()} torch threads; "
        f"torch {torch.__version__}; device {where}; command: `{command}`"
    )


def _ratios(result: dict[str, Any], linear: dict[str, Any] | None) -> tuple[str, str]:
    """Linear's speed-up and memory saving over a dense row, as table cells."""
    if result["status"] != "ok" or linear is None or linear["status"] != "ok":
        return "", ""
    speed = f"{result['seconds'] / linear['seconds']:.1f}"
    # Linear's extra memory can round to nothing on the CPU (pages already mapped)
    if linear["peak_extra_bytes"] < MB:
        return speed, f"> {result['peak_extra_bytes'] / MB:,.0f}"
    return speed, f"{result['peak_extra_bytes'] / linear['peak_extra_bytes']:.1f}"


def table_row(case: Case, result: dict[str, Any], linear: dict[str, Any] | None) -> str:
    if result["status"] == "ok":
        cells = f"{result['seconds']:.3f} | {result['peak_extra_bytes'] / MB:,.0f}"
    else:
        cells = f"{result['status']} | "
    speed, ratio = _ratios(result, linear) if case.method != "linear" else ("", "")
    return f"| {case.label} | {case.n:,} | {case.method} | {cells} | {speed} | {ratio} |"


TABLE_HEAD = (
    "| case (B, C, HxW) | N | method | time fwd+bwd (s) | peak extra memory (MB) "
    "| speed-up of linear vs this (x) | memory ratio (this / linear) |\n"
    "|---|---:|---|---:|---:|---:|---:|"
)


def selected_cases(args: argparse.Namespace) -> list[tuple[int, int, int, int, tuple[str, ...]]]:
    sizes = QUICK_SIZES if args.quick else args.sizes
    cases = [c for c in CASES if sizes is None or f"{c[2]}x{c[3]}" in sizes]
    if args.dense_full:
        cases = [(*c[:4], ("dense_full", *c[4]) if "dense" in c[4] else c[4]) for c in cases]
    return cases


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Measure every selected case, print the table row by row, return the raw results."""
    print(header(args.device))
    print(f"\naffinity_loss forward + backward, distance={args.distance!r}\n")
    print(TABLE_HEAD, flush=True)
    raw = []
    for b, c, h, w, methods in selected_cases(args):
        # linear first, so each dense row can be compared with it as soon as it is printed
        results = {}
        for method in sorted(methods, key=lambda m: m != "linear"):
            case = Case(b, c, h, w, method, args.distance, args.device, args.repeats)
            results[method] = run_case(case, args.memory_budget_gb, args.timeout_s)
            raw.append({**asdict(case), "n": case.n, **results[method]})
        for method in methods:
            case = Case(b, c, h, w, method, args.distance, args.device, args.repeats)
            print(table_row(case, results[method], results.get("linear")), flush=True)
    return raw


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="'cpu' (default) or 'cuda'")
    parser.add_argument("--distance", default="l2", choices=("l2", "squared"))
    parser.add_argument("--repeats", type=int, default=3, help="timed passes (default 3)")
    parser.add_argument(
        "--memory-budget-gb",
        type=float,
        default=16.0,
        help="skip dense cases estimated to need more than this (default 16)",
    )
    parser.add_argument("--quick", action="store_true", help="only 32x32, a smoke test")
    parser.add_argument("--sizes", nargs="+", metavar="HxW", help="only these sizes, e.g. 64x64")
    parser.add_argument(
        "--dense-full",
        action="store_true",
        help="also time dense with the whole N x N matrices at once",
    )
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=3600.0,
        help="give up on one (case, method) after this long (default 3600)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the raw results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(measure(Case(**json.loads(args.worker)))))
        return
    raw = run_all(args)
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=2) + "\n")


if __name__ == "__main__":
    main()
