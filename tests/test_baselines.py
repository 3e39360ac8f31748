"""The baselines (KD, FitNet, attention transfer, pair-wise, CWD): properties, cross-checks
and error paths beyond the per-loss reference tests in test_kd.py, test_fitnet.py,
test_attention.py, test_pairwise.py and test_cwd.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from test_affinity import _RecordShapes

from segdistill import (
    AttentionTransferLoss,
    CWDLoss,
    FitNetLoss,
    KDLoss,
    PairwiseLoss,
    affinity_loss,
    attention_map,
    attention_transfer_loss,
    cwd_loss,
    fitnet_loss,
    kd_loss,
    pairwise_loss,
)

f64 = torch.float64


def _randn(g, *shape, grad=False):
    return torch.randn(*shape, generator=g, dtype=f64, requires_grad=grad)


def _up(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _pixels(x):
    """(B, K, H, W) -> (B * H * W, K): one row of class scores per pixel."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _meta(shape):
    return torch.empty(shape, device="meta")


# --------------------------------------------------------------------------- KD


@given(b=st.integers(1, 2), k=st.integers(1, 5), h=st.integers(1, 5), w=st.integers(1, 5),
       hs=st.integers(1, 5), ws=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_kd_at_temperature_one_is_kl_div_on_flattened_pixels(b, k, h, w, hs, ws, seed):
    g = torch.Generator().manual_seed(seed)
    s, t = _randn(g, b, k, hs, ws, grad=True), _randn(g, b, k, h, w, grad=True)
    expected = F.kl_div(F.log_softmax(_pixels(_up(s, (h, w))), 1),
                        F.log_softmax(_pixels(t), 1), reduction="batchmean", log_target=True)
    actual = kd_loss(s, t, temperature=1.0)
    torch.testing.assert_close(actual, expected)
    for a, e in zip(torch.autograd.grad(actual, (s, t)), torch.autograd.grad(expected, (s, t))):
        torch.testing.assert_close(a, e)


@given(seed=st.integers(0, 2**16), temperature=st.sampled_from([0.5, 1.0, 4.0]))
def test_kd_ignored_pixels_are_left_out_of_every_reduction(seed, temperature):
    g = torch.Generator().manual_seed(seed)
    s, t = _randn(g, 2, 4, 3, 3), _randn(g, 2, 4, 6, 6)
    target = torch.randint(0, 3, (2, 6, 6), generator=g)
    target[target == 2] = 255
    valid = target != 255
    full = kd_loss(s, t, temperature=temperature, reduction="none")
    per_pixel = kd_loss(s, t, target, temperature=temperature, reduction="none")
    torch.testing.assert_close(per_pixel, torch.where(valid, full, torch.zeros_like(full)))
    torch.testing.assert_close(kd_loss(s, t, target, temperature=temperature, reduction="sum"),
                               full[valid].sum())
    expected_mean = full[valid].mean() if valid.any() else full.new_zeros(())
    torch.testing.assert_close(kd_loss(s, t, target, temperature=temperature), expected_mean)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_kd_all_ignored_is_zero_with_finite_gradients(reduction):
    s = torch.randn(2, 3, 2, 2, requires_grad=True)
    t = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = kd_loss(s, t, torch.full((2, 8, 8), 7), ignore_index=7, reduction=reduction)
    assert (loss == 0).all()
    loss.sum().backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
    assert (s.grad == 0).all()


def test_kd_without_ignore_index_counts_every_pixel_but_still_checks_the_target():
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    labels = torch.randint(0, 3, (2, 4, 4))
    torch.testing.assert_close(kd_loss(s, t, labels, ignore_index=None), kd_loss(s, t))
    # a 255 is no class and no ignore label here: the one label rule refuses it
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\), got values from 255 "):
        kd_loss(s, t, torch.full((2, 4, 4), 255), ignore_index=None)
    # validate_args=False skips only that range check (no host sync)
    torch.testing.assert_close(
        kd_loss(s, t, torch.full((2, 4, 4), 255), ignore_index=None, validate_args=False),
        kd_loss(s, t))
    with pytest.raises(ValueError,
                       match=r"logits and target with the same batch size, got 2 and 3"):
        kd_loss(s, t, torch.zeros(3, 4, 4, dtype=torch.long), ignore_index=None)


