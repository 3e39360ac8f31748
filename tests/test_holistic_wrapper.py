"""The holistic (adversarial) term through the wrapper: two optimisers, one backward, DDP."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from segdistill import presets
from segdistill.losses.holistic import discriminator_optimizer


def _pair(k=4):
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, k, 1))
    student = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, k, 1))
    return teacher, student


def test_preset_parameters_split():
    wrapper = presets.holistic(*_pair(), num_classes=4, width=4)
    d = {id(p) for p in wrapper.terms["holistic"].loss.discriminator.parameters()}
    assert {id(p) for p in wrapper.separately_optimized_parameters()} == d
    trainable = {id(p) for p in wrapper.trainable_parameters()}
    assert not trainable & d
    assert trainable == {id(p) for p in wrapper.student.parameters()}


def test_one_step_trains_both_and_logs_the_generator_term():
    wrapper = presets.holistic(*_pair(), num_classes=4, width=4).train()
    x = torch.randn(2, 3, 64, 64)
    out = wrapper(x)
    # value: the weighted generator term only (the attached discriminator part is exactly 0)
    loss = out.losses["holistic"]
    assert loss.requires_grad
    with torch.no_grad():
        eval_twin = presets.holistic(*_pair(), num_classes=4, width=4).eval()
        eval_twin.load_state_dict(wrapper.state_dict())
        plain = eval_twin(x).losses["holistic"]  # no attachment in eval mode
    wrapper.eval()
    with torch.no_grad():
        assert torch.equal(wrapper(x).losses["holistic"], plain)
    wrapper.train()
    opt = torch.optim.SGD(wrapper.trainable_parameters(), lr=0.1)
    d_opt = discriminator_optimizer(wrapper.separately_optimized_parameters())
    (out.loss + out.output.mean()).backward()
    disc = wrapper.terms["holistic"].loss.discriminator
    assert all(p.grad is not None for p in disc.parameters())
    assert all(p.grad is not None for p in wrapper.student.parameters())
    before = disc.conv1.weight.detach().clone()
    opt.step()
    d_opt.step()
    assert not torch.equal(before, disc.conv1.weight)


def test_eval_and_no_grad_skip_the_discriminator_loss():
    wrapper = presets.holistic(*_pair(), num_classes=4, width=4).eval()
    x = torch.randn(2, 3, 64, 64)
    wrapper(x).loss.backward()
    disc = wrapper.terms["holistic"].loss.discriminator
    assert all(p.grad is None for p in disc.parameters())
    with torch.no_grad():
        assert wrapper.train()(x).loss.isfinite()


def test_conditional_preset_gets_the_images():
    wrapper = presets.holistic(*_pair(), num_classes=4, width=4, image_channels=3).train()
    out = wrapper(torch.randn(2, 3, 64, 64))
    assert out.loss.isfinite()
    assert wrapper.terms["holistic"].uses_inputs


def test_under_amp_grad_scaler_cpu_bf16():
    wrapper = presets.holistic(*_pair(), num_classes=4, width=4).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = wrapper(torch.randn(2, 3, 64, 64))
    assert out.loss.dtype == torch.float32
    out.loss.backward()


WORLD = 2


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        torch.manual_seed(0)
        wrapper = presets.holistic(*_pair(), num_classes=4, width=4).train()
        ddp = DistributedDataParallel(wrapper)  # find_unused_parameters=False
        opt = torch.optim.SGD(wrapper.trainable_parameters(), lr=0.01)
        d_opt = discriminator_optimizer(wrapper.separately_optimized_parameters())
        g = torch.Generator().manual_seed(rank)
        for _ in range(3):  # a later step fails if any parameter went unused
            x = torch.randn(2, 3, 64, 64, generator=g)
            out = ddp(x)
            (out.loss + out.output.mean()).backward()
            for optimizer in (opt, d_opt):
                optimizer.step()
                optimizer.zero_grad()
        torch.save({n: p.detach() for n, p in wrapper.named_parameters()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_stay_in_step(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name)
