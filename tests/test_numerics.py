"""Issue 10: float32 accuracy where student and teacher agree, non-finite inputs,
overflow, masked logits and large powers, against float64 references written here."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from segdistill import (
    adaptation_loss,
    affinity_loss,
    attention_transfer_loss,
    cwd_loss,
    fitnet_loss,
    kd_loss,
    pairwise_loss,
    reconstruction_loss,
)

DEVICE = torch.device(os.environ.get("SEGDISTILL_TEST_DEVICE", "cpu"))
"""Where the library runs in these tests; the float64 references stay on the CPU.
``SEGDISTILL_TEST_DEVICE=cuda pytest tests/test_numerics.py`` runs the same checks on
a GPU (``benchmarks/gpu_check.py`` does)."""


def on_device(call, *tensors):
    """``call`` on copies of ``tensors`` on :data:`DEVICE`, its result back on the CPU."""
    return call(*(t.to(DEVICE) for t in tensors)).cpu()


# ---- float64 dense references --------------------------------------------------------


def reference_rows(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """(B, N, N): the difference of the affinities of eq. (3) times N, densely."""
    def cosines(x):
        flat = x.flatten(2)
        unit = flat / flat.norm(dim=1, keepdim=True)
        return unit.mT @ unit
    return cosines(student) - cosines(teacher)


def reference(student, teacher, loss):
    """The three Gram-path losses per image, from N x N matrices in float64."""
    diff = reference_rows(student, teacher)
    n = diff.shape[-1]
    if loss == "affinity_l2":  # eq. (4): mean over rows of ||A^s_i - A^t_i||
        return diff.norm(dim=2).mean(1) / n
    if loss == "affinity_squared":
        return diff.square().sum((1, 2)) / n**3
    return diff.square().sum((1, 2)) / n**2  # pair-wise, Liu et al.


def library(student, teacher, loss, method):
    if loss == "pairwise":
        return pairwise_loss(student, teacher, method=method, reduction="none")
    distance = "l2" if loss == "affinity_l2" else "squared"
    return affinity_loss(student, teacher, distance=distance, method=method, reduction="none")


LOSSES = ["affinity_l2", "affinity_squared", "pairwise"]


def near_pair(seed, channels, size, delta, features, teacher_form):
    """float32 (student, teacher) with student = base + delta * noise.

    ``teacher_form``: ``'equal'`` (the base itself), ``'zeros'`` (the base with
    zero channels appended) or ``'mix'`` (an orthogonal mix of the base's channels
    into more channels): all three have the base's affinities.
    """
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(2, channels, size, size, generator=g, dtype=torch.float64)
    if features == "relu":  # non-negative and correlated, like post-ReLU features
        base = torch.relu(base + 0.5)
    extra = max(1, channels // 4)
    teacher = base
    if teacher_form != "equal":
        teacher = torch.cat([base, base.new_zeros(2, extra, size, size)], 1)
    if teacher_form == "mix":  # two Householder reflections: orthogonal, every channel mixed
        for _ in range(2):
            v = torch.randn(channels + extra, generator=g, dtype=torch.float64)
            v = (v / v.norm()).view(1, -1, 1, 1)
            teacher = teacher - 2 * v * (v * teacher).sum(1, keepdim=True)
    student = base + delta * torch.randn(base.shape, generator=g, dtype=torch.float64)
    return student.float(), teacher.float()


def _relative(actual, expected):
    return ((actual.double() - expected).norm() / expected.norm()).item()


def check_against_reference(student, teacher, loss, method, value_tol=1e-3, grad_tol=1e-2):
    """float32 library vs float64 reference on the same (float32) inputs."""
    s64 = student.double().requires_grad_()
    t64 = teacher.double().requires_grad_()
    expected = reference(s64, t64, loss)
    expected_grads = torch.autograd.grad(expected.sum(), (s64, t64))
    s32 = student.detach().to(DEVICE, copy=True).requires_grad_()
    t32 = teacher.detach().to(DEVICE, copy=True).requires_grad_()
    actual = library(s32, t32, loss, method)
    assert actual.dtype == torch.float32
    grads = [g.cpu() for g in torch.autograd.grad(actual.sum(), (s32, t32))]
    actual = actual.detach().cpu()
    worst = ((actual.double() - expected).abs() / expected.abs()).max().item()
    assert worst <= value_tol, f"value off by {worst:.2e}"
    for name, g, e in zip(("student", "teacher"), grads, expected_grads, strict=True):
        assert _relative(g, e) <= grad_tol, f"{name} gradient off by {_relative(g, e):.2e}"


# ---- 1. float32 accuracy near equality --------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    channels=st.sampled_from([64, 256, 2048]),
    delta=st.sampled_from([1e-1, 1e-2, 1e-3, 1e-4]),
    features=st.sampled_from(["random", "relu"]),
    teacher_form=st.sampled_from(["equal", "zeros", "mix"]),
    loss=st.sampled_from(LOSSES),
    method=st.sampled_from(["linear", "dense", "auto"]),
)
def test_float32_matches_float64_reference_near_equality(seed, channels, delta, features,
                                                         teacher_form, loss, method):
    size = 3 if channels == 2048 else 6  # small N for large C keeps CI fast
    student, teacher = near_pair(seed, channels, size, delta, features, teacher_form)
    check_against_reference(student, teacher, loss, method)


@pytest.mark.parametrize("teacher_form", ["equal", "zeros", "mix"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("method", ["linear", "dense"])
def test_every_path_at_the_smallest_delta(teacher_form, loss, method):
    student, teacher = near_pair(1, 256, 8, 1e-4, "relu", teacher_form)
    check_against_reference(student, teacher, loss, method)


def test_issue_example_affinity_near_equality():
    """The issue's example: 2.77e-6, not 0, with the dense path's gradient."""
    g = torch.Generator().manual_seed(0)
    b = torch.randn(2, 256, 32, 32, generator=g)
    student = b + 1e-3 * torch.randn(b.shape, generator=g)
    check_against_reference(student, b, "affinity_l2", "linear")
    assert affinity_loss(student, b).item() > 1e-6


def test_issue_example_pairwise_near_equality():
    g = torch.Generator().manual_seed(0)
    b = torch.randn(2, 256, 24, 24, generator=g)
    for delta in (1e-2, 1e-3):
        student = b + delta * torch.randn(b.shape, generator=g)
        check_against_reference(student, b, "pairwise", "linear")


def test_rotated_channels_are_recomputed_not_cancelled():
    """Equal channel counts that agree only up to a rotation: E = S - T is O(1) while
    the affinities agree to 1e-4; the E-form cancels, so the image is recomputed."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(2, 64, 6, 6, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    teacher = torch.einsum("oc,bchw->bohw", q, base).float()
    student = (base + 1e-4 * torch.randn(base.shape, generator=g, dtype=torch.float64)).float()
    for loss in LOSSES:
        check_against_reference(student, teacher, loss, "linear")


