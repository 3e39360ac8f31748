"""Benchmark of ``segdistill.cirkd_loss``: time and peak memory beside the dense reading
and beside the bare products it runs.

For each case (batch B, channels C, feature map H x W, so N = H * W positions) and
each method, one forward + backward pass, with a student map that requires grad and a
teacher map that does not (a frozen teacher, as in distillation), at the reference
temperature 0.1:

- ``cirkd``: the library's memory-linear loss (blocked, online log-sum-exp, a
  recomputing backward pass);
- ``dense``: the reading of the reference code (CIRKD's
  ``CriterionMiniBatchCrossImagePair``): every one of the B^2 N x N relation maps
  built, ``log_softmax``, ``kl_div(..., 'batchmean')``, autograd for the backward
  pass. Its value is checked against the library's before it is timed; cases whose
  estimated need (:data:`DENSE_MATRICES_PER_PAIR` N x N float32 matrices per pair)
  exceeds ``--memory-budget-gb`` are skipped with the estimate;
- ``sdpa`` (only with ``--sdpa``): the forward value read from
  ``scaled_dot_product_attention`` kernels, for the comparison in the docs: the
  log-sum-exps need the CPU flash kernel's private entry point
  (``aten._scaled_dot_product_flash_attention_for_cpu``, which returns them), and
  the means :math:`\\sum_k p_k u_k` and :math:`\\sum_k p_k v_k` one attention call
  each (values of one map per call: the kernel takes one head size), three calls per
  key image. Forward only (its backward would be those calls' backward passes, a
  multiple of the library's products): its row has a forward time, to set beside
  ``cirkd``'s.

Time is the median of ``--repeats`` passes after a warm-up pass on a small map (so
that a large case is not run an extra time), with the forward pass's share beside it.
Beside each ``cirkd`` pass the worker also times, in the same process, the matrix
products the library runs for that case (:func:`matmul_products`: the same tiles,
forward and backward, teacher frozen) as bare ``torch.mm`` calls: the "matmul bound",
and the table gives the loss's time over it (the median of the per-pass ratios). Every
(case, method) runs in a fresh subprocess, so that its peak memory is its own: the rise
of the process's peak resident set size over the resident set size once the inputs (and
the bound's operands) exist, with the helpers of ``benchmarks/affinity.py``.

Run from the repository root:

    python benchmarks/cirkd.py                   # the default cases, on the CPU
    python benchmarks/cirkd.py --quick           # 32 x 32 only, a smoke test
    python benchmarks/cirkd.py --sizes 128x256   # the Cityscapes size only (one pass)
    python benchmarks/cirkd.py --sdpa --threads 1 --markdown docs/benchmarks/cirkd_cpu.md
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.append(str(Path(__file__).resolve().parent))  # for the affinity benchmark's helpers
from affinity import GB, MB, _failure, _peak_rss_bytes, _reset_peak_rss, _rss_bytes, header

TEMPERATURE = 0.1
# (B, C, H, W, methods). The last case is a 1024 x 2048 Cityscapes frame at output stride 8
# (CIRKD's crop is 512 x 1024: 64 x 128), where one N x N map takes 4.3 GB.
CASES: list[tuple[int, int, int, int, tuple[str, ...]]] = [
    (2, 256, 32, 32, ("cirkd", "dense")),
    (4, 256, 32, 32, ("cirkd", "dense")),
    (2, 256, 64, 64, ("cirkd", "dense")),
    (3, 256, 64, 64, ("cirkd", "dense")),
    (4, 256, 64, 64, ("cirkd", "dense")),
    (2, 256, 128, 256, ("cirkd", "dense")),
]
QUICK_SIZES = ("32x32",)
# From this many positions a case runs --large-repeats times, and without the sdpa row.
LARGE_N = 128 * 256
# Autograd keeps per pair the student's logits' log_softmax, the teacher's softmax and the
# elementwise KL's inputs: about 4 N x N float32 matrices (measured: 3.3 at B = 2, 64 x 64).
DENSE_MATRICES_PER_PAIR = 4.0

Shape = tuple[int, int]


@dataclass(frozen=True)
class Case:
    """One (shape, method) measurement, as handed to a worker subprocess."""

    batch: int
    channels: int
    height: int
    width: int
    method: str
    repeats: int
    threads: int

    @property
    def n(self) -> int:
        return self.height * self.width

    @property
    def label(self) -> str:
        return f"{self.batch}, {self.channels}, {self.height}x{self.width}"


def dense_cirkd_loss(student: torch.Tensor, teacher: torch.Tensor,
                     temperature: float = TEMPERATURE) -> torch.Tensor:
    """The reference code's reading: every pair's N x N maps, then ``kl_div``."""
    s = F.normalize(student.flatten(2), dim=1)
    t = F.normalize(teacher.flatten(2), dim=1)
    batch = s.shape[0]
    total = s.new_zeros(())
    for i in range(batch):
        for j in range(batch):
            log_q = F.log_softmax(s[i].mT @ s[j] / temperature, dim=1)
            p = F.softmax(t[i].mT @ t[j] / temperature, dim=1)
            total = total + F.kl_div(log_q, p, reduction="batchmean")
    return total / batch**2


def sdpa_cirkd_value(student: torch.Tensor, teacher: torch.Tensor,
                     temperature: float = TEMPERATURE) -> torch.Tensor:
    """The loss's value from three flash-attention calls per key image (forward only)."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    s = F.normalize(student.flatten(2), dim=1).mT  # (B, N, C)
    t = F.normalize(teacher.flatten(2), dim=1).mT
    batch, n, _ = s.shape
    inv_tau = 1.0 / temperature
    q_s, q_t = s.reshape(1, 1, batch * n, -1), t.reshape(1, 1, batch * n, -1)
    total = s.new_zeros(())
    for j in range(batch):  # keys and values of image j, queries every position
        k_s, k_t = s[j].view(1, 1, n, -1), t[j].view(1, 1, n, -1)
        mean_t, lse_t = flash(q_t, k_t, k_t, scale=inv_tau)  # sum_k p_k t_k, LSE(u)
        mean_s = flash(q_t, k_t, k_s, scale=inv_tau)[0]  # sum_k p_k s_k
        lse_s = flash(q_s, k_s, k_s, scale=inv_tau)[1]  # LSE(v)
        u_mean = inv_tau * (q_t * mean_t).sum(-1)
        v_mean = inv_tau * (q_s * mean_s).sum(-1)
        total = total + (u_mean - v_mean - lse_t + lse_s).sum()
    return total / (batch**2 * n)


