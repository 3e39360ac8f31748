"""Benchmark of every distillation loss: forward + backward time and peak memory at
training sizes.

For each case (batch B, channels C, feature map H x W, so N = H * W positions) and each
method, one forward + backward pass, the student's input requiring grad and the
teacher's not (a frozen teacher, as in distillation):

- the feature losses (``fitnet_loss``, ``attention_transfer_loss``, ``adaptation_loss``,
  ``affinity_loss``, ``pairwise_loss``, ``MGDLoss`` (``mgd_loss`` with its
  generator), ``ifvd_loss``, ``cirkd_loss``,
  ``CIRKDMemory``) take (B, C, H, W) maps from both networks;
- the logit losses (``kd_loss``, ``cwd_loss``, ``dist_loss``, ``HolisticLoss``) take
  (B, K, H, W) logits on the same grid, K = 19 (Cityscapes' classes);
- ``ifvd_loss`` and ``CIRKDMemory`` also take labels on the map's grid (K classes, a
  tenth of the pixels ignored: 255);
- the modules (``MGDLoss``, ``CIRKDMemory``, ``HolisticLoss``) are built before the
  measurement, so their parameters and buffers (CIRKDMemory's queues, 4 K (20,000 +
  2,000) C bytes) are not counted as extra memory; their parameters' gradients are
  cleared after each pass, like the student's. ``HolisticLoss`` runs as in training:
  its generator term plus the discriminator's loss (``attach_discriminator_loss``), one
  backward pass; it needs maps of at least 64 x 64.

The relational losses (``affinity_loss``, ``pairwise_loss``, ``cirkd_loss``: CIRKD's
mini-batch term, in ``segdistill/losses/cirkd.py`` where the checkout has it) have two
rows each:

- ``linear``: the library's memory-linear form (``method="linear"`` for affinity and
  pair-wise; ``cirkd_loss`` as it is). Beside it, its *matmul bound*: the same matrix
  products as bare ``bmm`` calls, timed in the same process, alternating with the loss
  (``benchmarks/affinity.py``'s ``matmul_products`` for affinity and pair-wise; for CIRKD
  :func:`cirkd_products`, the library's own tiles), and the loss's time over it;
- ``dense``: the N x N reading: ``method="dense"`` for affinity and pair-wise (the
  N x N matrices in row blocks), and for CIRKD :func:`dense_cirkd_loss`, written here,
  which builds all B^2 N x N relation maps (its value is checked against the
  library's on a crop of the inputs first). Where its estimated need (``benchmarks/
  affinity.py``'s estimate, :func:`cirkd_dense_bytes` for CIRKD) exceeds
  ``--memory-budget-gb`` it is not run, and the row gives the estimate instead; beside
  a dense row, its time and memory over the linear row's.

Time and memory are measured as ``benchmarks/affinity.py`` measures them (its helpers,
imported): the median of ``--repeats`` passes after a warm-up pass; the peak extra
memory over what the inputs (and modules) take, one fresh subprocess per row (on CUDA
``max_memory_allocated``), or every row in this process with ``--in-process``. With
``--max-pass-s``, a row whose pass, predicted from the same row at an earlier case
(scaled by :func:`work`), would take longer is not run, and the row gives the
prediction: CIRKD's quadratic cost outgrows a CPU quickly. Below
the table the script states its targets and whether this run met them: ``cirkd_loss``
within 1.5x of its matmul bound from 64 x 64 up and at least 10x lighter than the dense
reading at 64 x 64, and no memory-linear form slower than its dense reading. The command
and the machine are at the table's foot.

Run from the repository root:

    python benchmarks/methods.py                 # the default cases, on the CPU
    python benchmarks/methods.py --quick         # one small case, a smoke test
    python benchmarks/methods.py --sizes 2x256x64x64 2x256x128x128 --markdown t.md
    python benchmarks/methods.py --device cuda --in-process   # one CUDA context
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, NamedTuple, TypeAlias

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segdistill import (
    CIRKDMemory,
    HolisticLoss,
    MGDLoss,
    adaptation_loss,
    affinity_loss,
    attach_discriminator_loss,
    attention_transfer_loss,
    cwd_loss,
    dist_loss,
    fitnet_loss,
    ifvd_loss,
    kd_loss,
    pairwise_loss,
)

sys.path.append(str(Path(__file__).resolve().parent))  # for the affinity benchmark's helpers
import affinity
from affinity import GB, MB, Shape

Form: TypeAlias = Literal["", "linear", "dense"]
"""A row's form: '' for a loss without a dense reading, else 'linear' or 'dense'."""
Products: TypeAlias = list[tuple[Shape, Shape]]