def test_kd_per_pixel_map_lives_on_the_teacher_grid():
    s, t = torch.randn(2, 3, 3, 5), torch.randn(2, 3, 6, 10)
    labels = torch.zeros(2, 12, 20, dtype=torch.long)
    assert kd_loss(s, t, labels, reduction="none").shape == (2, 6, 10)
    assert kd_loss(t, s, reduction="none").shape == (2, 3, 5)  # a finer student is resized down


def test_kd_gradcheck_with_an_ignore_mask():
    s = torch.randn(2, 3, 2, 2, dtype=f64, requires_grad=True)
    t = torch.randn(2, 3, 4, 4, dtype=f64, requires_grad=True)
    target = torch.tensor([[0, 255], [1, 2]]).repeat(2, 2, 2)  # (2, 4, 4)
    for reduction in ("none", "mean", "sum"):
        assert torch.autograd.gradcheck(
            lambda a, b, r=reduction: kd_loss(a, b, target, temperature=3.0, reduction=r), (s, t))


def test_kd_module_with_target_equals_functional():
    s, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 6, 6)
    target = torch.randint(0, 5, (2, 6, 6))
    target[target == 4] = 0
    module = KDLoss(temperature=3.0, ignore_index=0, reduction="sum")
    assert repr(module) == ("KDLoss(temperature=3.0, ignore_index=0, resize='teacher', "
                            "reduction='sum')")
    torch.testing.assert_close(module(s, t, target),
                               kd_loss(s, t, target, temperature=3.0, ignore_index=0,
                                       reduction="sum"), rtol=0, atol=0)


def test_kd_with_target_under_autocast_computes_in_float32():
    s = torch.randn(2, 4, 3, 3, requires_grad=True)
    t = torch.randn(2, 4, 6, 6)
    target = torch.randint(0, 3, (2, 6, 6))
    target[:, 0] = 255
    conv = torch.nn.Conv2d(4, 4, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(s)
        assert logits.dtype == torch.bfloat16
        loss = KDLoss()(logits, t, target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s.grad).all()


_LOGITS = torch.randn(1, 3, 2, 2)


@pytest.mark.parametrize("call,error,match", [
    (lambda: kd_loss(_LOGITS, _LOGITS, torch.zeros(1, 2, 2, dtype=torch.bool)), TypeError,
     r"expected target to hold integer labels, got torch.bool"),
    (lambda: kd_loss(_LOGITS, _LOGITS, [[0, 1], [1, 0]]), TypeError,
     r"expected target to be a torch.Tensor, got list"),
    (lambda: kd_loss(_LOGITS, _LOGITS, _meta((1, 2, 2)).long()), ValueError,
     r"expected logits and target on the same device, got cpu and meta"),
    (lambda: kd_loss(_LOGITS, _meta((1, 3, 2, 2))), ValueError,
     r"expected student logits and teacher logits on the same device, got cpu and meta"),
    (lambda: kd_loss(_LOGITS, torch.randn(2, 3, 2, 2)), ValueError,
     r"student logits and teacher logits with the same batch size, got 1 and 2"),
    (lambda: kd_loss(_LOGITS, torch.zeros(1, 3, 2, 2, dtype=torch.long)), TypeError,
     r"expected teacher logits to have a floating-point dtype, got torch.int64"),
    (lambda: kd_loss(_LOGITS, _LOGITS, temperature="2"), TypeError,
     r"temperature must be a real number, got str"),
    (lambda: kd_loss(_LOGITS, _LOGITS, temperature=math.inf), ValueError,
     r"temperature must be finite, got inf"),
    (lambda: kd_loss(_LOGITS, _LOGITS, reduction="batchmean"), ValueError,
     r"reduction must be one of 'none', 'mean', 'sum', got 'batchmean'"),
    (lambda: kd_loss(_LOGITS, _LOGITS, ignore_index=True), TypeError,
     r"ignore_index must be an int or None, got bool"),
    (lambda: KDLoss(temperature=-1.0), ValueError, r"temperature must be greater than 0.0"),
    (lambda: KDLoss(reduction="avg"), ValueError, r"reduction must be one of"),
])
def test_kd_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ----------------------------------------------------------------------- FitNet


@given(b=st.integers(1, 2), c=st.integers(1, 4), hs=st.integers(1, 5), ws=st.integers(1, 5),
       ht=st.integers(1, 6), wt=st.integers(1, 6), seed=st.integers(0, 2**16),
       reduction=st.sampled_from(["none", "mean", "sum"]))
def test_fitnet_identity_regressor_is_mse_on_resized_features(b, c, hs, ws, ht, wt, seed,
                                                              reduction):
    g = torch.Generator().manual_seed(seed)
    s, t = _randn(g, b, c, hs, ws, grad=True), _randn(g, b, c, ht, wt, grad=True)
    expected = F.mse_loss(_up(s, (ht, wt)), t, reduction=reduction)
    actual = FitNetLoss(c, c, reduction=reduction)(s, t)
    torch.testing.assert_close(actual, expected)
    for a, e in zip(torch.autograd.grad(actual.sum(), (s, t)),
                    torch.autograd.grad(expected.sum(), (s, t))):
        torch.testing.assert_close(a, e)


def test_fitnet_module_gradcheck_through_the_regressor():
    torch.manual_seed(0)
    module = FitNetLoss(3, 5).double()
    s = torch.randn(2, 3, 2, 3, dtype=f64, requires_grad=True)
    t = torch.randn(2, 5, 4, 5, dtype=f64, requires_grad=True)
    w = module.regressor.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b, weight: torch.func.functional_call(module, {"regressor.weight": weight},
                                                        (a, b)),
        (s, t, w))