def matmul_products(case: Case) -> list[tuple[Shape, Shape]]:
    """The operand shapes of every product ``cirkd_loss`` runs for ``case`` (equal channel
    counts C, teacher frozen): per tile of R query rows and K keys (the library's own
    tiling), the two (R, C) x (C, K) logits forward, the same two again backward, and the
    student's gradients (R, K) x (K, C) for the queries and (K, R) x (R, C) for the keys."""
    from segdistill.losses.cirkd import _BLOCK_SIZE, _tiles

    b, c, n = case.batch, case.channels, case.n
    products: list[tuple[Shape, Shape]] = []
    for _, _, _, (rows, images, keys) in _tiles(b * n, n, b, _BLOCK_SIZE):
        width = images * keys
        logits = ((rows, c), (c, width))
        products += [logits, logits, logits, logits, ((rows, width), (width, c)),
                     ((width, rows), (rows, c))]
    return products


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bare_products(case: Case) -> Callable[[], None]:
    """:func:`matmul_products` as bare ``torch.mm`` calls, into buffers, on operands that
    stay in cache as the library's tiles do (allocated here, before the loss's memory is
    measured)."""
    shapes = matmul_products(case)
    operands = {(a, b): (torch.randn(a), torch.randn(b), torch.empty(a[0], b[1]))
                for a, b in set(shapes)}
    calls = [operands[shape] for shape in shapes]

    def products() -> None:
        for a, b, out in calls:
            torch.mm(a, b, out=out)

    return products


