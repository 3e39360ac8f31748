"""Figures: predictions side by side, and the affinity map of one pixel (the paper's Fig. 3).

Needs matplotlib (part of the ``examples`` extra). The maps themselves come from
:func:`segdistill.pixel_affinity`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["label_palette", "save_prediction_grid"]


def label_palette(num_classes: int, ignore_index: int | None = 255) -> np.ndarray:
    """RGB colours in [0, 1] for labels ``0..num_classes-1`` (class 0 black); the ignore
    label, when given and below 256, is white. Returns a (256, 3) array.

    Example:
        >>> label_palette(3)[[0, 255]].tolist()
        [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    """
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    colours = np.ones((256, 3))
    colours[0] = 0.0
    for k in range(1, num_classes):
        colours[k] = cmap((k - 1) % 20)[:3]
    if ignore_index is not None and 0 <= ignore_index < 256:
        colours[ignore_index] = 1.0
    return colours


def save_prediction_grid(
    path: str | Path,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    predictions: Mapping[str, Sequence[np.ndarray]],
    palette: np.ndarray,
    affinities: Mapping[str, Sequence[np.ndarray]] | None = None,
    pixels: Sequence[tuple[int, int]] | None = None,
    title: str = "",
) -> Path:
    """Write a PNG with one row per image: image, ground truth, each prediction, and each
    affinity map (with the chosen pixel marked).

    Args:
        path: the PNG to write.
        images: (H, W) grey or (H, W, 3) RGB arrays in [0, 1].
        labels: (H, W) integer label maps.
        predictions: name -> one (H, W) label map per image.
        palette: (256, 3) colours, e.g. from :func:`label_palette`.
        affinities: name -> one (h, w) cosine map per image (see
            :func:`segdistill.pixel_affinity`).
        pixels: the (row, column) each affinity map is about, per image.
        title: the figure's title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    affinities = affinities or {}
    rows = len(images)
    ncols = 2 + len(predictions) + len(affinities)
    fig, axes = plt.subplots(rows, ncols, figsize=(1.7 * ncols, 1.8 * rows), squeeze=False)
    for i in range(rows):
        panels: list[tuple[str, np.ndarray, str | None]] = [
            ("image", images[i], "gray" if images[i].ndim == 2 else None),
            ("ground truth", palette[labels[i]], None),
        ]
        panels += [(name, palette[maps[i]], None) for name, maps in predictions.items()]
        panels += [(f"affinity: {name}", maps[i], "magma") for name, maps in affinities.items()]
        for j, (name, image, cmap) in enumerate(panels):
            ax = axes[i, j]
            if cmap == "magma":
                ax.imshow(image, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
                if pixels is not None:
                    h, w = image.shape
                    size = labels[i].shape
                    ax.plot(pixels[i][1] * w / size[1] - 0.5, pixels[i][0] * h / size[0] - 0.5,
                            "c+", ms=8)
            else:
                ax.imshow(image, cmap=cmap, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