@pytest.mark.parametrize("block_elements", [1, 200])
@pytest.mark.parametrize("teacher_form", ["equal", "zeros"])
@pytest.mark.parametrize("loss", LOSSES)
def test_cache_sized_column_blocks_change_nothing(monkeypatch, block_elements, teacher_form,
                                                  loss):
    """On the CPU the elementwise passes run in blocks of columns; blocks of one column
    and blocks that do not divide N give the reference's values and gradients."""
    from segdistill.losses import _gram

    monkeypatch.setattr(_gram, "_BLOCK_ELEMENTS", block_elements)
    student, teacher = near_pair(2, 16, 7, 1e-3, "relu", teacher_form)
    check_against_reference(student, teacher, loss, "linear")
    student, teacher = near_pair(3, 16, 7, 1.0, "random", teacher_form)
    check_against_reference(student, teacher, loss, "linear")


@pytest.mark.parametrize("loss", LOSSES)
def test_zero_and_underflowing_positions_on_the_fast_norm_path(loss):
    """The Gram path squares the features for its norms: an all-zero position keeps
    zero affinities (divisor eps), and a position whose squares underflow to zero
    (entries of 1e-25) is normalised exactly like the same vector at scale 1."""
    g = torch.Generator().manual_seed(5)
    student = torch.randn(2, 8, 5, 5, generator=g, dtype=torch.float64)
    teacher = torch.randn(2, 8, 5, 5, generator=g, dtype=torch.float64)
    student[0, :, 1, 1] = 0.0
    teacher[1, :, 2, 3] = 0.0
    s32 = student.float().to(DEVICE, copy=True).requires_grad_()
    t32 = teacher.float().to(DEVICE, copy=True).requires_grad_()
    expected = library(s32, t32, loss, "dense")
    assert torch.isfinite(expected).all()
    actual = library(s32, t32, loss, "linear")
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-7)
    grads = torch.autograd.grad(actual.sum(), (s32, t32))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("loss", LOSSES)
