"""DIST (Huang et al., NeurIPS 2022) against a plain reading of DIST_KD's segmentation code."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from segdistill.losses.dist import DISTLoss, dist_loss

f64 = torch.float64


def _pearson_rows(x, y, eps=1e-8):
    """Row-wise Pearson correlation of two (N, D) matrices, eps on the product of norms."""
    x = x - x.mean(1, keepdim=True)
    y = y - y.mean(1, keepdim=True)
    return (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1) + eps)


def reference_dist(student, teacher, beta=1.0, gamma=1.0, tau=1.0):
    """DIST_KD's segmentation form: (B, K, H, W) -> (B*H*W, K) rows, softmax over classes,
    inter over the rows, intra over the columns; tau^2 as in its classification code."""
    k = student.shape[1]
    p_s = (student.transpose(1, 3).reshape(-1, k) / tau).softmax(1)
    p_t = (teacher.transpose(1, 3).reshape(-1, k) / tau).softmax(1)
    inter = 1 - _pearson_rows(p_s, p_t).mean()
    intra = 1 - _pearson_rows(p_s.t(), p_t.t()).mean()
    return tau**2 * (beta * inter + gamma * intra)


def reference_mmrazor(student, teacher):
    """mmrazor's / torchdistill's DIST fed 4-D logits: softmax over dim 1, then the intra
    term correlates dim 0 (the batch) at every (class, pixel)."""
    p_s, p_t = student.softmax(1), teacher.softmax(1)

    def pearson(x, y, dim):
        x = x - x.mean(dim, keepdim=True)
        y = y - y.mean(dim, keepdim=True)
        return (x * y).sum(dim) / (x.norm(dim=dim) * y.norm(dim=dim) + 1e-8)

    return (1 - pearson(p_s, p_t, 1).mean()) + (1 - pearson(p_s, p_t, 0).mean())


def _randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=f64, requires_grad=True)


@settings(max_examples=25)
@given(b=st.integers(1, 3), k=st.integers(1, 5), h=st.integers(1, 4), w=st.integers(1, 4),
       tau=st.sampled_from([1.0, 2.0, 4.0]), beta=st.sampled_from([0.0, 1.0, 2.0]),
       gamma=st.sampled_from([0.0, 1.0, 0.5]), seed=st.integers(0, 2**16))
def test_matches_reference_values_and_gradients(b, k, h, w, tau, beta, gamma, seed):
    g = torch.Generator().manual_seed(seed)
    s, t = _randn(g, b, k, h, w), _randn(g, b, k, h, w)
    actual = dist_loss(s, t, beta=beta, gamma=gamma, temperature=tau)
    expected = reference_dist(s, t, beta, gamma, tau)
    torch.testing.assert_close(actual, expected)
    for a, e in zip(torch.autograd.grad(actual, (s, t)), torch.autograd.grad(expected, (s, t)),
                    strict=True):
        torch.testing.assert_close(a, e)


def test_terms_are_pearson_correlations_as_torch_corrcoef_computes_them():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 4, 3, 5, generator=g, dtype=f64), torch.randn(2, 4, 3, 5, generator=g,
                                                                        dtype=f64)
    rows = lambda x: x.softmax(1).permute(0, 2, 3, 1).reshape(-1, 4)  # noqa: E731
    p_s, p_t = rows(s), rows(t)
    inter = 1 - torch.stack([torch.corrcoef(torch.stack([a, b]))[0, 1]
                             for a, b in zip(p_s, p_t, strict=True)]).mean()
    intra = 1 - torch.stack([torch.corrcoef(torch.stack([p_s[:, c], p_t[:, c]]))[0, 1]
                             for c in range(4)]).mean()
    torch.testing.assert_close(dist_loss(s, t, gamma=0.0), inter, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dist_loss(s, t, beta=0.0), intra, rtol=1e-6, atol=1e-7)


def test_intra_term_correlates_pixels_not_the_batch_as_mmrazor_does():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 5, 6, 6, generator=g, dtype=f64), torch.randn(4, 5, 6, 6, generator=g,
                                                                        dtype=f64)
    # the inter terms agree; the intra terms differ on a real grid
    torch.testing.assert_close(dist_loss(s, t, gamma=0.0), reference_dist(s, t, gamma=0.0))
    assert (dist_loss(s, t) - reference_mmrazor(s, t)).abs() > 1e-3
    # on a 1 x 1 grid the pixels are the batch, and the two readings are one loss
    s1, t1 = s[..., :1, :1], t[..., :1, :1]
    torch.testing.assert_close(dist_loss(s1, t1), reference_mmrazor(s1, t1))


@given(seed=st.integers(0, 2**16))
@settings(max_examples=15)
def test_zero_for_equal_logits_and_invariant_to_per_pixel_shifts(seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(2, 4, 3, 3, generator=g, dtype=f64)
    s = torch.randn(2, 4, 3, 3, generator=g, dtype=f64)
    shift = torch.randn(2, 1, 3, 3, generator=g, dtype=f64)  # the softmax ignores it
    assert abs(dist_loss(t, t).item()) < 1e-6
    assert abs(dist_loss(t + shift, t).item()) < 1e-6
    torch.testing.assert_close(dist_loss(s + shift, t), dist_loss(s, t))
    assert 0 < dist_loss(s, t).item() <= 4


def test_resize_options_match_interpolating_first():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    up = F.interpolate(s, size=(8, 8), mode="bilinear", align_corners=False)
    down = F.interpolate(t, size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(dist_loss(s, t, resize="teacher"), dist_loss(up, t))
    torch.testing.assert_close(dist_loss(s, t, resize="student"), dist_loss(s, down))
    # stride rounding (one cell) is aligned without asking
    assert torch.isfinite(dist_loss(torch.randn(1, 3, 5, 5), torch.randn(1, 3, 4, 4)))


def test_gradcheck():
    s = torch.randn(2, 3, 2, 2, dtype=f64, requires_grad=True)
    t = torch.randn(2, 3, 2, 2, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: dist_loss(a, b, temperature=2.0), (s, t))


def test_single_class_and_single_pixel_are_finite_with_zero_gradient():
    # one class: every probability is 1, the centred vectors are zero, correlation 0
    s = torch.randn(2, 1, 3, 3, requires_grad=True)
    loss = dist_loss(s, torch.randn(2, 1, 3, 3))
    loss.backward()
    assert loss.item() == pytest.approx(2.0) and (s.grad == 0).all()
    # one pixel in the batch: the intra term correlates constants, so it is 1
    s = torch.randn(1, 4, 1, 1, requires_grad=True)
    loss = dist_loss(s, torch.randn(1, 4, 1, 1), beta=0.0)
    loss.backward()
    assert loss.item() == pytest.approx(1.0) and (s.grad == 0).all()


def test_module_equals_functional_and_round_trips():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 5, 4, 4, generator=g), torch.randn(2, 5, 8, 8, generator=g)
    kwargs = {"beta": 2.0, "gamma": 0.5, "temperature": 4.0, "resize": "teacher"}
    module = DISTLoss(**kwargs)
    assert repr(module) == ("DISTLoss(beta=2.0, gamma=0.5, temperature=4.0, resize='teacher', "
                            "reduction='mean')")
    torch.testing.assert_close(module(s, t), dist_loss(s, t, **kwargs), rtol=0, atol=0)
    torch.testing.assert_close(pickle.loads(pickle.dumps(module))(s, t), module(s, t))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("which", ["student", "teacher"])
def test_nan_or_inf_in_gives_nan(bad, which):
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    (s if which == "student" else t)[1, 2, 3, 0] = bad
    assert torch.isnan(dist_loss(s, t))


def test_minus_inf_logit_is_a_zero_probability_not_a_nan():
    s, t = torch.randn(2, 3, 4, 4, dtype=f64), torch.randn(2, 3, 4, 4, dtype=f64)
    masked = t.clone()
    masked[:, 0] = float("-inf")
    expected = reference_dist(s, torch.where(torch.isinf(masked), -1e4, masked))
    torch.testing.assert_close(dist_loss(s, masked), expected)


def test_under_autocast_bf16_is_float32_and_finite():
    s = torch.randn(2, 4, 6, 6, requires_grad=True)
    t = torch.randn(2, 4, 6, 6)
    conv = torch.nn.Conv2d(4, 4, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(s)
        assert logits.dtype == torch.bfloat16
        loss = DISTLoss()(logits, t)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("call,error,match", [
    (lambda: dist_loss(torch.randn(1, 3, 2, 2), torch.randn(1, 4, 2, 2)), ValueError,
     r"student logits and teacher logits with the same number of channels, got 3 and 4 "
     r"\(one per class\)"),
    (lambda: dist_loss(torch.randn(1, 3, 2, 2), torch.randn(2, 3, 2, 2)), ValueError,
     r"same batch size, got 1 and 2"),
    (lambda: dist_loss(torch.randn(1, 3, 2, 2), torch.randn(1, 3, 4, 4)), ValueError,
     r"same H x W, got \(2, 2\) and \(4, 4\)"),
    (lambda: dist_loss(torch.randn(3, 2, 2), torch.randn(1, 3, 2, 2)), ValueError,
     r"expected student logits of shape \(B, C, H, W\), got a 3-D tensor"),
    (lambda: dist_loss(torch.zeros(1, 3, 2, 2, dtype=torch.long), torch.randn(1, 3, 2, 2)),
     TypeError, r"floating-point dtype, got torch.int64"),
    (lambda: dist_loss(torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2), temperature=0),
     ValueError, r"temperature must be greater than 0.0, got 0.0"),
    (lambda: DISTLoss(beta=-1.0), ValueError, r"beta must be at least 0.0, got -1.0"),
    (lambda: DISTLoss(gamma="1"), TypeError, r"gamma must be a real number, got str"),
    (lambda: DISTLoss(reduction="none"), ValueError,
     r"reduction must be 'mean' for DIST: its intra-class term correlates every pixel of the "
     r"batch, .* got 'none'"),
    (lambda: dist_loss(torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2), reduction="sum"),
     ValueError, r"reduction must be 'mean' for DIST.* got 'sum'"),
    (lambda: DISTLoss(resize="bilinear"), ValueError,
     r"resize must be one of 'none', 'student', 'teacher', got 'bilinear'"),
])
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