NUM_CLASSES = 19  # Cityscapes
IGNORE_INDEX = 255
CIRKD_TEMPERATURE = 0.1  # the reference's, and the library's default
# (B, C, H, W): 64 x 64 maps; CIRKD's Cityscapes crop (512 x 1024) at output stride 8, with
# its 512-channel features; 128 x 128; a whole 1024 x 2048 frame at output stride 8.
CASES: list[tuple[int, int, int, int]] = [
    (4, 256, 64, 64),
    (2, 512, 64, 128),
    (2, 256, 128, 128),
    (2, 256, 128, 256),
]
# 64 x 64 is the smallest map HolisticLoss takes; one image keeps CIRKD's B^2 N^2 small
QUICK_CASES = [(1, 8, 64, 64)]
# Autograd keeps, of the B^2 N x N float32 maps of dense_cirkd_loss, the student's
# log-softmax, the teacher's, the elementwise KL and, backward, their gradients: about
# 5 maps at the peak (measured: 4.8 at B = 2, 64 x 64); this errs on the safe side.
DENSE_CIRKD_MAPS = 6.0


@dataclass(frozen=True)
class Case:
    """One row: a shape, a method and its form, as handed to a worker subprocess."""

    batch: int
    channels: int
    height: int
    width: int
    method: str
    form: Form
    device: str
    repeats: int
    threads: int

    @property
    def n(self) -> int:
        return self.height * self.width

    @property
    def label(self) -> str:
        return f"{self.batch}, {self.channels}, {self.height}x{self.width}"


class Inputs(NamedTuple):
    """A method's inputs: the student's map (requires grad), the teacher's, labels."""

    student: Tensor
    teacher: Tensor
    labels: Tensor


class Loss(NamedTuple):
    """One forward pass of a method, and the module whose gradients it accumulates."""

    forward: Callable[[], Tensor]
    module: nn.Module | None = None


@dataclass(frozen=True)
class Method:
    """A table's method: what it takes, its forward pass, and for a relational loss its
    dense reading, its products and its dense reading's memory estimate."""

    takes: Literal["features", "logits"]
    build: Callable[[Inputs], Loss]
    dense: Callable[[Inputs], Loss] | None = None
    products: Callable[[Case], Products] | None = None
    dense_bytes: Callable[[Case], int] | None = None
    pairs: Literal["none", "image", "batch"] = "none"
    """What a relational loss relates: the positions of each image (N x N per image) or
    of the whole batch (CIRKD: B^2 N^2)."""
    min_side: int = 1


# ---------------------------------------------------------------- CIRKD's mini-batch term


def cirkd() -> ModuleType | None:
    """``segdistill.losses.cirkd``, or None where this checkout does not have it yet."""
    try:
        return importlib.import_module("segdistill.losses.cirkd")
    except ImportError:
        return None


def dense_cirkd_loss(student: Tensor, teacher: Tensor,
                     temperature: float = CIRKD_TEMPERATURE) -> Tensor:
    """CIRKD's mini-batch term read plainly: the B^2 N x N relation maps of every ordered
    pair of images at once, each row's softmax over the keys, the KL divergence summed
    over the pairs' rows over B^2 N (the reference's ``kl_div(..., 'batchmean')`` per
    pair, averaged over the pairs)."""
    s = F.normalize(student.flatten(2), dim=1)  # (B, C, N)
    t = F.normalize(teacher.flatten(2), dim=1)
    batch, _, n = s.shape
    log_q = F.log_softmax(torch.einsum("icn,jcm->ijnm", s, s) / temperature, dim=-1)
    log_p = F.log_softmax(torch.einsum("icn,jcm->ijnm", t, t) / temperature, dim=-1)
    return F.kl_div(log_q, log_p, reduction="sum", log_target=True) / (batch**2 * n)


