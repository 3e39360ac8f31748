"""benchmarks/gpu_check.py in its quick mode (CPU, gloo), and its precision shim."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchvision")
pytest.importorskip("torchmetrics")
pytest.importorskip("torchdata")

REPO = Path(__file__).resolve().parent.parent


def _load():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" /
                                                  "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("precision, expected", [
    ("fp32", "False torch.float32 False"),
    ("bf16", "True torch.bfloat16 False"),
    ("tf32", "False torch.float32 True"),
])
def test_the_precision_shim_reaches_every_python_process(tmp_path, precision, expected):
    gpu_check = _load()
    (tmp_path / "sitecustomize.py").write_text(gpu_check.SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), gpu_check.PRECISION_ENV: precision}
    probe = ("import torch; x = torch.ones(2, 2); print(torch.is_autocast_enabled('cpu'), "
             "(x @ x).dtype, torch.backends.cuda.matmul.allow_tf32)")
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[0] == expected


@pytest.mark.slow
def test_the_quick_mode_writes_every_table(tmp_path):
    out = tmp_path / "check"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--quick", "--out",
         str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
        check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert "# GPU check, quick (CPU, gloo)" in summary
    for part in ("losses", "pipeline, digits", "torchrun, digits"):
        assert f"| {part} | ok |" in summary
    affinity = (out / "affinity.md").read_text()
    assert "## affinity, bf16 autocast" in affinity
    assert "| 4, 256, 32x32 | 1,024 | fused |" in affinity
    pipeline = (out / "pipeline-digits.md").read_text()
    assert "| distill | distillation step (paper) | head | fp32 |" in pipeline
    assert "| distill, part | translator encoder | head | fp32 |" in pipeline
    assert "distillation step / (teacher forward + student step) = " in pipeline
    torchrun = (out / "torchrun-digits.md").read_text()
    assert "| distill-paper |" in torchrun and '"torchscript"' in torchrun
    assert (out / "runs" / "digits" / "distill-paper" / "export" / "student.pt2").is_file()
