"""Pascal VOC 2012 (with the SBD trainaug labels) and Cityscapes, read from a local root.

Expected layouts (the usual ones; examples/README.md says how to get them):

VOC::

    ROOT/VOCdevkit/VOC2012/JPEGImages/<id>.jpg
    ROOT/VOCdevkit/VOC2012/SegmentationClass/<id>.png        val labels (palette PNGs)
    ROOT/VOCdevkit/VOC2012/SegmentationClassAug/<id>.png     trainaug labels (VOC + SBD)
    ROOT/VOCdevkit/VOC2012/ImageSets/Segmentation/train_aug.txt, val.txt

Cityscapes::

    ROOT/leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png
    ROOT/gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png

Training samples are augmented as in the paper (random scale in [0.5, 2],
padding, random crop, horizontal flip) with randomness drawn from a generator
seeded by the sample key of :class:`segdistill.training.EpochSampler`, so a
resumed run sees exactly the crops an uninterrupted one would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from segdistill.training import decode_sample_key

IGNORE_INDEX = 255
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

# Cityscapes labelIds -> the 19 train ids (255: ignored), from the official label table
_CITYSCAPES_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
    25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)


def cityscapes_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map a Cityscapes labelIds array to train ids (0-18, 255 ignored)."""
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in _CITYSCAPES_TRAIN_IDS.items():
        table[label_id] = train_id
    return table[label_ids]


def _require(path: Path, what: str, root: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"dataset root {root} is incomplete: missing {path} ({what}); "
            "see examples/README.md for the expected layout"
        )
    return path


def _read_image(path: Path) -> Tensor:
    from PIL import Image

    with Image.open(path) as img:
        array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _read_label(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img, dtype=np.uint8).copy()


class SegmentationFiles(Dataset[tuple[Tensor, Tensor]]):
    """Image and label files, augmented for training or plain for evaluation.

    Args:
        pairs: (image path, label path) per sample.
        train: augment (scale, pad, crop, flip) and index by sample key.
        crop: the training crop's side.
        scale_range: the random scale's range.
        seed: mixed into every sample's augmentation seed.
        label_map: maps a raw label array to train ids (Cityscapes).
    """

    uses_sample_keys = True

    def __init__(self, pairs: list[tuple[Path, Path]], train: bool, crop: int,
                 scale_range: tuple[float, float] = (0.5, 2.0), seed: int = 0,
                 label_map: str | None = None) -> None:
        if not pairs:
            raise ValueError("the dataset is empty: no image/label pairs were found")
        self.pairs = pairs
        self.train = train
        self.crop = crop
        self.scale_range = scale_range
        self.seed = seed
        self.label_map = label_map
        self.uses_sample_keys = train

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[Tensor, Tensor]:
        """The image (3, H, W) uint8 and the label (H, W) long of sample ``index``."""
        image_path, label_path = self.pairs[index]
        raw = _read_label(label_path)
        if self.label_map == "cityscapes":
            raw = cityscapes_train_ids(raw)
        return _read_image(image_path), torch.from_numpy(raw.astype(np.int64))

    def __getitem__(self, key: int) -> tuple[Tensor, Tensor]:
        if not self.train:
            image, label = self.load(key)
            return normalize(image), label
        _, index = decode_sample_key(key, len(self))
        image, label = self.load(index)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + key)
        return augment(image, label, self.crop, self.scale_range, g)


def normalize(image: Tensor) -> Tensor:
    """uint8 (3, H, W) -> float, ImageNet mean and std."""
    return (image.float() / 255.0 - MEAN) / STD


def augment(image: Tensor, label: Tensor, crop: int, scale_range: tuple[float, float],
            g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random scale, pad (image mean, label ignored), random crop, horizontal flip."""
    low, high = scale_range
    scale = low + (high - low) * float(torch.rand((), generator=g))
    h, w = image.shape[-2:]
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    x = F.interpolate(normalize(image)[None], size=size, mode="bilinear",
                      align_corners=False)[0]
    y = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
    pad_h, pad_w = max(crop - size[0], 0), max(crop - size[1], 0)
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), value=0.0)  # 0 is the mean after normalising
        y = F.pad(y, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
    top = int(torch.randint(x.shape[-2] - crop + 1, (), generator=g))
    left = int(torch.randint(x.shape[-1] - crop + 1, (), generator=g))
    x, y = x[:, top:top + crop, left:left + crop], y[top:top + crop, left:left + crop]
    if torch.rand((), generator=g) < 0.5:
        x, y = x.flip(-1), y.flip(-1)
    return x.contiguous(), y.contiguous()


def voc(root: str | Path, split: str, train: bool, crop: int,
        scale_range: tuple[float, float] = (0.5, 2.0), seed: int = 0) -> SegmentationFiles:
    """Pascal VOC 2012: ``split`` 'train_aug' (VOC + SBD labels) or 'val'."""
    root = Path(root)
    base = _require(root / "VOCdevkit" / "VOC2012", "the VOC 2012 devkit", root)
    images = _require(base / "JPEGImages", "the VOC images", root)
    labels = _require(
        base / ("SegmentationClassAug" if split == "train_aug" else "SegmentationClass"),
        "the SBD trainaug labels" if split == "train_aug" else "the VOC val labels", root)
    listing = _require(base / "ImageSets" / "Segmentation" / f"{split}.txt",
                       f"the {split} image list", root)
    ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    pairs = [(images / f"{i}.jpg", labels / f"{i}.png") for i in ids]
    missing = [p for pair in pairs for p in pair if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} files of the {split} list are missing, e.g. "
                                f"{missing[0]}")
    return SegmentationFiles(pairs, train, crop, scale_range, seed)


def cityscapes(root: str | Path, split: str, train: bool, crop: int,
               scale_range: tuple[float, float] = (0.5, 2.0), seed: int = 0
               ) -> SegmentationFiles:
    """Cityscapes fine annotations, labelIds mapped to the 19 train ids."""
    root = Path(root)
    images = _require(root / "leftImg8bit" / split, f"the {split} images", root)
    labels = _require(root / "gtFine" / split, f"the {split} fine labels", root)
    pairs = []
    for image in sorted(images.glob("*/*_leftImg8bit.png")):
        name = image.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")
        label = labels / image.parent.name / name
        if not label.exists():
            raise FileNotFoundError(f"no label for {image}: expected {label}")
        pairs.append((image, label))
    return SegmentationFiles(pairs, train, crop, scale_range, seed, label_map="cityscapes")


DATASETS = {"voc": (voc, VOC_CLASSES), "cityscapes": (cityscapes, CITYSCAPES_CLASSES)}