def test_fitnet_regressor_under_autocast_gives_a_float32_loss_and_finite_gradients():
    torch.manual_seed(0)
    module = FitNetLoss(3, 6)
    s, t = torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 6, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module(s, t)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(module.regressor.weight.grad).all()


@pytest.mark.parametrize("call,error,match", [
    (lambda: fitnet_loss(torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2), reduction="mse"),
     ValueError, r"reduction must be one of 'none', 'mean', 'sum', got 'mse'"),
    (lambda: fitnet_loss(torch.randn(1, 3, 2, 2), _meta((1, 3, 2, 2))), ValueError,
     r"expected student and teacher on the same device, got cpu and meta"),
    (lambda: fitnet_loss(torch.randn(1, 3, 2, 2), torch.randn(3, 2, 2)), ValueError,
     r"expected teacher of shape \(B, C, H, W\), got a 3-D tensor"),
    (lambda: FitNetLoss(3, 0), ValueError, r"teacher_channels must be a positive int, got 0"),
    (lambda: FitNetLoss(3.0, 4), TypeError, r"student_channels must be an int, got float"),
    (lambda: FitNetLoss(3, 4, reduction="avg"), ValueError, r"reduction must be one of"),
    (lambda: FitNetLoss(3, 4)(torch.zeros(1, 3, 2, 2, dtype=torch.long), torch.randn(1, 4, 2, 2)),
     TypeError, r"expected student to have a floating-point dtype, got torch.int64"),
])
def test_fitnet_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------ attention transfer


def reference_attention_map(x, p):
    q = x.abs().pow(p).mean(1).reshape(x.shape[0], -1)
    return q / q.norm(dim=1, keepdim=True)


@given(b=st.integers(1, 3), c=st.integers(1, 5), h=st.integers(1, 5), w=st.integers(1, 5),
       p=st.sampled_from([1.0, 2.0, 4.0]), seed=st.integers(0, 2**16))
def test_attention_map_matches_reference(b, c, h, w, p, seed):
    g = torch.Generator().manual_seed(seed)
    x = _randn(g, b, c, h, w, grad=True)
    actual, expected = attention_map(x, p), reference_attention_map(x, p)
    assert actual.shape == (b, h * w) and actual.dtype == f64
    torch.testing.assert_close(actual, expected)
    (ga,) = torch.autograd.grad(actual.square().sum() + actual[:, 0].sum(), x)
    (ge,) = torch.autograd.grad(expected.square().sum() + expected[:, 0].sum(), x)
    torch.testing.assert_close(ga, ge)