def _cirkd_loss(student: Tensor, teacher: Tensor) -> Tensor:
    module = cirkd()
    if module is None:  # the driver skips these rows; a worker should never get here
        raise RuntimeError("segdistill.losses.cirkd is absent")
    loss: Tensor = module.cirkd_loss(student, teacher, temperature=CIRKD_TEMPERATURE)
    return loss


def _dense_cirkd(x: Inputs) -> Loss:
    # the two readings agree (on a crop, in no time) before the dense one is timed
    crop = x.student.detach()[..., :8, :8], x.teacher[..., :8, :8]
    with torch.no_grad():
        torch.testing.assert_close(dense_cirkd_loss(*crop), _cirkd_loss(*crop),
                                   rtol=1e-4, atol=1e-6)
    return Loss(lambda: dense_cirkd_loss(x.student, x.teacher))


def cirkd_products(case: Case) -> Products:
    """The operand shapes of every product ``cirkd_loss`` runs for ``case`` (equal channel
    counts C, teacher frozen): per tile of R query rows and K keys of the library's own
    tiling, the teacher's and the student's (R, C) x (C, K) logits forward, the same two
    recomputed backward, and the student's gradients, (R, K) x (K, C) for the queries
    and (K, R) x (R, C) for the keys."""
    module = cirkd()
    assert module is not None
    b, c, n = case.batch, case.channels, case.n
    products: Products = []
    for _, _, _, (rows, images, keys) in module._tiles(b * n, n, b, module._BLOCK_SIZE):
        width = images * keys
        logits = ((1, rows, c), (1, c, width))
        products += [logits] * 4 + [((1, rows, width), (1, width, c)),
                                    ((1, width, rows), (1, rows, c))]
    return products


def cirkd_dense_bytes(case: Case) -> int:
    return int(DENSE_CIRKD_MAPS * case.batch**2 * case.n**2 * 4)


# ---------------------------------------------------------------- the methods


def _affinity_case(case: Case, loss: str) -> affinity.Case:
    method: Literal["linear", "dense"] = "linear" if case.form == "linear" else "dense"
    return affinity.Case(case.batch, case.channels, case.height, case.width, method, "l2",
                        case.device, case.repeats, loss)


def _mgd(x: Inputs) -> Loss:
    c = x.student.shape[1]
    module = MGDLoss(c, c).to(x.student.device)
    return Loss(lambda: module(x.student, x.teacher), module)


def _cirkd_memory(x: Inputs) -> Loss:
    c = x.student.shape[1]
    module = CIRKDMemory(c, c, NUM_CLASSES).to(x.student.device)
    return Loss(lambda: module(x.student, x.teacher, x.labels), module)


def _holistic(x: Inputs) -> Loss:
    module = HolisticLoss(NUM_CLASSES).to(x.student.device)

    def forward() -> Tensor:  # the generator term; one backward also trains D
        return attach_discriminator_loss(module(x.student, x.teacher),
                                         module.discriminator_loss(x.student, x.teacher))

    return Loss(forward, module)


METHODS: dict[str, Method] = {
    "kd_loss": Method("logits", lambda x: Loss(lambda: kd_loss(x.student, x.teacher))),
    "cwd_loss": Method("logits", lambda x: Loss(lambda: cwd_loss(x.student, x.teacher))),
    "fitnet_loss": Method("features",
                          lambda x: Loss(lambda: fitnet_loss(x.student, x.teacher))),
    "attention_transfer_loss": Method(
        "features", lambda x: Loss(lambda: attention_transfer_loss(x.student, x.teacher))),
    "adaptation_loss": Method("features",
                              lambda x: Loss(lambda: adaptation_loss(x.student, x.teacher))),
    "affinity_loss": Method(
        "features",
        lambda x: Loss(lambda: affinity_loss(x.student, x.teacher, method="linear")),
        dense=lambda x: Loss(lambda: affinity_loss(x.student, x.teacher, method="dense")),
        products=lambda case: affinity.matmul_products(_affinity_case(case, "affinity")),
        dense_bytes=lambda case: affinity.dense_need_bytes(_affinity_case(case, "affinity")),
        pairs="image"),
    "pairwise_loss": Method(
        "features",
        lambda x: Loss(lambda: pairwise_loss(x.student, x.teacher, method="linear")),
        dense=lambda x: Loss(lambda: pairwise_loss(x.student, x.teacher, method="dense")),
        products=lambda case: affinity.matmul_products(_affinity_case(case, "pairwise")),
        dense_bytes=lambda case: affinity.dense_need_bytes(_affinity_case(case, "pairwise")),
        pairs="image"),
    "dist_loss": Method("logits", lambda x: Loss(lambda: dist_loss(x.student, x.teacher))),
    "MGDLoss": Method("features", _mgd),
    "ifvd_loss": Method("features", lambda x: Loss(
        lambda: ifvd_loss(x.student, x.teacher, x.labels, num_classes=NUM_CLASSES))),
    "cirkd_loss": Method("features",
                         lambda x: Loss(lambda: _cirkd_loss(x.student, x.teacher)),
                         dense=_dense_cirkd, products=cirkd_products,
                         dense_bytes=cirkd_dense_bytes, pairs="batch"),
    "CIRKDMemory": Method("features", _cirkd_memory),
    "HolisticLoss": Method("logits", _holistic, min_side=64),
}


