"""AffinityLoss: the memory-linear algorithm against a plain dense reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from segdistill import AffinityLoss, affinity_loss, affinity_matrix, pairwise_loss


def reference_affinity_loss(student: torch.Tensor, teacher: torch.Tensor, distance: str = "l2"):
    """Eqs. (3)-(4) written out: build both N x N matrices, compare rows, average."""
    losses = []
    for s, t in zip(student, teacher):
        def affinity(x):
            flat = x.reshape(x.shape[0], -1)  # (C, N)
            unit = flat / flat.norm(dim=0, keepdim=True).clamp_min(1e-8)
            return unit.T @ unit / flat.shape[1]

        diff = affinity(s) - affinity(t)
        if distance == "l2":
            losses.append(diff.norm(dim=1).mean())
        else:
            losses.append(diff.square().sum(dim=1).mean())
    return torch.stack(losses)


shapes = st.tuples(
    st.integers(1, 3),  # B
    st.integers(1, 9),  # C_s
    st.integers(1, 9),  # C_t
    st.integers(1, 7),  # H
    st.integers(1, 7),  # W
)


def _features(shape, dtype, seed):
    b, c_s, c_t, h, w = shape
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, c_s, h, w, generator=g, dtype=dtype, requires_grad=True)
    teacher = torch.randn(b, c_t, h, w, generator=g, dtype=dtype, requires_grad=True)
    return student, teacher


def _assert_close(actual, expected, tol):
    # relative where the values are at least 1, absolute below
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("method", ["linear", "dense"])
@pytest.mark.parametrize("distance", ["l2", "squared"])
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_matches_reference_float64(method, distance, shape, seed):
    student, teacher = _features(shape, torch.float64, seed)
    expected = reference_affinity_loss(student, teacher, distance)
    actual = affinity_loss(student, teacher, method=method, distance=distance, reduction="none")
    _assert_close(actual, expected, 1e-7)
    grads = torch.autograd.grad(actual.sum(), (student, teacher))
    expected_grads = torch.autograd.grad(expected.sum(), (student, teacher))
    for g, e in zip(grads, expected_grads):
        _assert_close(g, e, 1e-7)


@pytest.mark.parametrize("distance", ["l2", "squared"])
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_linear_float32_matches_float64_reference(distance, shape, seed):
    student, teacher = _features(shape, torch.float64, seed)
    expected = reference_affinity_loss(student, teacher, distance)
    expected_grads = torch.autograd.grad(expected.sum(), (student, teacher))
    s32 = student.detach().float().requires_grad_()
    t32 = teacher.detach().float().requires_grad_()
    actual = affinity_loss(s32, t32, method="linear", distance=distance, reduction="none")
    assert actual.dtype == torch.float32
    _assert_close(actual.double(), expected, 1e-3)
    grads = torch.autograd.grad(actual.sum(), (s32, t32))
    for g, e in zip(grads, expected_grads):
        _assert_close(g.double(), e, 1e-3)


class _RecordShapes(TorchDispatchMode):
    """Records the shape of every tensor any aten op returns, backward included."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("distance", ["l2", "squared"])
def test_linear_never_allocates_n_by_n(distance):
    """No op of the linear path, forward or backward, makes a tensor of N x N elements."""
    n = 16 * 16
    student = torch.randn(2, 4, 16, 16, requires_grad=True)
    teacher = torch.randn(2, 6, 16, 16, requires_grad=True)
    with _RecordShapes() as linear:
        affinity_loss(student, teacher, method="linear", distance=distance).backward()
    with _RecordShapes() as dense:
        affinity_loss(student, teacher, method="dense", distance=distance).backward()
    # at most a stack of three (B, C, N) maps: O(N C), never N x N
    assert max(math.prod(s) for s in linear.shapes) <= 2 * 3 * 6 * n
    # the recorder does see N x N tensors where they exist
    assert max(math.prod(s) for s in dense.shapes) >= n * n


@pytest.mark.parametrize("distance", ["l2", "squared"])
def test_auto_picks_by_shape(distance):
    """'auto' runs the linear path where C << N (no N x N tensor, which dense builds) and
    the dense one where C >> N (no C x C Gram, which linear builds)."""

    def largest_tensor(b, c, h, w):
        with _RecordShapes() as record:
            affinity_loss(torch.randn(b, c, h, w, requires_grad=True), torch.randn(b, c, h, w),
                          distance=distance).backward()
        return max(math.prod(s) for s in record.shapes)

    assert largest_tensor(2, 4, 32, 32) < (32 * 32) ** 2  # C << N: linear
    assert largest_tensor(2, 256, 4, 4) < 256 * 256  # C >> N: dense


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1000])
def test_dense_chunking_does_not_change_the_value(chunk_size):
    student, teacher = _features((2, 3, 5, 4, 5), torch.float64, 0)
    expected = reference_affinity_loss(student, teacher)
    actual = affinity_loss(student, teacher, method="dense", chunk_size=chunk_size,
                           reduction="none")
    _assert_close(actual, expected, 1e-10)


