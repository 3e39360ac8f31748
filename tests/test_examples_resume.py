"""Runs that never lose work or mislead, each fault injected: a step gone non-finite (a
huge learning rate, a NaN loss, a NaN gradient, an inf buffer), an all-ignored batch,
a resume with other flags or another model, a second run on the folder, a torn log line,
a full disk while saving. Each test checks the message and that what was saved stays."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

pytest.importorskip("torchdata")
REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))  # for `examples`

from examples.segmentation import run as run_module  # noqa: E402
from examples.segmentation import stages  # noqa: E402
from examples.segmentation.config import CONFIGS, RESUME_SAFE, STAGE_FIELDS, PipelineConfig  # noqa: E402
from examples.segmentation.locks import folder_lock  # noqa: E402
from examples.segmentation.training import (  # noqa: E402
    TrainConfig,
    fit,
    load_model_state,
    remove_stale_temporaries,
)
from segdistill import load_checkpoint, save_checkpoint  # noqa: E402


def _data(n: int = 8, ignored: bool = False) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    labels = (torch.full((n, 8, 8), 255) if ignored
              else torch.randint(0, 4, (n, 8, 8), generator=generator))
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=generator), labels)


class _Faulty(nn.Module):
    """A BN-free segmenter that, from its third forward on, makes one thing non-finite:
    its logits ('loss'), a gradient ('gradient', sqrt at 0 times 0) or a buffer
    ('buffer', as batch-norm statistics that overflowed)."""

    def __init__(self, fault: str | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.zero = nn.Parameter(torch.zeros(()))
        self.register_buffer("statistic", torch.zeros(()))
        self.fault, self.calls = fault, 0

    def forward(self, x):
        self.calls += 1
        y = self.conv(x) + 0.0 * self.zero
        if self.calls >= 3 and self.fault == "loss":
            y = y * float("nan")
        if self.calls >= 3 and self.fault == "gradient":
            y = y + torch.sqrt(self.zero) * 0.0
        if self.calls >= 3 and self.fault == "buffer":
            self.statistic.fill_(float("inf"))
        return y


def _config(tmp_path: Path, **values) -> TrainConfig:
    return TrainConfig(**{"steps": 6, "batch_size": 2, "lr": 0.1, "progress": False,
                          "checkpoint_path": str(tmp_path / "stage" / "checkpoint.pt"),
                          "checkpoint_every": 1, **values})


def _all_finite(state) -> bool:
    return all(bool(v.isfinite().all()) for v in state.values() if v.is_floating_point())


@pytest.mark.parametrize("fault,match", [
    ("loss", r"step 3: the loss became nan, from ce = nan; the run stops before its backward "
             r"pass"),
    ("gradient", r"step 3: the gradients became non-finite \(1 tensors: 'zero'\), the loss "
                 r"being [\d.]+; the run stops before its update was applied"),
    ("buffer", r"step 3: the model's weights went non-finite \(1 tensors: 'statistic'\), "
               r"the loss being [\d.]+; the run stops before they were saved"),
])
def test_a_non_finite_step_stops_before_anything_of_it_is_saved(tmp_path, fault, match):
    config = _config(tmp_path)
    model = _Faulty(fault)
    with pytest.raises(FloatingPointError, match=match) as caught:
        fit(model, _data(), config)
    path = config.checkpoint_path
    assert re.search(rf"the checkpoint {re.escape(path)} of step 2, the last finite state, "
                     r"is kept\. To go on, lower the learning rate \(--lr, now 0\.1\)",
                     str(caught.value))
    state = load_checkpoint(path)
    assert state["step"] == 2 and _all_finite(state["model"])
    if fault == "gradient":  # the update was not applied: the weights are step 2's
        assert torch.equal(model.conv.weight, state["model"]["conv.weight"])
    resumed = fit(_Faulty(), _data(), config, resume=True)  # the kept state goes on
    assert [row["step"] for row in resumed] == [1, 2, 3, 4, 5, 6]


def test_a_huge_learning_rate_never_saves_non_finite_weights(tmp_path):
    run = _digits_run(tmp_path, lr=1e6, student_steps=20)  # the run
    with pytest.raises(FloatingPointError, match=r"step (\d+): ") as caught:
        stages.train_student(run)
    failed = int(re.match(r"step (\d+)", str(caught.value)).group(1))
    assert "lower the learning rate (--lr, now 1e+06)" in str(caught.value)
    state = load_checkpoint(run.out / "student" / "checkpoint.pt")
    assert failed > 1 and state["step"] == failed - 1
    assert _all_finite(state["model"])
    assert all(_all_finite(s) for s in state["optimizer"]["state"].values())
    assert not (run.out / "student" / "model.pt").exists()


def test_a_non_finite_first_step_blames_the_inputs_not_the_learning_rate(tmp_path):
    images, labels = _data().tensors
    images[0, 0, 0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"step 1: the loss became nan.* no checkpoint "
                                                 r"of this run was written\. To go on, this is "
                                                 r"the first step, before any update: check the "
                                                 r"inputs"):
        fit(_Faulty(), TensorDataset(images, labels), _config(tmp_path))
    assert not Path(_config(tmp_path).checkpoint_path).exists()


def test_a_batch_without_counted_pixels_contributes_zero(tmp_path):
    model = _Faulty()
    history = fit(model, _data(ignored=True), _config(tmp_path, steps=2))
    assert [row["ce"] for row in history] == [0.0, 0.0]
    assert _all_finite(model.state_dict())


# ---- resume: the checkpoint records the run's settings -----------------------------------

def test_a_resume_with_other_settings_is_refused_and_the_checkpoint_stays(tmp_path):
    config = _config(tmp_path, steps=4)
    fit(_Faulty(), _data(), config, stop_after=2)
    saved = Path(config.checkpoint_path).read_bytes()
    for values, match in [
        ({"lr": 0.5}, r"  lr: 0\.1 in the checkpoint, 0\.5 now\n"),
        ({"batch_size": 4}, r"  batch_size: 2 in the checkpoint, 4 now\n"),
        ({"num_workers": 1}, r"  num_workers: 0 in the checkpoint, 1 now\n"),
        ({"steps": 8}, r"  steps: 4 in the checkpoint, 8 now\n.*planned for 4 steps \(the "
                       r"learning rate reaches 0 at step 4\), and a resume continues it; it "
                       r"cannot re-plan it for 8: to train 8 steps, start the stage afresh"),
    ]:
        with pytest.raises(ValueError, match=rf"cannot resume from "
                                             rf"{re.escape(config.checkpoint_path)}: it was "
                                             rf"written with other settings(?s:.*){match}"):
            fit(_Faulty(), _data(), _config(tmp_path, **{"steps": 4, **values}), resume=True)
        assert Path(config.checkpoint_path).read_bytes() == saved
    # where and how often the run is kept and shown may change
    history = fit(_Faulty(), _data(), _config(tmp_path, steps=4, checkpoint_every=3,
                                              log_every=2), resume=True)
    assert [row["step"] for row in history] == [1, 2, 3, 4]


def _digits_run(tmp_path, **values):
    config = CONFIGS["digits"].override(**{
        "scenes": (8, 6), "workers": 0, "batch_size": 4, "log_every": 1,
        "checkpoint_every": 1, "student_steps": 3, **values})
    return run_module.Run(config, None, tmp_path / "runs", torch.device("cpu"), progress=False)


def test_the_pipeline_refuses_changed_flags_naming_them(tmp_path):
    run = _digits_run(tmp_path)
    stages.train_student(run_module.Run(run.config, None, run.out, run.device, stop_after=1,
                                        progress=False))
    path = run.out / "student" / "checkpoint.pt"
    saved = path.read_bytes()

    def resume(**values):
        stages.train_student(run_module.Run(run.config.override(**values), None, run.out,
                                            run.device, resume=True, progress=False))

    with pytest.raises(ValueError, match=rf"cannot resume from {re.escape(str(path))}(?s:.*)"
                                         r"  --batch-size: 4 in the checkpoint, 8 now\n"
                                         r"  --lr: 0\.05 in the checkpoint, 0\.5 now\n"
                                         r"  --student-steps: 3 in the checkpoint, 6 now\n"):
        resume(lr=0.5, batch_size=8, student_steps=6)
    # a model that does not fit: named by the flag, not torch's size mismatch
    with pytest.raises(ValueError, match=r"  --num-classes: 11 in the checkpoint, 12 now"):
        resume(num_classes=12)
    assert path.read_bytes() == saved
    # safe flags, and the flags of other stages, may change
    history = stages.train_student(run_module.Run(
        run.config.override(log_every=2, checkpoint_every=5, eval_batch_size=2,
                            teacher_steps=7, distill_steps=9, kd_temperature=2.0),
        None, run.out, run.device, resume=True, progress=False))
    assert [row["step"] for row in history] == [1, 2, 3]


def test_the_translator_stage_refuses_changed_flags_and_may_run_longer(tmp_path):
    run = _digits_run(tmp_path, translator_steps=1, teacher_steps=1)
    stages.train_teacher(run)
    stages.train_translator_stage(run)
    path = run.out / "translator" / "checkpoint.pt"
    recorded = load_checkpoint(path)["settings"]
    assert recorded["--translator-lr"] == run.config.translator_lr
    assert "--translator-steps" not in recorded and "--student-steps" not in recorded
    saved = path.read_bytes()

    def resume(**values):
        return stages.train_translator_stage(run_module.Run(
            run.config.override(**values), None, run.out, run.device, resume=True,
            progress=False))

    with pytest.raises(ValueError, match=r"(?s)cannot resume from .*checkpoint\.pt.*"
                                         r"  --batch-size: 4 in the checkpoint, 2 now"
                                         r".*  --translator-lr: 0\.1 in the checkpoint, 0\.5 now"):
        resume(translator_lr=0.5, batch_size=2)
    assert path.read_bytes() == saved
    # more steps continue the run; other stages' flags may change
    assert len(resume(translator_steps=2, student_steps=9)) == 2


def test_resume_records_name_real_fields_and_leave_out_the_safe_ones(tmp_path):
    names = {f.name for f in PipelineConfig.__dataclass_fields__.values()}
    assert set(RESUME_SAFE) <= names and set(STAGE_FIELDS) <= names
    run = _digits_run(tmp_path)
    student, distill = (run_module.resume_record(run, kind) for kind in ("student", "distill"))
    assert "--lr" in student and "--student-steps" in student and "--workers" in student
    assert not {"--teacher-steps", "--distill-steps", "--kd-temperature", "--log-every",
                "--checkpoint-every", "--threads"} & set(student)
    assert "--distill-steps" in distill and "--student-steps" not in distill
    assert run_module.train_config(run, "ablation/seed0/kd", 3, "distill").record == distill


def test_a_model_that_does_not_fit_names_the_checkpoint(tmp_path):
    state = nn.Conv2d(3, 5, 1).state_dict()
    with pytest.raises(ValueError, match=r"the checkpoint ckpt\.pt holds a model that does not "
                                         r"fit this one \(weight: \(5, 3, 1, 1\) in the "
                                         r"checkpoint, \(4, 3, 1, 1\) here; bias: \(5,\) in the "
                                         r"checkpoint, \(4,\) here\); pass --num-classes"):
        load_model_state(nn.Conv2d(3, 4, 1), state, "ckpt.pt", "pass --num-classes")
    path = tmp_path / "student" / "model.pt"
    save_checkpoint({"model": state}, path)
    with pytest.raises(ValueError, match=rf"the checkpoint {re.escape(str(path))} holds a model "
                                         r"that does not fit.*--num-classes"):
        run_module.load_weights(nn.Conv2d(3, 4, 1), path, "student model")


# ---- one run per stage folder -------------------------------------------------------------

def _holder(folder: Path) -> subprocess.Popen:
    """Another process that holds ``folder``'s lock until it is killed."""
    code = ("import sys, time\nfrom examples.segmentation.locks import folder_lock\n"
            "with folder_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_on_a_folder_fails_and_a_dead_runs_lock_is_taken_over(tmp_path):
    run = _digits_run(tmp_path, student_steps=1)
    folder = run.out / "student"
    other = _holder(folder)
    try:
        in_flight = folder / f".checkpoint.pt.{other.pid}.abcd1234.tmp"  # its save, under way
        in_flight.write_bytes(b"\0" * 64)
        (folder / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
        with pytest.raises(RuntimeError, match=rf"{re.escape(str(folder))} is in use by another "
                                               rf"run: pid {other.pid} on .*; its lock is "
                                               rf"{re.escape(str(folder / 'run.lock'))}"):
            stages.train_student(run)
        assert in_flight.exists()  # the other run's work is untouched
        assert (folder / "log.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
        assert remove_stale_temporaries(folder / "checkpoint.pt") == []  # a live writer's
    finally:
        other.send_signal(signal.SIGKILL)
        other.wait()
    with pytest.warns(RuntimeWarning, match=rf"taking over the stale lock .*: its run \(pid "
                                            rf"{other.pid} on"):
        stages.train_student(run)
    assert not in_flight.exists() and (folder / "model.pt").is_file()
    assert not (folder / "run.lock").exists()  # released at the end


def test_the_lock_is_released_when_a_stage_fails(tmp_path):
    with pytest.raises(KeyError), folder_lock(tmp_path) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        raise KeyError("boom")
    assert not lock.exists()
    lock.write_text("not json")
    with pytest.raises(RuntimeError, match=r"which names no process \(unreadable\)"), \
            folder_lock(tmp_path):
        pass


# ---- the log -------------------------------------------------------------------------------

def test_a_torn_last_log_line_is_dropped_with_a_warning(tmp_path):
    log = tmp_path / "stage" / "log.jsonl"
    config = _config(tmp_path, steps=4, log_path=str(log), log_every=1)
    straight = fit(_Faulty(), _data(), _config(tmp_path / "straight", steps=4))
    fit(_Faulty(), _data(), config, stop_after=2)
    with log.open("a") as f:
        f.write('{"step": 3, "lr": 0.0')  # killed mid-write
    with pytest.warns(RuntimeWarning, match=rf"{re.escape(str(log))}: dropping its torn last "
                                            r"line 3"):
        resumed = fit(_Faulty(), _data(), config, resume=True)
    assert resumed == straight
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]


def test_a_corrupt_log_line_names_the_file(tmp_path):
    log = tmp_path / "stage" / "log.jsonl"
    config = _config(tmp_path, steps=4, log_path=str(log), log_every=1)
    fit(_Faulty(), _data(), config, stop_after=2)
    checkpoint = Path(config.checkpoint_path).read_bytes()
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], "{garbage", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(log))}, line 2, is not a log row "
                                         r".*repair or delete that file"):
        fit(_Faulty(), _data(), config, resume=True)
    assert Path(config.checkpoint_path).read_bytes() == checkpoint


