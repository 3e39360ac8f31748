"""Attention transfer against a plain reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from segdistill import attention_transfer_loss


def reference_at(s, t, p):
    def at(x):
        q = x.abs().pow(p).mean(1).reshape(x.shape[0], -1)
        return q / q.norm(dim=1, keepdim=True)

    return (at(s) - at(t)).pow(2).mean(1).mean()


@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5),
                       st.integers(1, 4), st.integers(1, 4)),
       p=st.sampled_from([1.0, 2.0, 3.0]), seed=st.integers(0, 1000))
def test_matches_reference(shape, p, seed):
    b, cs, ct, h, w = shape
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, cs, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(b, ct, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    expected, actual = reference_at(s, t, p), attention_transfer_loss(s, t, p=p)
    torch.testing.assert_close(actual, expected)
    for a, e in zip(torch.autograd.grad(actual, (s, t)), torch.autograd.grad(expected, (s, t))):
        torch.testing.assert_close(a, e)


@given(scale=st.floats(0.01, 100), seed=st.integers(0, 1000))
def test_invariant_to_a_global_scale_and_zero_for_equal_maps(scale, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.randn(2, 6, 4, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(attention_transfer_loss(s * scale, t),
                               attention_transfer_loss(s, t))
    assert attention_transfer_loss(t * scale, t).item() < 1e-20


def test_gradcheck():
    s = torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 4, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(attention_transfer_loss, (s, t))


def test_resize_and_reductions():
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 8, 8)
    assert attention_transfer_loss(s, t, resize="teacher", reduction="none").shape == (2,)
    with pytest.raises(ValueError, match=r"same H x W, got \(4, 4\) and \(8, 8\)"):
        attention_transfer_loss(s, t)


@pytest.mark.parametrize("kwargs,match", [
    ({"p": 0.5}, r"p must be at least 1.0, got 0.5"),
    ({"resize": "x"}, r"resize must be one of 'none', 'student', 'teacher', got 'x'"),
    ({"reduction": "max"}, r"reduction must be one of 'none', 'mean', 'sum', got 'max'"),
])
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        attention_transfer_loss(torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2), **kwargs)
