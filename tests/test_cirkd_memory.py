"""CIRKD's memory term against a plain reference: the contrast loss, the queues, resuming, DDP."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from segdistill.losses.cirkd_memory import CIRKDMemory, _write, memory_contrast_loss

IGNORE = 255


def reference_contrast(s, t, bank, tau=0.1, kd_t=1.0):
    """Per-anchor loss written out, one anchor at a time (the teacher side detached; a
    zero vector, a pixel where the projector's ReLU is zero throughout, stays zero)."""
    losses = []
    for i in range(s.shape[0]):
        si = s[i] / s[i].norm().clamp_min(1e-8)
        ti = t[i].detach() / t[i].detach().norm()
        p = torch.softmax(bank @ ti / (tau * kd_t), 0)
        log_q = torch.log_softmax(bank @ si / (tau * kd_t), 0)
        losses.append((p * (p.log() - log_q)).sum() * kd_t**2)
    return torch.stack(losses)


def reference_projector(module, x):
    """1x1 conv, BatchNorm with the batch's statistics, ReLU, 1x1 conv, written out."""
    conv1, bn, _, conv2 = module.projector
    y = torch.einsum("oc,bchw->bohw", conv1.weight[:, :, 0, 0], x)
    mean = y.mean((0, 2, 3), keepdim=True)
    var = y.var((0, 2, 3), unbiased=False, keepdim=True)
    y = (y - mean) / torch.sqrt(var + bn.eps) * bn.weight[:, None, None] + bn.bias[:, None, None]
    return torch.einsum("oc,bchw->bohw", conv2.weight[:, :, 0, 0], y.clamp_min(0))


def reference_enqueue(pixel_q, pixel_ptr, region_q, region_ptr, t_unit, labels, classes):
    """The queue update one entry at a time, image by image, for a ``pixels_per_class``
    that takes every pixel: each class's pixels in raster order, then its unit mean."""
    pixel_q, region_q = pixel_q.clone(), region_q.clone()
    pixel_ptr, region_ptr = pixel_ptr.tolist(), region_ptr.tolist()
    for b in range(t_unit.shape[0]):
        for c in range(classes):
            mask = labels[b] == c
            if not mask.any():
                continue
            feats = t_unit[b][:, mask].T
            mean = feats.mean(0)
            region_q[c, region_ptr[c]] = mean / mean.norm()
            region_ptr[c] = (region_ptr[c] + 1) % region_q.shape[1]
            for f in feats:
                pixel_q[c, pixel_ptr[c]] = f
                pixel_ptr[c] = (pixel_ptr[c] + 1) % pixel_q.shape[1]
    return pixel_q, torch.tensor(pixel_ptr), region_q, torch.tensor(region_ptr)


def unit(x):
    return x / x.norm(dim=1, keepdim=True)


def small(**options):
    """A small module; its projector is seeded, so that two of them are the same."""
    torch.manual_seed(0)
    defaults = dict(pixel_memory=30, region_memory=6, pixels_per_class=3, pixel_contrast=8,
                    region_contrast=4)
    return CIRKDMemory(3, 5, 4, **{**defaults, **options})


def batch(seed, b=2, size=4, label_size=8, classes=4, ignored=0.3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, 3, size, size, generator=g, dtype=dtype)
    t = torch.randn(b, 5, size, size, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (b, label_size, label_size), generator=g)
    y[torch.rand(y.shape, generator=g) < ignored] = IGNORE
    return s, t, y


# ---- the contrast loss -----------------------------------------------------------------------

@settings(max_examples=25)
@given(n=st.integers(1, 5), c=st.integers(1, 4), m=st.integers(1, 6),
       tau=st.sampled_from([0.07, 0.1, 0.5]), kd_t=st.sampled_from([1.0, 2.0]),
       seed=st.integers(0, 1000))
def test_contrast_matches_reference(n, c, m, tau, kd_t, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, c, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(n, c, generator=g, dtype=torch.float64, requires_grad=True)
    bank = unit(torch.randn(m, c, generator=g, dtype=torch.float64))
    expected = reference_contrast(s, t, bank, tau, kd_t)
    actual = memory_contrast_loss(s, t, bank, temperature=tau, kd_temperature=kd_t,
                                  reduction="none")
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(memory_contrast_loss(s, t, bank, temperature=tau,
                                                    kd_temperature=kd_t), expected.mean())
    (g1,) = torch.autograd.grad(actual.sum(), s)
    (g2,) = torch.autograd.grad(expected.sum(), s)
    torch.testing.assert_close(g1, g2)
    assert (actual >= -1e-12).all()


def test_contrast_gradcheck_and_no_teacher_gradient():
    s = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    bank = unit(torch.randn(5, 4, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda x: memory_contrast_loss(x, t, bank), (s,))
    assert not memory_contrast_loss(s.detach(), t, bank).requires_grad
    assert memory_contrast_loss(t, t, bank).abs().item() < 1e-12


# ---- one step of the module --------------------------------------------------------------

def test_one_training_step_matches_reference():
    torch.manual_seed(0)
    module = CIRKDMemory(3, 5, 3, pixel_memory=50, region_memory=7, pixels_per_class=64,
                         pixel_contrast=30, region_contrast=9, seed=3).double()
    with torch.no_grad():  # pointers near the end, so that the step wraps around
        module.pixel_ptr.copy_(torch.tensor([45, 0, 20]))
        module.region_ptr.copy_(torch.tensor([6, 2, 0]))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    s, t, y = batch(0, classes=3, dtype=torch.float64)
    s.requires_grad_(True)
    loss = module(s, t, y)

    labels = y[:, ::2, ::2]  # nearest from 8 x 8 to 4 x 4
    t_unit = t / t.norm(dim=1, keepdim=True)
    pixel_q, pixel_ptr, region_q, region_ptr = reference_enqueue(
        before["pixel_queue"], before["pixel_ptr"], before["region_queue"],
        before["region_ptr"], t_unit, labels, 3)
    torch.testing.assert_close(module.pixel_queue, pixel_q)
    torch.testing.assert_close(module.region_queue, region_q)
    assert module.pixel_ptr.tolist() == pixel_ptr.tolist()
    assert module.region_ptr.tolist() == region_ptr.tolist()
    assert module.step.item() == 1

    pixel_idx, region_idx = module.contrast_indices(0)
    assert pixel_idx.shape == (30 // 3 + 1,) and region_idx.shape == (9 // 3 + 1,)
    banks = (pixel_q[:, pixel_idx].reshape(-1, 5), region_q[:, region_idx].reshape(-1, 5))
    for mine, theirs in zip(module.sample_bank(0), banks):
        torch.testing.assert_close(mine, theirs)
    counted = labels != IGNORE
    sa = reference_projector(module, s).permute(0, 2, 3, 1)[counted]
    ta = t.permute(0, 2, 3, 1)[counted]
    expected = (0.1 * reference_contrast(sa, ta, banks[0])
                + 0.1 * reference_contrast(sa, ta, banks[1])).mean()
    torch.testing.assert_close(loss, expected)
    weight = module.projector[0].weight
    g1 = torch.autograd.grad(loss, (s, weight))
    g2 = torch.autograd.grad(expected, (s, weight))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_module_equals_functional_in_eval_mode():
    module = small(pixel_weight=0.3, region_weight=0.05).eval()
    s, t, y = batch(1)
    loss = module(s, t, y)
    pixel_bank, region_bank = module.sample_bank()
    counted = y[:, ::2, ::2] != IGNORE
    with torch.no_grad():
        sa = module.projector(s).permute(0, 2, 3, 1)[counted]
        expected = (0.3 * memory_contrast_loss(sa, t.permute(0, 2, 3, 1)[counted], pixel_bank)
                    + 0.05 * memory_contrast_loss(sa, t.permute(0, 2, 3, 1)[counted],
                                                  region_bank))
    torch.testing.assert_close(loss, expected)


def test_reductions_and_grids():
    s, t, y = batch(2)
    counted = y[:, ::2, ::2] != IGNORE
    maps = small(reduction="none").eval()(s, t, y)
    assert maps.shape == (2, 4, 4)
    assert (maps[~counted] == 0).all() and (maps[counted] > 0).all()
    torch.testing.assert_close(small(reduction="sum").eval()(s, t, y), maps.sum())
    torch.testing.assert_close(small().eval()(s, t, y), maps.sum() / counted.sum())
    # a student map on another grid is resized onto the teacher's with resize='teacher'
    small_s = torch.randn(2, 3, 2, 2)
    assert small(resize="teacher").eval()(small_s, t, y).isfinite()
    with pytest.raises(ValueError, match="same H x W"):
        small().eval()(small_s, t, y)


def test_max_anchors_caps_the_anchors_reproducibly():
    s, t, y = batch(3, size=6, label_size=6, ignored=0.0)
    maps = small(max_anchors=10, reduction="none")(s, t, y)
    assert (maps != 0).sum().item() == 10
    torch.testing.assert_close(small(max_anchors=10, reduction="none")(s, t, y), maps)
    torch.testing.assert_close(small(max_anchors=10)(s, t, y), maps.sum() / 10)


def test_first_step_is_finite_and_all_ignored_gives_zero_with_gradient():
    module = CIRKDMemory(3, 5, 4)  # the reference's sizes: queues of random unit vectors
    s, t, y = batch(4)
    assert module(s, t, y).isfinite()
    loss = small()(s, t, torch.full_like(y, IGNORE))
    assert loss.item() == 0.0
    loss.backward()


# ---- the queues ------------------------------------------------------------------------------

def one_class(memory=5, **options):
    return CIRKDMemory(3, 5, 1, pixel_memory=memory, region_memory=2, pixels_per_class=16,
                       pixel_contrast=memory - 1, region_contrast=1, **options)


def test_pointer_wraps_around():
    module = one_class()
    t1, t2 = torch.randn(1, 5, 1, 3), torch.randn(1, 5, 1, 4)
    module(torch.randn(1, 3, 1, 3), t1, torch.zeros(1, 1, 3, dtype=torch.long))
    assert module.pixel_ptr.tolist() == [3]
    torch.testing.assert_close(module.pixel_queue[0, :3], unit(t1[0, :, 0].T))
    module(torch.randn(1, 3, 1, 4), t2, torch.zeros(1, 1, 4, dtype=torch.long))
    assert module.pixel_ptr.tolist() == [2] and module.region_ptr.tolist() == [0]
    q = module.pixel_queue[0]
    torch.testing.assert_close(q[[3, 4, 0, 1]], unit(t2[0, :, 0].T))
    torch.testing.assert_close(q[2], unit(t1[0, :, 0].T)[2])


def test_a_step_larger_than_the_queue_keeps_its_last_entries():
    module = one_class()
    t = torch.randn(1, 5, 1, 7)
    module(torch.randn(1, 3, 1, 7), t, torch.zeros(1, 1, 7, dtype=torch.long))
    assert module.pixel_ptr.tolist() == [2]
    torch.testing.assert_close(module.pixel_queue[0, [2, 3, 4, 0, 1]], unit(t[0, :, 0].T)[2:])


@settings(max_examples=30)
@given(lengths=st.lists(st.integers(0, 9), min_size=1, max_size=4), seed=st.integers(0, 100))
def test_ring_write_equals_writing_one_entry_at_a_time(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    classes, length = 3, 4
    queue, ptr = torch.randn(classes, length, 2, generator=g), torch.randint(0, length, (3,),
                                                                            generator=g)
    expected_q, expected_p = queue.clone(), ptr.clone()
    for n in lengths:  # several steps of random classes
        codes = torch.randint(0, classes, (n,), generator=g)
        entries = torch.randn(n, 2, generator=g)
        for code, entry in zip(codes.tolist(), entries):
            expected_q[code, expected_p[code]] = entry
            expected_p[code] = (expected_p[code] + 1) % length
        _write(queue, ptr, entries, codes)
    torch.testing.assert_close(queue, expected_q)
    assert torch.equal(ptr, expected_p)


def test_per_class_cap_and_ignored_pixels_never_enqueued():
    module = small(pixels_per_class=2, pixel_memory=40)
    s, t, y = batch(5, size=6, label_size=6, ignored=0.4)
    marker = torch.zeros(5)
    marker[0] = 1.0
    t = t.clone()
    t.permute(0, 2, 3, 1)[y == IGNORE] = marker * 100.0  # the ignored pixels' direction
    before = module.pixel_queue.clone()
    for step in range(3):
        module(s, t, y)
        counts = [min(2, int((y[b] == c).sum())) for b in range(2) for c in range(4)]
        expected = torch.tensor(counts).view(2, 4).sum(0) * (step + 1) % 40
        assert module.pixel_ptr.tolist() == expected.tolist()
    t_unit = unit(t.permute(0, 2, 3, 1).reshape(-1, 5))
    for c in range(4):
        written = module.pixel_queue[c][~torch.isclose(module.pixel_queue[c], before[c]).all(1)]
        members = t_unit[(y == c).flatten()]
        # every entry is a pixel of its class (none of the ignored ones)
        assert torch.cdist(written, members).min(1).values.max() < 1e-5
        assert torch.cdist(written, marker[None]).min() > 1e-3


def test_queues_update_in_training_mode_only_whatever_the_grad_mode():
    s, t, y = batch(6)
    module = small().eval()
    before = copy.deepcopy(module.state_dict())
    module(s, t, y)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    module.train()
    with torch.no_grad():
        module(s, t, y)
    assert module.step.item() == 1 and module.region_ptr.sum() > 0


def test_nan_in_gives_nan_and_a_bad_teacher_image_is_not_enqueued():
    s, t, y = batch(7, ignored=0.0)
    bad_s = s.clone()
    bad_s[0, :, 0, 0] = float("nan")
    assert small()(bad_s, t, y).isnan()
    y = y.clone()
    y[:, :2, :2] = IGNORE  # the pixel (0, 0) of the 4 x 4 grid is ignored
    bad_t = t.clone()
    bad_t[1, :, 0, 0] = float("inf")
    module = small(reduction="none")
    loss = module(s, bad_t, y)
    assert loss[1].isnan().all() and loss[0].isfinite().all()
    # only the good image was enqueued: one region per class it holds
    present = [int((y[0, ::2, ::2] == c).any()) for c in range(4)]
    assert module.region_ptr.tolist() == present
    assert module.pixel_queue.isfinite().all() and module.region_queue.isfinite().all()


def test_float32_under_bfloat16_autocast():
    module = small()
    s, t, y = batch(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module(s, t, y)
    assert loss.dtype == torch.float32 and loss.isfinite()


# ---- checkpoints ----------------------------------------------------------------------------

def run(module, batches):
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)  # stateless: no momentum
    losses = []
    for s, t, y in batches:
        loss = module(s, t, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def test_state_dict_round_trip_and_exact_resume(tmp_path):
    batches = [batch(10 + i) for i in range(4)]
    first = small(max_anchors=12, seed=7)
    run(first, batches[:2])
    torch.save(first.state_dict(), tmp_path / "memory.pt")
    uninterrupted = run(first, batches[2:])

    resumed = small(max_anchors=12, seed=99)  # the seed comes back from the checkpoint
    resumed.load_state_dict(torch.load(tmp_path / "memory.pt", weights_only=True))
    assert resumed.seed.item() == 7 and resumed.step.item() == 2
    assert torch.equal(run(resumed, batches[2:]), uninterrupted)
    for key, value in first.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert {"pixel_queue", "pixel_ptr", "region_queue", "region_ptr", "seed",
            "step"} <= set(first.state_dict())


def test_same_seed_same_run_other_seed_other_queues():
    batches = [batch(20 + i) for i in range(2)]
    a = small(pixels_per_class=1, seed=1)
    b = small(pixels_per_class=1, seed=1)
    c = small(pixels_per_class=1, seed=2)
    assert torch.equal(run(a, batches), run(b, batches))
    run(c, batches)
    assert torch.equal(a.pixel_queue, b.pixel_queue)
    assert not torch.equal(a.pixel_queue, c.pixel_queue)


# ---- two processes ---------------------------------------------------------------------------

WORLD = 2
SPLIT = (slice(0, 3), slice(3, 4))  # unequal batches: rank 0 holds 3 images, rank 1 one


def _ddp_module():
    module = small(pixels_per_class=2, reduction="sum", seed=5)
    module.projector[1].eval()  # BatchNorm's running statistics: the sum splits over ranks
    return module


def _ddp_batches():
    batches = [batch(30 + i, b=4) for i in range(2)]
    batches[0][2][3] = IGNORE  # rank 1 has nothing to enqueue at the first step
    return batches


def _steps(module, batches, part=slice(None)):
    losses = [module(s[part], t[part], y[part]).detach() for s, t, y in batches]
    keys = ("pixel_queue", "pixel_ptr", "region_queue", "region_ptr", "step")
    return torch.stack(losses), {k: module.state_dict()[k] for k in keys}


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        losses, state = _steps(_ddp_module(), _ddp_batches(), SPLIT[rank])
        torch.save({"losses": losses, **state}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_share_the_queues_of_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    single_losses, single = _steps(_ddp_module(), _ddp_batches())
    for key, value in single.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        torch.testing.assert_close(ranks[0][key], value, msg=key)
    assert single["step"].item() == 2 and single["region_ptr"].sum() > 0
    torch.testing.assert_close(ranks[0]["losses"] + ranks[1]["losses"], single_losses)


# ---- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("call,error,match", [
    (lambda: small()(torch.randn(1, 4, 2, 2), torch.randn(1, 5, 2, 2),
                     torch.zeros(1, 2, 2, dtype=torch.long)),
     ValueError, r"expected student features with 3 channels, got 4"),
    (lambda: small()(torch.randn(1, 3, 2, 2), torch.randn(1, 6, 2, 2),
                     torch.zeros(1, 2, 2, dtype=torch.long)),
     ValueError, r"expected teacher features with 5 channels, got 6"),
    (lambda: small()(torch.randn(1, 3, 2, 2), torch.randn(2, 5, 2, 2),
                     torch.zeros(1, 2, 2, dtype=torch.long)),
     ValueError, r"same batch size, got 1 and 2"),
    (lambda: small()(torch.randn(1, 3, 2, 2), torch.randn(1, 5, 2, 2), None),
     TypeError, r"CIRKDMemory needs the labels"),
    (lambda: small()(torch.randn(1, 3, 2, 2), torch.randn(1, 5, 2, 2),
                     torch.full((1, 2, 2), 4)),
     ValueError, r"labels must be in \[0, 4\) or ignore_index=255, got values from 4 to 4"),
    (lambda: small()(torch.randn(1, 3, 2, 2), torch.randn(1, 5, 2, 2),
                     torch.zeros(1, 2, 2)),
     TypeError, r"expected target to hold integer labels"),
    (lambda: CIRKDMemory(3, 5, 4, pixel_memory=10), ValueError,
     r"pixel_contrast // num_classes \+ 1 = 1025 bank entries per class exceed "
     r"pixel_memory=10"),
    (lambda: small(region_contrast=40), ValueError,
     r"region_contrast // num_classes \+ 1 = 11 bank entries per class exceed region_memory=6"),
    (lambda: small(pixel_weight=0.0, region_weight=0.0), ValueError, r"both 0"),
    (lambda: small(temperature=0.0), ValueError, r"temperature must be greater than 0"),
    (lambda: small(region_weight=-1.0), ValueError, r"region_weight must be at least 0"),
    (lambda: small(max_anchors=0), ValueError, r"max_anchors must be a positive int"),
    (lambda: small(seed=-1), ValueError, r"seed must be in \[0, 2\*\*63\), got -1"),
    (lambda: small(seed=1.5), TypeError, r"seed must be an int, got float"),
    (lambda: small(reduction="avg"), ValueError, r"reduction must be one of"),
    (lambda: small(resize="both"), ValueError, r"resize must be one of"),
    (lambda: CIRKDMemory(3, 5, 0), ValueError, r"num_classes must be a positive int"),
    (lambda: memory_contrast_loss(torch.randn(3, 4), torch.randn(2, 4), torch.randn(5, 4)),
     ValueError, r"anchors of one shape, got \(3, 4\) and \(2, 4\)"),
    (lambda: memory_contrast_loss(torch.randn(3, 4), torch.randn(3, 4), torch.randn(5, 2)),
     ValueError, r"a bank with the anchors' 4 channels, got 2"),
    (lambda: memory_contrast_loss(torch.randn(3, 4, 1), torch.randn(3, 4), torch.randn(5, 4)),
     ValueError, r"expected student anchors of shape \(N, C\), got a 3-D tensor"),
    (lambda: memory_contrast_loss(torch.randn(3, 4), torch.randn(3, 4), torch.randn(5, 4),
                                  kd_temperature=-1.0),
     ValueError, r"kd_temperature must be greater than 0"),
])
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_extra_repr():
    text = repr(small())
    assert "num_classes=4, pixel_memory=30, region_memory=6, pixels_per_class=3" in text
    assert "pixel_weight=0.1, region_weight=0.1, max_anchors=None, ignore_index=255" in text