def test_attention_map_computes_in_float32_for_half_inputs_and_keeps_zero_maps_finite():
    assert attention_map(torch.randn(1, 2, 3, 3).bfloat16()).dtype == torch.float32
    zeros = torch.zeros(1, 2, 3, 3, requires_grad=True)
    q = attention_map(zeros)
    q.sum().backward()
    assert (q == 0).all() and torch.isfinite(zeros.grad).all()


@given(scale_s=st.floats(1e-2, 1e2), scale_t=st.floats(1e-2, 1e2), seed=st.integers(0, 2**16),
       p=st.sampled_from([1.0, 2.0, 3.0]))
def test_attention_invariant_to_a_positive_scale_of_either_map(scale_s, scale_t, seed, p):
    g = torch.Generator().manual_seed(seed)
    s, t = _randn(g, 2, 3, 4, 5), _randn(g, 2, 6, 4, 5)
    base = attention_transfer_loss(s, t, p=p, reduction="none")
    torch.testing.assert_close(
        attention_transfer_loss(scale_s * s, scale_t * t, p=p, reduction="none"), base)
    assert attention_transfer_loss(scale_s * t, t, p=p).item() < 1e-20
    assert (base > 0).all()


@pytest.mark.parametrize("resize", ["student", "teacher"])
def test_attention_resize_is_bilinear_onto_the_named_grid(resize):
    s, t = torch.randn(2, 3, 4, 6, dtype=f64), torch.randn(2, 5, 8, 12, dtype=f64)
    if resize == "student":
        expected = attention_transfer_loss(s, _up(t, (4, 6)))
    else:
        expected = attention_transfer_loss(_up(s, (8, 12)), t)
    torch.testing.assert_close(attention_transfer_loss(s, t, resize=resize), expected)
    module = AttentionTransferLoss(p=3.0, resize=resize, eps=1e-6, reduction="sum")
    assert repr(module) == (f"AttentionTransferLoss(p=3.0, resize={resize!r}, eps=1e-06, "
                            f"reduction='sum')")
    torch.testing.assert_close(
        module(s, t),
        attention_transfer_loss(s, t, p=3.0, resize=resize, eps=1e-6, reduction="sum"),
        rtol=0, atol=0)


@pytest.mark.parametrize("call,error,match", [
    (lambda: attention_map(torch.randn(2, 3, 3)), ValueError,
     r"expected features of shape \(B, C, H, W\), got a 3-D tensor"),
    (lambda: attention_map(torch.ones(1, 2, 3, 3, dtype=torch.long)), TypeError,
     r"expected features to have a floating-point dtype, got torch.int64"),
    (lambda: attention_map(torch.randn(1, 2, 3, 3), p=0.5), ValueError,
     r"p must be at least 1.0, got 0.5"),
    (lambda: attention_map(torch.randn(1, 2, 3, 3), eps=0.0), ValueError,
     r"eps must be greater than 0.0, got 0.0"),
    (lambda: attention_transfer_loss(torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3), eps=-1),
     ValueError, r"eps must be greater than 0.0, got -1.0"),
    (lambda: attention_transfer_loss(torch.randn(1, 2, 3, 3), torch.randn(2, 2, 3, 3)),
     ValueError, r"student and teacher with the same batch size, got 1 and 2"),
    (lambda: attention_transfer_loss(torch.randn(1, 2, 3, 3), _meta((1, 2, 3, 3))),
     ValueError, r"student and teacher on the same device, got cpu and meta"),
    (lambda: AttentionTransferLoss(p="2"), TypeError, r"p must be a real number, got str"),
    (lambda: AttentionTransferLoss(resize="both"), ValueError,
     r"resize must be one of 'none', 'student', 'teacher', got 'both'"),
])
def test_attention_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


# -------------------------------------------------------------------- pair-wise


@given(shape=st.tuples(st.integers(1, 2), st.integers(1, 5), st.integers(1, 5),
                       st.integers(1, 6), st.integers(1, 6)),
       seed=st.integers(0, 2**16))
def test_pairwise_is_n_times_squared_affinity_without_pooling(shape, seed):
    b, cs, ct, h, w = shape
    g = torch.Generator().manual_seed(seed)
    s, t = _randn(g, b, cs, h, w), _randn(g, b, ct, h, w)
    torch.testing.assert_close(
        pairwise_loss(s, t, reduction="none"),
        h * w * affinity_loss(s, t, distance="squared", reduction="none"),
        rtol=1e-9, atol=1e-12)


