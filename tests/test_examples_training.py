"""The reference pipeline's training and evaluation for real GPUs, checked on the CPU:
collectives on the run's device, the translator stage under torchrun, weight decay per
model, sync BN's default, validation with a best checkpoint, gradient accumulation,
evaluation under autocast at the evaluation size, and the checkpoint errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("torchvision")
pytest.importorskip("torchmetrics")
pytest.importorskip("torchdata")

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))

from examples.segmentation import evaluation, stages  # noqa: E402
from examples.segmentation import run as run_module  # noqa: E402
from examples.segmentation.cli import parser  # noqa: E402
from examples.segmentation.config import CONFIGS, from_flags  # noqa: E402
from examples.segmentation.training import TrainConfig, fit  # noqa: E402
from segdistill import save_checkpoint  # noqa: E402

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce",
               "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter", "all_to_all",
               "all_to_all_single", "broadcast_object_list", "all_gather_object")


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _digits_run(tmp_path, **config):
    values = {"scenes": (8, 6), "eval_batch_size": 3, "workers": 0, "batch_size": 4,
              "log_every": 1, "checkpoint_every": 1000, **config}
    return run_module.Run(CONFIGS["digits"].override(**values), None, tmp_path / "runs",
                          torch.device("cpu"), progress=False)


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def _device_checked_collectives(monkeypatch, device: torch.device) -> list[torch.device]:
    """Replace every collective by one that refuses a tensor off ``device``, as NCCL refuses
    CPU tensors; returns the devices it saw."""
    seen: list[torch.device] = []
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def checked(*args, _original=original, _name=name, **kwargs):
            for tensor in _tensors([*args, *kwargs.values()]):
                seen.append(tensor.device)
                if tensor.device != device:
                    raise RuntimeError(f"{_name}: a tensor on {tensor.device}, the process's "
                                       f"device is {device} (NCCL: no backend for it)")
            return _original(*args, **kwargs)

        monkeypatch.setattr(dist, name, checked)
    return seen


def test_evaluation_reduces_only_tensors_on_the_run_device(tmp_path, monkeypatch,
                                                          one_process_group):
    run = _digits_run(tmp_path)
    model = run_module.build_student(run).eval()
    val = run_module.dataset(run, train=False)
    seen = _device_checked_collectives(monkeypatch, run.device)

    class Loader(DataLoader):  # the loader's own seed (the one CPU tensor it makes)
        def __iter__(self):
            with torch.device("cpu"):
                return super().__iter__()

    monkeypatch.setattr(evaluation, "DataLoader", Loader)
    # Every tensor made without an explicit device lands on "meta" here, not on the CPU:
    # one that the evaluation built on the default device instead of the run's (the CPU
    # confusion counts that NCCL rejects) would reach a collective off run.device.
    with torch.device("meta"):
        values = evaluation.evaluate_model(run, model, val)
    assert seen and set(seen) == {run.device}  # the confusion counts were reduced, there
    monkeypatch.undo()
    dist.destroy_process_group()
    plain = evaluation.evaluate_model(run, model, val)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store2'}", rank=0,
                            world_size=1)
    assert torch.equal(values["miou"], plain["miou"])


def test_the_device_check_catches_a_cpu_tensor(monkeypatch, one_process_group):
    _device_checked_collectives(monkeypatch, torch.device("meta"))  # stands for "cuda"
    with pytest.raises(RuntimeError, match="a tensor on cpu"):
        dist.all_reduce(torch.zeros(3))


def test_the_translator_trains_at_the_global_batch_with_a_timeout(tmp_path, monkeypatch):
    run = _digits_run(tmp_path, translator_steps=2, translator_timeout=90.0)
    stages.train_teacher(run.with_config(teacher_steps=1))
    run = run_module.Run(run.config, None, run.out, run.device, rank=0, world_size=2,
                         progress=False)
    calls: dict[str, object] = {}
    fake = SimpleNamespace(  # a process group of 2 as stages sees it
        is_initialized=lambda: True,
        new_group=lambda timeout: calls.setdefault("timeout", timeout),
        barrier=lambda group=None: calls.setdefault("barrier", group),
        destroy_process_group=lambda group=None: None)
    monkeypatch.setattr(stages, "dist", fake)
    real = stages.train_translator

    def spy(teacher, loader, *args, **kwargs):
        calls["batch"] = loader.batch_size
        return real(teacher, loader, *args, **kwargs)

    monkeypatch.setattr(stages, "train_translator", spy)
    stages.train_translator_stage(run)
    assert calls["batch"] == run.config.batch_size  # the global batch, not 4 // 2
    assert calls["timeout"].total_seconds() == 90 * 60
    assert calls["barrier"] == calls["timeout"]  # the barrier of the group with the timeout


def test_weight_decay_per_model_and_norm_bias_exemption(tmp_path, monkeypatch):
    run = _digits_run(tmp_path, teacher_weight_decay=1e-4, weight_decay=4e-5,
                      decay_norm_bias=False)
    assert CONFIGS["voc"].teacher_weight_decay == 1e-4 and CONFIGS["voc"].weight_decay == 4e-5
    assert run_module.train_config(run, "teacher", 1).weight_decay == 1e-4
    assert run_module.train_config(run, "student", 1).weight_decay == 4e-5
    assert run_module.train_config(run, "distill-knowledge_adaptation", 1).weight_decay == 4e-5
    groups = []

    class BuiltError(Exception):
        pass

    def sgd(params, **kwargs):
        groups.extend(params)
        raise BuiltError

    monkeypatch.setattr(torch.optim, "SGD", sgd)
    with pytest.raises(BuiltError):
        fit(run_module.build_student(run), run_module.dataset(run, True),
            run_module.train_config(run, "student", 1))
    decays = {g["weight_decay"]: len(g["params"]) for g in groups}
    assert set(decays) == {4e-5, 0.0} and decays[0.0] > 0


def test_sync_bn_defaults_to_on_with_several_cuda_processes(tmp_path):
    config = from_flags(parser().parse_args(["student", "--dataset", "voc"]), "voc")
    assert config.sync_bn is None  # auto
    off = from_flags(parser().parse_args(["student", "--dataset", "voc", "--no-sync-bn"]),
                     "voc")
    assert off.sync_bn is False

    def run(sync_bn, world, device):
        return run_module.Run(CONFIGS["voc"].override(sync_bn=sync_bn), None, tmp_path,
                              torch.device(device), world_size=world)
    assert run_module.sync_bn_enabled(run(None, 2, "cuda"))
    assert not run_module.sync_bn_enabled(run(None, 1, "cuda"))
    assert not run_module.sync_bn_enabled(run(None, 2, "cpu"))  # gloo: SyncBatchNorm needs CUDA
    assert not run_module.sync_bn_enabled(run(False, 2, "cuda"))
    assert run_module.sync_bn_enabled(run(True, 2, "cuda"))


def test_validation_every_k_steps_keeps_the_best(tmp_path):
    run = _digits_run(tmp_path, val_every=2, student_steps=4)
    stages.train_student(run)
    rows = [json.loads(line) for line in
            (run.out / "student" / "val.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    best = torch.load(run.out / "student" / "best.pt", weights_only=True)
    top = max(rows, key=lambda r: r["miou"])
    assert best["miou"] == top["miou"] and best["step"] == top["step"]
    model = run_module.build_student(run)
    model.load_state_dict(best["model"])
    again = evaluation.evaluate_model(run, model.eval(), run_module.dataset(run, train=False))
    assert float(again["miou"]) == pytest.approx(top["miou"])


class _Pixelwise(nn.Module):
    """A BN-free segmenter, so that a step's gradient is a plain mean over its samples."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def test_accumulating_two_batches_equals_one_double_batch(tmp_path):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(16, 3, 8, 8, generator=generator)
    labels = torch.randint(0, 4, (16, 8, 8), generator=generator)  # no ignored pixel
    data = TensorDataset(images, labels)
    weights = []
    for batch, accumulate in ((4, 1), (2, 2)):
        model = _Pixelwise()
        history = fit(model, data, TrainConfig(steps=3, batch_size=batch, accumulate=accumulate,
                                               lr=0.1, progress=False))
        weights.append((model.conv.weight.detach().clone(), [h["loss"] for h in history]))
    assert len(weights[1][1]) == 3
    assert torch.allclose(weights[0][0], weights[1][0], atol=1e-6)
    assert weights[0][1] == pytest.approx(weights[1][1], abs=1e-6)


