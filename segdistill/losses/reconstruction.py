r"""Reconstruction loss of the knowledge translator (He et al., CVPR 2019, eq. 1)."""

from __future__ import annotations

from torch import Tensor, nn

from segdistill._checks import check_feature_map, check_real, check_same_batch, check_same_device
from segdistill._features import full_precision
from segdistill._reduction import Reduction, check_reduction, nan_where_nonfinite, reduce_loss

__all__ = ["ReconstructionLoss", "reconstruction_loss"]


def _reconstruction(target: Tensor, reconstruction: Tensor, latent: Tensor, alpha: float,
                    reduction: Reduction) -> Tensor:
    """:func:`reconstruction_loss` with its options already validated."""
    check_feature_map(target, "target")
    check_feature_map(reconstruction, "reconstruction")
    check_feature_map(latent, "latent")
    check_same_device(target, reconstruction, ("target", "reconstruction"))
    check_same_device(target, latent, ("target", "latent"))
    if target.shape != reconstruction.shape:
        raise ValueError(
            "expected target and reconstruction of the same shape, got "
            f"{tuple(target.shape)} and {tuple(reconstruction.shape)}"
        )
    check_same_batch(target, latent, ("target", "latent"))
    ctx, (x, y, z) = full_precision(target, reconstruction, latent)
    with ctx:
        error = (x - y).square().flatten(1).mean(1)
        sparsity = z.abs().flatten(1).mean(1)
        return reduce_loss(nan_where_nonfinite(error + alpha * sparsity, x, y, z), reduction)


def reconstruction_loss(
    target: Tensor,
    reconstruction: Tensor,
    latent: Tensor,
    *,
    alpha: float = 1e-7,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Autoencoder loss of the knowledge translator, He et al. (CVPR 2019), eq. (1).

    .. math::

        \mathcal{L}_{ae} = \lVert \phi_t - D(E(\phi_t)) \rVert_2^2
            + \alpha \lVert E(\phi_t) \rVert_1

    Both norms are taken as means over their elements (a mean squared error
    and a mean absolute latent value) per image, so the loss does not grow
    with the feature map's size and the paper's learning rate of 0.1 applies
    whatever the teacher's channel count. The L1 term keeps the latent sparse;
    the paper's :math:`\alpha = 10^{-7}` makes it a light regulariser.

    Args:
        target: the teacher's features :math:`\phi_t`.
        reconstruction: the translator's output :math:`D(E(\phi_t))`.
        latent: the translator's code :math:`E(\phi_t)`.
        alpha: weight of the sparsity term, at least 0.
        reduction: ``'none'`` | ``'mean'`` | ``'sum'`` over the batch.

    Shape:
        - target: :math:`(B, C, H, W)`.
        - reconstruction: :math:`(B, C, H, W)`.
        - latent: :math:`(B, C', H', W')`.
        - output: scalar, or :math:`(B,)` with ``reduction='none'``.

    Returns:
        The loss, in the compute dtype (float32, or float64 for float64 inputs).

    Raises:
        TypeError: an input is not a floating-point tensor.
        ValueError: an input is not 4-D or is empty, ``target`` and
            ``reconstruction`` differ in shape, the batch sizes differ, or an
            option has an unknown value.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> target = torch.randn(2, 4, 6, 6)
        >>> latent = torch.randn(2, 4, 3, 3)
        >>> reconstruction_loss(target, target, latent, alpha=0.0).item()
        0.0
        >>> round(reconstruction_loss(target, torch.zeros_like(target), latent).item(), 4)
        0.8747
    """
    alpha = check_real("alpha", alpha, minimum=0.0)
    check_reduction(reduction)
    return _reconstruction(target, reconstruction, latent, alpha, reduction)


class ReconstructionLoss(nn.Module):
    r"""Autoencoder loss of the knowledge translator (eq. 1), as a module.

    Stores the options of :func:`reconstruction_loss`, validated once here, and
    computes it in ``forward``; see that function for the formula and the
    arguments.

    Args:
        alpha: weight of the L1 sparsity term on the latent (default 1e-7).
        reduction: ``'none'`` | ``'mean'`` | ``'sum'`` over the batch.

    Shape:
        - target, reconstruction: :math:`(B, C, H, W)`.
        - latent: :math:`(B, C', H', W')`.
        - output: scalar, or :math:`(B,)` with ``reduction='none'``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> from segdistill import Translator
        >>> translator = Translator(8)
        >>> features = torch.rand(2, 8, 9, 9)
        >>> out = translator(features)
        >>> loss = ReconstructionLoss()(features, out.reconstruction, out.latent)
        >>> loss.shape, bool(loss > 0)
        (torch.Size([]), True)
    """

    def __init__(self, alpha: float = 1e-7, reduction: Reduction = "mean") -> None:
        super().__init__()
        self.alpha = check_real("alpha", alpha, minimum=0.0)
        check_reduction(reduction)
        self.reduction: Reduction = reduction

    def forward(self, target: Tensor, reconstruction: Tensor, latent: Tensor) -> Tensor:
        return _reconstruction(target, reconstruction, latent, self.alpha, self.reduction)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, reduction={self.reduction!r}"