# ---- saving --------------------------------------------------------------------------------

class _FullDisk:
    """A file whose writes fail with ENOSPC once ``room`` bytes are written."""

    def __init__(self, file, room: int) -> None:
        self.file, self.room = file, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def test_a_full_disk_while_saving_says_so_and_keeps_the_previous_checkpoint(tmp_path,
                                                                           monkeypatch):
    config = _config(tmp_path, steps=4)
    real, saves = os.fdopen, []

    def fdopen(fd, *args, **kwargs):
        saves.append(fd)
        file = real(fd, *args, **kwargs)
        return _FullDisk(file, 1000) if len(saves) >= 3 else file  # the disk fills at save 3

    monkeypatch.setattr(os, "fdopen", fdopen)
    path = config.checkpoint_path
    with pytest.raises(OSError, match=rf"no space left on device while saving "
                                      rf"{re.escape(path)}; the previous checkpoint is "
                                      r"intact$") as caught:
        fit(_Faulty(), _data(), config)
    assert caught.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 2
    assert not list(Path(path).parent.glob(".*.tmp"))
    with pytest.raises(OSError, match=r"while saving .*new\.pt; nothing was written there"):
        monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: _FullDisk(real(fd, *a, **k), 10))
        save_checkpoint({"x": torch.ones(100)}, tmp_path / "new.pt")
    assert not (tmp_path / "new.pt").exists()


def test_the_folder_is_synced_after_the_rename(tmp_path, monkeypatch):
    import stat

    real, synced = os.fsync, []

    def fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    save_checkpoint({"x": torch.ones(1)}, tmp_path / "a.pt")
    assert synced == [False, True]  # the file, then its folder
