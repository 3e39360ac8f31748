r"""The knowledge translator: an autoencoder on the teacher's features (He et al., 2019)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from torch import Tensor, nn

from segdistill._blocks import ConvBNReLU, DeconvBNReLU
from segdistill._checks import check_feature_map, check_positive_int

__all__ = ["Translator", "TranslatorOutput"]


class TranslatorOutput(NamedTuple):
    """What :meth:`Translator.forward` returns."""

    reconstruction: Tensor
    """:math:`D(E(\\phi_t))`, the same shape as the input."""
    latent: Tensor
    """:math:`E(\\phi_t)`, on the half-resolution grid."""


def _check_input(x: Any, channels: int, name: str) -> None:
    dims = check_feature_map(x, name)
    if dims["C"] != channels:
        raise ValueError(f"expected {name} with {channels} channels, got {dims['C']}")


class Translator(nn.Module):
    r"""Knowledge translator of He et al. (CVPR 2019): an autoencoder on teacher features.

    The encoder :math:`E` compresses the teacher's feature map
    :math:`\phi_t` into a compact code on a grid half as fine, which is the
    student's grid when the teacher runs at output stride 8 and the student at
    16; the decoder :math:`D` maps the code back. It is trained alone with
    :func:`~segdistill.reconstruction_loss` (eq. 1), then frozen, and only
    :meth:`encode` is used for distillation.

    - Encoder: ``num_layers`` 3x3 conv + BN + ReLU, the first with stride 2.
    - Decoder: ``num_layers`` 3x3 transposed conv + BN + ReLU, the last with
      stride 2, sized so that any H x W, odd or even, round-trips exactly.

    Args:
        in_channels: the teacher's channels :math:`C_t`.
        latent_channels: the code's channels; :math:`C_t` by default, as in
            the paper.
        num_layers: layers in each of the encoder and the decoder (default 3).

    Shape:
        - input: :math:`(B, C_t, H, W)`.
        - latent: :math:`(B, C_{lat}, \lceil H/2 \rceil, \lceil W/2 \rceil)`.
        - reconstruction: :math:`(B, C_t, H, W)`.

    Raises:
        TypeError, ValueError: for non-positive or non-integer sizes at
            construction; for an input that is not a (B, C_t, H, W) floating
            tensor on the forward pass.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> translator = Translator(64, latent_channels=32)
        >>> out = translator(torch.randn(2, 64, 65, 65))
        >>> out.latent.shape, out.reconstruction.shape
        (torch.Size([2, 32, 33, 33]), torch.Size([2, 64, 65, 65]))
    """

    def __init__(
        self, in_channels: int, latent_channels: int | None = None, num_layers: int = 3
    ) -> None:
        super().__init__()
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.latent_channels = check_positive_int(
            "latent_channels", in_channels if latent_channels is None else latent_channels
        )
        self.num_layers = check_positive_int("num_layers", num_layers)
        c, z = self.in_channels, self.latent_channels
        self.encoder = nn.Sequential(
            *(
                ConvBNReLU(c if i == 0 else z, z, stride=2 if i == 0 else 1)
                for i in range(num_layers)
            )
        )
        last = num_layers - 1
        self.decoder = nn.ModuleList(
            DeconvBNReLU(z, c if i == last else z, stride=2 if i == last else 1)
            for i in range(num_layers)
        )

    def encode(self, x: Tensor) -> Tensor:
        """Map teacher features :math:`\\phi_t` to the code :math:`E(\\phi_t)`."""
        _check_input(x, self.in_channels, "translator input")
        return self.encoder(x)  # type: ignore[no-any-return]

    def decode(self, z: Tensor, output_size: Sequence[int] | None = None) -> Tensor:
        """Map a code back to the teacher's grid.

        Args:
            z: the code, :math:`(B, C_{lat}, h, w)`.
            output_size: the H x W to produce, :math:`2h - 1` or :math:`2h`
                per dimension; :math:`(2h, 2w)` when omitted.
        """
        _check_input(z, self.latent_channels, "latent code")
        h, w = z.shape[-2:]
        if output_size is None:
            output_size = (2 * h, 2 * w)
        else:
            output_size = tuple(output_size)[-2:]
            if any(o not in (2 * i - 1, 2 * i) for o, i in zip(output_size, (h, w), strict=True)):
                raise ValueError(
                    f"output_size {tuple(output_size)} cannot be decoded from a {h} x {w} code; "
                    f"expected ({2 * h - 1} or {2 * h}, {2 * w - 1} or {2 * w})"
                )
        for i, layer in enumerate(self.decoder):
            z = layer(z, output_size if i == len(self.decoder) - 1 else None)
        return z

    def forward(self, x: Tensor) -> TranslatorOutput:
        """Encode and decode ``x``; the reconstruction has exactly ``x``'s shape."""
        latent = self.encode(x)
        return TranslatorOutput(self.decode(latent, x.shape[-2:]), latent)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, latent_channels={self.latent_channels}, "
            f"num_layers={self.num_layers}"
        )
