"""Benchmark of ``segdistill.affinity_loss``: time and peak memory, dense against linear.

For each case (batch B, channels C, feature map H x W, so N = H * W positions) and
each method, this measures one forward + backward pass of the affinity loss, with
a student map that requires grad and a teacher map that does not (a frozen
teacher, as in distillation):

- ``dense``: the library's dense method, which materialises the N x N affinity
  matrices in row blocks;
- ``linear``: the exact algorithm that only builds C x C Gram matrices;
- ``fused`` (only with ``--fused``, ``affinity`` with ``l2``): the one-Gram form
  of DESIGN section 2, written here and not in the library: with U = [S; T] and
  W = [S; -T], each row's squared distance is w_i' (U U') w_i, two batched
  matmuls and a column-wise dot product, autograd for the backward pass. Its
  value is checked against the library's before it is timed;
- ``dense_full`` (only with ``--dense-full``): the dense method with one block
  of all N rows, i.e. the whole N x N matrices at once, as eqs. (3)-(4) read.

Time is the median of ``--repeats`` passes after one warm-up pass. Beside each
``linear`` row the worker also times, in the same process, the C x C x N matrix
products that the library's linear path runs for that case (forward and
backward, teacher frozen) as bare ``torch.bmm`` calls: that is the
"matmul bound", the time the loss would take if everything but the products
were free, and the table gives the loss's time over it. Every
(case, method) runs in a fresh subprocess, so that its peak memory is its own:
on the CPU, "peak extra memory" is the rise of the process's peak resident set
size over the resident set size once the inputs exist; on CUDA it is
``torch.cuda.max_memory_allocated`` over the memory allocated once the inputs
exist. Dense cases whose estimated need (about 6 N x N float32 matrices per
image) exceeds ``--memory-budget-gb`` are skipped, and a subprocess that dies
(for instance killed for memory) shows as "failed" in the table.

``--in-process`` measures every case in this one process instead, which saves a
start-up (and on CUDA a context) per case: on CUDA the peak stays each case's own
(``torch.cuda.reset_peak_memory_stats`` before it); on the CPU the kernel's peak
resident set size is reset before each case (``/proc/self/clear_refs``, Linux),
which undercounts memory that an earlier case freed but the allocator kept, and
is "n/a" where it cannot be reset. A case that fails (out of memory) shows as
"failed", and the others still run. ``--markdown`` and ``--json`` are rewritten
after each shape, so that a run stopped half-way leaves the rows it finished.

Run from the repository root:

    python benchmarks/affinity.py                 # the default cases, on the CPU
    python benchmarks/affinity.py --device cuda   # the same on a GPU
    python benchmarks/affinity.py --quick         # 32 x 32 only, a smoke test
    python benchmarks/affinity.py --json results.json --distance squared
    python benchmarks/affinity.py --device cuda --in-process   # one CUDA context
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))  # for `examples`
from examples.segmentation.profiling import cpu_model

if TYPE_CHECKING:
    from segdistill.losses.affinity import Distance, Method

    CaseMethod: TypeAlias = Method | Literal["dense_full", "fused"]
    """The library's methods, and the two forms that only this benchmark times."""
    CaseRow: TypeAlias = tuple[int, int, int, int, tuple[CaseMethod, ...]]
    """(B, C, H, W, methods)."""

Shape: TypeAlias = tuple[int, int, int]
"""A batched matrix product's operand: (batch, rows, columns)."""

# (B, C, H, W, methods). The last case is a 1024 x 2048 Cityscapes frame at output
# stride 8, where even one N x N matrix per image (4.3 GB) is out of reach for dense.
CASES: list[CaseRow] = [
    (4, 256, 32, 32, ("dense", "linear")),
    (4, 256, 64, 64, ("dense", "linear")),
    (4, 256, 128, 128, ("dense", "linear")),
    (2, 256, 128, 256, ("linear",)),
]
QUICK_SIZES = ("32x32",)
# Forward + backward keeps a few N x N float32 matrices per image alive (the
# products, their difference, and the gradients): about 3.5 with the whole matrices and
# 2 with row blocks (measured at B=4, 64 x 64); these err on the safe side.
DENSE_MATRICES_PER_IMAGE = {"dense_full": 6.0, "dense": 3.0}
GB = 1e9
MB = 2**20