def test_accumulate_splits_the_global_batch(tmp_path):
    run = _digits_run(tmp_path, batch_size=16, accumulate=4)
    assert run_module.train_config(run, "student", 1).batch_size == 4
    with pytest.raises(ValueError, match="does not split"):
        run_module.train_config(_digits_run(tmp_path, batch_size=16, accumulate=3), "student", 1)


def test_evaluation_under_autocast_at_the_evaluation_size(tmp_path, monkeypatch):
    run = _digits_run(tmp_path, amp="bf16", crop=48, eval_batch_size=2)
    stages.train_student(run.with_config(student_steps=1, amp="none"))
    dtypes = []
    real = F.interpolate

    def spy(x, *args, **kwargs):
        dtypes.append(x.dtype)
        return real(x, *args, **kwargs)

    monkeypatch.setattr(F, "interpolate", spy)
    result = evaluation.evaluate(run, "student", echo=False)
    assert torch.bfloat16 in dtypes  # the forward ran under autocast
    assert result["input"] == list(run_module.dataset(run, train=False)[0][0].shape[-2:])
    assert result["amp"] == "bf16"


def test_evaluation_size_is_the_val_image_not_the_crop(tmp_path):
    from test_examples import make_cityscapes

    root = make_cityscapes(tmp_path / "data")  # val images of 32 x 64
    run = run_module.Run(CONFIGS["cityscapes"].override(crop=16, pretrained=False, workers=0,
                                                    batch_size=2, student_steps=1,
                                                    eval_batch_size=1),
                     root, tmp_path / "runs", torch.device("cpu"), progress=False)
    stages.train_student(run)
    result = evaluation.evaluate(run, "student", echo=False)
    assert result["input"] == [32, 64]


