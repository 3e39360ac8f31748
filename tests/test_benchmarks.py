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


def _table_rows(markdown: str) -> list[list[str]]:
    """The cells of every body row of a Markdown table."""
    return [[cell.strip() for cell in line.strip("|").split("|")]
            for line in markdown.splitlines()
            if line.startswith("| ") and not line.startswith("| case")]


def _methods_run(tmp_path, *flags: str) -> tuple[str, list[dict]]:
    """Run benchmarks/methods.py in-process (one subprocess) with ``flags``; its Markdown
    and its raw results."""
    md, out = tmp_path / "t.md", tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "methods.py"), *flags, "--in-process", "--repeats",
         "1", "--markdown", str(md), "--json", str(out)],
        capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return md.read_text(), json.loads(out.read_text())


def _check_rows(text: str, raw: list[dict], case: str, skipped: set[str]) -> None:
    """A row per method and form, in order, each measured (but ``skipped`` and, where the
    checkout lacks it, cirkd_loss), linear rows with their bound, dense with ratios; the
    targets and, at the foot, the machine and the command."""
    methods = _load("methods")
    rows = _table_rows(text)
    expected = [(name, form or "-") for name, spec in methods.METHODS.items()
                for form in methods.forms(spec)]
    assert [(r[2], r[3]) for r in rows] == expected
    assert all(r[0] == case for r in rows)
    if methods.cirkd() is None:
        skipped = skipped | {"cirkd_loss"}
    for cells, result in zip(rows, raw):
        if cells[2] in skipped:
            assert result["status"].startswith("skipped ("), result
            continue
        assert result["status"] == "ok" and result["seconds"] > 0, result
        assert cells[4] == f"{result['seconds']:.3f}" and cells[5]
        if cells[3] == "linear":  # the matmul bound beside it
            assert result["bound_seconds"] > 0 and cells[6] and float(cells[7]) > 0
        if cells[3] == "dense":  # and its ratios to the linear row
            assert float(cells[8]) > 0 and cells[9]
    assert "Targets:" in text and "- cirkd_loss within 1.5x of its matmul bound" in text
    foot = text.rstrip().splitlines()[-1]
    assert foot.startswith("Machine: ") and "benchmarks/methods.py --" in foot


def test_methods_benchmark_has_a_row_per_method(tmp_path):
    text, raw = _methods_run(tmp_path, "--sizes", "2x4x16x16")
    _check_rows(text, raw, "2, 4, 16x16", skipped={"HolisticLoss"})  # under 64 x 64


@pytest.mark.slow
def test_methods_benchmark_quick_run_measures_every_method(tmp_path):
    text, raw = _methods_run(tmp_path, "--quick")
    _check_rows(text, raw, "1, 8, 64x64", skipped=set())


def test_methods_benchmark_gives_the_estimates_of_what_it_does_not_run(tmp_path):
    md = tmp_path / "t.md"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "methods.py"), "--sizes", "2x4x8x8", "2x4x16x16",
         "--methods", "affinity_loss", "HolisticLoss", "--in-process", "--repeats", "1",
         "--memory-budget-gb", "0", "--max-pass-s", "0", "--markdown", str(md)],
        capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {(r[0], r[2], r[3]): r for r in _table_rows(md.read_text())}
    assert rows[("2, 4, 8x8", "affinity_loss", "linear")][4] != ""
    dense = rows[("2, 4, 8x8", "affinity_loss", "dense")]
    assert dense[4] == "not run: over the memory budget" and dense[5].endswith("(estimate)")
    predicted = rows[("2, 4, 16x16", "affinity_loss", "linear")][4]
    assert predicted.startswith("not run: ~") and predicted.endswith(
        " s a pass (predicted from 2, 4, 8x8)")
    assert rows[("2, 4, 8x8", "HolisticLoss", "-")][4] == \
        "skipped (needs maps of at least 64 x 64)"


def test_dense_cirkd_reading_equals_the_library_loss_values_and_gradients():
    methods = _load("methods")
    module = methods.cirkd()
    if module is None:
        pytest.skip("segdistill/losses/cirkd.py is not in this checkout")
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 5, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 7, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    got, want = methods.dense_cirkd_loss(s, t), module.cirkd_loss(s, t)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, (s, t)), torch.autograd.grad(want, (s, t))):
        torch.testing.assert_close(a, b)