@given(shape=shapes, seed=st.integers(0, 2**16), method=st.sampled_from(["linear", "dense"]))
def test_zero_when_equal_up_to_positive_per_position_scale(shape, seed, method):
    b, c, _, h, w = shape
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(b, c, h, w, generator=g)
    scale = torch.rand(b, 1, h, w, generator=g) * 10 + 0.1
    student = (teacher * scale).requires_grad_()
    loss = affinity_loss(student, teacher, method=method)
    assert loss.item() == pytest.approx(0.0, abs=1e-5)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(grad).all()


@given(shape=shapes, seed=st.integers(0, 2**16), distance=st.sampled_from(["l2", "squared"]))
def test_invariant_to_a_shared_permutation_of_positions(shape, seed, distance):
    student, teacher = _features(shape, torch.float64, seed)
    _, _, _, h, w = shape
    perm = torch.randperm(h * w, generator=torch.Generator().manual_seed(seed))

    def permute(x):
        return x.detach().flatten(2)[:, :, perm].reshape(x.shape)

    before = affinity_loss(student, teacher, distance=distance, reduction="none")
    after = affinity_loss(permute(student), permute(teacher), distance=distance,
                          reduction="none")
    _assert_close(after, before, 1e-10)


def test_permuting_only_one_map_changes_the_loss():
    """The invariance above is not vacuous: the loss does see positions."""
    teacher = torch.randn(1, 8, 4, 4, dtype=torch.float64)
    student = teacher.clone()
    shuffled = student.flatten(2)[:, :, torch.randperm(16)].reshape(student.shape)
    assert affinity_loss(student, teacher).item() < 1e-12
    assert affinity_loss(shuffled, teacher).item() > 1e-3


def test_zero_feature_vectors_give_finite_values_and_gradients():
    student = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    teacher = torch.randn(2, 7, 4, 4, dtype=torch.float64)
    student[:, :, 1, 2] = 0
    teacher[:, :, 0, :] = 0
    for method in ("linear", "dense"):
        s = student.clone().requires_grad_()
        t = teacher.clone().requires_grad_()
        loss = affinity_loss(s, t, method=method)
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
    expected = reference_affinity_loss(student, teacher).mean()
    _assert_close(affinity_loss(student, teacher, method="linear"), expected, 1e-9)


def test_all_zero_maps():
    zeros = torch.zeros(1, 3, 4, 4, requires_grad=True)
    loss = affinity_loss(zeros, torch.zeros(1, 3, 4, 4))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(zeros.grad).all()


def test_equal_maps_are_zero_with_finite_gradient_in_float32_at_scale():
    """At N = 4096 the three Gram terms cancel to rounding noise; the root is guarded."""
    teacher = torch.randn(2, 32, 64, 64)
    student = teacher.clone().requires_grad_()
    loss = affinity_loss(student, teacher, method="linear")
    loss.backward()
    assert loss.item() < 1e-4
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("reduction,expected_shape", [("none", (3,)), ("mean", ()), ("sum", ())])
def test_reductions(reduction, expected_shape):
    student, teacher = _features((3, 4, 6, 5, 5), torch.float64, 1)
    per_image = reference_affinity_loss(student, teacher)
    out = affinity_loss(student, teacher, reduction=reduction)
    assert out.shape == expected_shape
    want = {"none": per_image, "mean": per_image.mean(), "sum": per_image.sum()}[reduction]
    _assert_close(out, want, 1e-10)


@pytest.mark.parametrize("resize", ["student", "teacher"])
def test_explicit_resize(resize):
    student = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    teacher = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    size = (5, 5) if resize == "student" else (9, 9)

    def up(x):
        return torch.nn.functional.interpolate(x, size=size, mode="bilinear",
                                               align_corners=False)

    expected = reference_affinity_loss(up(student), up(teacher)).mean()
    _assert_close(affinity_loss(student, teacher, resize=resize), expected, 1e-10)


def test_affinity_matrix_matches_reference():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    flat = x.flatten(2)
    unit = flat / flat.norm(dim=1, keepdim=True)
    expected = unit.mT @ unit / 20
    _assert_close(affinity_matrix(x), expected, 1e-12)
    assert affinity_matrix(x).shape == (2, 20, 20)


def test_gradcheck():
    student = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    for method in ("linear", "dense"):
        for distance in ("l2", "squared"):
            assert torch.autograd.gradcheck(
                lambda s, t, m=method, d=distance: affinity_loss(s, t, method=m, distance=d),
                (student, teacher),
            )