def _fit_student(tmp_path, steps, resume=False, **kw):
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, 8, 8, generator=generator),
                         torch.randint(0, 4, (8, 8, 8), generator=generator))
    path = tmp_path / "stage" / "checkpoint.pt"
    return fit(_Pixelwise(), data, TrainConfig(steps=steps, batch_size=2, progress=False,
                                               checkpoint_path=str(path), **kw),
               resume=resume), path


def test_stale_temporary_checkpoints_are_removed(tmp_path):
    folder = tmp_path / "stage"
    folder.mkdir()
    stale = [folder / ".checkpoint.pt.abc123.tmp", folder / ".checkpoint.pt.x.tmp"]
    for path in stale:
        path.write_bytes(b"\0" * 100)
    other = folder / ".model.pt.keep.tmp"  # another file's: not ours to remove
    other.write_bytes(b"")
    _fit_student(tmp_path, 1)
    assert not any(p.exists() for p in stale) and other.exists()


def test_a_truncated_checkpoint_is_named(tmp_path):
    _, path = _fit_student(tmp_path, 2)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(RuntimeError, match=f"cannot read the checkpoint {path}"):
        _fit_student(tmp_path, 4, resume=True)


def test_resuming_a_finished_run_with_fewer_steps_says_so(tmp_path, capsys):
    _fit_student(tmp_path, 4)
    with pytest.raises(ValueError, match="at step 4, past the 2 steps"):
        _fit_student(tmp_path, 2, resume=True)
    history, _ = _fit_student(tmp_path, 4, resume=True)
    assert len(history) == 4
    assert "already at step 4 of 4" in capsys.readouterr().out


def test_checkpoint_helpers_keep_the_atomic_writer(tmp_path):
    save_checkpoint({"x": torch.ones(1)}, tmp_path / "a.pt")
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_two_process_torchrun_translator_validation_accumulation(tmp_path):
    import os
    import subprocess

    (tmp_path / "path").mkdir()
    (tmp_path / "path" / "examples").symlink_to(REPO / "examples")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path / "path"), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "OMP_NUM_THREADS": "1"}
    out = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", "29533", "-m", "examples.segmentation", "all", "--dataset",
         "digits", "--out", str(out), "--scenes", "16", "8", "--batch-size", "8",
         "--accumulate", "2", "--teacher-steps", "2", "--student-steps", "2",
         "--distill-steps", "2", "--translator-steps", "2", "--val-every", "1",
         "--translator-timeout", "5", "--eval-batch-size", "4", "--no-progress",
         "--device", "cpu"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("teacher", "student", "distill-knowledge_adaptation"):
        rows = (out / stage / "val.jsonl").read_text().splitlines()
        assert [json.loads(r)["step"] for r in rows] == [1, 2]
        assert (out / stage / "best.pt").is_file()
    assert (out / "translator" / "model.pt").is_file()
    assert "| distill-knowledge_adaptation |" in proc.stdout


def test_a_truncated_translator_checkpoint_is_named(tmp_path):
    run = _digits_run(tmp_path, translator_steps=1)
    stages.train_teacher(run.with_config(teacher_steps=1))
    path = run.out / "translator" / "checkpoint.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(RuntimeError, match=f"cannot read the checkpoint {path}"):
        stages.train_translator_stage(run_module.Run(run.config, None, run.out, run.device,
                                                 resume=True, progress=False))
