"""DDP and FSDP2 over gloo on the CPU: around the wrapper 2 processes train as 1 does; a
student wrapped on its own, with trainable parts outside it, is refused; plain copies."""

from __future__ import annotations

import copy
import os
from collections import OrderedDict

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from models import task_and_distillation_loss, tiny_batch, tiny_pair
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from segdistill import FeatureSpec, Translator, presets
from segdistill._distributed import plain_copy, student_wrapper_kind

fsdp = pytest.importorskip("torch.distributed.fsdp", reason="torch built without distributed")
device_mesh = pytest.importorskip("torch.distributed.device_mesh")
DTensor = pytest.importorskip("torch.distributed.tensor").DTensor

WORLD = 2
STEPS = 2
FSDP2 = "FSDP2 fully_shard"


# ---- shared pieces -------------------------------------------------------------------------

def _init(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)


@pytest.fixture
def one_process(tmp_path):
    """A 1-process gloo group, for wrappers that need one to exist (DDP, fully_shard)."""
    _init(0, 1, str(tmp_path / "init"))
    yield
    dist.destroy_process_group()


def _build(preset: str):
    torch.manual_seed(0)
    teacher, student = tiny_pair()
    if preset == "fitnet":  # its regressor lives in the loss, outside the student
        wrapper = presets.fitnet(teacher, student, teacher_layer=FeatureSpec("relu", channels=12),
                                 student_layer=FeatureSpec("relu", channels=6), resize="teacher")
    else:  # two adapters (with BN) outside the student, a frozen translator beside it
        wrapper = presets.knowledge_adaptation(
            teacher, student, teacher_layer="relu",
            student_layer=FeatureSpec("relu", channels=6),
            translator=Translator(12, latent_channels=6))
    # BN in eval mode: per-rank batch statistics differ from the full batch's by
    # construction (SyncBatchNorm is the tool for that); the updates must still match
    wrapper.eval()
    return wrapper



