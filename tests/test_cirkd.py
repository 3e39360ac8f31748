"""CIRKD's mini-batch loss: the blocked, memory-linear pass against a plain dense reading."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import segdistill.losses.cirkd as cirkd_module
from segdistill.losses.cirkd import CIRKDLoss, cirkd_loss


def reference_cirkd(student, teacher, temperature=0.1):
    """The reference code's reading, per query image: for every pair (i, j) both N x N
    relation maps, ``kl_div(log_softmax(S / tau), log_softmax(T / tau), 'batchmean')``,
    the mean over j; in float64. (``F.normalize``'s eps is the library's 1e-8, not the
    reference's 1e-12: they differ only in the gradient at an all-zero vector.)"""
    s = F.normalize(student.double().flatten(2), dim=1, eps=1e-8)
    t = F.normalize(teacher.double().flatten(2), dim=1, eps=1e-8)
    batch = s.shape[0]
    per_image = []
    for i in range(batch):
        total = 0.0
        for j in range(batch):
            log_q = F.log_softmax(s[i].T @ s[j] / temperature, dim=1)
            log_p = F.log_softmax(t[i].T @ t[j] / temperature, dim=1)
            total = total + F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
        per_image.append(total / batch)
    return torch.stack(per_image)


def _maps(b, c_s, c_t, h, w, dtype=torch.float64, seed=0, noise=None):
    """A student and a teacher map, both requiring grad; with ``noise`` the student is the
    teacher plus that much Gaussian noise (equal channels)."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(b, c_t, h, w, generator=g, dtype=dtype)
    if noise is None:
        student = torch.randn(b, c_s, h, w, generator=g, dtype=dtype)
    else:
        student = teacher + noise * torch.randn(teacher.shape, generator=g, dtype=dtype)
    return student.requires_grad_(), teacher.requires_grad_()


def _grads(loss, inputs):
    return torch.autograd.grad(loss.sum(), inputs)


def _relative(actual, expected):
    return ((actual.double() - expected).norm() / expected.norm()).item()


@settings(max_examples=25)
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6),
                       st.integers(1, 5), st.integers(1, 5)),
       temperature=st.sampled_from([0.1, 0.01, 1.0]),
       block_size=st.sampled_from([None, 1, 2, 3, 7]), seed=st.integers(0, 2**16))
def test_matches_reference_float64(shape, temperature, block_size, seed):
    """Values and both gradients, for any channel counts, grids and blocks."""
    student, teacher = _maps(*shape, seed=seed)
    expected = reference_cirkd(student, teacher, temperature)
    actual = cirkd_loss(student, teacher, temperature=temperature, block_size=block_size,
                        reduction="none")
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12)
    for got, want in zip(_grads(actual, (student, teacher)), _grads(expected, (student, teacher))):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("temperature", [0.1, 0.01])
@pytest.mark.parametrize("channels,noise", [
    ((16, 24), None),  # unequal channels, unrelated maps
    ((32, 32), None),
    ((32, 32), 1.0),  # correlated
    ((32, 32), 1e-1),
    ((32, 32), 1e-2),
    ((32, 32), 1e-3),  # nearly equal: the KL is ~1e-7 and float32 cancels
])
def test_float32_within_1e_4_of_float64(temperature, channels, noise):
    c_s, c_t = channels
    s32, t32 = _maps(3, c_s, c_t, 8, 9, dtype=torch.float32, seed=1, noise=noise)
    student, teacher = (x.detach().double().requires_grad_() for x in (s32, t32))
    expected = reference_cirkd(student, teacher, temperature)
    actual = cirkd_loss(s32, t32, temperature=temperature, reduction="none")
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=0)
    for got, want in zip(_grads(actual, (s32, t32)), _grads(expected, (student, teacher))):
        assert _relative(got, want) < 1e-4


def test_refined_and_working_precision_rows_combine(monkeypatch):
    """With the recomputation threshold between the rows' ratios, some query rows are
    recomputed in float64 and the others kept: values and gradients still agree."""
    s32, t32 = _maps(2, 8, 8, 6, 6, dtype=torch.float32, seed=3, noise=0.3)
    student, teacher = (x.detach().double().requires_grad_() for x in (s32, t32))
    expected = reference_cirkd(student, teacher)
    units = [cirkd_module._unit_rows(x.flatten(2), 1e-8)[0] for x in (s32, t32)]
    stats = cirkd_module._row_stats(cirkd_module._Queries(*units), cirkd_module._Keys(*units),
                                    36, 10.0, 256)
    ratio = stats.kl.sum(1) / stats.rounding.sum(1)
    monkeypatch.setattr(cirkd_module, "_RECOMPUTE_ULPS", ratio.median().item())
    rows = []
    original = cirkd_module._row_stats
    monkeypatch.setattr(cirkd_module, "_row_stats",
                        lambda q, *args: rows.append(q.s.shape[0]) or original(q, *args))
    actual = cirkd_loss(s32, t32, reduction="none")
    assert rows[0] == 72 and 0 < rows[1] < 72  # every row, then the float64 ones
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=0)
    for got, want in zip(_grads(actual, (s32, t32)), _grads(expected, (student, teacher))):
        assert _relative(got, want) < 1e-5


def test_equal_maps_give_exactly_zero_with_zero_gradient():
    teacher = torch.randn(2, 32, 16, 16)
    student = teacher.clone().requires_grad_()
    for temperature in (0.1, 0.01):
        loss = cirkd_loss(student, teacher, temperature=temperature)
        (grad,) = torch.autograd.grad(loss, student)
        assert loss.item() == 0.0
        assert grad.abs().max().item() < 1e-9


def test_zero_feature_vectors_match_the_reference():
    student, teacher = _maps(2, 5, 7, 4, 4, seed=4)
    with torch.no_grad():
        student[:, :, 1, 2] = 0
        teacher[:, :, 0, :] = 0
    expected = reference_cirkd(student, teacher)
    actual = cirkd_loss(student, teacher, reduction="none")
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12)
    for got, want in zip(_grads(actual, (student, teacher)), _grads(expected, (student, teacher))):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)
    zeros = torch.zeros(1, 3, 2, 2, requires_grad=True)
    loss = cirkd_loss(zeros, torch.zeros(1, 3, 2, 2))
    assert loss.item() == 0.0 and torch.isfinite(torch.autograd.grad(loss, zeros)[0]).all()


def test_gradcheck():
    student, teacher = _maps(2, 3, 4, 2, 3, seed=5)
    assert torch.autograd.gradcheck(
        lambda s, t: cirkd_loss(s, t, temperature=0.5, block_size=2, reduction="none"),
        (student, teacher))


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


@pytest.mark.parametrize("noise", [None, 1e-3])  # 1e-3: every row through float64 as well
def test_never_allocates_n_by_n(noise):
    """No op, forward or backward (both sides), makes a tensor larger than a few (B, N, C)
    maps or one block, at N x N = 1M elements and B N C = 32K."""
    b, c, n = 2, 16, 32 * 32
    student, teacher = _maps(b, c, c, 32, 32, dtype=torch.float32, seed=6, noise=noise)
    with _RecordShapes() as record:
        torch.autograd.backward(cirkd_loss(student, teacher, block_size=128))
    largest = max(math.prod(shape) for shape in record.shapes)
    assert largest <= 2 * b * n * c  # a (B, C, N) float64 copy, or one 128 x 512 block
    with _RecordShapes() as record:
        torch.autograd.backward(cirkd_loss(student, teacher))
    assert max(math.prod(shape) for shape in record.shapes) <= 256 * 1024 < n * n
    with _RecordShapes() as record:  # the recorder sees N x N tensors where they exist
        torch.autograd.backward(reference_cirkd(student, teacher).mean())
    assert max(math.prod(shape) for shape in record.shapes) >= n * n


def test_invariances():
    """A shared permutation of the positions, or positive per-position scales, change
    nothing; permuting the images permutes the per-image losses."""
    student, teacher = _maps(3, 4, 6, 3, 4, seed=7)
    student, teacher = student.detach(), teacher.detach()
    base = cirkd_loss(student, teacher, reduction="none")
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))

    def shuffle(x):
        return x.flatten(2)[:, :, perm].reshape(x.shape)

    torch.testing.assert_close(cirkd_loss(shuffle(student), shuffle(teacher), reduction="none"),
                               base)
    scale = torch.rand(3, 1, 3, 4, dtype=torch.float64) * 10 + 0.1
    torch.testing.assert_close(cirkd_loss(student * scale, teacher, reduction="none"), base)
    order = torch.tensor([2, 0, 1])
    torch.testing.assert_close(cirkd_loss(student[order], teacher[order], reduction="none"),
                               base[order])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_gives_nan(bad):
    student, teacher = _maps(2, 3, 3, 3, 3, dtype=torch.float32, seed=8)
    student = student.detach().clone()
    student[1, 0, 2, 2] = bad
    assert torch.isnan(cirkd_loss(student, teacher, reduction="none")).all()  # every image
    assert torch.isnan(cirkd_loss(teacher.detach(), student))


@pytest.mark.parametrize("reduction,expected_shape", [("none", (3,)), ("mean", ()), ("sum", ())])
def test_reductions(reduction, expected_shape):
    student, teacher = _maps(3, 4, 5, 3, 3, seed=9)
    per_image = reference_cirkd(student, teacher)
    out = cirkd_loss(student, teacher, reduction=reduction)
    assert out.shape == expected_shape
    want = {"none": per_image, "mean": per_image.mean(), "sum": per_image.sum()}[reduction]
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("resize", ["student", "teacher"])
def test_explicit_resize(resize):
    student, teacher = torch.randn(2, 4, 5, 5), torch.randn(2, 6, 9, 9)
    size = (5, 5) if resize == "student" else (9, 9)

    def onto(x):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    torch.testing.assert_close(cirkd_loss(student, teacher, resize=resize),
                               cirkd_loss(onto(student), onto(teacher)))


def test_module_equals_functional_and_repr():
    student, teacher = _maps(2, 4, 6, 3, 5, seed=10)
    kwargs = {"temperature": 0.2, "block_size": 3, "reduction": "sum"}
    module = CIRKDLoss(**kwargs)
    torch.testing.assert_close(module(student, teacher), cirkd_loss(student, teacher, **kwargs),
                               rtol=0, atol=0)
    assert repr(module) == ("CIRKDLoss(temperature=0.2, resize='none', block_size=3, "
                            "eps=1e-08, reduction='sum')")
    assert repr(CIRKDLoss()) == "CIRKDLoss(temperature=0.1, resize='none', eps=1e-08, " \
        "reduction='mean')"


def test_autocast_bf16_gives_float32_and_float32_gradients():
    student, teacher = _maps(2, 6, 4, 4, 5, dtype=torch.float32, seed=11)
    conv = torch.nn.Conv2d(6, 6, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = conv(student)  # a bf16 activation, as a student under autocast gives
        assert first.dtype == torch.bfloat16
        loss = cirkd_loss(first, teacher)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(loss, (student, teacher)))
    # backward() inside the autocast region (which the backward pass inherits) stays float32
    expected = torch.autograd.grad(cirkd_loss(student, teacher), (student, teacher))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grads = torch.autograd.grad(cirkd_loss(student, teacher), (student, teacher))
    for got, want in zip(grads, expected):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


def test_frozen_teacher_gets_no_gradient():
    student, teacher = _maps(2, 4, 4, 3, 3, seed=12)
    teacher = teacher.detach()
    loss = cirkd_loss(student, teacher)
    (grad,) = torch.autograd.grad(loss, student)
    (want,) = torch.autograd.grad(reference_cirkd(student, teacher).mean(), student)
    torch.testing.assert_close(grad, want)


@pytest.mark.parametrize("call,error,match", [
    (lambda: cirkd_loss(torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2), temperature=0),
     ValueError, r"temperature must be greater than 0.0, got 0.0"),
    (lambda: CIRKDLoss(temperature="0.1"), TypeError, r"temperature must be a real number"),
    (lambda: CIRKDLoss(block_size=0), ValueError, r"block_size must be a positive int, got 0"),
    (lambda: CIRKDLoss(block_size=2.0), TypeError, r"block_size must be an int, got float"),
    (lambda: CIRKDLoss(reduction="batchmean"), ValueError,
     r"reduction must be one of 'none', 'mean', 'sum', got 'batchmean'"),
    (lambda: CIRKDLoss(resize="both"), ValueError, r"resize must be one of"),
    (lambda: CIRKDLoss(eps=0.0), ValueError, r"eps must be greater than 0.0"),
    (lambda: cirkd_loss(torch.randn(1, 3, 2, 2), torch.randn(1, 3, 4, 4)), ValueError,
     r"same H x W, got \(2, 2\) and \(4, 4\)"),
    (lambda: cirkd_loss(torch.randn(2, 3, 2, 2), torch.randn(1, 3, 2, 2)), ValueError,
     r"same batch size, got 2 and 1"),
    (lambda: cirkd_loss(torch.randn(3, 2, 2), torch.randn(1, 3, 2, 2)), ValueError,
     r"expected student of shape \(B, C, H, W\), got a 3-D tensor"),
    (lambda: cirkd_loss(torch.ones(1, 3, 2, 2, dtype=torch.long), torch.randn(1, 3, 2, 2)),
     TypeError, r"floating-point dtype, got torch.int64"),
])
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------------------- the benchmark


def _benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cirkd.py"
    spec = importlib.util.spec_from_file_location("bench_cirkd", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_benchmark_readings_equal_the_loss():
    bench = _benchmark()
    student, teacher = _maps(3, 8, 8, 4, 5, dtype=torch.float32, seed=13)
    want = cirkd_loss(student, teacher)
    torch.testing.assert_close(bench.dense_cirkd_loss(student, teacher), want)
    with torch.no_grad():
        torch.testing.assert_close(bench.sdpa_cirkd_value(student, teacher), want,
                                   rtol=1e-4, atol=1e-6)


def test_matmul_bound_times_the_products_the_loss_runs():
    """The bound's products are the library's (same multiply-adds, forward and backward,
    teacher frozen), so it cannot be flattered by leaving some out."""
    bench = _benchmark()
    case = bench.Case(2, 8, 40, 30, "cirkd", 1, 1)  # N = 1200: two key tiles per image

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.madds = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in ("mm", "addmm", "addmm_"):
                a, b = args[-2], args[-1]
                self.madds += a.shape[0] * a.shape[1] * b.shape[1]
            return func(*args, **(kwargs or {}))

    student = torch.randn(2, 8, 40, 30, requires_grad=True)
    teacher = torch.randn(2, 8, 40, 30)
    with Count() as count:
        torch.autograd.backward(cirkd_loss(student, teacher))
    expected = sum(a[0] * a[1] * b[1] for a, b in bench.matmul_products(case))
    assert count.madds == expected