def test_memory_layout_changes_nothing(loss):
    """channels_last and transposed (non-contiguous) maps give the contiguous maps'
    values and gradients: the kernel writes into its own buffers from strided views."""
    g = torch.Generator().manual_seed(7)
    student, teacher = torch.randn(2, 16, 9, 11, generator=g), torch.randn(2, 16, 9, 11,
                                                                        generator=g)
    a, b = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    expected = library(a, b, loss, "linear")
    expected_grads = torch.autograd.grad(expected.sum(), (a, b))
    a = student.contiguous(memory_format=torch.channels_last).requires_grad_()
    b = teacher.mT.contiguous().mT.requires_grad_()
    assert not b.is_contiguous()
    actual = library(a, b, loss, "linear")
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-9)
    for grad, e in zip(torch.autograd.grad(actual.sum(), (a, b)), expected_grads):
        torch.testing.assert_close(grad, e, rtol=1e-5, atol=1e-9)


PER_POSITION = [
    *[(f"affinity {m} {d}", lambda s, t, m=m, d=d: affinity_loss(
        s, t, method=m, distance=d, reduction="none"))
      for m in ("linear", "dense") for d in ("l2", "squared")],
    *[(f"pairwise {m}", lambda s, t, m=m: pairwise_loss(s, t, method=m, reduction="none"))
      for m in ("linear", "dense")],
    ("adaptation", lambda s, t: adaptation_loss(s, t, reduction="none").flatten(1).mean(1)),
]


@pytest.mark.parametrize("name,call", PER_POSITION, ids=[c[0] for c in PER_POSITION])
def test_each_position_at_its_own_extreme_scale(name, call):
    """Losses that normalise each position: one position scaled by 1e-25 (its squares
    underflow float32 to exactly zero, it is not a zero vector) and another by 1e25
    give the unscaled value."""
    g = torch.Generator().manual_seed(6)
    student, teacher = torch.randn(2, 8, 5, 5, generator=g), torch.randn(2, 8, 5, 5, generator=g)
    expected = on_device(call, student, teacher)
    s, t = student.clone(), teacher.clone()
    s[1, :, 4, 0] *= 1e-25
    s[0, :, 2, 2] *= 1e25
    t[0, :, 1, 3] *= 1e-25
    torch.testing.assert_close(on_device(call, s, t), expected, rtol=1e-5, atol=1e-9)


# ---- 2. NaN and infinity ------------------------------------------------------------------