def _full(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, gathered when sharded (a collective under FSDP2)."""
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in module.named_parameters()}


def _train(wrapper, model, x, y, steps: int = STEPS) -> None:
    """SGD with momentum, so that the second step depends on the first one's gradients.
    The optimiser takes the parameters as they are now: after fully_shard (which swaps
    them for DTensor shards) or DDP."""
    optimizer = torch.optim.SGD(wrapper.trainable_parameters(), lr=0.5, momentum=0.9)
    for _ in range(steps):
        optimizer.zero_grad()
        task_and_distillation_loss(model, x, y).backward()
        optimizer.step()


def _single_process(preset: str) -> dict[str, torch.Tensor]:
    wrapper = _build(preset)
    _train(wrapper, wrapper, *tiny_batch())
    return _full(wrapper)


# ---- data parallel around the wrapper == one process ---------------------------------------

def _around_the_wrapper(wrapper, how: str) -> nn.Module:
    """Each recipe that puts the whole wrapper, adapters included, under one data-parallel
    wrapping; returns what to call."""
    if how == "ddp":
        return DistributedDataParallel(wrapper)
    mesh = device_mesh.init_device_mesh("cpu", (WORLD,))
    if how == "fsdp2 student, then root":
        fsdp.fully_shard(wrapper.student, mesh=mesh)
    ignored = set(wrapper.teacher.parameters()) if how == "fsdp2 root, teacher ignored" else None
    fsdp.fully_shard(wrapper, mesh=mesh, ignored_params=ignored)
    return wrapper


def _train_worker(rank: int, init_file: str, out_dir: str, preset: str, how: str,
                  export: bool) -> None:
    _init(rank, WORLD, init_file)
    try:
        wrapper = _build(preset)
        model = _around_the_wrapper(wrapper, how)
        x, y = tiny_batch()
        shard = slice(rank * 2, rank * 2 + 2)
        _train(wrapper, model, x[shard], y[shard])
        result = {"params": _full(wrapper)}
        if export:
            exported = wrapper.export_student()  # a collective under FSDP2: on every rank
            result["types"] = [type(m) for m in exported.modules()]
            result["tensor_types"] = {type(t) for t in exported.state_dict().values()}
            result["hooks"] = sum(len(m._forward_hooks) + len(m._forward_pre_hooks)
                                  for m in exported.modules())
            result["state"] = exported.state_dict()
            result["output"] = exported(x).detach()
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(worker, tmp_path, *args) -> list[dict]:
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path), *args), nprocs=WORLD,
             join=True)
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "how"), [
    ("fitnet", "ddp"),
    ("fitnet", "fsdp2 root"),
    ("knowledge_adaptation", "fsdp2 student, then root"),
    ("fitnet", "fsdp2 root, teacher ignored"),
])
def test_around_the_wrapper_two_processes_train_as_one(tmp_path, preset, how):
    results = _spawn(_train_worker, tmp_path, preset, how, False)
    expected = _single_process(preset)
    fresh = _build(preset)
    start = _full(fresh)
    trained = {n for n, p in fresh.named_parameters() if p.requires_grad}
    outside = [n for n in trained if not n.startswith("student.")]
    assert outside, "no trainable parameters outside the student: nothing to test"
    # the steps moved what is trained outside the student; the frozen parts (the
    # teacher, a translator) stayed as they were
    assert all(not torch.equal(expected[n], start[n]) for n in outside)
    assert all(torch.equal(expected[n], start[n]) for n in expected if n not in trained)
    for rank, result in enumerate(results):
        params = result["params"]
        assert params.keys() == expected.keys()
        for name, value in expected.items():
            assert params[name].shape == value.shape, name
            torch.testing.assert_close(params[name], value, rtol=1e-5, atol=1e-6,
                                       msg=f"rank {rank}: {name}")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["fsdp2 root", "fsdp2 student, then root"])
def test_export_student_of_a_sharded_wrapper_is_plain_and_full(tmp_path, how):
    # needs the wrapper's check (export_student through plain_copy)
    # root only: the student's modules keep their classes, its parameters are shards;
    # student too: its classes are FSDP's as well
    results = _spawn(_train_worker, tmp_path, "fitnet", how, True)
    single = _build("fitnet")
    x, y = tiny_batch()
    _train(single, single, x, y)
    expected = single.student.state_dict()
    for result in results:
        assert result["types"] == [type(m) for m in single.student.modules()]
        assert result["tensor_types"] == {torch.Tensor}
        assert result["hooks"] == 0
        assert list(result["state"]) == list(expected)
        for name, value in expected.items():
            torch.testing.assert_close(result["state"][name], value, rtol=1e-5, atol=1e-6,
                                       msg=name)
        torch.testing.assert_close(result["output"], single.student(x), rtol=1e-5, atol=1e-6)


# ---- a student wrapped on its own, with parts outside it: refused -------------------------

def _fitnet(student: nn.Module, teacher: nn.Module):
    return presets.fitnet(teacher, student, teacher_layer=FeatureSpec("relu", channels=12),
                          student_layer=FeatureSpec("relu", channels=6), resize="teacher")


def _refused(wrapper, kind: str) -> None:
    x, y = tiny_batch()
    with pytest.raises(ValueError) as raised:
        task_and_distillation_loss(wrapper, x, y)
    message = str(raised.value)
    for words in (kind, "all-reduce", "around the wrapper"):
        assert words in message, f"{words!r} not in the message: {message}"


def test_a_ddp_student_with_a_regressor_outside_it_is_refused(one_process):
    # needs the wrapper's check
    teacher, student = tiny_pair()
    _refused(_fitnet(DistributedDataParallel(student), teacher), "DistributedDataParallel")


def test_a_sharded_student_with_a_regressor_outside_it_is_refused(one_process):
    # needs the wrapper's check
    teacher, student = tiny_pair()
    wrapper = _fitnet(student, teacher)
    fsdp.fully_shard(wrapper.student, mesh=device_mesh.init_device_mesh("cpu", (1,)))
    _refused(wrapper, FSDP2)  # sharded after the wrapper was built: found at the forward


def test_a_ddp_student_with_nothing_outside_it_trains(one_process):
    # needs the wrapper's check (that it lets this through)
    teacher, student = tiny_pair()
    wrapper = presets.kd(teacher, DistributedDataParallel(student), resize="teacher")
    x, y = tiny_batch()
    out = wrapper(x, y)
    (out.loss + nn.functional.cross_entropy(out.output, y)).backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for p in student.parameters())


# ---- student_wrapper_kind ------------------------------------------------------------------

def test_student_wrapper_kind_names_the_wrapping(one_process):
    _, student = tiny_pair()
    assert student_wrapper_kind(student) is None
    assert student_wrapper_kind(nn.DataParallel(student)) is None  # one process: no all-reduce
    assert student_wrapper_kind(torch.compile(student)) is None
    ddp = DistributedDataParallel(student)
    assert student_wrapper_kind(ddp) == "DistributedDataParallel"
    assert student_wrapper_kind(torch.compile(ddp)) == "DistributedDataParallel"
    _, student = tiny_pair()
    outer = nn.Sequential(OrderedDict(body=student))
    fsdp.fully_shard(student.down, mesh=device_mesh.init_device_mesh("cpu", (1,)))
    assert student_wrapper_kind(outer) == FSDP2  # found inside
    assert student_wrapper_kind(torch.compile(outer)) == FSDP2
    assert student_wrapper_kind(student.head) is None


def test_student_wrapper_kind_without_distributed(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    _, student = tiny_pair()
    assert student_wrapper_kind(student) is None
    assert type(plain_copy(torch.compile(student))) is nn.Sequential


# ---- plain_copy ----------------------------------------------------------------------------

def _check_plain_copy(copied: nn.Module, original: nn.Module) -> None:
    assert copied is not original
    assert [type(m) for m in copied.modules()] == [type(m) for m in original.modules()]
    state, expected = copied.state_dict(), original.state_dict()
    assert list(state) == list(expected)  # no '_orig_mod.' or 'module.' prefix
    for name, value in expected.items():
        assert type(state[name]) is torch.Tensor, name
        assert torch.equal(state[name], value), name
        assert state[name].data_ptr() != value.data_ptr(), f"{name} is shared, not copied"


@pytest.mark.parametrize("wrap", ["plain", "compiled", "DataParallel", "compiled DataParallel"])
def test_plain_copy_unwraps(wrap):
    _, student = tiny_pair()
    model = nn.DataParallel(student) if "DataParallel" in wrap else student
    model = torch.compile(model) if "compiled" in wrap else model
    _check_plain_copy(plain_copy(model), student)


def test_plain_copy_unwraps_ddp(one_process):
    _, student = tiny_pair()
    _check_plain_copy(plain_copy(DistributedDataParallel(student)), student)


def test_plain_copy_keeps_the_users_hooks_only():
    _, student = tiny_pair()
    student.head.register_forward_hook(lambda module, args, output: output * 2)
    copied = plain_copy(student)
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(copied(x), student(x))  # the doubling hook came along, as in deepcopy


def test_plain_copy_rejects_what_is_no_module():
    with pytest.raises(TypeError, match=r"expected an nn\.Module, got dict"):
        plain_copy({"weight": torch.zeros(1)})


def _with_bn() -> nn.Module:
    """The tiny student with a BatchNorm after it (buffers) and a 5-channel head (shards
    of unequal size over 2 ranks)."""
    torch.manual_seed(0)
    _, student = tiny_pair()
    return nn.Sequential(OrderedDict(body=student, bn=nn.BatchNorm2d(5))).eval()


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def _sharded_copy_worker(rank: int, init_file: str, out_dir: str) -> None:
    _init(rank, WORLD, init_file)
    try:
        model = _with_bn()
        mesh = device_mesh.init_device_mesh("cpu", (WORLD,))
        for block in (model.body.stem, model.body.down, model.body, model):  # inner first
            fsdp.fully_shard(block, mesh=mesh)
        x, y = tiny_batch()
        shard = slice(rank * 2, rank * 2 + 2)
        _step(model, x[shard], y[shard])
        copied = plain_copy(model)
        before = _full(model)
        _step(model, x[shard], y[shard])  # the original still trains after the copy
        torch.save({
            "types": [type(m) for m in copied.modules()],
            "state": copied.state_dict(),
            "tensor_types": {type(t) for t in copied.state_dict().values()},
            "fsdp_hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks)
                              + len(m._load_state_dict_post_hooks) for m in copied.modules()),
            "fsdp_flags": [n for n, m in copied.named_modules()
                           if hasattr(m, "_is_fsdp_managed_module")],
            "kind": (student_wrapper_kind(model), student_wrapper_kind(copied)),
            "original_sharded": all(isinstance(p, DTensor) for p in model.parameters()),
            "original_moved": any(not torch.equal(before[n], p) for n, p in _full(model).items()),
            "output": copied(x).detach(),
            "copied_again": type(copy.deepcopy(copied)) is nn.Sequential,
        }, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_plain_copy_of_an_fsdp2_module_is_full_and_plain(tmp_path):
    results = _spawn(_sharded_copy_worker, tmp_path)
    single = _with_bn()
    x, y = tiny_batch()
    _step(single, x, y)
    expected = single.state_dict()
    for rank, result in enumerate(results):
        assert result["types"] == [type(m) for m in single.modules()]  # no FSDP<Name>
        assert result["tensor_types"] == {torch.Tensor}  # no DTensor
        assert result["fsdp_hooks"] == 0 and result["fsdp_flags"] == []
        assert result["kind"] == (FSDP2, None)
        assert result["copied_again"]
        assert result["original_sharded"] and result["original_moved"]
        state = result["state"]
        assert list(state) == list(expected)
        for name, value in expected.items():
            assert state[name].shape == value.shape, name
            torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6,
                                       msg=f"rank {rank}: {name}")
        torch.testing.assert_close(result["output"], single(x), rtol=1e-5, atol=1e-6)
