"""ReconstructionLoss (eq. 1) against a plain reference."""

from __future__ import annotations

import pytest
import torch

from segdistill import ReconstructionLoss, reconstruction_loss


def reference(target, reconstruction, latent, alpha):
    per_image = [
        ((x - y) ** 2).mean() + alpha * z.abs().mean()
        for x, y, z in zip(target, reconstruction, latent)
    ]
    return torch.stack(per_image)


@pytest.mark.parametrize("alpha", [0.0, 1e-7, 0.5])
def test_matches_reference(alpha):
    target = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    recon = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    latent = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    expected = reference(target, recon, latent, alpha)
    torch.testing.assert_close(
        reconstruction_loss(target, recon, latent, alpha=alpha, reduction="none"), expected
    )
    torch.testing.assert_close(reconstruction_loss(target, recon, latent, alpha=alpha),
                               expected.mean())
    torch.testing.assert_close(
        reconstruction_loss(target, recon, latent, alpha=alpha, reduction="sum"), expected.sum()
    )


def test_sparsity_term_counts():
    target = torch.ones(1, 2, 4, 4)
    latent = torch.full((1, 2, 2, 2), -3.0)
    assert reconstruction_loss(target, target, latent, alpha=0.1).item() == pytest.approx(0.3)


def test_gradcheck():
    args = [torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    latent = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, y, z: reconstruction_loss(x, y, z, alpha=0.3), (*args, latent)
    )


def test_module_repr():
    assert repr(ReconstructionLoss()) == "ReconstructionLoss(alpha=1e-07, reduction='mean')"


def test_rejects_shape_mismatch():
    with pytest.raises(ValueError, match=r"target and reconstruction of the same shape, got "
                                         r"\(1, 2, 4, 4\) and \(1, 2, 3, 3\)"):
        reconstruction_loss(torch.randn(1, 2, 4, 4), torch.randn(1, 2, 3, 3),
                            torch.randn(1, 2, 2, 2))


def test_rejects_latent_batch_mismatch():
    with pytest.raises(ValueError, match=r"target and latent with the same batch size"):
        reconstruction_loss(torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4),
                            torch.randn(2, 2, 2, 2))


def test_rejects_negative_alpha():
    with pytest.raises(ValueError, match=r"alpha must be at least 0.0, got -1.0"):
        ReconstructionLoss(alpha=-1.0)


def test_rejects_3d_latent():
    with pytest.raises(ValueError, match=r"expected latent of shape \(B, C, H, W\)"):
        reconstruction_loss(torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4),
                            torch.randn(2, 2, 2))