def test_module_repr_and_options():
    module = AffinityLoss(distance="squared", method="linear", chunk_size=8, reduction="sum")
    assert repr(module) == (
        "AffinityLoss(distance='squared', method='linear', resize='none', chunk_size=8, "
        "eps=1e-08, reduction='sum')"
    )


# ---- error paths -------------------------------------------------------------------------

def test_rejects_non_tensor():
    with pytest.raises(TypeError, match=r"expected student to be a torch.Tensor, got list"):
        affinity_loss([1.0], torch.randn(1, 2, 3, 3))


def test_rejects_wrong_ndim():
    with pytest.raises(ValueError, match=r"expected teacher of shape \(B, C, H, W\), got a 3-D"):
        affinity_loss(torch.randn(1, 2, 3, 3), torch.randn(2, 3, 3))


def test_rejects_integer_dtype():
    with pytest.raises(TypeError, match=r"floating-point dtype, got torch.int64"):
        affinity_loss(torch.ones(1, 2, 3, 3, dtype=torch.long), torch.randn(1, 2, 3, 3))


def test_rejects_empty():
    with pytest.raises(ValueError, match=r"expected student to be non-empty, got shape \(0, 2"):
        affinity_loss(torch.randn(0, 2, 3, 3), torch.randn(0, 2, 3, 3))


def test_rejects_batch_mismatch():
    with pytest.raises(ValueError, match=r"same batch size, got 2 and 3"):
        affinity_loss(torch.randn(2, 2, 3, 3), torch.randn(3, 2, 3, 3))


def test_rejects_spatial_mismatch_without_resize():
    with pytest.raises(ValueError, match=r"same H x W, got \(33, 33\) and \(65, 65\)"):
        affinity_loss(torch.randn(1, 2, 33, 33), torch.randn(1, 2, 65, 65))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"method": "fast"}, r"method must be one of 'auto', 'dense', 'linear', got 'fast'"),
        ({"distance": "l1"}, r"distance must be one of 'l2', 'squared', got 'l1'"),
        ({"reduction": "avg"}, r"reduction must be one of 'none', 'mean', 'sum', got 'avg'"),
        ({"resize": "both"}, r"resize must be one of 'none', 'student', 'teacher', got 'both'"),
        ({"chunk_size": 0}, r"chunk_size must be a positive int, got 0"),
        ({"eps": 0.0}, r"eps must be greater than 0.0, got 0.0"),
    ],
)
def test_rejects_unknown_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        affinity_loss(torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3), **kwargs)
    with pytest.raises(ValueError, match=match):
        AffinityLoss(**kwargs)


@pytest.mark.parametrize("frozen", ["teacher", "student"])
def test_linear_backward_with_one_side_frozen_matches_dense(frozen):
    # The hand-written backward of the linear path computes only the gradients
    # asked for; each one alone must still equal the dense form's.
    g = torch.Generator().manual_seed(7)
    student = torch.randn(2, 5, 4, 6, generator=g, dtype=torch.float64)
    teacher = torch.randn(2, 3, 4, 6, generator=g, dtype=torch.float64)
    live = student if frozen == "teacher" else teacher
    live.requires_grad_()
    (linear,) = torch.autograd.grad(affinity_loss(student, teacher, method="linear"), live)
    (dense,) = torch.autograd.grad(affinity_loss(student, teacher, method="dense"), live)
    torch.testing.assert_close(linear, dense, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("teacher_channels", [3, 4])
@pytest.mark.parametrize("call", [
    lambda s, t, m: affinity_loss(s, t, method=m),
    lambda s, t, m: affinity_loss(s, t, method=m, distance="squared"),
    lambda s, t, m: pairwise_loss(s, t, method=m),
], ids=["affinity l2", "affinity squared", "pairwise"])
@pytest.mark.parametrize("method", ["linear", "dense"])
def test_second_derivatives_match_gradgradcheck(call, method, teacher_channels):
    """Both kernels' hand-written or own-graph backward passes rebuild a graph under
    create_graph=True: second derivatives are exact, E-form and unequal channels."""
    g = torch.Generator().manual_seed(1)
    student = torch.randn(1, 3, 2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    teacher = torch.randn(1, teacher_channels, 2, 3, dtype=torch.float64, generator=g,
                          requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda s, t: call(s, t, method), (student, teacher))


@pytest.mark.parametrize("method", ["linear", "dense"])
def test_backward_twice_with_retain_graph(method):
    s = torch.randn(2, 4, 3, 3, requires_grad=True)
    t = torch.randn(2, 4, 3, 3)
    for call in (lambda: affinity_loss(s, t, method=method),
                 lambda: pairwise_loss(s, t, method=method)):
        loss = call()
        loss.backward(retain_graph=True)
        first = s.grad.clone()
        loss.backward()
        torch.testing.assert_close(s.grad, 2 * first)
        s.grad = None
