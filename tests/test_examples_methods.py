"""The pipeline's methods beyond one preset: the holistic term's discriminator in fit
(its own optimiser, checkpointed, resumed exactly), combinations joined by '+', and
several methods in one command (issue 20)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
pytest.importorskip("torchvision")
pytest.importorskip("torchdata")

from examples.segmentation.cli import main, parser
from examples.segmentation.methods import (
    COMBINATIONS,
    METHODS,
    check_method,
    needs_translator,
    parts,
)
from segdistill import load_checkpoint

DIGITS = ["--dataset", "digits", "--teacher-steps", "2", "--student-steps", "2",
          "--distill-steps", "2", "--scenes", "8", "4", "--batch-size", "4",
          "--eval-batch-size", "4", "--checkpoint-every", "1", "--log-every", "1",
          "--no-progress", "--device", "cpu", "--threads", "1"]


def _log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def test_method_names_and_combinations_are_checked():
    for method in ("kd", "cirkd+holistic", *COMBINATIONS):
        check_method(method)
    assert parts("ifvd+kd+holistic") == ["ifvd", "kd", "holistic"]
    assert needs_translator("kd+knowledge_adaptation") and not needs_translator("kd+cwd")
    for bad in ("kd+kd", "kd+nope", "nope"):
        with pytest.raises(ValueError, match="several distinct ones joined by"):
            check_method(bad)
    with pytest.raises(SystemExit):
        parser().parse_args(["distill", "--dataset", "digits", "--method", "kd+kd"])
    args = parser().parse_args(["distill", "--dataset", "digits", "--method", "kd", "cwd"])
    assert args.method == ["kd", "cwd"]


@pytest.mark.slow
def test_holistic_on_the_digits_trains_its_discriminator_and_resumes_exactly(tmp_path):
    """48 x 48 logits reach the discriminator upsampled to 64 x 64 (min_size)."""
    once, split = tmp_path / "once", tmp_path / "split"
    for out in (once, split):
        assert main(["teacher", *DIGITS, "--out", str(out)]) == 0
    assert main(["distill", "--method", "holistic", *DIGITS, "--out", str(once)]) == 0
    assert main(["distill", "--method", "holistic", *DIGITS, "--out", str(split),
                 "--stop-after", "1"]) == 0
    assert main(["distill", "--method", "holistic", *DIGITS, "--out", str(split),
                 "--resume"]) == 0
    a, b = _log(once / "distill-holistic"), _log(split / "distill-holistic")
    assert len(a) == 2 and {"ce", "holistic"} <= set(a[-1])
    assert a == b  # bit-identical histories: the discriminator's Adam state was restored
    state = load_checkpoint(once / "distill-holistic" / "checkpoint.pt")
    assert state["adversary"] is not None and state["adversary"]["state"]
    disc = [k for k in state["model"] if "discriminator" in k]
    assert disc, "the discriminator is in the checkpoint's model state"
    assert not any(k.startswith("teacher.") for k in state["model"])


@pytest.mark.slow
def test_a_combination_and_several_methods_in_one_command(tmp_path):
    out = tmp_path / "runs"
    assert main(["teacher", *DIGITS, "--out", str(out)]) == 0
    assert main(["distill", "--method", "ifvd+kd+holistic", "dist", *DIGITS,
                 "--out", str(out)]) == 0
    combined = _log(out / "distill-ifvd+kd+holistic")
    assert len(combined) == 2 and {"ifvd", "kd", "holistic", "ce"} <= set(combined[-1])
    assert {"dist", "ce"} <= set(_log(out / "distill-dist")[-1])


@pytest.mark.slow
def test_two_processes_train_a_memory_bank_and_a_discriminator(tmp_path):
    """torchrun with 2 gloo processes: CIRKD's memory queues are gathered from both ranks
    and the discriminator's gradients are all-reduced by DDP around the wrapper."""
    import os
    import subprocess

    out = tmp_path / "runs"
    assert main(["teacher", *DIGITS, "--out", str(out)]) == 0
    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "path").mkdir()
    (tmp_path / "path" / "examples").symlink_to(repo / "examples")
    path = os.pathsep.join(p for p in (str(tmp_path / "path"), os.environ.get("PYTHONPATH"))
                           if p)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", "29533", "-m", "examples.segmentation", "distill", "--method",
         "cirkd+holistic", *DIGITS, "--out", str(out)],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = _log(out / "distill-cirkd+holistic")
    assert len(log) == 2 and {"kd", "holistic", "ce"} <= set(log[-1])
    assert any(k.startswith("memory") or "memory" in k for k in log[-1]), log[-1]
    state = load_checkpoint(out / "distill-cirkd+holistic" / "checkpoint.pt")
    assert state["adversary"] is not None


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One teacher and one translator on the digit scenes, for every method's test."""
    out = tmp_path_factory.mktemp("digits") / "runs"
    assert main(["teacher", *DIGITS, "--out", str(out)]) == 0
    assert main(["translator", *DIGITS, "--translator-steps", "2", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_two_steps_on_the_digits(digits_run, method):
    assert main(["distill", "--method", method, *DIGITS, "--out", str(digits_run)]) == 0
    log = _log(digits_run / f"distill-{method}")
    assert len(log) == 2 and all(math.isfinite(v) for v in log[-1].values())
    assert len(set(log[-1]) - {"step", "lr", "loss", "ce"}) >= 1  # a distillation term


@pytest.mark.slow
def test_all_with_two_methods_on_the_digits(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["all", "--method", "kd", "cwd+holistic", *DIGITS,
                 "--translator-steps", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| distill-kd |" in printed and "| distill-cwd+holistic |" in printed
    assert not (out / "translator").exists()  # neither method needs it
    assert (out / "figures" / "digits.png").is_file()
