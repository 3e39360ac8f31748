r"""Feature adapters :math:`C_f` and :math:`C_a` on the student (He et al., 2019)."""

from __future__ import annotations

from torch import Tensor, nn

from segdistill._blocks import ConvBNReLU
from segdistill._checks import check_feature_map, check_positive_int

__all__ = ["Adapter"]


class Adapter(nn.Module):
    r"""Feature adapter of He et al. (CVPR 2019): student features onto the teacher's space.

    ``num_layers`` 3x3 conv + BN + ReLU layers at stride 1, mapping
    :math:`C_s` channels to :math:`C_t` and keeping H x W. The paper's appendix
    uses three layers (the default) and its section 3.1 one. Adapters are
    trained with the student and dropped afterwards, so the deployed student's
    parameters and FLOPs are unchanged. The paper uses two separate adapters:
    :math:`C_f` for the adaptation loss and :math:`C_a` for the affinity loss.

    Args:
        in_channels: the student's channels :math:`C_s`.
        out_channels: the target channels :math:`C_t` (the translator's code).
        num_layers: conv layers (default 3).

    Shape:
        - input: :math:`(B, C_s, H, W)`.
        - output: :math:`(B, C_t, H, W)`.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> adapter = Adapter(320, 256)
        >>> adapter(torch.randn(2, 320, 33, 33)).shape
        torch.Size([2, 256, 33, 33])
    """

    def __init__(self, in_channels: int, out_channels: int, num_layers: int = 3) -> None:
        super().__init__()
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.out_channels = check_positive_int("out_channels", out_channels)
        self.num_layers = check_positive_int("num_layers", num_layers)
        self.layers = nn.Sequential(
            *(ConvBNReLU(in_channels if i == 0 else out_channels, out_channels)
              for i in range(num_layers))
        )

    def forward(self, x: Tensor) -> Tensor:
        dims = check_feature_map(x, "adapter input")
        if dims["C"] != self.in_channels:
            raise ValueError(
                f"expected adapter input with {self.in_channels} channels, got {dims['C']}"
            )
        return self.layers(x)  # type: ignore[no-any-return]

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"num_layers={self.num_layers}"
        )