def forms(method: Method) -> tuple[Form, ...]:
    return ("linear", "dense") if method.dense is not None else ("",)


def work(case: Case) -> float:
    """A row's cost in arbitrary units, to predict its time from a smaller case's: its
    largest products (B N C for a loss linear in N, B N C^2 for the C x C Grams of the
    linear relational forms, B N^2 C for N x N maps per image, B^2 N^2 C for CIRKD's)."""
    method = METHODS[case.method]
    b, n = case.batch, case.n
    c = case.channels if method.takes == "features" else NUM_CLASSES
    if method.pairs == "batch":
        return b * b * n * n * c
    if method.pairs == "image":
        return b * n * n * c if case.form == "dense" else b * n * c * c
    return b * n * c


# ---------------------------------------------------------------- worker side


def _inputs(case: Case, takes: str) -> Inputs:
    torch.manual_seed(0)
    channels = NUM_CLASSES if takes == "logits" else case.channels
    shape = (case.batch, channels, case.height, case.width)
    student = torch.randn(shape, device=case.device, requires_grad=True)
    teacher = torch.randn(shape, device=case.device)
    grid = (case.batch, case.height, case.width)
    labels = torch.randint(0, NUM_CLASSES, grid, device=case.device)
    labels[torch.rand(grid, device=case.device) < 0.1] = IGNORE_INDEX
    return Inputs(student, teacher, labels)


def _make_step(case: Case) -> Callable[[], None]:
    """Build the inputs (and modules) and return one forward + backward pass over them."""
    method = METHODS[case.method]
    x = _inputs(case, method.takes)
    build = method.dense if case.form == "dense" and method.dense is not None else \
        method.build
    loss = build(x)

    def step() -> None:
        torch.autograd.backward(loss.forward())
        x.student.grad = None  # each pass allocates its gradients afresh, as in training
        if loss.module is not None:
            loss.module.zero_grad(set_to_none=True)

    return step


def measure(case: Case, fresh: bool = True) -> dict[str, float]:
    """Time and peak extra memory of one row in this process; for a linear form also its
    matmul bound."""
    method = METHODS[case.method]
    products = method.products(case) if case.form == "linear" and method.products else None
    return affinity.measure_step(_make_step(case), case.device, case.repeats, fresh, products)


# ---------------------------------------------------------------- driver side


def run_row(case: Case, args: argparse.Namespace,
            earlier: tuple[Case, float] | None = None) -> dict[str, Any]:
    """Measure one row in a fresh subprocess (or with ``--in-process`` in this one), unless
    it cannot run here: CIRKD's module is absent, the maps are too small, a dense reading
    would not fit ``--memory-budget-gb`` (then the result is its estimated need), or the
    pass, predicted from the same row's seconds at an ``earlier`` case, would take longer
    than ``--max-pass-s`` (then the result is the prediction)."""
    method = METHODS[case.method]
    if case.method == "cirkd_loss" and cirkd() is None:
        return {"status": "skipped (segdistill/losses/cirkd.py is not in this checkout)"}
    if min(case.height, case.width) < method.min_side:
        return {"status": f"skipped (needs maps of at least {method.min_side} x "
                          f"{method.min_side})"}
    if case.form == "dense" and method.dense_bytes is not None:
        need = method.dense_bytes(case)
        if need > args.memory_budget_gb * GB:
            return {"status": "not run", "need_bytes": need}
    if earlier is not None:
        predicted = earlier[1] * work(case) / work(earlier[0])
        if predicted > args.max_pass_s:
            return {"status": "not run", "predicted_seconds": predicted,
                    "predicted_from": earlier[0].label}
    if args.in_process:
        return affinity.measure_here(lambda: measure(case, fresh=False), case.device)
    return affinity.run_worker(__file__, asdict(case), args.timeout_s)


