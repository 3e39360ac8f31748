"""Channel-wise distillation against a plain per-channel reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from segdistill import cwd_loss


def reference_cwd(s, t, temp):
    b, c = s.shape[:2]
    total = 0.0
    for n in range(b):
        for k in range(c):
            p = torch.softmax(t[n, k].reshape(-1) / temp, 0)
            q = torch.softmax(s[n, k].reshape(-1) / temp, 0)
            total = total + (p * (p.log() - q.log())).sum()
    return total * temp**2 / (b * c)


@given(shape=st.tuples(st.integers(1, 2), st.integers(1, 4), st.integers(1, 4),
                       st.integers(1, 4)),
       temp=st.sampled_from([1.0, 2.0, 4.0]), seed=st.integers(0, 1000))
def test_matches_reference(shape, temp, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    expected, actual = reference_cwd(s, t, temp), cwd_loss(s, t, temperature=temp)
    torch.testing.assert_close(actual, expected)
    for a, e in zip(torch.autograd.grad(actual, (s, t)), torch.autograd.grad(expected, (s, t))):
        torch.testing.assert_close(a, e)


@given(seed=st.integers(0, 1000))
def test_zero_for_equal_maps_and_invariant_to_per_channel_shifts(seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    s = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    shift = torch.randn(2, 3, 1, 1, generator=g, dtype=torch.float64)
    assert abs(cwd_loss(t, t).item()) < 1e-12
    assert cwd_loss(s, t).item() > 0
    torch.testing.assert_close(cwd_loss(s + shift, t), cwd_loss(s, t))


def test_gradcheck():
    s = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(cwd_loss, (s, t))


@pytest.mark.parametrize("call,match", [
    (lambda: cwd_loss(torch.randn(1, 3, 2, 2), torch.randn(1, 4, 2, 2)),
     r"same number of channels, got 3 and 4"),
    (lambda: cwd_loss(torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2), temperature=-1),
     r"temperature must be greater than 0.0, got -1.0"),
    (lambda: cwd_loss(torch.randn(1, 3, 2, 2), torch.randn(1, 3, 4, 4)),
     r"same H x W, got \(2, 2\) and \(4, 4\)"),
])
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