GRAM_CALLS = [
    *[(f"affinity {m} {d}", lambda s, t, m=m, d=d: affinity_loss(
        s, t, method=m, distance=d, reduction="none"))
      for m in ("linear", "dense") for d in ("l2", "squared")],
    *[(f"pairwise {m}", lambda s, t, m=m: pairwise_loss(s, t, method=m, reduction="none"))
      for m in ("linear", "dense")],
    ("adaptation position", lambda s, t: adaptation_loss(s, t, reduction="none").flatten(1)
     .mean(1)),
    ("adaptation sample", lambda s, t: adaptation_loss(s, t, normalize="sample",
                                                       reduction="none")),
    ("attention", lambda s, t: attention_transfer_loss(s, t, reduction="none")),
    ("attention p=100", lambda s, t: attention_transfer_loss(s, t, p=100.0, reduction="none")),
    ("kd", lambda s, t: kd_loss(s, t, reduction="none").flatten(1).mean(1)),
    ("kd with labels", lambda s, t: kd_loss(
        s, t, torch.zeros(s.shape[0], *s.shape[2:], dtype=torch.long, device=s.device),
        reduction="none").flatten(1).mean(1)),
    ("cwd", lambda s, t: cwd_loss(s, t, reduction="none")),
    ("fitnet", lambda s, t: fitnet_loss(s, t, reduction="none").flatten(1).mean(1)),
    ("reconstruction", lambda s, t: reconstruction_loss(t, s, s, reduction="none")),
]


@pytest.mark.parametrize("name,call", GRAM_CALLS, ids=[c[0] for c in GRAM_CALLS])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("which", ["student", "teacher"])
@pytest.mark.parametrize("same_channels", [True, False])
def test_a_non_finite_value_makes_that_image_nan(name, call, bad, which, same_channels):
    if not same_channels and name.split()[0] in ("adaptation", "kd", "cwd", "fitnet",
                                                 "reconstruction"):
        pytest.skip("this loss takes equal channel counts")
    if bad == -math.inf and which == "teacher" and name.split()[0] in ("kd", "cwd"):
        pytest.skip("-inf teacher logits are masked classes (tested below)")
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 6, 4, 4, generator=g)
    teacher = torch.randn(2, 6 if same_channels else 9, 4, 4, generator=g)
    target = student if which == "student" else teacher
    target[1, 2, 1, 3] = bad
    out = on_device(call, student, teacher)
    if bad == -math.inf and which == "student" and name.split()[0] in ("kd", "cwd"):
        # a class (position) the teacher gives mass but the student rules out: KL = +inf
        assert not torch.isfinite(out[1])
    else:
        assert out[1].isnan(), f"{name}: image 1 gave {out[1].item()}"
    assert torch.isfinite(out[0]), f"{name}: the clean image 0 gave {out[0].item()}"
    assert not torch.isfinite(out.mean())


# ---- 3. scale invariance without overflow -----------------------------------------------

SCALE_INVARIANT = [
    *[(f"affinity {m} {d} {c}", lambda s, t, m=m, d=d: affinity_loss(
        s, t, method=m, distance=d, reduction="none"), c)
      for m in ("linear", "dense") for d in ("l2", "squared") for c in (8, 12)],
    *[(f"pairwise {m} {c}", lambda s, t, m=m: pairwise_loss(s, t, method=m, reduction="none"),
       c) for m in ("linear", "dense") for c in (8, 12)],
    *[(f"adaptation {n} q={q}", lambda s, t, n=n, q=q: adaptation_loss(
        s, t, normalize=n, q=q, reduction="none"), 8)
      for n in ("position", "sample") for q in (1.0, 2.0, math.inf)],
    ("attention", lambda s, t: attention_transfer_loss(s, t, reduction="none"), 12),
    ("attention p=6", lambda s, t: attention_transfer_loss(s, t, p=6.0, reduction="none"), 12),
]


@pytest.mark.parametrize("name,call,teacher_channels", SCALE_INVARIANT,
                         ids=[c[0] for c in SCALE_INVARIANT])
@pytest.mark.parametrize("scale", [1e20, 1e-20])
@pytest.mark.parametrize("which", ["student", "teacher", "both"])
def test_scale_invariant_losses_do_not_overflow(name, call, teacher_channels, scale, which):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 8, 5, 5, generator=g)
    teacher = torch.randn(2, teacher_channels, 5, 5, generator=g)
    expected = on_device(call, student, teacher)
    s = student * scale if which in ("student", "both") else student
    t = teacher * scale if which in ("teacher", "both") else teacher
    actual = on_device(call, s, t)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=0.0)


