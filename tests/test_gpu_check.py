"""benchmarks/gpu_check.py: its quick mode (CPU, gloo), its tiny mode (the full mode's code
on the CPU), the full mode's commands as the scripts they run parse them, its time budget,
its bundle, and its precision shim."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("torchvision")
pytest.importorskip("torchmetrics")
pytest.importorskip("torchdata")

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))  # for `examples`


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}",
                                                  REPO / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _check(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
                          check=False)


@pytest.mark.parametrize("precision, expected", [
    ("fp32", "False torch.float32 False"),
    ("bf16", "True torch.bfloat16 False"),
    ("tf32", "False torch.float32 True"),
])
def test_the_precision_shim_reaches_every_python_process(tmp_path, precision, expected):
    gpu_check = _load("gpu_check")
    (tmp_path / "sitecustomize.py").write_text(gpu_check.SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), gpu_check.PRECISION_ENV: precision}
    probe = ("import torch; x = torch.ones(2, 2); print(torch.is_autocast_enabled('cpu'), "
             "(x @ x).dtype, torch.backends.cuda.matmul.allow_tf32)")
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[0] == expected


def _after(launcher: tuple[str, ...], command: list[str]) -> list[str]:
    """The arguments of ``command`` after the launcher's."""
    return command[command.index(launcher[-1]) + 1:]


@pytest.mark.parametrize("mode", ["full", "tiny"])
def test_every_command_of_the_full_and_tiny_modes_parses(tmp_path, mode):
    # the full mode runs only on a GPU: here its commands go through the parsers of the
    # scripts they run, and the configurations they make are the ones the check means
    from examples.segmentation.cli import parser
    from examples.segmentation.config import from_flags

    gpu_check, affinity, pipeline = _load("gpu_check"), _load("affinity"), _load("pipeline")
    plan = gpu_check.make_plan(mode)
    parts = [part.key for part, _ in gpu_check.schedule(plan)]
    assert parts == ["torchrun-voc", "pipeline-voc", "pipeline-cityscapes", "losses",
                     "steps-cityscapes", "torchrun-cityscapes"]
    assert plan.precisions == ("fp32", "bf16")
    assert gpu_check.make_plan(mode, ["tf32"]).precisions == ("tf32",)

    sizes = {"full": ["64x64", "128x128", "128x256"], "tiny": ["32x32"]}[mode]
    for loss, flags in plan.losses:
        args = affinity.parse_args(gpu_check.loss_command(plan, flags, tmp_path / loss)[2:])
        assert args.in_process and args.loss == loss and args.fused == (loss == "affinity")
        assert [f"{h}x{w}" for _, _, h, w, _ in affinity.selected_cases(args)] == sizes
        assert args.markdown == f"{tmp_path / loss}.md"

    pipelines = {"full": {"voc": ([513, 513], 8), "cityscapes": ([1024, 2048], 2)},
                 "tiny": {"voc": ([33, 33], 2), "cityscapes": ([33, 65], 2)}}[mode]
    for dataset, (size, batch) in pipelines.items():
        args = pipeline.parse_args(
            gpu_check.pipeline_command(plan, dataset, tmp_path / "t.md")[2:])
        assert (list(args.size), args.batch, args.networks) == (size, batch, "paper")
        assert args.classes == {"voc": None, "cityscapes": 19}[dataset]  # None: VOC's 21
        assert args.amp == "bf16" and args.teacher_layer == ["head", "backbone"]
        assert args.device == ("cuda" if mode == "full" else "cpu")

    # the full mode: VOC's crop (513) and batch 16, Cityscapes' crop (769) and batch 8
    crops = {"full": {"voc": (513, 16), "cityscapes": (769, 8)},
             "tiny": {"voc": (32, 2), "cityscapes": (32, 2)}}[mode]
    for tree in plan.trees:
        commands = gpu_check.torchrun_commands(plan, tree, tmp_path / "data", tmp_path / "r")
        stages = [parser().parse_args(_after(gpu_check.LAUNCHER, c)) for c in commands]
        assert [s.stage for s in stages] == ["all", "export"]
        assert stages[1].models == ["distill-knowledge_adaptation"]
        assert stages[1].formats == list(plan.formats)
        assert "onnx" in plan.formats or not gpu_check._has_onnx()
        for args in stages:
            config = from_flags(args, args.dataset)
            assert (args.dataset, args.root) == (tree.dataset, tmp_path / "data")
            assert (config.crop, config.batch_size) == crops[tree.dataset]
            assert (config.amp, config.pretrained, config.teacher_steps) == \
                ("bf16", False, plan.steps)
            assert args.device == (None if mode == "full" else "cpu")