def _inputs(case: Case, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    shape = (case.batch, case.channels, height, width)
    return torch.randn(shape, requires_grad=case.method != "sdpa"), torch.randn(shape)


def _step(case: Case, student: torch.Tensor, teacher: torch.Tensor) -> Callable[[], float]:
    """One pass of the method, forward + backward (the forward alone for ``sdpa``),
    returning the forward pass's time."""
    from segdistill.losses.cirkd import cirkd_loss

    def step() -> float:
        start = time.perf_counter()
        if case.method == "sdpa":
            with torch.no_grad():
                sdpa_cirkd_value(student, teacher)
            return time.perf_counter() - start
        loss = (cirkd_loss if case.method == "cirkd" else dense_cirkd_loss)(student, teacher)
        forward = time.perf_counter() - start
        torch.autograd.backward(loss)
        student.grad = None  # each pass allocates its gradient afresh, as in training
        return forward

    return step


def measure(case: Case) -> dict[str, float]:
    """Time and peak extra memory of one case in this (fresh) process; for ``cirkd`` also
    its matmul bound, timed alternating with the loss so that both see the same machine
    load (medians of each and of the per-pair ratios)."""
    from segdistill.losses.cirkd import cirkd_loss

    torch.set_num_threads(case.threads)
    _step(case, *_inputs(case, 8, 8))()  # warm-up on a small map
    student, teacher = _inputs(case, case.height, case.width)
    if case.method != "cirkd" and case.n <= 1024:  # the readings agree before they are timed
        with torch.no_grad():
            other = dense_cirkd_loss if case.method == "dense" else sdpa_cirkd_value
            torch.testing.assert_close(other(student, teacher), cirkd_loss(student, teacher),
                                       rtol=1e-4, atol=1e-6)
    step = _step(case, student, teacher)
    products = bare_products(case) if case.method == "cirkd" else None
    if products is not None:
        products()
    base = _rss_bytes()
    fresh = _reset_peak_rss()
    passes = []
    for _ in range(case.repeats):
        start = time.perf_counter()
        forward = step()
        passes.append((time.perf_counter() - start, forward,
                       math.nan if products is None else _timed(products)))
    extra = float(max(_peak_rss_bytes() - base, 0)) if fresh else math.nan
    result = {"seconds": statistics.median(p[0] for p in passes),
              "forward_seconds": statistics.median(p[1] for p in passes),
              "peak_extra_bytes": extra}
    if products is not None:
        result["bound_seconds"] = statistics.median(p[2] for p in passes)
        result["bound_ratio"] = statistics.median(p[0] / p[2] for p in passes)
    return result


def dense_need_bytes(case: Case) -> int:
    return int(DENSE_MATRICES_PER_PAIR * case.batch**2 * case.n**2 * 4)


def run_case(case: Case, budget_gb: float, timeout_s: float) -> dict[str, Any]:
    """Measure one case in a fresh subprocess, unless dense would not fit the budget."""
    if case.method == "dense" and dense_need_bytes(case) > budget_gb * GB:
        return {"status": f"skipped (needs ~{dense_need_bytes(case) / GB:.0f} GB)"}
    command = [sys.executable, __file__, "--worker", json.dumps(asdict(case))]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, check=False,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": f"failed (timed out after {timeout_s:.0f} s)"}
    if proc.returncode != 0:
        return {"status": _failure(proc)}
    try:
        return {"status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1])}
    except (IndexError, json.JSONDecodeError):
        return {"status": "failed (no result on stdout)"}


TABLE_HEAD = (
    "| case (B, C, HxW) | N | method | time fwd+bwd (s) | forward (s) | peak extra memory (MB) "
    "| matmul bound (s) | time / bound | dense / cirkd: time | dense / cirkd: memory |\n"
    "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"
)


def table_row(case: Case, result: dict[str, Any], cirkd: dict[str, Any] | None) -> str:
    """One Markdown row; a ``dense`` row carries its time and memory over ``cirkd``'s."""
    if result["status"] != "ok":
        return f"| {case.label} | {case.n:,} | {case.method} | {result['status']} |" + " |" * 6
    memory = result["peak_extra_bytes"]
    seconds = "" if case.method == "sdpa" else f"{result['seconds']:.3f}"
    cells = [seconds, f"{result['forward_seconds']:.3f}",
             "n/a" if math.isnan(memory) else f"{memory / MB:,.0f}"]
    if "bound_seconds" in result:
        cells += [f"{result['bound_seconds']:.3f}", f"{result['bound_ratio']:.2f}"]
    else:
        cells += ["", ""]
    if case.method == "dense" and cirkd is not None and cirkd["status"] == "ok":
        ratio = result["peak_extra_bytes"] / max(cirkd["peak_extra_bytes"], MB)
        cells += [f"{result['seconds'] / cirkd['seconds']:.1f}", f"{ratio:.1f}"]
    else:
        cells += ["", ""]
    return f"| {case.label} | {case.n:,} | {case.method} | " + " | ".join(cells) + " |"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes (default 3)")
    parser.add_argument("--large-repeats", type=int, default=1,
                        help=f"timed passes from N = {LARGE_N} on (default 1)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads (default: torch's)")
    parser.add_argument("--memory-budget-gb", type=float, default=8.0,
                        help="skip dense cases estimated to need more than this (default 8)")
    parser.add_argument("--quick", action="store_true", help="only 32x32, a smoke test")
    parser.add_argument("--sizes", nargs="+", metavar="HxW", help="only these sizes")
    parser.add_argument("--sdpa", action="store_true",
                        help="also time the forward value from flash-attention calls")
    parser.add_argument("--timeout-s", type=float, default=3600.0,
                        help="give up on one (case, method) after this long (default 3600)")
    parser.add_argument("--markdown", metavar="PATH", help="also write the table here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(measure(Case(**json.loads(args.worker)))))
        return
    torch.set_num_threads(args.threads)
    sizes = QUICK_SIZES if args.quick else args.sizes
    lines: list[str] = []

    def emit(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    emit(f"cirkd_loss (temperature {TEMPERATURE}), forward + backward, teacher frozen\n")
    emit(TABLE_HEAD)
    for b, c, h, w, methods in CASES:
        if sizes is not None and f"{h}x{w}" not in sizes:
            continue
        large = h * w >= LARGE_N
        results: dict[str, dict[str, Any]] = {}
        for method in (*methods, *(("sdpa",) if args.sdpa and not large else ())):
            case = Case(b, c, h, w, method, args.large_repeats if large else args.repeats,
                        args.threads)
            results[method] = run_case(case, args.memory_budget_gb, args.timeout_s)
            emit(table_row(case, results[method], results.get("cirkd")))
        if args.markdown:
            Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
            Path(args.markdown).write_text("\n".join([*lines, "", header("cpu")]) + "\n")
    emit("")
    emit(header("cpu"))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