@dataclass(frozen=True)
class Case:
    """One (shape, method) measurement, as handed to a worker subprocess."""

    batch: int
    channels: int
    height: int
    width: int
    method: CaseMethod
    distance: Distance
    device: str
    repeats: int
    loss: str = "affinity"

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
    """The peak resident set size since the process started or :func:`_reset_peak_rss`."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _reset_peak_rss() -> bool:
    """Reset the peak resident set size (VmHWM) to the current one; whether it could
    (Linux 4.0 and later)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def fused_affinity_loss(student: torch.Tensor, teacher: torch.Tensor,
                        eps: float = 1e-8) -> torch.Tensor:
    """The affinity loss (row-wise L2, mean) from one Gram of the stacked features."""
    s = torch.nn.functional.normalize(student.flatten(2), dim=1, eps=eps)
    t = torch.nn.functional.normalize(teacher.flatten(2), dim=1, eps=eps)
    u = torch.cat([s, t], dim=1)  # (B, C_s + C_t, N)
    w = torch.cat([s, -t], dim=1)
    r = ((u @ u.mT) @ w * w).sum(1)  # N^2 ||A^s_i - A^t_i||^2
    rows = r.clamp_min(torch.finfo(r.dtype).tiny).sqrt()
    return (rows / s.shape[-1]).mean()


def _make_step(case: Case) -> Callable[[], None]:
    """Build the inputs and return one forward + backward pass over them."""
    from segdistill import affinity_loss, pairwise_loss

    torch.manual_seed(0)
    shape = (case.batch, case.channels, case.height, case.width)
    student = torch.randn(shape, device=case.device, requires_grad=True)
    teacher = torch.randn(shape, device=case.device)
    method, chunk = case.method, None
    if method == "dense_full":
        method, chunk = "dense", case.n

    if method == "fused":
        with torch.no_grad():
            torch.testing.assert_close(fused_affinity_loss(student, teacher),
                                       affinity_loss(student, teacher, method="linear"),
                                       rtol=1e-4, atol=1e-6)

    def step() -> None:
        if method == "fused":
            loss = fused_affinity_loss(student, teacher)
        elif case.loss == "pairwise":
            loss = pairwise_loss(student, teacher, method=method)
        else:
            loss = affinity_loss(
                student, teacher, distance=case.distance, method=method, chunk_size=chunk
            )
        torch.autograd.backward(loss)
        student.grad = None  # each pass allocates its gradient afresh, as in training

    return step


def _sync(cuda: bool) -> None:
    # CUDA kernels run asynchronously: without this the clock stops before they finish
    if cuda:
        torch.cuda.synchronize()


def matmul_products(case: Case) -> list[tuple[Shape, Shape]]:
    """The operand shapes of the batched products the linear path runs for ``case``.

    Equal channel counts C, teacher frozen. Row-wise L2 (``segdistill.losses._gram``):
    three C x C Grams (T T', T E', E E'), a 2C x 2C matrix of them applied to
    [T; E], and in the backward pass (S Gamma) [T; E]' and a C x 2C matrix applied
    to [T; E]: 11 C^2 N multiply-adds. Squared Frobenius (the pair-wise loss): three
    Grams and, backward, one C x 2C matrix applied to [T; E], 5 C^2 N.
    """
    b, c, n = case.batch, case.channels, case.n
    gram = ((b, c, n), (b, n, c))
    if case.loss == "affinity" and case.distance == "l2":
        return [gram] * 3 + [((b, 2 * c, 2 * c), (b, 2 * c, n)),
                             ((b, c, n), (b, n, 2 * c)), ((b, c, 2 * c), (b, 2 * c, n))]
    return [gram] * 3 + [((b, c, 2 * c), (b, 2 * c, n))]


def _timed(fn: Callable[[], None], cuda: bool) -> float:
    start = time.perf_counter()
    fn()
    _sync(cuda)
    return time.perf_counter() - start


def matmul_bound(products: Sequence[tuple[Shape, Shape]], step: Callable[[], None],
                 device: str, repeats: int) -> dict[str, float]:
    """Time ``products`` (:func:`matmul_products`, or another loss's) as bare ``bmm``
    calls, alternating with ``step`` (the loss) so that both see the same machine load;
    medians of each and of the per-pair ratios. Products of one shape share their
    operands, so that a loss's thousands of equal tiles need one pair of them."""
    cuda = device.startswith("cuda")
    operands = {shape: (torch.randn(shape[0], device=device),
                        torch.randn(shape[1], device=device)) for shape in set(products)}
    calls = [operands[shape] for shape in products]

    def run_products() -> None:
        for a, b in calls:
            torch.bmm(a, b)

    run_products()
    pairs = [(_timed(step, cuda), _timed(run_products, cuda)) for _ in range(repeats)]
    return {"seconds": statistics.median(p[0] for p in pairs),
            "bound_seconds": statistics.median(p[1] for p in pairs),
            "bound_ratio": statistics.median(p[0] / p[1] for p in pairs)}


def measure(case: Case, fresh: bool = True) -> dict[str, float]:
    """Time and peak extra memory of forward + backward for one case, in this process;
    for the linear method also its matmul bound (:func:`measure_step`)."""
    products = matmul_products(case) if case.method == "linear" else None
    return measure_step(_make_step(case), case.device, case.repeats, fresh, products)


