"""DistributedDataParallel over gloo on the CPU: 2 processes == 1 process on the same batch."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from models import task_and_distillation_loss, tiny_batch, tiny_pair
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from segdistill import FeatureSpec, Translator, presets

WORLD = 2


def _build():
    torch.manual_seed(0)
    teacher, student = tiny_pair()
    wrapper = presets.knowledge_adaptation(
        teacher, student, teacher_layer="relu", student_layer=FeatureSpec("relu", channels=6),
        translator=Translator(12, latent_channels=6),
    )
    # BN in eval mode: with per-rank batch statistics the two runs would differ by
    # construction (SyncBatchNorm is the tool for that); gradients must still match
    wrapper.eval()
    return wrapper



def _grads(wrapper):
    return {n: p.grad.clone() for n, p in wrapper.named_parameters() if p.requires_grad}


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        wrapper = _build()
        ddp = DistributedDataParallel(wrapper)
        x, y = tiny_batch()
        shard = slice(rank * 2, rank * 2 + 2)
        for _ in range(2):  # a second step fails if any parameter went unused in the first
            ddp.zero_grad()
            task_and_distillation_loss(ddp, x[shard], y[shard]).backward()
        torch.save(_grads(wrapper), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_gradients_equal_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    single = _build()
    x, y = tiny_batch()
    task_and_distillation_loss(single, x, y).backward()
    expected = _grads(single)
    assert expected, "no trainable parameters"
    for rank in range(WORLD):
        grads = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert grads.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(grads[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_export_student_unwraps_a_ddp_student(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0,
                            world_size=1)
    try:
        teacher, student = tiny_pair()
        wrapper = presets.attention_transfer(
            teacher, DistributedDataParallel(student), teacher_layer="relu",
            student_layer="relu", resize="teacher")
        x, y = tiny_batch()
        task_and_distillation_loss(wrapper, x, y).backward()
        assert student.stem.weight.grad is not None
        exported = wrapper.export_student()
    finally:
        dist.destroy_process_group()
    assert type(exported) is nn.Sequential
    assert list(exported.state_dict()) == list(student.state_dict())  # no 'module.' prefix
    assert not any(m._forward_hooks for m in exported.modules())
