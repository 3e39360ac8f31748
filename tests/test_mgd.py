"""MGD (Yang et al., ECCV 2022) against a plain reading of yzd-v/MGD's FeatureLoss."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from segdistill.losses.mgd import MGDLoss, mgd_loss, random_mask

f64 = torch.float64


def reference_mgd(student, teacher, module, mask):
    """The reference's get_dis_loss with its mask given: align, zero the masked positions,
    conv3x3 - ReLU - conv3x3, squared error summed, divided by the batch size."""
    s = student
    if isinstance(module.align, torch.nn.Conv2d):
        s = F.conv2d(s, module.align.weight, module.align.bias)
    kept = torch.where(mask, 0.0, 1.0).to(s.dtype)  # the reference's `mat`: 1 where kept
    first, second = module.generator[0], module.generator[2]
    x = F.conv2d(s * kept, first.weight, first.bias, padding=1).relu()
    x = F.conv2d(x, second.weight, second.bias, padding=1)
    return ((x - teacher) ** 2).sum() / teacher.shape[0]


def _seeded(seed):
    return torch.Generator().manual_seed(seed)


@settings(max_examples=20)
@given(b=st.integers(1, 3), cs=st.integers(1, 4), ct=st.integers(1, 4), h=st.integers(1, 5),
       w=st.integers(1, 5), ratio=st.sampled_from([0.0, 0.5, 0.75, 1.0]),
       seed=st.integers(0, 2**16))
def test_matches_reference_values_and_gradients(b, cs, ct, h, w, ratio, seed):
    torch.manual_seed(seed)
    module = MGDLoss(cs, ct, mask_ratio=ratio).double()
    g = _seeded(seed)
    s = torch.randn(b, cs, h, w, generator=g, dtype=f64, requires_grad=True)
    t = torch.randn(b, ct, h, w, generator=g, dtype=f64, requires_grad=True)
    mask = random_mask(t, ratio, rng=g)
    actual, expected = module(s, t, mask), reference_mgd(s, t, module, mask)
    torch.testing.assert_close(actual, expected)
    wrt = (s, t, *module.parameters())
    for a, e in zip(torch.autograd.grad(actual, wrt), torch.autograd.grad(expected, wrt),
                    strict=True):
        torch.testing.assert_close(a, e)


def test_align_is_a_biased_1x1_conv_only_where_channels_differ():
    assert isinstance(MGDLoss(8, 8).align, torch.nn.Identity)
    align = MGDLoss(4, 8).align
    assert isinstance(align, torch.nn.Conv2d) and align.kernel_size == (1, 1)
    assert align.bias is not None
    convs = [m for m in MGDLoss(4, 8).generator if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (8, 8, (3, 3), (1, 1))] * 2


def test_random_mask_is_one_draw_per_position_below_the_ratio():
    feats = torch.zeros(3, 7, 5, 6)
    mask = random_mask(feats, 0.3, rng=_seeded(4))
    assert mask.shape == (3, 1, 5, 6) and mask.dtype == torch.bool
    torch.testing.assert_close(mask, torch.rand(3, 1, 5, 6, generator=_seeded(4)) < 0.3)
    assert random_mask(feats, 1.0).all() and not random_mask(feats, 0.0).any()
    fraction = random_mask(torch.zeros(4, 1, 64, 64), 0.75, rng=_seeded(0)).float().mean()
    assert abs(fraction.item() - 0.75) < 0.02


def test_masked_positions_are_zero_in_every_channel_and_the_rest_untouched():
    seen = []
    s, t = torch.randn(2, 5, 6, 6), torch.randn(2, 5, 6, 6)
    mask = random_mask(s, 0.5, rng=_seeded(1))
    mgd_loss(s, t, lambda x: seen.append(x) or x, mask)
    (generated_from,) = seen
    assert (generated_from[mask.expand_as(s)] == 0).all()
    torch.testing.assert_close(generated_from[~mask.expand_as(s)], s[~mask.expand_as(s)])


def test_module_draws_from_its_rng_like_random_mask_and_reproducibly():
    torch.manual_seed(0)
    module = MGDLoss(3, 6, mask_ratio=0.6, rng=_seeded(7))
    s, t = torch.randn(2, 3, 5, 5), torch.randn(2, 6, 5, 5)
    first, second = module(s, t), module(s, t)
    assert first.item() != second.item()  # a new mask every call
    aligned = module.align(s)
    rng = _seeded(7)
    for value in (first, second):
        expected = mgd_loss(aligned, t, module.generator, random_mask(aligned, 0.6, rng=rng))
        torch.testing.assert_close(value, expected, rtol=0, atol=0)
    module.rng = _seeded(7)
    torch.testing.assert_close(module(s, t), first, rtol=0, atol=0)


def test_reductions_are_over_the_batch_of_per_image_sums():
    torch.manual_seed(0)
    gen = torch.nn.Conv2d(4, 4, 3, padding=1)
    s, t = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    mask = random_mask(s, rng=_seeded(2))
    per_image = mgd_loss(s, t, gen, mask, reduction="none")
    assert per_image.shape == (3,)
    expected = ((gen(s * ~mask) - t) ** 2).sum((1, 2, 3))
    torch.testing.assert_close(per_image, expected)
    torch.testing.assert_close(mgd_loss(s, t, gen, mask, reduction="sum"), expected.sum())
    torch.testing.assert_close(mgd_loss(s, t, gen, mask), expected.sum() / 3)


def test_resize_teacher_masks_the_upsampled_student():
    torch.manual_seed(0)
    gen = torch.nn.Conv2d(4, 4, 3, padding=1)
    s, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 6, 6)
    mask = random_mask(t, rng=_seeded(3))
    up = F.interpolate(s, size=(6, 6), mode="bilinear", align_corners=False)
    torch.testing.assert_close(mgd_loss(s, t, gen, mask, resize="teacher"),
                               mgd_loss(up, t, gen, mask))
    module = MGDLoss(4, 4, resize="teacher", rng=_seeded(3))
    assert torch.isfinite(module(s, t))


def test_gradcheck():
    torch.manual_seed(0)
    gen = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(2, 2, 3, padding=1)).double()
    s = torch.randn(2, 2, 3, 3, dtype=f64, requires_grad=True)
    t = torch.randn(2, 2, 3, 3, dtype=f64, requires_grad=True)
    mask = random_mask(s, 0.5, rng=_seeded(5))
    assert torch.autograd.gradcheck(lambda a, b: mgd_loss(a, b, gen, mask), (s, t))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("which", ["student", "teacher"])
@pytest.mark.parametrize("masked", [False, True])
def test_a_non_finite_value_makes_that_image_nan(bad, which, masked):
    # a 1x1 conv with weight 1 and a ReLU: a -inf student value comes out as a finite 0
    gen = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.ReLU())
    torch.nn.init.eye_(gen[0].weight.view(3, 3))
    torch.nn.init.zeros_(gen[0].bias)
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    mask = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    mask[:, :, 1, 2] = masked
    (s if which == "student" else t)[1, 0, 1, 2] = bad
    loss = mgd_loss(s, t, gen, mask, reduction="none")
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1])
    assert torch.isnan(mgd_loss(s, t, gen, mask))


def test_under_autocast_bf16_is_float32_and_finite():
    module = MGDLoss(4, 6, rng=_seeded(0))
    s = torch.randn(2, 4, 6, 6, requires_grad=True)
    t = torch.randn(2, 6, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module(s, t)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s.grad).all() and module.generator[0].weight.grad is not None


def test_pickle_deepcopy_and_state_dict_round_trip():
    module = MGDLoss(3, 5, mask_ratio=0.5, reduction="sum", rng=_seeded(9))
    assert repr(module).startswith("MGDLoss(\n  student_channels=3, teacher_channels=5, "
                                   "mask_ratio=0.5, resize='none', reduction='sum'")
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    mask = random_mask(t, rng=_seeded(1))
    for other in (pickle.loads(pickle.dumps(module)), copy.deepcopy(module)):
        torch.testing.assert_close(other(s, t, mask), module(s, t, mask))
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    fresh = MGDLoss(3, 5, mask_ratio=0.5, reduction="sum")
    fresh.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(fresh(s, t, mask), module(s, t, mask))


def test_on_device_matches_cpu(device):
    torch.manual_seed(0)
    module = MGDLoss(3, 4).double()
    s, t = torch.randn(2, 3, 5, 5, dtype=f64), torch.randn(2, 4, 5, 5, dtype=f64)
    mask = random_mask(t, rng=_seeded(0))
    expected = module(s, t, mask)
    moved = copy.deepcopy(module).to(device)
    torch.testing.assert_close(moved(s.to(device), t.to(device), mask.to(device)).cpu(), expected)
    moved.rng = torch.Generator(device=device).manual_seed(0)
    assert torch.isfinite(moved(s.to(device), t.to(device)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_rng_on_another_device():
    with pytest.raises(ValueError, match=r"expected rng on the features' device cuda:0, got a "
                                         r"torch.Generator on cpu"):
        random_mask(torch.zeros(1, 1, 2, 2, device="cuda"), rng=_seeded(0))


def _pair(cs=4, ct=4, hs=3, ht=3):
    return torch.randn(2, cs, hs, hs), torch.randn(2, ct, ht, ht)


_MASK = torch.zeros(2, 1, 3, 3, dtype=torch.bool)


@pytest.mark.parametrize("call,error,match", [
    (lambda: mgd_loss(*_pair(3, 4), torch.nn.Identity(), _MASK), ValueError,
     r"same number of channels, got 3 and 4; MGDLoss\(student_channels, teacher_channels\)"),
    (lambda: MGDLoss(3, 4)(*_pair(5, 4)), ValueError,
     r"expected student features with 3 channels, got 5"),
    (lambda: mgd_loss(*_pair(ht=6), torch.nn.Identity(), _MASK), ValueError,
     r"same H x W, got \(3, 3\) and \(6, 6\)"),
    (lambda: mgd_loss(*_pair(), torch.nn.Identity(), _MASK.float()), TypeError,
     r"expected mask to be a bool tensor \(True where masked\), got a torch.float32 tensor"),
    (lambda: mgd_loss(*_pair(), torch.nn.Identity(), None), TypeError,
     r"got NoneType; draw one with random_mask\(features, mask_ratio\)"),
    (lambda: mgd_loss(*_pair(), torch.nn.Identity(), _MASK[:, 0]), ValueError,
     r"expected mask of shape \(B, 1, H, W\) = \(2, 1, 3, 3\), .* got \(2, 3, 3\)"),
    (lambda: mgd_loss(*_pair(), "conv", _MASK), TypeError,
     r"expected generator to be a module or a callable, got str"),
    (lambda: mgd_loss(*_pair(), torch.nn.Conv2d(4, 5, 1), _MASK), ValueError,
     r"expected the generator to return the teacher's shape \(2, 4, 3, 3\), got \(2, 5, 3, 3\)"),
    (lambda: mgd_loss(*_pair(), torch.nn.Identity(), _MASK, reduction="avg"), ValueError,
     r"reduction must be one of 'none', 'mean', 'sum', got 'avg'"),
    (lambda: MGDLoss(4, 4, mask_ratio=1.5), ValueError, r"mask_ratio must be at most 1.0, got 1.5"),
    (lambda: random_mask(torch.zeros(1, 1, 2, 2), -0.1), ValueError,
     r"mask_ratio must be at least 0.0, got -0.1"),
    (lambda: MGDLoss(4, 4, rng=0), TypeError,
     r"expected rng to be a torch.Generator or None, got int"),
    (lambda: random_mask(torch.zeros(2, 2)), ValueError,
     r"expected features of shape \(B, C, H, W\), got a 2-D tensor"),
    (lambda: MGDLoss(0, 4), ValueError, r"student_channels must be a positive int, got 0"),
])
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