def measure_step(step: Callable[[], None], device: str, repeats: int, fresh: bool = True,
                 products: Sequence[tuple[Shape, Shape]] | None = None) -> dict[str, float]:
    """Time (median of ``repeats`` passes after a warm-up pass) and peak extra memory of
    ``step``, one pass over inputs that already exist, in this process. With
    ``products``, the passes alternate with them (:func:`matmul_bound`), after the peak
    is read: their operands are not the loss's memory. ``fresh``: the process measures
    no other case (on the CPU its peak memory is then its own even where the kernel's
    peak cannot be reset; otherwise it is NaN there)."""
    cuda = device.startswith("cuda")
    _sync(cuda)
    if cuda:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_bytes()
        if not _reset_peak_rss() and not fresh:
            base = -1  # earlier cases' peak: unknown
    step()  # warm-up: one-off allocations and kernel selection stay out of the timings
    _sync(cuda)
    # with products, the passes alternating with them are the timed ones
    times = [_timed(step, cuda) for _ in range(repeats if products is None else 0)]
    peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes()
    extra = math.nan if base < 0 else float(max(peak - base, 0))
    result = {"seconds": statistics.median(times) if times else math.nan,
              "peak_extra_bytes": extra}
    if products is not None:
        result.update(matmul_bound(products, step, device, repeats))
    return result


# ---------------------------------------------------------------- driver side


def dense_need_bytes(case: Case) -> int:
    """Rough memory dense needs for forward + backward, in bytes (float32)."""
    matrices = DENSE_MATRICES_PER_IMAGE.get(case.method, 0.0)
    return int(matrices * case.batch * case.n * case.n * 4)


def _failure(proc: subprocess.CompletedProcess[str]) -> str:
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        hint = ", likely out of memory" if name == "SIGKILL" else ""
        return f"failed (killed by {name}{hint})"
    lines = proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"]
    return f"failed ({lines[-1][:80]})"


