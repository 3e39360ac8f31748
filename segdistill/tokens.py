r"""ViT tokens as feature maps: ``(B, [CLS + registers +] N, C)`` to ``(B, C, H, W)``.

A ViT layer (timm's ``blocks.11``, Hugging Face's ``encoder.layer.11`` or
``layernorm``, DINOv2's) returns a sequence of tokens: first the prefix tokens
(a class token, and the register tokens of DINOv2 with registers), then one
token per image patch in row-major order. The losses of segdistill compare
feature maps, so the patch tokens are put back on their grid:

.. math::

    F[b, c, i, j] = X[b,\ P + i W + j,\ c], \qquad 0 \le i < H,\ 0 \le j < W,

where :math:`P` is the number of prefix tokens and :math:`(H, W)` the patch grid,
``(image height // patch height, image width // patch width)`` for an image of the
given size (non-square grids included).

Give a :class:`TokenGrid` to a :class:`~segdistill.FeatureSpec` (``tokens=``) and the
hooks convert the layer's output before any check, on either side of a
:class:`~segdistill.DistillationWrapper`; :func:`tokens_to_map` is the functional twin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from segdistill._checks import check_positive_int

__all__ = ["TokenGrid", "tokens_to_map"]


def _pair(name: str, value: Any) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"expected {name} as an int or a pair (height, width), got "
                             f"{len(value)} values")
        return (check_positive_int(f"{name}[0]", value[0]),
                check_positive_int(f"{name}[1]", value[1]))
    size = check_positive_int(name, value)
    return size, size


@dataclass(frozen=True)
class TokenGrid:
    """How a ViT layer's tokens lie on the image: patch size and prefix tokens.

    Args:
        patch_size: the patch size in pixels, an int or ``(height, width)``; the
            grid is ``image size // patch size``. ``None`` when ``grid`` is given or
            the grid is square.
        prefix_tokens: tokens before the patch tokens (1 for a class token, 1 + 4
            for DINOv2 with 4 registers, 0 for none).
        grid: a fixed patch grid ``(H, W)``, for models that resize their input.

    Raises:
        TypeError, ValueError: a size is not a positive int (or a pair of them), or
            ``prefix_tokens`` is negative.

    Example:
        >>> TokenGrid(patch_size=14, prefix_tokens=5).grid_for(125, (140, 168))
        (10, 12)
    """

    patch_size: int | tuple[int, int] | None = None
    prefix_tokens: int = 1
    grid: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.patch_size is not None:
            object.__setattr__(self, "patch_size", _pair("patch_size", self.patch_size))
        if self.grid is not None:
            object.__setattr__(self, "grid", _pair("grid", self.grid))
        if isinstance(self.prefix_tokens, bool) or not isinstance(self.prefix_tokens, int) \
                or self.prefix_tokens < 0:
            raise ValueError(f"expected prefix_tokens to be an int >= 0, got "
                             f"{self.prefix_tokens!r}")

    @classmethod
    def of(cls, model: nn.Module) -> TokenGrid:
        """Read the patch size and the prefix tokens off a timm or Hugging Face ViT.

        timm's ``VisionTransformer`` (and its DINOv2/EVA kin) has ``patch_embed.patch_size``
        and ``num_prefix_tokens``; a Hugging Face ViT or DINOv2 model has ``config.patch_size``,
        one class token and ``config.num_register_tokens`` registers when it has them.

        Raises:
            TypeError: the model says neither.
        """
        patch_embed = getattr(model, "patch_embed", None)
        if patch_embed is not None and hasattr(model, "num_prefix_tokens"):
            prefix: Any = model.num_prefix_tokens
            return cls(patch_size=tuple(patch_embed.patch_size), prefix_tokens=int(prefix))
        config = getattr(model, "config", None)
        if config is not None and getattr(config, "patch_size", None) is not None:
            registers = int(getattr(config, "num_register_tokens", 0) or 0)
            return cls(patch_size=config.patch_size, prefix_tokens=1 + registers)
        raise TypeError(
            f"cannot read the token layout of {type(model).__name__} (no timm patch_embed/"
            "num_prefix_tokens, no Hugging Face config.patch_size); pass "
            "TokenGrid(patch_size=..., prefix_tokens=...)")

    def grid_for(self, tokens: int, image_size: tuple[int, int] | None) -> tuple[int, int]:
        """The patch grid ``(H, W)`` of a sequence of ``tokens`` tokens from an image of
        ``image_size`` (``None``: the fixed grid, or a square one).

        Raises:
            ValueError: the tokens do not fill that grid.
        """
        patches = tokens - self.prefix_tokens
        if self.grid is not None:
            grid, how = self.grid, "the given grid"
        elif self.patch_size is not None and image_size is not None:
            ph, pw = self.patch_size  # type: ignore[misc]
            grid = (image_size[0] // ph, image_size[1] // pw)
            how = f"image {image_size[0]} x {image_size[1]}, patch {ph} x {pw}"
        else:
            side = math.isqrt(max(patches, 0))
            grid, how = (side, side), "square, as no image size is known"
        if grid[0] * grid[1] != patches or patches <= 0:
            raise ValueError(
                f"expected {self.prefix_tokens} prefix tokens + {grid[0] * grid[1]} patch "
                f"tokens (a {grid[0]} x {grid[1]} grid: {how}), got {tokens} tokens")
        return grid


def tokens_to_map(tokens: Tensor, layout: TokenGrid,
                  image_size: tuple[int, int] | None = None) -> Tensor:
    r"""Put a ViT layer's patch tokens back on their grid, dropping the prefix tokens.

    Args:
        tokens: :math:`(B, P + H W, C)`.
        layout: the patch size and the :math:`P` prefix tokens (see :class:`TokenGrid`).
        image_size: the input image's ``(height, width)``, which gives the grid.

    Returns:
        :math:`(B, C, H, W)`, a view-free copy in the default (contiguous) layout; the
        gradient flows back to the patch tokens.

    Raises:
        TypeError: ``tokens`` is not a floating tensor.
        ValueError: it is not 3-D, or its length does not fit the grid.

    Example:
        >>> import torch
        >>> x = torch.arange(2 * 7 * 3.0).reshape(2, 7, 3)  # CLS + a 2 x 3 grid, 3 channels
        >>> fmap = tokens_to_map(x, TokenGrid(patch_size=16), image_size=(32, 48))
        >>> fmap.shape
        torch.Size([2, 3, 2, 3])
        >>> bool((fmap[0, :, 1, 2] == x[0, 1 + 1 * 3 + 2]).all())
        True
    """
    if not isinstance(tokens, Tensor) or not tokens.is_floating_point():
        raise TypeError(f"expected tokens as a floating tensor, got "
                        f"{getattr(tokens, 'dtype', type(tokens).__name__)}")
    if tokens.ndim != 3:
        raise ValueError(f"expected tokens of shape (B, tokens, C), got shape "
                         f"{tuple(tokens.shape)}")
    if not isinstance(layout, TokenGrid):
        raise TypeError(f"expected layout to be a TokenGrid, got {type(layout).__name__}")
    b, length, c = tokens.shape
    h, w = layout.grid_for(length, image_size)
    patches = tokens[:, layout.prefix_tokens:]
    return patches.transpose(1, 2).reshape(b, c, h, w).contiguous()
