"""The benchmark scripts run, and the one-Gram form they time equals the library's loss."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segdistill import affinity_loss

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("shape_s, shape_t",
                         [((2, 5, 4, 6), (2, 3, 4, 6)), ((1, 8, 1, 7), (1, 8, 1, 7))])
def test_fused_form_equals_the_affinity_loss_values_and_gradients(shape_s, shape_t):
    fused = _load("affinity").fused_affinity_loss
    g = torch.Generator().manual_seed(0)
    s = torch.randn(shape_s, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(shape_t, generator=g, dtype=torch.float64, requires_grad=True)
    got, want = fused(s, t), affinity_loss(s, t, method="dense")
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, (s, t)), torch.autograd.grad(want, (s, t))):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_affinity_benchmark_quick_run_writes_its_tables(tmp_path):
    out = tmp_path / "r.json"
    md = tmp_path / "t.md"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "affinity.py"), "--quick", "--fused", "--repeats", "1",
         "--json", str(out), "--markdown", str(md)],
        capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert {r["method"] for r in rows} == {"dense", "linear", "fused"}
    assert all(r["status"] == "ok" and r["seconds"] > 0 for r in rows)
    assert "| 4, 256, 32x32 | 1,024 | fused |" in md.read_text()


def test_fused_flag_is_refused_for_other_losses():
    with pytest.raises(SystemExit):
        _load("affinity").parse_args(["--fused", "--loss", "pairwise"])


@pytest.mark.parametrize("loss, distance", [("affinity", "l2"), ("affinity", "squared"),
                                            ("pairwise", "squared")])
def test_matmul_bound_times_the_products_the_linear_path_runs(loss, distance):
    """The bound's products are the library's: same multiply-add count, forward and
    backward, teacher frozen (so the bound cannot be flattered by leaving some out)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from segdistill import pairwise_loss

    bench = _load("affinity")
    case = bench.Case(2, 8, 4, 5, "linear", distance, "cpu", 1, loss)

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.madds = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in ("bmm", "baddbmm", "baddbmm_"):
                a, b = args[-2], args[-1]
                self.madds += a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
            return func(*args, **(kwargs or {}))

    student = torch.randn(2, 8, 4, 5, requires_grad=True)
    teacher = torch.randn(2, 8, 4, 5)
    with Count() as count:
        if loss == "pairwise":
            pairwise_loss(student, teacher, method="linear").backward()
        else:
            affinity_loss(student, teacher, method="linear", distance=distance).backward()
    expected = sum(a[0] * a[1] * a[2] * b[2] for a, b in bench.matmul_products(case))
    assert count.madds == expected


def test_readme_affinity_table_is_the_committed_benchmark_table():
    """Every memory-linear row of the README's affinity table repeats the committed
    ``docs/benchmarks/affinity_cpu.md`` (written by the command the README gives)."""
    root = BENCHMARKS.parent
    readme = (root / "README.md").read_text()
    table = (root / "docs" / "benchmarks" / "affinity_cpu.md").read_text()
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in table.splitlines() if line.startswith("| ") and "| linear |" in line]
    assert len(rows) == 4
    for case, n, _, seconds, megabytes, bound, ratio, *_ in rows:
        b, c, size = case.split(", ")
        h, w = size.split("x")
        expected = (f"| {b}, {c}, {h} x {w} | {n} |", f"| {seconds} s, {megabytes} MB |",
                    f"| {bound} s | {ratio} |")
        line = next((x for x in readme.splitlines() if x.startswith(expected[0])), None)
        assert line is not None, f"no README row for {case}"
        assert expected[1] in line and line.endswith(expected[2]), (
            f"README row for {case} differs from docs/benchmarks/affinity_cpu.md: {line}")