def test_cirkd_bound_times_the_products_the_library_runs():
    """Same multiply-add count as the library's own products, forward and backward, with
    a frozen teacher (as the affinity bound's test above)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    methods = _load("methods")
    module = methods.cirkd()
    if module is None:
        pytest.skip("segdistill/losses/cirkd.py is not in this checkout")

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.madds = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in ("mm", "addmm", "addmm_", "bmm"):
                a, b = args[-2], args[-1]
                self.madds += a.shape[-2] * a.shape[-1] * b.shape[-1]
            return func(*args, **(kwargs or {}))

    # 20 x 30 positions: query blocks, key tiles and images that do not divide evenly
    case = methods.Case(2, 8, 20, 30, "cirkd_loss", "linear", "cpu", 1, 1)
    student = torch.randn(2, 8, 20, 30, requires_grad=True)
    teacher = torch.randn(2, 8, 20, 30)
    with Count() as count:
        module.cirkd_loss(student, teacher).backward()
    expected = sum(a[0] * a[1] * a[2] * b[2] for a, b in methods.cirkd_products(case))
    assert count.madds == expected


@pytest.mark.parametrize("mode, sizes", [
    ("full", [(2, 512, 64, 128), (4, 256, 97, 97)]),  # Cityscapes' training crops, stride 8
    ("tiny", [(2, 16, 64, 64)]),
    ("quick", None),
])
def test_the_gpu_checks_methods_step_parses(tmp_path, mode, sizes):
    pytest.importorskip("numpy")
    gpu_check, methods = _load("gpu_check"), _load("methods")
    plan = gpu_check.make_plan(mode)
    command = gpu_check.methods_command(plan, tmp_path / "methods")
    assert command[1] == str(BENCHMARKS / "methods.py")
    args = methods.parse_args(command[2:])
    assert args.in_process and args.sizes == sizes and args.quick == (sizes is None)
    assert args.device == ("cuda" if mode == "full" else "cpu")
    assert (args.markdown, args.json) == (f"{tmp_path / 'methods'}.md",
                                          f"{tmp_path / 'methods'}.json")


def test_capture_benchmark_times_both_layers(tmp_path):
    pytest.importorskip("torchvision")
    md = tmp_path / "capture.md"
    bench = _load("capture")
    bench.main(["--batch", "1", "--size", "32", "--repeats", "1", "--markdown", str(md)])
    text = md.read_text()
    assert "| `layer2.1.bn2` | written in place later" in text and "| `layer2` |" in text
    assert "Command: `python benchmarks/capture.py --batch 1" in text


def _method_steps_run(tmp_path, *flags: str) -> tuple[str, list[dict]]:
    """Run benchmarks/method_steps.py (one subprocess) with ``flags``; its Markdown and its
    raw results."""
    md, out = tmp_path / "steps.md", tmp_path / "steps.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "method_steps.py"), *flags, "--repeats", "1",
         "--warmup", "1", "--threads", "1", "--markdown", str(md), "--json", str(out)],
        capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return md.read_text(), json.loads(out.read_text())


def test_method_steps_table_has_a_row_per_method_beside_the_student(tmp_path):
    pytest.importorskip("torchvision")
    pytest.importorskip("torchdata")
    text, raw = _method_steps_run(tmp_path, "--methods", "kd", "cirkd", "--batch", "4")
    assert "batch 4 of 48 x 48, teacher digits_os4, student digits_os8, 11 classes" in text
    rows = [r for r in _table_rows(text) if not r[0].startswith("method")]
    assert [r[0] for r in rows] == ["student (no teacher)", "kd", "cirkd"]
    assert [r["method"] for r in raw] == [r[0] for r in rows]
    student = raw[0]
    assert all(r["status"] == "ok" and r["seconds"] > 0 for r in raw), raw
    mb = 2**20
    for cells, result in zip(rows, raw):
        step, ratio, peak, extra, resident, _ = cells[1:]
        assert step == f"{result['seconds']:.4f}" and float(ratio) > 0
        assert peak == f"{result['peak_bytes'] / mb:,.1f}"
        assert resident == f"{result['resident_bytes'] / mb:,.1f}"
        # the step holds more than what is resident at its start: activations at least
        assert result["peak_bytes"] > result["resident_bytes"] > 0
        if result is not student:
            assert extra == f"{(result['peak_bytes'] - student['peak_bytes']) / mb:,.1f}"
            # the teacher's weights are resident beside the student's, and it runs too
            assert result["resident_bytes"] > student["resident_bytes"]
            assert result["peak_bytes"] > student["peak_bytes"]
    assert rows[0][2] == "1.00" and rows[0][4] == ""
    assert rows[1][6] == ""  # kd has no relational term
    # CIRKD's mini-batch term on the teacher's grid: 48 / 4 = 12
    assert rows[2][6].startswith("minibatch: ~") and rows[2][6].endswith(" at 4 x 12 x 12")
    assert raw[0]["dense"] == [] and raw[2]["dense"] == [rows[2][6]]
    machine, load = text.rstrip().splitlines()[-3:][::2]
    assert machine.startswith("Machine: ") and "benchmarks/method_steps.py --methods" in machine
    assert load.startswith("Load average (1 min) ")


def test_method_steps_cpu_peak_is_the_most_tensor_bytes_held_at_once():
    pytest.importorskip("torchvision")
    pytest.importorskip("torchdata")
    bench = _load("method_steps")
    kept = torch.ones(1000)  # held before the step: not part of its rise

    def step() -> None:
        a = torch.empty(2**20)  # 4 MiB
        b = torch.ones(2**19)  # 2 MiB: 6 MiB held
        del a
        c = torch.zeros(3 * 2**18)  # 3 MiB: 5 MiB held
        del b, c
        kept.add_(1)

    assert bench.peak_rise_bytes(step, torch.device("cpu")) == 6 * 2**20


def test_method_steps_rows_of_a_method_that_did_not_fit_or_failed(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    pytest.importorskip("torchdata")
    bench = _load("method_steps")
    args = bench.parse_args(["--methods", "kd"])
    run = bench.Run(bench.SIZES["digits"].config(), None, tmp_path, torch.device("cpu"))
    student = {"status": "ok", "peak_bytes": 2**20}
    for error, status in [(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate"),
                           "did not fit"),
                          (ValueError("term 'kd': bad grids; pass resize="),
                           "failed (ValueError: term 'kd': bad grids)")]:
        def build(*_args, error=error):
            raise error

        monkeypatch.setattr(bench, "build", build)
        result, kept = bench.measure_row(run, bench.SIZES["digits"], "kd", None, args)
        assert result["status"] == status and kept is None
        assert bench.table_row("kd", result, student) == f"| kd | {status} |  |  |  |  |  |"
    shown = bench.table_row("cirkd", {"status": "did not fit", "dense": ["minibatch: x"]},
                            student)
    assert shown == "| cirkd | did not fit |  |  |  |  | minibatch: x |"


def test_method_steps_refuses_an_unknown_method():
    pytest.importorskip("torchvision")
    pytest.importorskip("torchdata")
    with pytest.raises(SystemExit):
        _load("method_steps").parse_args(["--methods", "kd+nope"])


@pytest.mark.parametrize("mode, size, image, methods", [
    ("full", "cityscapes", (512, 1024), None),  # CIRKD's setup per GPU, every method
    ("tiny", "cityscapes", (64, 64), ["kd", "cirkd"]),
    ("quick", "digits", (48, 48), None),
])
def test_the_gpu_checks_method_steps_part_parses(tmp_path, mode, size, image, methods):
    pytest.importorskip("numpy")
    pytest.importorskip("torchvision")
    pytest.importorskip("torchdata")
    gpu_check, bench = _load("gpu_check"), _load("method_steps")
    plan = gpu_check.make_plan(mode)
    (key,) = plan.method_steps
    command = gpu_check.steps_command(plan, key, tmp_path / "t.md", tmp_path / "r.json")
    assert command[1] == str(BENCHMARKS / "method_steps.py")
    args = bench.parse_args(command[2:])
    assert (args.size, args.image, args.device) == \
        (size, image, "cuda" if mode == "full" else "cpu")
    assert args.methods == (methods or bench.default_methods())
    assert (args.markdown, args.json) == (str(tmp_path / "t.md"), str(tmp_path / "r.json"))
    if mode == "full":
        assert args.batch == 2 and "steps-cityscapes" in plan.caps
