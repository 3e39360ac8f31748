"""The affinity map of one pixel, for pictures (the paper's Figure 3).

The maths only: it returns a tensor; drawing it is the caller's business (the
reference pipeline's ``examples/segmentation/figures.py`` uses matplotlib).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from segdistill._checks import check_feature_map, check_positive_int

__all__ = ["pixel_affinity"]


def pixel_affinity(features: Tensor, pixel: tuple[int, int], image_size: Sequence[int]) -> Tensor:
    r"""Cosine similarity of the feature cell under ``pixel`` with every cell of the map.

    One row of the affinity matrix of eq. (3) times :math:`N`, reshaped to the
    feature grid: :math:`N A_{i\cdot}` for the cell :math:`i` that holds the
    image pixel ``pixel``. The paper's Figure 3 draws these maps for the
    teacher's translated features and the student's adapted ones. Only that
    row is computed (O(N C)), never the N x N matrix of
    :func:`~segdistill.affinity_matrix`, so it runs on full-resolution maps.

    Args:
        features: (1, C, h, w), one image's feature map (further images are ignored).
        pixel: (row, column) in the image.
        image_size: the image's (H, W), to find the cell under ``pixel``.

    Returns:
        (h, w) cosines in [-1, 1], detached, on the features' device.

    Raises:
        TypeError: ``features`` is not a floating-point tensor (a complex one
            among others: its cosine is not the real part's).
        ValueError: ``features`` is not 4-D or is empty (no image, a zero-height
            or zero-width map, no channel), or ``pixel`` lies outside ``image_size``.

    Example:
        >>> features = torch.zeros(1, 2, 2, 2)
        >>> features[0, 0, :, 0] = 1.0  # left column: channel 0
        >>> features[0, 1, :, 1] = 1.0  # right column: channel 1
        >>> pixel_affinity(features, (0, 0), (4, 4))
        tensor([[1., 0.],
                [1., 0.]])
    """
    if isinstance(features, Tensor) and features.dim() != 4:
        raise ValueError(f"expected features of shape (1, C, h, w), got {tuple(features.shape)}")
    check_feature_map(features, "features")
    height, width = (check_positive_int("image_size", int(s)) for s in image_size)
    if not (0 <= pixel[0] < height and 0 <= pixel[1] < width):
        raise ValueError(f"pixel {tuple(pixel)} lies outside an image of size {(height, width)}")
    _, _, h, w = features.shape
    row, col = pixel[0] * h // height, pixel[1] * w // width
    with torch.no_grad():
        unit = F.normalize(features[0].detach().float().flatten(1), dim=0, eps=1e-8)  # (C, N)
        return (unit[:, row * w + col] @ unit).reshape(h, w)
