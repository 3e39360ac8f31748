"""IFVD (Wang et al.) against a plain per-image, per-class reference."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from models import tiny_pair

from segdistill import DistillationTerm, DistillationWrapper
from segdistill.losses.ifvd import IFVDLoss, ifvd_loss


def reference_map(feat, labels, num_classes, ignore, eps=1e-8):
    """CIRKD's CriterionIFV read plainly: per image and class, the class's pixels take the
    masked mean as centre; every other pixel keeps its own feature; cosine over channels."""
    maps = []
    for n in range(feat.shape[0]):
        x = feat[n]  # (C, H, W)
        centre = x.clone()
        for k in range(num_classes):
            mask = labels[n] == k
            if ignore is not None:
                mask = mask & (labels[n] != ignore)
            proto = (x * mask).sum((1, 2)) / (mask.sum() + 1e-6)
            centre = torch.where(mask, proto[:, None, None], centre)
        dot = (x * centre).sum(0)
        norms = x.norm(dim=0).clamp_min(eps) * centre.norm(dim=0).clamp_min(eps)
        maps.append(dot / norms)
    return torch.stack(maps)


def reference_ifvd(student, teacher, target, num_classes, ignore=255):
    """The (B, H, W) map of squared differences; labels nearest-resized to the feature grid."""
    labels = F.interpolate(target[:, None].double(), size=student.shape[-2:],
                           mode="nearest")[:, 0]
    m_s = reference_map(student, labels, num_classes, ignore)
    m_t = reference_map(teacher, labels, num_classes, ignore)
    return (m_s - m_t) ** 2


def random_case(seed, b=2, cs=3, ct=5, h=4, w=5, up=4, k=4, ignore=255, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, cs, h, w, generator=g, dtype=dtype, requires_grad=True)
    t = torch.randn(b, ct, h, w, generator=g, dtype=dtype, requires_grad=True)
    target = torch.randint(0, k, (b, h * up, w * up), generator=g)
    if ignore is not None:
        target[torch.rand(target.shape, generator=g) < 0.25] = ignore
    return s, t, target


def assert_values_and_gradients(actual, expected, inputs):
    torch.testing.assert_close(actual, expected)
    for a, e in zip(torch.autograd.grad(actual, inputs), torch.autograd.grad(expected, inputs)):
        torch.testing.assert_close(a, e)


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), cs=st.integers(1, 5), ct=st.integers(1, 5), h=st.integers(1, 4),
       w=st.integers(1, 4), up=st.sampled_from([1, 4]), k=st.integers(1, 4),
       ignore=st.sampled_from([255, 0, None]), seed=st.integers(0, 1000))
def test_matches_reference(b, cs, ct, h, w, up, k, ignore, seed):
    s, t, target = random_case(seed, b, cs, ct, h, w, up, k, ignore)
    expected = reference_ifvd(s, t, target, k, ignore)
    actual = ifvd_loss(s, t, target, num_classes=k, ignore_index=ignore, reduction="none")
    torch.testing.assert_close(actual, expected)
    assert_values_and_gradients(
        ifvd_loss(s, t, target, num_classes=k, ignore_index=ignore), expected.mean(), (s, t))


def test_unequal_channels_ignored_pixels_absent_classes_and_labels_on_the_input_grid():
    s, t, target = random_case(3, b=2, cs=6, ct=16, h=6, w=7, up=4, k=3)
    target[0][target[0] == 2] = 1  # class 2 is absent from image 0, present in image 1
    assert (target[1] == 2).any() and (target == 255).any()
    for reduction, reduce in (("mean", torch.mean), ("sum", torch.sum)):
        actual = ifvd_loss(s, t, target, num_classes=3, reduction=reduction)
        assert_values_and_gradients(actual, reduce(reference_ifvd(s, t, target, 3)), (s, t))


def test_a_class_absent_from_every_image_changes_nothing():
    s, t, target = random_case(4, k=3)
    torch.testing.assert_close(ifvd_loss(s, t, target, num_classes=7),
                               ifvd_loss(s, t, target, num_classes=3))


def test_reductions_and_ignored_pixels():
    s, t, target = random_case(5, up=1)
    per_pixel = ifvd_loss(s, t, target, num_classes=4, reduction="none")
    assert per_pixel.shape == (2, 4, 5)
    assert (per_pixel[target == 255] == 0).all() and (per_pixel[target != 255] > 0).all()
    torch.testing.assert_close(ifvd_loss(s, t, target, num_classes=4, reduction="sum"),
                               per_pixel.sum())
    # the mean is over every pixel, ignored ones included, as the reference's MSELoss
    torch.testing.assert_close(ifvd_loss(s, t, target, num_classes=4), per_pixel.sum() / 40)


def test_an_ignored_all_zero_feature_adds_nothing():
    """The reference's cos(0, 0) = 0 would add (0 - 1)^2 here; an ignored pixel is 1 on both
    sides."""
    s, t, target = random_case(6, up=1)
    target[0, 1, 2] = 255
    with torch.no_grad():
        s[0, :, 1, 2] = 0.0
    per_pixel = ifvd_loss(s, t, target, num_classes=4, reduction="none")
    assert per_pixel[0, 1, 2] == 0
    loss = ifvd_loss(s, t, target, num_classes=4)
    (grad,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(grad).all() and (grad[0, :, 1, 2] == 0).all()


def test_every_pixel_ignored_is_zero_with_zero_gradient():
    s, t, _ = random_case(7)
    loss = ifvd_loss(s, t, torch.full((2, 4, 5), 255), num_classes=4)
    (grad,) = torch.autograd.grad(loss, s)
    assert loss.item() == 0.0 and (grad == 0).all()


def test_equal_maps_give_zero_and_each_map_is_scale_invariant():
    s, t, target = random_case(8, dtype=torch.float32)
    s, t = s.detach(), t.detach()
    assert ifvd_loss(t, t, target, num_classes=4).item() == 0.0
    expected = ifvd_loss(s, t, target, num_classes=4)
    for scale in (1e20, 1e-20):
        torch.testing.assert_close(ifvd_loss(s * scale, t, target, num_classes=4), expected)
        torch.testing.assert_close(ifvd_loss(s, t * scale, target, num_classes=4), expected)


def test_unchecked_labels_outside_the_classes_are_treated_as_ignored():
    s, t, target = random_case(9, k=3)
    odd = target.clone()
    odd[target == 255] = 7
    torch.testing.assert_close(
        ifvd_loss(s, t, odd, num_classes=3, ignore_index=None, validate_args=False),
        ifvd_loss(s, t, target, num_classes=3))


def test_grids_are_aligned_before_the_labels_are_resized():
    s, _, target = random_case(10, h=4, w=4, up=4)
    t = torch.randn(2, 5, 8, 8, dtype=torch.float64)
    t_on_s = F.interpolate(t, size=(4, 4), mode="bilinear", align_corners=False)
    s_on_t = F.interpolate(s, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(ifvd_loss(s, t, target, num_classes=4, resize="student"),
                               reference_ifvd(s, t_on_s, target, 4).mean())
    torch.testing.assert_close(ifvd_loss(s, t, target, num_classes=4, resize="teacher"),
                               reference_ifvd(s_on_t, t, target, 4).mean())


def test_gradcheck():
    s, t, _ = random_case(11, b=2, cs=2, ct=3, h=2, w=3, up=2, k=3)
    # an ignored pixel, and class 2 absent from image 1 (whose zero prototype has no norm
    # to differentiate twice)
    target = torch.tensor([[[0, 1, 2], [0, 1, 255]], [[0, 1, 1], [0, 255, 1]]])
    def loss(a, b):
        return ifvd_loss(a, b, target, num_classes=3)

    assert torch.autograd.gradcheck(loss, (s, t))
    assert torch.autograd.gradgradcheck(loss, (s, t))


def test_module_matches_functional():
    s, t, target = random_case(12)
    options = dict(ignore_index=0, resize="teacher", eps=1e-6, reduction="sum",
                   validate_args=False)
    module = IFVDLoss(4, **options)
    assert repr(module) == ("IFVDLoss(num_classes=4, ignore_index=0, resize='teacher', "
                            "eps=1e-06, reduction='sum')")
    torch.testing.assert_close(module(s, t, target),
                               ifvd_loss(s, t, target, num_classes=4, **options))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_input_gives_nan_in_its_image(bad):
    s, t, target = random_case(13, dtype=torch.float32, up=1)
    s, t = s.detach(), t.detach()
    target[0, 0, 0] = 255
    for which in ("student", "teacher"):
        a, b = s.clone(), t.clone()
        (a if which == "student" else b)[0, :, 0, 0] = bad  # at an ignored pixel
        per_pixel = ifvd_loss(a, b, target, num_classes=4, reduction="none")
        assert per_pixel[0].isnan().all() and per_pixel[1].isfinite().all()
        assert ifvd_loss(a, b, target, num_classes=4).isnan()


def test_autocast_computes_in_float32():
    g = torch.Generator().manual_seed(14)
    x = torch.randn(2, 3, 8, 8, generator=g, requires_grad=True)
    t = torch.randn(2, 6, 8, 8, generator=g)
    target = torch.randint(0, 3, (2, 32, 32), generator=g)
    target[:, :4] = 255
    conv = torch.nn.Conv2d(3, 4, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = conv(x)
        assert feats.dtype == torch.bfloat16
        loss = IFVDLoss(3)(feats, t.bfloat16(), target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(x.grad).all()


def test_half_inputs_compute_in_float32_and_backward_inside_autocast_is_float32():
    s, t, target = random_case(15, dtype=torch.float32)
    s, t = s.detach(), t.detach()
    half = ifvd_loss(s.bfloat16(), t.bfloat16(), target, num_classes=4)
    assert half.dtype == torch.float32
    rounded = ifvd_loss(s.bfloat16().double(), t.bfloat16().double(), target, num_classes=4)
    torch.testing.assert_close(half.double(), rounded, rtol=1e-4, atol=1e-6)
    s.requires_grad_()
    expected = torch.autograd.grad(ifvd_loss(s, t, target, num_classes=4), s)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (grad,) = torch.autograd.grad(ifvd_loss(s, t, target, num_classes=4), s)
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-8)


def test_module_pickles_and_round_trips_its_state_dict():
    s, t, target = random_case(16)
    module = IFVDLoss(4, ignore_index=None, reduction="none")
    clone = pickle.loads(pickle.dumps(module))
    assert repr(clone) == repr(module)
    target[target == 255] = 1
    torch.testing.assert_close(clone(s, t, target), module(s, t, target))
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    IFVDLoss(4).load_state_dict(torch.load(buffer, weights_only=True))


def test_through_a_term_the_wrapper_hands_over_the_labels():
    torch.manual_seed(0)
    teacher, student = tiny_pair(num_classes=3)  # feature grids at 1/2 and 1/4 of the input
    term = DistillationTerm(IFVDLoss(3, resize="student"), student="features",
                            teacher="features", weight=20.0, uses_target=True)
    wrapper = DistillationWrapper(teacher, student, {"ifvd": term}, {"features": "relu"},
                                  {"features": "relu"})
    x, target = torch.randn(2, 3, 16, 16), torch.randint(0, 3, (2, 16, 16))
    out = wrapper(x, target=target)
    with torch.no_grad():
        s_feat, t_feat = student[:4](x), teacher[:4](x)
    torch.testing.assert_close(out.losses["ifvd"],
                               20.0 * ifvd_loss(s_feat, t_feat, target, num_classes=3,
                                                resize="student"))
    out.loss.backward()
    assert all(p.grad is not None for p in student.stem.parameters())


_F = torch.randn(1, 3, 2, 2)
_LABELS = torch.zeros(1, 2, 2, dtype=torch.long)


@pytest.mark.parametrize("call,error,match", [
    (lambda: ifvd_loss(_F, _F, None, num_classes=3), TypeError,
     r"IFVD needs labels: expected target to be a \(B, H, W\) tensor of integer labels, "
     r"got None"),
    (lambda: IFVDLoss(3)(_F, _F, None), TypeError, r"IFVD needs labels"),
    (lambda: ifvd_loss(_F, _F, _LABELS + 3, num_classes=3), ValueError,
     r"labels must be in \[0, 3\) or ignore_index=255, got values from 3 to 3"),
    (lambda: ifvd_loss(_F, _F, _LABELS - 1, num_classes=3, ignore_index=None), ValueError,
     r"labels must be in \[0, 3\), got values from -1 to -1"),
    (lambda: ifvd_loss(_F, _F, _LABELS.float(), num_classes=3), TypeError,
     r"expected target to hold integer labels, got torch.float32"),
    (lambda: ifvd_loss(_F, _F, _LABELS[0], num_classes=3), ValueError,
     r"expected target of shape \(B, H, W\), got a 2-D tensor of shape \(2, 2\)"),
    (lambda: ifvd_loss(_F, _F, _LABELS.expand(2, 2, 2), num_classes=3), ValueError,
     r"expected logits and target with the same batch size, got 1 and 2"),
    (lambda: ifvd_loss(_F, _F, [[0]], num_classes=3), TypeError,
     r"expected target to be a torch.Tensor, got list"),
    (lambda: ifvd_loss(_F, _F, _LABELS, num_classes=0), ValueError,
     r"num_classes must be a positive int, got 0"),
    (lambda: IFVDLoss(3.0), TypeError, r"num_classes must be an int, got float"),
    (lambda: IFVDLoss(3, ignore_index=1.5), TypeError,
     r"ignore_index must be an int or None, got float"),
    (lambda: IFVDLoss(3, eps=0.0), ValueError, r"eps must be greater than 0.0, got 0.0"),
    (lambda: IFVDLoss(3, resize="bilinear"), ValueError,
     r"resize must be one of 'none', 'student', 'teacher', got 'bilinear'"),
    (lambda: IFVDLoss(3, reduction="batchmean"), ValueError,
     r"reduction must be one of 'none', 'mean', 'sum', got 'batchmean'"),
    (lambda: ifvd_loss(_F, torch.randn(1, 3, 4, 4), _LABELS, num_classes=3), ValueError,
     r"expected student and teacher features on the same H x W, got \(2, 2\) and \(4, 4\)"),
    (lambda: ifvd_loss(_F, torch.randn(2, 3, 2, 2), _LABELS, num_classes=3), ValueError,
     r"expected student and teacher with the same batch size, got 1 and 2"),
    (lambda: ifvd_loss(_F[0], _F, _LABELS, num_classes=3), ValueError,
     r"expected student of shape \(B, C, H, W\), got a 3-D tensor"),
    (lambda: ifvd_loss(_F, _F.long(), _LABELS, num_classes=3), TypeError,
     r"expected teacher to have a floating-point dtype, got torch.int64"),
])
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
