"""KD (Hinton et al.) against a plain per-pixel reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from segdistill import KDLoss, kd_loss


def reference_kd(student, teacher, target, t, ignore):
    student = F.interpolate(student, size=teacher.shape[-2:], mode="bilinear",
                            align_corners=False)
    total, count = 0.0, 0
    b, _, h, w = teacher.shape
    for n in range(b):
        for y in range(h):
            for x in range(w):
                if target is not None and target[n, y, x] == ignore:
                    continue
                p = torch.softmax(teacher[n, :, y, x] / t, 0)
                q = torch.softmax(student[n, :, y, x] / t, 0)
                total = total + (p * (p.log() - q.log())).sum() * t * t
                count += 1
    return total / max(count, 1)


@given(b=st.integers(1, 2), k=st.integers(2, 5), h=st.integers(1, 4), w=st.integers(1, 4),
       up=st.sampled_from([1, 2]), t=st.sampled_from([1.0, 2.0, 4.0, 6.0]),
       seed=st.integers(0, 1000), masked=st.booleans())
def test_matches_reference(b, k, h, w, up, t, seed, masked):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(b, k, h * up, w * up, generator=g, dtype=torch.float64)
    student = torch.randn(b, k, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 3, (b, h * up, w * up), generator=g) if masked else None
    if target is not None:
        target[target == 2] = 255
    expected = reference_kd(student, teacher, target, t, 255)
    actual = kd_loss(student, teacher, target, temperature=t)
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=torch.float64))
    if isinstance(expected, torch.Tensor) and expected.requires_grad:
        (g1,) = torch.autograd.grad(actual, student)
        (g2,) = torch.autograd.grad(expected, student)
        torch.testing.assert_close(g1, g2)


def test_temperature_one_is_plain_kl():
    s, t = torch.randn(2, 6, 3, 5, dtype=torch.float64), torch.randn(2, 6, 3, 5,
                                                                     dtype=torch.float64)
    flat = lambda x: x.permute(0, 2, 3, 1).reshape(-1, 6)  # noqa: E731
    expected = F.kl_div(F.log_softmax(flat(s), 1), F.log_softmax(flat(t), 1),
                        reduction="batchmean", log_target=True)
    torch.testing.assert_close(kd_loss(s, t, temperature=1.0), expected)


def test_all_ignored_is_zero_with_finite_gradient():
    s = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = kd_loss(s, torch.randn(1, 3, 4, 4), torch.full((1, 4, 4), 255))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(s.grad).all()


def test_labels_on_a_finer_grid_are_resized_nearest():
    s, t = torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2)
    fine = torch.zeros(1, 4, 4, dtype=torch.long)
    fine[:, :2, :2] = 255  # the top-left cell of the 2 x 2 grid
    coarse = torch.zeros(1, 2, 2, dtype=torch.long)
    coarse[0, 0, 0] = 255
    torch.testing.assert_close(kd_loss(s, t, fine), kd_loss(s, t, coarse))


def test_reductions():
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    target[0] = 255
    per_pixel = kd_loss(s, t, target, reduction="none")
    assert per_pixel.shape == (2, 4, 4) and (per_pixel[0] == 0).all()
    torch.testing.assert_close(kd_loss(s, t, target, reduction="sum"), per_pixel.sum())
    torch.testing.assert_close(kd_loss(s, t, target), per_pixel[1].mean())


def test_gradcheck():
    s = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: kd_loss(a, b, temperature=2.0), (s, t))


@pytest.mark.parametrize("call,error,match", [
    (lambda: kd_loss(torch.randn(1, 3, 2, 2), torch.randn(1, 4, 2, 2)), ValueError,
     r"student logits and teacher logits with the same number of channels, got 3 and 4 "
     r"\(one per class\)"),
    (lambda: kd_loss(torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2), temperature=0),
     ValueError, r"temperature must be greater than 0.0, got 0.0"),
    (lambda: kd_loss(torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2)),
     TypeError, r"expected target to hold integer labels, got torch.float32"),
    (lambda: kd_loss(torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2),
                     torch.zeros(1, 1, 2, 2, dtype=torch.long)),
     ValueError, r"expected target of shape \(B, H, W\), got a 4-D"),
    (lambda: kd_loss(torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2),
                     torch.zeros(2, 2, 2, dtype=torch.long)),
     ValueError, r"logits and target with the same batch size, got 1 and 2"),
    (lambda: KDLoss(ignore_index=1.5), TypeError, r"ignore_index must be an int or None"),
    (lambda: kd_loss(torch.randn(3, 2, 2), torch.randn(1, 3, 2, 2)), ValueError,
     r"expected student logits of shape \(B, C, H, W\)"),
])
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
