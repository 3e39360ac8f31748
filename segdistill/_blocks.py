"""The conv-BN-ReLU layers the translator and the adapters are built from."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ConvBNReLU", "DeconvBNReLU"]


class ConvBNReLU(nn.Sequential):
    """A 3x3 convolution (padding 1, no bias), batch norm and ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class DeconvBNReLU(nn.Module):
    """A 3x3 transposed convolution (padding 1, no bias), batch norm and ReLU.

    ``forward`` takes the output's H x W so that a stride-2 layer can invert a
    stride-2 convolution on odd as well as even sizes.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.deconv = nn.ConvTranspose2d(
            in_channels, out_channels, 3, stride=stride, padding=1, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor, output_size: Sequence[int] | None = None) -> Tensor:
        size = None if output_size is None else list(output_size)
        return F.relu(self.bn(self.deconv(x, output_size=size)))
