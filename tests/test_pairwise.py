"""Pair-wise similarity distillation against its dense form."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from test_affinity import _RecordShapes

from segdistill import PairwiseLoss, pairwise_loss


def reference_pairwise(s, t, patch=None):
    if patch is not None:
        s = F.max_pool2d(s, patch, stride=patch, ceil_mode=True)
        t = F.max_pool2d(t, patch, stride=patch, ceil_mode=True)
    losses = []
    for a, b in zip(s, t):
        def cos(x):
            f = x.reshape(x.shape[0], -1)
            f = f / f.norm(dim=0, keepdim=True).clamp_min(1e-8)
            return f.T @ f

        losses.append((cos(a) - cos(b)).pow(2).sum() / a[0].numel() ** 2)
    return torch.stack(losses)


shapes = st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6),
                   st.integers(1, 7), st.integers(1, 7))


@pytest.mark.parametrize("method", ["linear", "dense"])
@given(shape=shapes, seed=st.integers(0, 2**16),
       patch=st.sampled_from([None, 2, (2, 3)]))
def test_matches_dense_reference(method, shape, seed, patch):
    b, cs, ct, h, w = shape
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, cs, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(b, ct, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    expected = reference_pairwise(s, t, patch)
    actual = pairwise_loss(s, t, patch_size=patch, method=method, reduction="none")
    torch.testing.assert_close(actual, expected, rtol=1e-7, atol=1e-7)
    for a, e in zip(torch.autograd.grad(actual.sum(), (s, t)),
                    torch.autograd.grad(expected.sum(), (s, t))):
        torch.testing.assert_close(a, e, rtol=1e-7, atol=1e-7)


def test_linear_allocates_no_n_by_n_tensor():
    n = 16 * 16
    s = torch.randn(2, 4, 16, 16, requires_grad=True)
    t = torch.randn(2, 6, 16, 16)
    with _RecordShapes() as rec:
        pairwise_loss(s, t, method="linear").backward()
    assert max(math.prod(shape) for shape in rec.shapes) <= 2 * 3 * 6 * n


def test_zero_for_maps_equal_up_to_per_position_scale():
    t = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    s = t * (torch.rand(2, 1, 6, 6, dtype=torch.float64) + 0.1)
    assert pairwise_loss(s, t).item() < 1e-12


def test_gradcheck():
    s = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: pairwise_loss(a, b, method="linear"), (s, t))


@pytest.mark.parametrize("kwargs,error,match", [
    ({"patch_size": 0}, ValueError, r"patch_size must be a positive int, got 0"),
    ({"patch_size": (2, 2, 2)}, TypeError, r"patch_size must be an int, a pair of ints or None"),
    ({"method": "fast"}, ValueError, r"method must be one of 'auto', 'dense', 'linear'"),
])
def test_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        pairwise_loss(torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4), **kwargs)
    with pytest.raises(error, match=match):
        PairwiseLoss(**kwargs)