def test_scaled_inputs_keep_their_gradient_direction():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(1, 8, 4, 4, generator=g)
    teacher = torch.randn(1, 8, 4, 4, generator=g)
    student, teacher = student.to(DEVICE), teacher.to(DEVICE)
    for scale in (1e20, 1e-20):
        s = (student * scale).requires_grad_()
        affinity_loss(s, teacher, method="linear").backward()
        s0 = student.clone().requires_grad_()
        affinity_loss(s0, teacher, method="linear").backward()
        # the loss is scale-invariant, so its gradient scales by 1 / scale
        torch.testing.assert_close(s.grad * scale, s0.grad, rtol=1e-4, atol=1e-9)


# ---- 4. masked classes and large powers -------------------------------------------------


def _kl_without_masked(student, teacher, temperature, dim):
    """T^2 KL over the classes the teacher does not mask, in float64."""
    keep = torch.isfinite(teacher)
    log_q = torch.log_softmax(student.double() / temperature, dim)
    p = torch.softmax(teacher.double() / temperature, dim)
    terms = torch.where(keep, p * (torch.log(p.clamp_min(1e-300)) - log_q), 0.0)
    return terms.sum(dim) * temperature**2


def test_kd_with_masked_teacher_classes_is_finite_and_exact():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 4, 4, generator=g, requires_grad=True)
    teacher = torch.randn(2, 5, 4, 4, generator=g)
    teacher[:, 3] = -math.inf  # class 3 masked everywhere
    teacher[0, 1, 2, 2] = -math.inf  # and class 1 at one pixel
    loss = kd_loss(student, teacher, temperature=2.0, reduction="none")
    assert torch.isfinite(loss).all()
    expected = _kl_without_masked(student.detach(), teacher, 2.0, 1)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    loss.mean().backward()
    assert torch.isfinite(student.grad).all()


def test_kd_with_masked_classes_in_both_is_finite():
    student = torch.randn(1, 4, 2, 2, requires_grad=True)
    teacher = torch.randn(1, 4, 2, 2)
    teacher[:, 0] = -math.inf
    with torch.no_grad():
        student[:, 0] = -math.inf
    loss = kd_loss(student, teacher)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def test_cwd_with_masked_teacher_positions_is_finite_and_exact():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    teacher = torch.randn(2, 3, 4, 4, generator=g)
    teacher[:, :, 0, :] = -math.inf  # a masked row of positions
    loss = cwd_loss(student, teacher, reduction="none")
    assert torch.isfinite(loss).all()
    expected = _kl_without_masked(student.detach().flatten(2), teacher.flatten(2), 4.0, -1)
    torch.testing.assert_close(loss.double(), expected.mean(1), rtol=1e-5, atol=1e-7)
    loss.sum().backward()
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("p", [20.0, 100.0, 300.0])
def test_attention_transfer_with_large_p_is_finite_and_exact(p):
    g = torch.Generator().manual_seed(0)
    student = (3 * torch.randn(2, 8, 5, 5, generator=g)).requires_grad_()
    teacher = 3 * torch.randn(2, 8, 5, 5, generator=g)

    def attention(x):
        # float64 and per-image scaling keep the reference itself finite
        x = x.double()
        x = x / x.abs().amax(dim=(1, 2, 3), keepdim=True)
        q = x.abs().pow(p).mean(1).flatten(1)
        return q / q.norm(dim=1, keepdim=True)

    loss = attention_transfer_loss(student, teacher, p=p, reduction="none")
    expected = (attention(student.detach()) - attention(teacher)).square().mean(1)
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-9)
    loss.sum().backward()
    assert torch.isfinite(student.grad).all()


def test_fitnet_and_reconstruction_infinite_values_are_nan_not_inf():
    s, t = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    s[0, 0, 0, 0] = math.inf
    assert fitnet_loss(s, t).isnan()
    assert reconstruction_loss(t, s, t).isnan()
    # finite inputs are untouched
    torch.testing.assert_close(fitnet_loss(t, t + 1), torch.tensor(1.0))
    assert F.mse_loss(t, t + 1).item() == pytest.approx(1.0)
