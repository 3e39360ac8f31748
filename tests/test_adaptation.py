"""AdaptationLoss (eq. 2) against a plain reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from segdistill import AdaptationLoss, adaptation_loss


def reference_adaptation_loss(student, teacher, p=1.0, q=2.0, normalize="position"):
    """Eq. (2) written out, one index j at a time."""
    terms = []
    for s, t in zip(student, teacher):
        if normalize == "sample":
            pairs = [(s.reshape(-1), t.reshape(-1))]
        else:
            pairs = [(s[:, y, x], t[:, y, x]) for y in range(s.shape[1]) for x in range(s.shape[2])]
        for s_j, t_j in pairs:
            s_n = s_j / torch.linalg.vector_norm(s_j, ord=q).clamp_min(1e-8)
            t_n = t_j / torch.linalg.vector_norm(t_j, ord=q).clamp_min(1e-8)
            terms.append(torch.linalg.vector_norm(t_n - s_n, ord=p))
    return torch.stack(terms).mean()


shapes = st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 4), st.integers(1, 4))
orders = st.sampled_from([1.0, 1.5, 2.0, 3.0, float("inf")])


@given(shape=shapes, p=orders, q=orders, normalize=st.sampled_from(["position", "sample"]),
       seed=st.integers(0, 2**16))
def test_matches_reference(shape, p, q, normalize, seed):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    expected = reference_adaptation_loss(student, teacher, p, q, normalize)
    actual = adaptation_loss(student, teacher, p=p, q=q, normalize=normalize)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(actual, (student, teacher))
    expected_grads = torch.autograd.grad(expected, (student, teacher))
    for a, e in zip(grads, expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-8, atol=1e-10)


@given(shape=shapes, seed=st.integers(0, 2**16), p=orders, q=orders)
def test_invariant_to_positive_per_position_scaling(shape, seed, p, q):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(*shape, generator=g, dtype=torch.float64)
    teacher = torch.randn(*shape, generator=g, dtype=torch.float64)
    b, _, h, w = shape
    scale_s = torch.rand(b, 1, h, w, generator=g, dtype=torch.float64) * 100 + 0.01
    scale_t = torch.rand(b, 1, h, w, generator=g, dtype=torch.float64) * 100 + 0.01
    before = adaptation_loss(student, teacher, p=p, q=q, reduction="none")
    after = adaptation_loss(student * scale_s, teacher * scale_t, p=p, q=q, reduction="none")
    torch.testing.assert_close(after, before, rtol=1e-9, atol=1e-9)


def test_sample_mode_is_not_position_invariant():
    """Per-sample normalisation mixes positions: a per-position scale does change it."""
    teacher = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    scale = torch.rand(1, 1, 3, 3, dtype=torch.float64) + 0.5
    assert adaptation_loss(teacher * scale, teacher, normalize="position").item() < 1e-12
    assert adaptation_loss(teacher * scale, teacher, normalize="sample").item() > 1e-3


@pytest.mark.parametrize("normalize,shape", [("position", (2, 3, 4)), ("sample", (2,))])
def test_reduction_none_shapes(normalize, shape):
    out = adaptation_loss(torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4),
                          normalize=normalize, reduction="none")
    assert out.shape == shape


def test_reduction_sum_and_mean_agree():
    s, t = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)
    terms = adaptation_loss(s, t, reduction="none")
    torch.testing.assert_close(adaptation_loss(s, t, reduction="sum"), terms.sum())
    torch.testing.assert_close(adaptation_loss(s, t), terms.mean())


def test_zero_vectors_are_finite():
    student = torch.randn(2, 4, 3, 3)
    student[0, :, 1, 1] = 0
    student.requires_grad_()
    teacher = torch.zeros(2, 4, 3, 3)
    loss = adaptation_loss(student, teacher, p=2.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def test_resize_teacher_onto_student():
    student = torch.randn(1, 4, 3, 3)
    teacher = torch.randn(1, 4, 6, 6)
    down = torch.nn.functional.interpolate(teacher, size=(3, 3), mode="bilinear",
                                           align_corners=False)
    torch.testing.assert_close(adaptation_loss(student, teacher, resize="student"),
                               adaptation_loss(student, down))


def test_gradcheck():
    s = torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    for p, normalize in [(1.0, "position"), (2.0, "position"), (3.0, "sample")]:
        assert torch.autograd.gradcheck(
            lambda a, b, p=p, n=normalize: adaptation_loss(a, b, p=p, normalize=n), (s, t)
        )


def test_module_repr():
    assert repr(AdaptationLoss(normalize="sample")) == (
        "AdaptationLoss(p=1.0, q=2.0, normalize='sample', resize='none', eps=1e-08, "
        "reduction='mean')"
    )


def test_rejects_channel_mismatch():
    with pytest.raises(ValueError,
                       match=r"same number of channels, got 3 and 5 \(an Adapter maps"):
        adaptation_loss(torch.randn(1, 3, 2, 2), torch.randn(1, 5, 2, 2))


def test_rejects_spatial_mismatch():
    with pytest.raises(ValueError, match=r"same H x W, got \(2, 2\) and \(4, 4\)"):
        adaptation_loss(torch.randn(1, 3, 2, 2), torch.randn(1, 3, 4, 4))


def test_rejects_batch_mismatch():
    with pytest.raises(ValueError, match=r"same batch size, got 1 and 2"):
        adaptation_loss(torch.randn(1, 3, 2, 2), torch.randn(2, 3, 2, 2))


def test_rejects_non_floating():
    with pytest.raises(TypeError, match=r"expected teacher to have a floating-point dtype"):
        adaptation_loss(torch.randn(1, 3, 2, 2), torch.ones(1, 3, 2, 2, dtype=torch.int32))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"p": 0.5}, ValueError, r"p must be at least 1.0, got 0.5"),
        ({"q": float("nan")}, ValueError, r"q must be finite, got nan"),
        ({"p": "1"}, TypeError, r"p must be a real number, got str"),
        ({"normalize": "image"}, ValueError,
         r"normalize must be one of 'position', 'sample', got 'image'"),
        ({"reduction": None}, ValueError, r"reduction must be one of .* got None"),
    ],
)
def test_rejects_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        adaptation_loss(torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2), **kwargs)
    with pytest.raises(error, match=match):
        AdaptationLoss(**kwargs)