TABLE_HEAD = (
    "| case (B, C, HxW) | N | method | form | time fwd+bwd (s) | peak extra memory (MB) "
    "| matmul bound (s) | time / bound | dense / linear: time | dense / linear: memory |\n"
    "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"
)


def table_row(case: Case, result: dict[str, Any], linear: dict[str, Any] | None) -> str:
    """One Markdown row; a dense row carries its time and memory over the linear row's,
    or, where it was not run, the memory it would need."""
    head = f"| {case.label} | {case.n:,} | {case.method} | {case.form or '-'} | "
    if "predicted_seconds" in result:
        return (head + f"not run: ~{result['predicted_seconds']:,.0f} s a pass (predicted "
                f"from {result['predicted_from']}) |  |  |  |  |  |")
    if result["status"] == "not run":
        need = result["need_bytes"]
        ratio = ""
        if linear is not None and linear["status"] == "ok":
            ratio = f"~{need / max(linear['peak_extra_bytes'], MB):,.0f} (estimate)"
        return (head + f"not run: over the memory budget | ~{need / MB:,.0f} (estimate) "
                f"|  |  |  | {ratio} |")
    if result["status"] != "ok":
        return head + f"{result['status']} |  |  |  |  |  |"
    memory = result["peak_extra_bytes"]
    cells = [f"{result['seconds']:.3f}", "n/a" if math.isnan(memory) else f"{memory / MB:,.0f}"]
    if "bound_seconds" in result:
        cells += [f"{result['bound_seconds']:.3f}", f"{result['bound_ratio']:.2f}"]
    else:
        cells += ["", ""]
    cells += list(affinity.ratios(result, linear)) if case.form == "dense" else ["", ""]
    return head + " | ".join(cells) + " |"


Row: TypeAlias = tuple[Case, dict[str, Any]]


def _dense_pairs(rows: Sequence[Row], method: str) -> list[tuple[Case, dict[str, Any],
                                                                  dict[str, Any]]]:
    """(case, linear result, dense result) of ``method`` wherever both were measured or
    estimated."""
    by_key = {(c.label, c.method, c.form): r for c, r in rows}
    return [(c, r, by_key[(c.label, c.method, "dense")]) for c, r in rows
            if c.method == method and c.form == "linear" and r["status"] == "ok"
            and (c.label, c.method, "dense") in by_key]


def _verdict(failures: Sequence[str], evidence: Sequence[str]) -> str:
    if not evidence:
        return "not measured in this run"
    return ("MISSED" if failures else "met") + f" ({'; '.join(evidence)})"


def targets(rows: Sequence[Row]) -> list[str]:
    """The targets' lines, each with the figures that decide it."""
    bound = [(c, r) for c, r in rows if c.method == "cirkd_loss" and c.form == "linear"
             and r["status"] == "ok" and min(c.height, c.width) >= 64]
    bound_text = [f"{r['bound_ratio']:.2f} at {c.label}" for c, r in bound]
    bound_missed = [t for (_, r), t in zip(bound, bound_text, strict=True)
                    if r["bound_ratio"] > 1.5]

    light, light_missed = [], []
    for c, linear, dense in _dense_pairs(rows, "cirkd_loss"):
        if c.height != 64 or c.width != 64:
            continue
        if dense["status"] == "ok":
            ratio, how = dense["peak_extra_bytes"] / max(linear["peak_extra_bytes"], MB), ""
        elif "need_bytes" in dense:
            ratio, how = dense["need_bytes"] / max(linear["peak_extra_bytes"], MB), \
                ", dense estimated"
        else:
            continue
        light.append(f"{ratio:,.0f}x at {c.label}{how}")
        if ratio < 10:
            light_missed.append(light[-1])

    fast, slow = [], []
    for method in (m for m, spec in METHODS.items() if spec.dense is not None):
        for c, linear, dense in _dense_pairs(rows, method):
            if dense["status"] == "ok":
                fast.append(f"{method} {dense['seconds'] / linear['seconds']:.1f}x faster "
                            f"at {c.label}")
                if linear["seconds"] > dense["seconds"]:
                    slow.append(fast[-1])
    return ["Targets:", "",
            "- cirkd_loss within 1.5x of its matmul bound from 64 x 64 up: "
            + _verdict(bound_missed, bound_text),
            "- cirkd_loss at least 10x lighter than its dense reading at 64 x 64: "
            + _verdict(light_missed, light),
            "- the memory-linear forms never slower than the dense reading: "
            + _verdict(slow, fast)]


