"""FitNet against MSE on upsampled features."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segdistill import FitNetLoss, fitnet_loss


def test_identity_regressor_is_mse_on_upsampled_features():
    s = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    t = torch.randn(2, 5, 6, 8, dtype=torch.float64)
    up = F.interpolate(s, size=(6, 8), mode="bilinear", align_corners=False)
    module = FitNetLoss(5, 5)
    assert isinstance(module.regressor, torch.nn.Identity)
    torch.testing.assert_close(module(s, t), F.mse_loss(up, t))
    torch.testing.assert_close(fitnet_loss(s, t, reduction="sum"),
                               F.mse_loss(up, t, reduction="sum"))
    assert fitnet_loss(s, t, reduction="none").shape == (2, 5, 6, 8)


def test_regressor_matches_conv_then_upsample_reference():
    torch.manual_seed(0)
    module = FitNetLoss(3, 7).double()
    s = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    t = torch.randn(2, 7, 8, 8, dtype=torch.float64)
    # reference: upsample first, then the 1x1 regressor (they commute)
    up = F.interpolate(s, size=(8, 8), mode="bilinear", align_corners=False)
    expected = F.mse_loss(F.conv2d(up, module.regressor.weight), t)
    torch.testing.assert_close(module(s, t), expected)
    loss = module(s, t)
    loss.backward()
    assert module.regressor.weight.grad is not None


def test_gradcheck():
    s = torch.randn(1, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(1, 2, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fitnet_loss, (s, t))


@pytest.mark.parametrize("call,error,match", [
    (lambda: fitnet_loss(torch.randn(1, 3, 2, 2), torch.randn(1, 4, 2, 2)), ValueError,
     r"same number of channels, got 3 and 4; "
     r"FitNetLoss\(student_channels, teacher_channels\)"),
    (lambda: FitNetLoss(3, 4)(torch.randn(1, 5, 2, 2), torch.randn(1, 4, 2, 2)), ValueError,
     r"expected student features with 3 channels, got 5"),
    (lambda: FitNetLoss(0, 4), ValueError, r"student_channels must be a positive int"),
    (lambda: fitnet_loss(torch.randn(1, 3, 2, 2), torch.randn(2, 3, 2, 2)), ValueError,
     r"same batch size, got 1 and 2"),
])
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