def measure_here(measure_one: Callable[[], dict[str, float]], device: str) -> dict[str, Any]:
    """Measure one case in this process (``--in-process``) with ``measure_one``; an error,
    out of memory say, is its status, and what it allocated is freed for the next case."""
    try:
        return {"status": "ok", **measure_one()}
    except RuntimeError as error:  # torch.OutOfMemoryError is one
        first = (str(error).strip().splitlines() or [""])[0]
        return {"status": f"failed ({type(error).__name__}: {first[:80]})"}
    finally:
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def run_worker(script: str, payload: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Measure one case in a fresh subprocess, ``script --worker PAYLOAD`` (JSON), whose
    last line of output is its result (JSON); the result with status 'ok', or why not."""
    command = [sys.executable, script, "--worker", json.dumps(payload)]
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


def run_case(case: Case, budget_gb: float, timeout_s: float,
             in_process: bool = False) -> dict[str, Any]:
    """Measure one case in a fresh subprocess (or with ``in_process`` in this one), unless
    dense would not fit the budget."""
    if case.method.startswith("dense") and dense_need_bytes(case) > budget_gb * GB:
        return {"status": f"skipped (needs ~{dense_need_bytes(case) / GB:.0f} GB)"}
    if in_process:
        return measure_here(lambda: measure(case, fresh=False), case.device)
    return run_worker(__file__, asdict(case), timeout_s)


def header(device: str) -> str:
    """One line: the machine, torch's threads and version, the device, the command."""
    where = device
    if device.startswith("cuda") and torch.cuda.is_available():
        where = f"{device} ({torch.cuda.get_device_name(device)})"
    command = shlex.join([sys.executable, *sys.argv])
    return (
        f"Machine: {cpu_model()}, {torch.get_num_threads()} torch threads; "
        f"torch {torch.__version__}; device {where}; command: `{command}`"
    )


def ratios(result: dict[str, Any], linear: dict[str, Any] | None) -> tuple[str, str]:
    """Linear's speed-up and memory saving over a dense row, as table cells."""
    if result["status"] != "ok" or linear is None or linear["status"] != "ok":
        return "", ""
    speed = f"{result['seconds'] / linear['seconds']:.1f}"
    if math.isnan(result["peak_extra_bytes"]) or math.isnan(linear["peak_extra_bytes"]):
        return speed, "n/a"
    # Linear's extra memory can round to nothing on the CPU (pages already mapped)
    if linear["peak_extra_bytes"] < MB:
        return speed, f"> {result['peak_extra_bytes'] / MB:,.0f}"
    return speed, f"{result['peak_extra_bytes'] / linear['peak_extra_bytes']:.1f}"


def table_row(case: Case, result: dict[str, Any], linear: dict[str, Any] | None) -> str:
    if result["status"] == "ok":
        memory = result["peak_extra_bytes"]
        cells = f"{result['seconds']:.3f} | " + \
            ("n/a" if math.isnan(memory) else f"{memory / MB:,.0f}")
    else:
        cells = f"{result['status']} | "
    speed, ratio = ratios(result, linear) if case.method != "linear" else ("", "")
    bound = " | "
    if result["status"] == "ok" and "bound_seconds" in result:
        bound = f"{result['bound_seconds']:.3f} | {result['bound_ratio']:.2f}"
    return (f"| {case.label} | {case.n:,} | {case.method} | {cells} | {bound} | {speed} "
            f"| {ratio} |")


TABLE_HEAD = (
    "| case (B, C, HxW) | N | method | time fwd+bwd (s) | peak extra memory (MB) "
    "| matmul bound (s) | time / bound | speed-up of linear vs this (x) "
    "| memory ratio (this / linear) |\n"
    "|---|---:|---|---:|---:|---:|---:|---:|---:|"
)


def selected_cases(args: argparse.Namespace) -> list[CaseRow]:
    sizes = QUICK_SIZES if args.quick else args.sizes
    cases = [c for c in CASES if sizes is None or f"{c[2]}x{c[3]}" in sizes]
    if args.dense_full:
        cases = [(*c[:4], ("dense_full", *c[4]) if "dense" in c[4] else c[4]) for c in cases]
    if args.fused:
        cases = [(*c[:4], (*c[4], "fused")) for c in cases]
    return cases


def write_outputs(args: argparse.Namespace, raw: list[dict[str, Any]],
                  lines: list[str]) -> None:
    """Write ``--json`` and ``--markdown`` (where asked for) with what is measured so far."""
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(raw, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text("\n".join(lines) + "\n")


def run_all(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    """Measure every selected case, print the table row by row (rewriting ``--json`` and
    ``--markdown`` after each shape); return the raw results and the printed lines."""
    lines: list[str] = []

    def emit(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    emit(header(args.device))
    what = "pairwise_loss" if args.loss == "pairwise" else \
        f"affinity_loss, distance={args.distance!r}"
    emit(f"\n{what}, forward + backward\n")
    emit(TABLE_HEAD)
    raw = []
    for b, c, h, w, methods in selected_cases(args):
        # linear first, so each dense row can be compared with it as soon as it is printed
        results = {}
        for method in sorted(methods, key=lambda m: m != "linear"):
            case = Case(b, c, h, w, method, args.distance, args.device, args.repeats, args.loss)
            results[method] = run_case(case, args.memory_budget_gb, args.timeout_s,
                                       args.in_process)
            raw.append({**asdict(case), "n": case.n, **results[method]})
        for method in methods:
            case = Case(b, c, h, w, method, args.distance, args.device, args.repeats, args.loss)
            emit(table_row(case, results[method], results.get("linear")))
        write_outputs(args, raw, lines)
    return raw, lines


def plot(raw: list[dict[str, Any]], path: str, title: str) -> None:
    """Time and peak memory against N, one line per method, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for method in sorted({r["method"] for r in raw}):
        rows = sorted((r for r in raw if r["method"] == method and r["status"] == "ok"),
                      key=lambda r: (r["n"], r["batch"]))
        if not rows:
            continue
        labels = [f"B={r['batch']}" for r in rows]
        for ax, key, scale in ((axes[0], "seconds", 1.0), (axes[1], "peak_extra_bytes", MB)):
            ax.plot([r["n"] for r in rows], [r[key] / scale for r in rows], "o-", label=method)
            for r, label in zip(rows, labels, strict=True):
                if r["batch"] != rows[0]["batch"]:
                    ax.annotate(label, (r["n"], r[key] / scale), fontsize=7)
    for ax, name in zip(axes, ("time, forward + backward (s)", "peak extra memory (MB)"),
                        strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N = H x W")
        ax.set_ylabel(name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="'cpu' (default) or 'cuda'")
    parser.add_argument("--loss", default="affinity", choices=("affinity", "pairwise"),
                        help="affinity_loss (default) or pairwise_loss (Liu et al.)")
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
        "--fused",
        action="store_true",
        help="also time the one-Gram form (affinity loss, l2 distance only)",
    )
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=3600.0,
        help="give up on one (case, method) after this long (default 3600; not with "
        "--in-process)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="measure every case in this process (one CUDA context) instead of one "
        "subprocess each",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the raw results here")
    parser.add_argument("--markdown", metavar="PATH", help="also write the table here")
    parser.add_argument("--plot", metavar="PATH", help="also plot time and memory (PNG)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fused and (args.loss != "affinity" or args.distance != "l2"):
        parser.error("--fused times the affinity loss with the l2 distance only")
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(measure(Case(**json.loads(args.worker)))))
        return
    raw, lines = run_all(args)
    write_outputs(args, raw, lines)
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot(raw, args.plot, f"{args.loss} loss on {args.device}, B and C as in the table")


if __name__ == "__main__":
    main()
