"""The digit scenes: segmentation from real handwritten digits (scikit-learn's ``load_digits``).

scikit-learn ships the 1,797 8 x 8 digit images of the UCI optical recognition
data set inside the package, so nothing is downloaded. A scene places a few
upscaled digits on a canvas; its label map gives each digit's pixels that
digit's class (1-10 for digits 0-9) and the rest class 0 (background). Telling
a 3 from an 8 takes the whole digit, not one pixel: the context that the
affinity loss is meant to transfer.

The split is by digit image: train and val scenes are built from disjoint
digit samples, so val measures recognition of unseen handwriting.

The third dataset of the pipeline (``--dataset digits``, no ``--root``): the
scenes are built in memory in a second, and the whole pipeline runs on a CPU
in minutes. Training scenes are not augmented (a flipped digit is another
glyph); the scenes themselves are the variation.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["CLASSES", "NUM_CLASSES", "DigitDataset", "DigitScenes", "make_digit_scenes"]

NUM_CLASSES = 11
"""Background and the ten digits."""
CLASSES = ("background", *(f"digit {d}" for d in range(10)))


class DigitScenes(NamedTuple):
    """A set of scenes: images (N, 1, S, S) in [0, 1] and labels (N, S, S) in [0, 10]."""

    images: Tensor
    labels: Tensor


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # an optional extra
        raise ImportError(
            "the digit scenes come with scikit-learn: pip install 'segdistill[examples]'"
        ) from error
    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)


def make_digit_scenes(
    split: str,
    num_scenes: int,
    size: int = 48,
    digits_per_scene: tuple[int, int] = (2, 4),
    scale: tuple[int, int] = (14, 22),
    noise: float = 0.15,
    seed: int = 0,
) -> DigitScenes:
    """Build ``num_scenes`` deterministic scenes of one split.

    Args:
        split: ``'train'`` (80 % of the digit images) or ``'val'`` (the other 20 %).
        num_scenes: how many scenes.
        size: canvas side in pixels.
        digits_per_scene: inclusive range of the number of digits on a canvas.
        scale: inclusive range of a digit's side after upscaling, in pixels.
        noise: standard deviation of the Gaussian noise added to the image.
        seed: seeds the split-specific generator; the digit split itself is fixed.

    Returns:
        The images and label maps.

    Example:
        >>> scenes = make_digit_scenes("val", 4, size=32, scale=(10, 12))
        >>> scenes.images.shape, scenes.labels.shape, int(scenes.labels.max()) <= 10
        (torch.Size([4, 1, 32, 32]), torch.Size([4, 32, 32]), True)
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be one of 'train', 'val', got {split!r}")
    if scale[1] > size:
        raise ValueError(f"digits of up to {scale[1]} px do not fit a {size} px canvas")
    images, targets = _load_digits()
    order = np.random.default_rng(1234).permutation(len(images))  # the fixed split
    cut = int(0.8 * len(images))
    pool = order[:cut] if split == "train" else order[cut:]
    rng = np.random.default_rng(seed * 2 + (split == "val"))

    canvas = np.zeros((num_scenes, size, size), dtype=np.float32)
    labels = np.zeros((num_scenes, size, size), dtype=np.int64)
    for n in range(num_scenes):
        occupied = np.zeros((size, size), dtype=bool)
        for _ in range(rng.integers(digits_per_scene[0], digits_per_scene[1] + 1)):
            index = pool[rng.integers(len(pool))]
            side = int(rng.integers(scale[0], scale[1] + 1))
            digit = F.interpolate(
                torch.from_numpy(images[index])[None, None], size=(side, side),
                mode="bilinear", align_corners=False,
            )[0, 0].numpy()
            for _attempt in range(20):  # find a free spot; skip the digit if there is none
                y, x = rng.integers(0, size - side + 1, size=2)
                if not occupied[y:y + side, x:x + side].any():
                    break
            else:
                continue
            occupied[y:y + side, x:x + side] = True
            canvas[n, y:y + side, x:x + side] = digit
            mask = digit > 0.3
            labels[n, y:y + side, x:x + side][mask] = targets[index] + 1
    canvas += rng.normal(0.0, noise, canvas.shape).astype(np.float32)
    return DigitScenes(torch.from_numpy(canvas)[:, None], torch.from_numpy(labels))


class DigitDataset(Dataset[tuple[Tensor, Tensor]]):
    """The pipeline's digit dataset: ``(image, label)`` pairs of :func:`make_digit_scenes`.

    Args:
        split: ``'train'`` or ``'val'``.
        num_scenes: how many scenes.
        size: canvas side in pixels.

    The scenes are the same in every run (seed 0); the run's seed changes the
    training, not the data.
    """

    def __init__(self, split: str, num_scenes: int, size: int = 48) -> None:
        self.scenes = make_digit_scenes(split, num_scenes, size=size, seed=0)

    def __len__(self) -> int:
        return len(self.scenes.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.scenes.images[index], self.scenes.labels[index]