def test_the_synthetic_trees_are_datasets_the_pipeline_reads(tmp_path):
    from examples.segmentation.data import cityscapes, voc

    gpu_check = _load("gpu_check")
    root = gpu_check.make_voc(tmp_path / "voc", (30, 40), 3, 2)
    train, val = voc(root, "train_aug", True, 24), voc(root, "val", False, 24)
    assert (len(train), len(val)) == (3, 2)
    image, label = val[0]  # the fourth image: VOC's sizes vary
    assert image.shape == (3, 30, 40 - 11) and label.shape == (30, 40 - 11)
    assert set(label.unique().tolist()) <= {0, 1, 2, 15, 255}
    root = gpu_check.make_cityscapes(tmp_path / "cityscapes", (16, 32), 2, 1)
    train, val = cityscapes(root, "train", True, 16), cityscapes(root, "val", False, 16)
    assert (len(train), len(val)) == (2, 1)
    image, label = val[0]
    assert image.shape == (3, 16, 32) and set(label.unique().tolist()) <= \
        {255, 0, 1, 2, 8, 11, 13, 18}


def test_a_command_over_the_budget_is_stopped_with_its_process_group(tmp_path, monkeypatch):
    gpu_check = _load("gpu_check")
    monkeypatch.setattr(gpu_check, "MIN_START_S", 0.5)
    monkeypatch.setattr(gpu_check, "KILL_GRACE_S", 2.0)
    args = gpu_check.parse_args(["--quick", "--out", str(tmp_path), "--budget-s", "3"])
    check = gpu_check.Check(args, gpu_check.make_plan("quick"), tmp_path)
    pid_file = tmp_path / "child.pid"
    # a child that ignores SIGTERM, in the command's process group: SIGKILL has to follow
    script = ("import signal, subprocess, sys, time; "
              "child = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
              "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)']); "
              f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(60)")
    part = gpu_check.Part("losses", "losses")
    start = time.perf_counter()
    status = check.run(part, [sys.executable, "-c", script], dict(os.environ))
    assert status.startswith("timed out after 3 s"), status
    assert time.perf_counter() - start < 15
    stat = Path(f"/proc/{pid_file.read_text()}/stat")
    time.sleep(0.5)
    # gone, or a zombie that only waits for init (which a container may not run) to reap it
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    assert "# timed out" in (tmp_path / "log.txt").read_text()
    assert check.run(part, [sys.executable, "-c", "pass"], dict(os.environ)).startswith(
        "skipped (time budget")


def _running(marker: str) -> list[str]:
    """The command lines of this machine's processes that mention ``marker``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # gone meanwhile
            continue
        if marker in text:
            found.append(text)
    return found


def test_a_stopped_check_stops_its_command_and_still_writes_the_summary(tmp_path):
    out, bundle = tmp_path / "check", tmp_path / "bundle"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--quick", "--out",
         str(out), "--bundle", str(bundle)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:  # until torchrun has started
        if "$ " in line and "torch.distributed.run" in line:
            break
    time.sleep(2)
    proc.terminate()
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == 143, rest[-3000:]
    summary = (bundle / "summary.md").read_text()
    assert "| torchrun, digits | interrupted |" in summary
    assert "| losses | pending | 0 | - |" in summary
    assert not _running(str(out))


def test_failure_lines_name_the_workers_error():
    gpu_check = _load("gpu_check")
    output = "\n".join([
        "some output", "[rank0]: Traceback (most recent call last):",
        '[rank0]:   File "stages.py", line 438, in export',
        "[rank0]: ValueError: the onnx export differs", "E1128 failed (exitcode: 1)",
        "Traceback (most recent call last):", '  File "run.py", line 994',
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
        "=" * 20, "Root Cause (first observed failure):", "  exitcode  : 1"])
    lines = gpu_check.failure_lines(output)
    assert lines[:4] == output.splitlines()[:4]
    assert lines[-1] == "  exitcode  : 1" and "..." in lines
    assert gpu_check.failure_lines("a\nb") == ["a", "b"]


def test_an_empty_budget_still_writes_the_summary_and_the_bundle(tmp_path):
    out, bundle = tmp_path / "check", tmp_path / "bundle"
    proc = _check("--quick", "--out", str(out), "--budget-s", "0", "--bundle", str(bundle),
                  cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    summary = (bundle / "summary.md").read_text()
    assert summary == (out / "summary.md").read_text()
    for part in ("torchrun, digits", "pipeline, digits", "losses", "method steps, digits"):
        assert f"| {part} | skipped (time budget: 0 s left) | 0 | - |" in summary
    with tarfile.open(bundle / "gpu-check.tar.gz") as tar:
        assert {"gpu-check/summary.md", "gpu-check/MANIFEST.txt"} <= set(tar.getnames())


@pytest.mark.slow
def test_the_quick_mode_writes_every_table(tmp_path):
    out, bundle = tmp_path / "check", tmp_path / "bundle"
    proc = _check("--quick", "--out", str(out), "--bundle", str(bundle), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "] torchrun, digits: ok (" in proc.stdout  # the progress lines
    summary = (out / "summary.md").read_text()
    assert "# GPU check, quick (CPU, gloo)" in summary
    for part in ("torchrun, digits", "pipeline, digits", "losses", "method steps, digits"):
        assert f"| {part} | ok |" in summary
    assert summary.index("| torchrun, digits |") < summary.index("| losses |") < \
        summary.index("| method steps, digits |")
    affinity = (out / "affinity.md").read_text()
    assert "## affinity, bf16 autocast" in affinity
    assert "| 4, 256, 32x32 | 1,024 | fused |" in affinity
    pipeline = (out / "pipeline-digits.md").read_text()
    assert "| distill | distillation step (paper) | head | fp32 |" in pipeline
    assert "| distill, part | translator encoder | head | fp32 |" in pipeline
    assert "distillation step / (teacher forward + student step) = " in pipeline
    torchrun = (out / "torchrun-digits.md").read_text()
    assert "| distill-knowledge_adaptation |" in torchrun and '"torchscript"' in torchrun
    steps = (out / "steps-digits.md").read_text()
    assert "batch 8 of 48 x 48, teacher digits_os4" in steps
    assert "| student (no teacher) |" in steps and "| cirkd+holistic |" in steps
    distilled = out / "runs" / "digits" / "distill-knowledge_adaptation"
    assert (distilled / "export" / "student.pt2").is_file()
    assert (bundle / "summary.md").read_text() == summary
    with tarfile.open(bundle / "gpu-check.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"gpu-check/summary.md", "gpu-check/affinity.md", "gpu-check/log.txt",
            "gpu-check/steps-digits.md", "gpu-check/raw/steps-digits.json",
            "gpu-check/raw/affinity-bf16.json", "gpu-check/runs/digits/figures/digits.png",
            "gpu-check/runs/digits/distill-knowledge_adaptation/export/export.json"} <= names
    assert not any(n.endswith((".pt", ".pt2")) for n in names)


@pytest.mark.slow
def test_the_tiny_mode_runs_the_full_modes_torchrun_part(tmp_path):
    # the full mode's torchrun part on its synthetic VOC tree, tiny: every stage, then the
    # export, ONNX included where it is installed
    out, bundle = tmp_path / "check", tmp_path / "bundle"
    proc = _check("--tiny", "--parts", "torchrun-voc", "--out", str(out), "--bundle",
                  str(bundle), "--budget-s", "600", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (bundle / "summary.md").read_text()
    assert "# GPU check, tiny (the full mode on the CPU, gloo)" in summary
    assert "| torchrun, voc | ok |" in summary and "| losses |" not in summary
    assert "--crop 32 --batch-size 2" in summary and "--root" in summary
    torchrun = (out / "torchrun-voc.md").read_text()
    assert "synthetic 48 x 48 images, 4 train, 2 val, 1 steps per stage" in torchrun
    assert "| teacher |" in torchrun and "| distill-knowledge_adaptation |" in torchrun
    onnx = _load("gpu_check")._has_onnx()
    assert ('"onnx"' in torchrun) == onnx and '"pt2"' in torchrun
    with tarfile.open(bundle / "gpu-check.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"gpu-check/torchrun-voc.md", "gpu-check/runs/voc/summary.md",
            "gpu-check/runs/voc/teacher/eval.json", "gpu-check/runs/voc/figures/voc.png"} \
        <= names
    assert not any(n.startswith("gpu-check/data/") for n in names)