def parse_case(text: str) -> tuple[int, int, int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)x(\d+)x(\d+)", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected BxCxHxW, e.g. 2x256x64x64, got {text!r}")
    b, c, h, w = (int(v) for v in match.groups())
    return b, c, h, w


def run_all(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    """Measure every row, print the table row by row (rewriting ``--json`` and
    ``--markdown`` after each case, the foot included); the raw results and the lines."""
    lines: list[str] = []

    def emit(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    foot = ["", affinity.header(args.device)]
    emit(f"Every distillation loss, forward + backward, teacher frozen; C is the features' "
         f"channels (the logit losses take K = {NUM_CLASSES})\n")
    emit(TABLE_HEAD)
    raw: list[dict[str, Any]] = []
    rows: list[Row] = []
    cases = QUICK_CASES if args.quick else args.sizes or CASES
    earlier: dict[tuple[str, Form], tuple[Case, float]] = {}  # each row's last measured
    for b, c, h, w in cases:
        for name, method in METHODS.items():
            if args.methods and name not in args.methods:
                continue
            linear = None
            for form in forms(method):
                case = Case(b, c, h, w, name, form, args.device, args.repeats, args.threads)
                result = run_row(case, args, earlier.get((name, form)))
                if result["status"] == "ok":
                    earlier[(name, form)] = (case, result["seconds"])
                linear = result if form == "linear" else linear
                rows.append((case, result))
                raw.append({**asdict(case), "n": case.n, **result})
                emit(table_row(case, result, linear))
        affinity.write_outputs(args, raw, [*lines, "", *targets(rows), *foot])
    for line in ["", *targets(rows), *foot]:
        emit(line)
    affinity.write_outputs(args, raw, lines)
    return raw, lines


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="'cpu' (default) or 'cuda'")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes (default 3)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch's CPU threads (default: torch's own); one is steadier on "
                        "a machine that others share")
    parser.add_argument("--sizes", nargs="+", type=parse_case, metavar="BxCxHxW",
                        help="these cases (batch, channels, map), e.g. 2x256x64x64; default: "
                        + " ".join("x".join(map(str, c)) for c in CASES))
    parser.add_argument("--quick", action="store_true",
                        help="one small case (1x8x64x64), a smoke test")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), metavar="METHOD",
                        help=f"only these methods, of: {', '.join(METHODS)}")
    parser.add_argument("--memory-budget-gb", type=float, default=16.0,
                        help="do not run a dense reading estimated to need more than this "
                        "(default 16); its row gives the estimate")
    parser.add_argument("--max-pass-s", type=float, default=float("inf"),
                        help="do not run a row whose pass, predicted from the same row at an "
                        "earlier case, would take longer than this (default: no limit); its "
                        "row gives the prediction")
    parser.add_argument("--timeout-s", type=float, default=3600.0,
                        help="give up on one row after this long (default 3600; not with "
                        "--in-process)")
    parser.add_argument("--in-process", action="store_true",
                        help="measure every row in this process (one CUDA context) instead "
                        "of one subprocess each")
    parser.add_argument("--json", metavar="PATH", help="also write the raw results here")
    parser.add_argument("--markdown", metavar="PATH",
                        help="also write the table here, with the command and the machine")
    parser.add_argument("--plot", metavar="PATH", help="also plot time and memory (PNG)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        case = Case(**json.loads(args.worker))
        torch.set_num_threads(case.threads)
        print(json.dumps(measure(case)))
        return
    torch.set_num_threads(args.threads)
    raw, _ = run_all(args)
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        named = [{**r, "method": f"{r['method']} {r['form']}".strip()} for r in raw]
        affinity.plot(named, args.plot, f"every loss on {args.device}, B and C as in the table")


if __name__ == "__main__":
    main()