@given(h=st.integers(1, 6), w=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_pairwise_patch_one_is_no_pooling_and_one_patch_is_zero(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    s, t = _randn(g, 2, 3, h, w), _randn(g, 2, 4, h, w)
    torch.testing.assert_close(pairwise_loss(s, t, patch_size=1), pairwise_loss(s, t))
    # a single node is only similar to itself: a_11 = 1 for both networks
    assert pairwise_loss(s, t, patch_size=(h, w)).item() < 1e-12
    assert pairwise_loss(s[:, :, :1, :1], t[:, :, :1, :1]).item() < 1e-12


@pytest.mark.parametrize("patch_size", [None, 3, (2, 5)])
def test_pairwise_linear_and_auto_allocate_no_n_by_n_tensor(patch_size):
    s = torch.randn(2, 4, 18, 20, requires_grad=True)
    t = torch.randn(2, 6, 18, 20, requires_grad=True)
    pooled = (18, 20) if patch_size is None else F.max_pool2d(
        s, patch_size, stride=patch_size, ceil_mode=True).shape[-2:]
    n = math.prod(pooled)
    for method in ("linear", "auto"):
        with _RecordShapes() as rec:
            pairwise_loss(s, t, patch_size=patch_size, method=method).backward()
        assert not any(shape[-2:] == (n, n) for shape in rec.shapes)
        if patch_size is None:  # nothing larger than both maps side by side (<< N x N)
            assert max(math.prod(shape) for shape in rec.shapes) <= 2 * (4 + 6) * n
    with _RecordShapes() as dense:
        pairwise_loss(s, t, patch_size=patch_size, method="dense").backward()
    assert any(shape[-2:] == (n, n) for shape in dense.shapes)  # the recorder does see them


def test_pairwise_zero_features_keep_finite_gradients():
    s = torch.randn(1, 3, 4, 4, dtype=f64)
    s[:, :, 1, 2] = 0  # one position with no signal at all
    s.requires_grad_()
    t = torch.randn(1, 5, 4, 4, dtype=f64)
    for method in ("linear", "dense"):
        (grad,) = torch.autograd.grad(pairwise_loss(s, t, method=method), s)
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("resize", ["student", "teacher"])
def test_pairwise_resize_and_module_equal_functional(resize):
    s, t = torch.randn(2, 3, 5, 6, dtype=f64), torch.randn(2, 4, 10, 12, dtype=f64)
    if resize == "student":
        expected = pairwise_loss(s, _up(t, (5, 6)), patch_size=(2, 3))
    else:
        expected = pairwise_loss(_up(s, (10, 12)), t, patch_size=(2, 3))
    module = PairwiseLoss(patch_size=(2, 3), resize=resize)
    torch.testing.assert_close(module(s, t), expected)
    torch.testing.assert_close(
        module(s, t), pairwise_loss(s, t, patch_size=(2, 3), resize=resize), rtol=0, atol=0)


@pytest.mark.parametrize("call,error,match", [
    (lambda: pairwise_loss(torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 6)), ValueError,
     r"same H x W, got \(4, 4\) and \(4, 6\); pass resize='student' or resize='teacher'"),
    (lambda: pairwise_loss(torch.randn(1, 2, 4, 4), _meta((1, 2, 4, 4))), ValueError,
     r"student and teacher on the same device, got cpu and meta"),
    (lambda: PairwiseLoss(patch_size=[2, 2]), TypeError,
     r"patch_size must be an int, a pair of ints or None, got \[2, 2\]"),
    (lambda: PairwiseLoss(patch_size=(2, 0)), ValueError,
     r"patch_size must be a positive int, got 0"),
    (lambda: PairwiseLoss(patch_size=True), TypeError, r"patch_size must be an int, got bool"),
    (lambda: PairwiseLoss(patch_size=(2, 2.5)), TypeError,
     r"patch_size must be an int, got float"),
    (lambda: PairwiseLoss(resize="up"), ValueError,
     r"resize must be one of 'none', 'student', 'teacher', got 'up'"),
    (lambda: PairwiseLoss(eps=0), ValueError, r"eps must be greater than 0.0, got 0.0"),
    (lambda: PairwiseLoss(reduction="avg"), ValueError,
     r"reduction must be one of 'none', 'mean', 'sum', got 'avg'"),
])
def test_pairwise_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


# -------------------------------------------------------------------------- CWD


@given(shape=st.tuples(st.integers(1, 2), st.integers(1, 4), st.integers(1, 4),
                       st.integers(1, 4)),
       temperature=st.sampled_from([0.5, 1.0, 4.0]), seed=st.integers(0, 2**16))
def test_cwd_invariant_to_per_channel_shifts_of_either_map(shape, temperature, seed):
    g = torch.Generator().manual_seed(seed)
    s, t = _randn(g, *shape), _randn(g, *shape)
    shift_s, shift_t = _randn(g, *shape[:2], 1, 1), _randn(g, *shape[:2], 1, 1)
    base = cwd_loss(s, t, temperature=temperature, reduction="none")
    torch.testing.assert_close(
        cwd_loss(s + shift_s, t + shift_t, temperature=temperature, reduction="none"), base)
    assert cwd_loss(t + shift_s, t, temperature=temperature).abs().item() < 1e-12
    if shape[2] * shape[3] > 1:  # one position: every channel is the certain distribution
        assert (base > 0).all()
    else:
        assert (base.abs() < 1e-12).all()


@given(shape=st.tuples(st.integers(1, 2), st.integers(1, 4), st.integers(1, 4),
                       st.integers(1, 4)),
       temperature=st.sampled_from([1.0, 3.0]), seed=st.integers(0, 2**16))
def test_cwd_is_kd_with_positions_as_classes_and_channels_as_pixels(shape, temperature, seed):
    g = torch.Generator().manual_seed(seed)
    s, t = _randn(g, *shape), _randn(g, *shape)

    def transpose(x):  # (B, C, H, W) -> (B, HW, C, 1)
        return x.flatten(2).transpose(1, 2)[..., None]

    torch.testing.assert_close(
        cwd_loss(s, t, temperature=temperature),
        kd_loss(transpose(s), transpose(t), temperature=temperature))


@pytest.mark.parametrize("resize", ["student", "teacher"])
def test_cwd_resize_and_module_equal_functional(resize):
    s, t = torch.randn(2, 3, 4, 4, dtype=f64), torch.randn(2, 3, 8, 8, dtype=f64)
    if resize == "student":
        expected = cwd_loss(s, _up(t, (4, 4)), temperature=2.0)
    else:
        expected = cwd_loss(_up(s, (8, 8)), t, temperature=2.0)
    module = CWDLoss(temperature=2.0, resize=resize)
    assert repr(module) == f"CWDLoss(temperature=2.0, resize={resize!r}, reduction='mean')"
    torch.testing.assert_close(module(s, t), expected)
    torch.testing.assert_close(
        module(s, t), cwd_loss(s, t, temperature=2.0, resize=resize), rtol=0, atol=0)


@pytest.mark.parametrize("call,error,match", [
    (lambda: cwd_loss(torch.randn(1, 3, 2, 2), torch.randn(2, 3, 2, 2)), ValueError,
     r"student and teacher with the same batch size, got 1 and 2"),
    (lambda: cwd_loss(torch.randn(1, 3, 2, 2), _meta((1, 3, 2, 2))), ValueError,
     r"student and teacher on the same device, got cpu and meta"),
    (lambda: cwd_loss(torch.randn(1, 3, 2), torch.randn(1, 3, 2, 2)), ValueError,
     r"expected student of shape \(B, C, H, W\), got a 3-D tensor"),
    (lambda: cwd_loss(torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2).to(torch.int32)),
     TypeError, r"expected teacher to have a floating-point dtype, got torch.int32"),
    (lambda: CWDLoss(temperature=None), TypeError,
     r"temperature must be a real number, got NoneType"),
    (lambda: CWDLoss(temperature=0), ValueError, r"temperature must be greater than 0.0, got 0.0"),
    (lambda: CWDLoss(resize="bilinear"), ValueError,
     r"resize must be one of 'none', 'student', 'teacher', got 'bilinear'"),
    (lambda: CWDLoss(reduction="batchmean"), ValueError,
     r"reduction must be one of 'none', 'mean', 'sum', got 'batchmean'"),
])
def test_cwd_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
