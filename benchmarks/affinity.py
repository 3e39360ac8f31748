"""Affinity loss: time and peak memory of the dense and the memory-linear algorithm.

Each (case, method) runs forward + backward in a fresh subprocess, so that peak
memory is that run's alone. The student's map requires grad and the
teacher's does not (a frozen teacher, as in distillation). On the CPU the
peak is the rise of the process's peak resident memory over what it used once
the inputs existed; on CUDA it is ``torch.cuda.max_memory_allocated`` over
the same baseline.

    python benchmarks/affinity.py                 # the CPU table
    python benchmarks/affinity.py --device cuda   # the same on a GPU
    python benchmarks/affinity.py --quick         # one small case, a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

# (batch, channels, height, width, methods); 'dense' is the library's dense method (N x N
# affinity rows in blocks of at most 2^24 elements), 'dense_full' the same with the two
# whole N x N matrices at once, as eqs. (3)-(4) read and public implementations do
CASES: list[tuple[int, int, int, int, tuple[str, ...]]] = [
    (4, 256, 32, 32, ("dense_full", "dense", "linear")),
    (4, 256, 64, 64, ("dense_full", "dense", "linear")),
    (4, 256, 128, 128, ("dense_full", "dense", "linear")),
    (2, 256, 128, 256, ("linear",)),  # a 1024 x 2048 Cityscapes frame at output stride 8
]
QUICK_CASES = CASES[:1]
# dense keeps about this many N x N float32 matrices per image alive in forward + backward
# N x N float32 matrices per image that forward + backward keep alive, on the safe side
# (measured at B=4, 64 x 64: about 3.5 and 2.1)
_DENSE_MATRICES = {"dense_full": 6, "dense": 2}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def worker(case: dict[str, Any]) -> dict[str, Any]:
    """Measure one (case, method) in this process; return the numbers."""
    from segdistill import affinity_loss

    device = torch.device(case["device"])
    torch.manual_seed(0)
    b, c, h, w = case["batch"], case["channels"], case["height"], case["width"]
    student = torch.randn(b, c, h, w, device=device, requires_grad=True)
    teacher = torch.randn(b, c, h, w, device=device)
    cuda = device.type == "cuda"

    method, chunk = case["method"], None
    if method == "dense_full":
        method, chunk = "dense", h * w

    def step() -> None:
        loss = affinity_loss(student, teacher, method=method, distance=case["distance"],
                             chunk_size=chunk)
        loss.backward()
        student.grad = None

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_bytes()
    step()  # warm-up, and the first peak
    sync()
    times = []
    for _ in range(case["repeats"]):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes()) - base
    return {"seconds": statistics.median(times), "peak_bytes": max(peak, 0)}


def _run_case(case: dict[str, Any]) -> dict[str, Any]:
    n = case["height"] * case["width"]
    need = _DENSE_MATRICES.get(case["method"], 0) * case["batch"] * n * n * 4
    if case["method"].startswith("dense") and need > case["budget_gb"] * 2**30:
        return {"status": f"skipped (needs ~{need / 2**30:.0f} GB)"}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(case)],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return {"status": f"failed ({tail[:60]})"}
    return {"status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1])}


def _machine(device: str) -> str:
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(0)
    else:
        name = platform.processor() or "CPU"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        name += f", {torch.get_num_threads()} threads"
    return f"{name}; torch {torch.__version__}; Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--distance", default="l2", choices=("l2", "squared"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-budget-gb", type=float, default=16.0,
                        help="skip dense cases estimated to need more (default 16)")
    parser.add_argument("--quick", action="store_true", help="only the 32 x 32 case")
    parser.add_argument("--sizes", nargs="+", metavar="HxW",
                        help="only these sizes of the default cases, e.g. 64x64")
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    print(f"# AffinityLoss forward + backward, distance={args.distance!r}, on {args.device}")
    print(f"# machine: {_machine(args.device)}")
    print(f"# command: python {' '.join(sys.argv)}\n")
    print("| B | C | H x W | N | method | time (s) | peak extra memory (MB) "
          "| linear speed-up over dense | memory ratio |")
    print("|---:|---:|---|---:|---|---:|---:|---:|---:|")
    rows = []
    cases = QUICK_CASES if args.quick else CASES
    if args.sizes:
        cases = [case for case in cases if f"{case[2]}x{case[3]}" in args.sizes]
    for b, c, h, w, methods in cases:
        measured = {}
        for method in methods:
            case = {"batch": b, "channels": c, "height": h, "width": w, "method": method,
                    "device": args.device, "distance": args.distance,
                    "repeats": args.repeats, "budget_gb": args.memory_budget_gb}
            measured[method] = result = _run_case(case)
            rows.append({**case, **result})
        linear = measured.get("linear", {})
        for method, result in measured.items():
            speed = ratio = ""
            if method != "linear" and result["status"] == "ok" and linear.get("status") == "ok":
                speed = f"{result['seconds'] / linear['seconds']:.1f}x"
                ratio = f"{result['peak_bytes'] / max(linear['peak_bytes'], 1):.1f}x"
            if result["status"] == "ok":
                cells = f"{result['seconds']:.3f} | {result['peak_bytes'] / 2**20:,.0f}"
            else:
                cells = f"{result['status']} | "
            print(f"| {b} | {c} | {h} x {w} | {h * w:,} | {method} | {cells} | {speed} "
                  f"| {ratio} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
