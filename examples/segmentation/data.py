"""The datasets: Pascal VOC 2012 (with the SBD trainaug labels), Cityscapes and Pascal
Context, read from a local root, and the digit scenes (:mod:`examples.segmentation.digits`),
built in memory.

Expected layouts (the usual ones; examples/README.md says how to get them):

VOC::

    ROOT/VOCdevkit/VOC2012/JPEGImages/<id>.jpg
    ROOT/VOCdevkit/VOC2012/SegmentationClass/<id>.png        val labels (palette PNGs)
    ROOT/VOCdevkit/VOC2012/SegmentationClassAug/<id>.png     trainaug labels (VOC + SBD)
    ROOT/VOCdevkit/VOC2012/ImageSets/Segmentation/train_aug.txt, val.txt

Cityscapes::

    ROOT/leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png
    ROOT/gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png

Pascal Context (the 59-class labels of the Detail API, as mmsegmentation lays them out)::

    ROOT/VOCdevkit/VOC2010/JPEGImages/<id>.jpg
    ROOT/VOCdevkit/VOC2010/SegmentationClassContext/<id>.png   0 background, 1..59 classes
    ROOT/VOCdevkit/VOC2010/ImageSets/SegmentationContext/train.txt, val.txt

Every label is checked where it is loaded: a single-channel index PNG (palette,
grayscale or 16-bit) of its image's size whose values are valid for the dataset;
anything else raises an error that names the file.

Training samples are augmented as in the paper (random scale in [0.5, 2],
padding, random crop, horizontal flip) with randomness drawn from a generator
seeded by the sample key of :class:`examples.segmentation.training.KeyedSampler`,
so a resumed run sees exactly the crops an uninterrupted one would.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from examples.segmentation import digits
from examples.segmentation.config import PipelineConfig, crop_size
from examples.segmentation.training import decode_sample_key

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
# the 59 most frequent classes of the Detail API's labels, in their label order (1..59)
PASCAL_CONTEXT_CLASSES = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book",
    "bottle", "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth",
    "computer", "cow", "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food",
    "grass", "ground", "horse", "keyboard", "light", "motorbike", "mountain", "mouse",
    "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves",
    "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck",
    "tvmonitor", "wall", "water", "window", "wood",
)
LabelMap = Literal["cityscapes", "reduce_zero"]
# PIL modes of single-channel index images: palette, 8-bit grayscale, 16- and 32-bit integer
LABEL_MODES = ("P", "L", "I;16", "I;16L", "I;16B", "I")


class LabelRule:
    """Which raw label values a dataset allows, and the train id of each.

    Raw values are looked up in a 256-entry table; a value outside it, or one the
    table marks invalid, is an error that names the file. ``255`` is ignored in
    every dataset.

    Args:
        num_classes: the train ids are ``0 .. num_classes - 1``.
        label_map: ``None`` (raw values are the train ids), ``'cityscapes'``
            (labelIds 0-33 to the 19 train ids by the official table) or
            ``'reduce_zero'`` (0 is background and ignored, ``k`` becomes ``k - 1``:
            Pascal Context's 59 classes).

    Raises:
        ValueError: for an unknown ``label_map`` or a ``num_classes`` it cannot hold.
    """

    def __init__(self, num_classes: int, label_map: LabelMap | None = None) -> None:
        top = 254 if label_map == "reduce_zero" else 255  # 255 is always the ignore index
        if not 1 <= num_classes <= top:
            raise ValueError(f"num_classes must be in [1, {top}], got {num_classes}")
        table = np.full(256, -1, dtype=np.int64)
        table[IGNORE_INDEX] = IGNORE_INDEX
        if label_map is None:
            table[:num_classes] = np.arange(num_classes)
            self.expected = f"class indices 0..{num_classes - 1} or {IGNORE_INDEX} (ignored)"
        elif label_map == "cityscapes":
            if num_classes != len(CITYSCAPES_CLASSES):
                raise ValueError(f"the Cityscapes label map gives {len(CITYSCAPES_CLASSES)} "
                                 f"train ids, got num_classes={num_classes}")
            table[:34] = IGNORE_INDEX
            for label_id, train_id in _CITYSCAPES_TRAIN_IDS.items():
                table[label_id] = train_id
            self.expected = f"Cityscapes labelIds 0..33 or {IGNORE_INDEX}"
        elif label_map == "reduce_zero":
            table[0] = IGNORE_INDEX
            table[1:num_classes + 1] = np.arange(num_classes)
            self.expected = (f"0 (background, ignored), classes 1..{num_classes} or "
                             f"{IGNORE_INDEX} (ignored)")
        else:
            raise ValueError(f"label_map must be None or one of {get_args(LabelMap)}, "
                             f"got {label_map!r}")
        self.num_classes = num_classes
        self.label_map = label_map
        self.table = table

    def __call__(self, raw: np.ndarray, path: str | Path) -> np.ndarray:
        """The train ids (int64) of the raw label array ``raw`` read from ``path``."""
        if raw.dtype == np.uint8:
            ids = self.table[raw]
            invalid = ids < 0
        else:  # 16- or 32-bit labels: never wrap a value, reject what the table cannot hold
            wide = raw.astype(np.int64)
            outside = (wide < 0) | (wide > 255)
            ids = self.table[np.where(outside, IGNORE_INDEX, wide)]
            invalid = outside | (ids < 0)
        if invalid.any():
            bad = np.unique(raw[invalid])
            shown = ", ".join(str(v) for v in bad[:8]) + (", ..." if len(bad) > 8 else "")
            raise ValueError(f"label {path} has {int(invalid.sum())} pixels with invalid "
                             f"values ({shown}); expected {self.expected}")
        out: np.ndarray = ids
        return out


def cityscapes_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map a Cityscapes labelIds array (uint8) to train ids (0-18, 255 ignored)."""
    table = LabelRule(len(CITYSCAPES_CLASSES), "cityscapes").table
    out: np.ndarray = np.where(table < 0, IGNORE_INDEX, table).astype(np.uint8)[label_ids]
    return out


def _require(path: Path, what: str, root: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"dataset root {root} is incomplete: missing {path} ({what}); "
            "see examples/README.md for the expected layout"
        )
    return path


def read_image(path: Path) -> Tensor:
    """The RGB image at ``path`` as uint8 (3, H, W); an unreadable file is named."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            array = np.array(img.convert("RGB"), dtype=np.uint8)
    except (OSError, SyntaxError) as error:  # PIL reports broken PNG chunks as SyntaxError
        raise OSError(f"cannot read the image {path} ({error}); expected a readable image "
                      "file (JPEG or PNG)") from error
    return torch.from_numpy(array).permute(2, 0, 1)


def read_label(path: Path) -> np.ndarray:
    """The raw label array (H, W) at ``path``, unconverted: uint8, uint16 or int32.

    Raises:
        ValueError: if the file is not a single-channel index image (e.g. RGB).
        OSError: if it cannot be read; the message names the file.
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.mode not in LABEL_MODES:
                raise ValueError(
                    f"label {path} is a {img.mode!r} image; expected a single-channel index "
                    "PNG whose values are class indices: palette ('P') or grayscale ('L'), "
                    "or 16-bit ('I;16') / 32-bit ('I') integers")
            return np.array(img)
    except (OSError, SyntaxError) as error:
        raise OSError(f"cannot read the label {path} ({error}); expected a readable "
                      "single-channel PNG") from error


class SegmentationFiles(Dataset[tuple[Tensor, Tensor]]):
    """Image and label files, augmented for training or plain for evaluation.

    Every sample is checked where it is loaded (:meth:`load`), at the cost of one
    table look-up per pixel: the label must be a single-channel index image of its
    image's size with values valid for ``num_classes`` and ``label_map`` (see
    :class:`LabelRule`); otherwise a ``ValueError`` names the file and what was
    expected. An unreadable image or label raises ``OSError`` with its path.

    Args:
        pairs: (image path, label path) per sample.
        train: augment (scale, pad, crop, flip) and index by sample key.
        crop: the training crop, (height, width), or one int for a square.
        scale_range: the random scale's range.
        seed: mixed into every sample's augmentation seed.
        label_map: maps a raw label array to train ids (see :class:`LabelRule`).
        num_classes: the number of train ids; labels must lie in ``0 .. num_classes - 1``
            or be 255 (after ``label_map``).
    """

    uses_sample_keys = True

    def __init__(self, pairs: list[tuple[Path, Path]], train: bool,
                 crop: int | tuple[int, int], scale_range: tuple[float, float] = (0.5, 2.0),
                 seed: int = 0, label_map: LabelMap | None = None, *, num_classes: int) -> None:
        if not pairs:
            raise ValueError("the dataset is empty: no image/label pairs were found")
        self.pairs = pairs
        self.train = train
        self.crop = crop_size(crop)
        self.scale_range = scale_range
        self.seed = seed
        self.label_map = label_map
        self.num_classes = num_classes
        self.rule = LabelRule(num_classes, label_map)
        self.uses_sample_keys = train

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[Tensor, Tensor]:
        """The image (3, H, W) uint8 and the label (H, W) long of sample ``index``.

        Raises:
            ValueError: if the label's size differs from the image's, it is not a
                single-channel index image, or it has values invalid for the dataset.
            OSError: if the image or the label cannot be read.
        """
        image_path, label_path = self.pairs[index]
        image = read_image(image_path)
        raw = read_label(label_path)
        if raw.shape != tuple(image.shape[-2:]):
            raise ValueError(
                f"label {label_path} is {raw.shape[0]} x {raw.shape[1]} (H x W) but its image "
                f"{image_path} is {image.shape[1]} x {image.shape[2]}; expected a label of the "
                "image's size")
        return image, torch.from_numpy(self.rule(raw, label_path))

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


def augment(image: Tensor, label: Tensor, crop: int | tuple[int, int],
            scale_range: tuple[float, float], g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random scale, pad (image mean, label ignored), random crop, horizontal flip.

    The draws from ``g``, in order: the scale, the crop's top, its left, the flip; a square
    crop given as one int or as an equal pair draws and cuts alike.

    Args:
        image: uint8 (3, H, W).
        label: long (H, W), the train ids of ``image``'s pixels.
        crop: the crop, (height, width), or one int for a square.
        scale_range: the random scale's range.
        g: the randomness.

    Returns:
        The normalised image (3, crop height, crop width) and its label (crop height, crop
        width); where the scaled image is smaller than the crop, padding (0, the mean, in the
        image; 255, ignored, in the label) fills the bottom and right before the flip.
    """
    crop_h, crop_w = crop_size(crop)
    low, high = scale_range
    scale = low + (high - low) * float(torch.rand((), generator=g))
    h, w = image.shape[-2:]
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    x = F.interpolate(normalize(image)[None], size=size, mode="bilinear",
                      align_corners=False)[0]
    y = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
    pad_h, pad_w = max(crop_h - size[0], 0), max(crop_w - size[1], 0)
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), value=0.0)  # 0 is the mean after normalising
        y = F.pad(y, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
    top = int(torch.randint(x.shape[-2] - crop_h + 1, (), generator=g))
    left = int(torch.randint(x.shape[-1] - crop_w + 1, (), generator=g))
    x, y = x[:, top:top + crop_h, left:left + crop_w], y[top:top + crop_h, left:left + crop_w]
    if torch.rand((), generator=g) < 0.5:
        x, y = x.flip(-1), y.flip(-1)
    return x.contiguous(), y.contiguous()


def _listed_pairs(listing: Path, images: Path, labels: Path, split: str
                  ) -> list[tuple[Path, Path]]:
    """(image, label) paths of the ids in a split file: ``<id>.jpg`` and ``<id>.png``.

    Raises:
        ValueError: the file lists no id, or ids that lead out of the image and label
            folders, and so maybe out of the root (absolute, or climbing with ``..``);
            the message names the file.
        FileNotFoundError: a listed file is missing.
    """
    ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"the {split} list {listing} is empty; expected one image id per "
                         "line (a file name without extension)")
    outside = [i for i in ids if os.path.isabs(i)
               or os.path.normpath(i).split(os.sep)[0] == os.pardir]
    if outside:
        shown = ", ".join(repr(i) for i in outside[:3]) + (", ..." if len(outside) > 3 else "")
        raise ValueError(f"the {split} list {listing} has {len(outside)} ids that lead out of "
                         f"the dataset's folders ({shown}); expected ids relative to {images}, "
                         "without a leading '/' or '..'")
    pairs = [(images / f"{i}.jpg", labels / f"{i}.png") for i in ids]
    missing = [p for pair in pairs for p in pair if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} files of the {split} list are missing, e.g. "
                                f"{missing[0]}")
    return pairs


def voc(root: str | Path, split: str, train: bool, crop: int | tuple[int, int],
        scale_range: tuple[float, float] = (0.5, 2.0), seed: int = 0,
        num_classes: int = len(VOC_CLASSES)) -> SegmentationFiles:
    """Pascal VOC 2012: ``split`` 'train_aug' (VOC + SBD labels) or 'val'."""
    root = Path(root)
    base = _require(root / "VOCdevkit" / "VOC2012", "the VOC 2012 devkit", root)
    images = _require(base / "JPEGImages", "the VOC images", root)
    labels = _require(
        base / ("SegmentationClassAug" if split == "train_aug" else "SegmentationClass"),
        "the SBD trainaug labels" if split == "train_aug" else "the VOC val labels", root)
    listing = _require(base / "ImageSets" / "Segmentation" / f"{split}.txt",
                       f"the {split} image list", root)
    return SegmentationFiles(_listed_pairs(listing, images, labels, split), train, crop,
                             scale_range, seed, num_classes=num_classes)


def cityscapes(root: str | Path, split: str, train: bool, crop: int | tuple[int, int],
               scale_range: tuple[float, float] = (0.5, 2.0), seed: int = 0,
               num_classes: int = len(CITYSCAPES_CLASSES)) -> SegmentationFiles:
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
    if not pairs:
        raise ValueError(f"the Cityscapes {split} split is empty: no "
                         f"<city>/<name>_leftImg8bit.png under {images}")
    return SegmentationFiles(pairs, train, crop, scale_range, seed, label_map="cityscapes",
                             num_classes=num_classes)


def pascal_context(root: str | Path, split: str, train: bool, crop: int | tuple[int, int],
                   scale_range: tuple[float, float] = (0.5, 2.0), seed: int = 0,
                   num_classes: int = len(PASCAL_CONTEXT_CLASSES)) -> SegmentationFiles:
    """Pascal Context, the 59 most frequent classes: ``split`` 'train' (4,998) or 'val' (5,105).

    The layout is mmsegmentation's (labels converted from the Detail API, 0 the
    background, 1..59 the classes). Background is ignored and the classes become
    train ids 0..58 (mmsegmentation's ``reduce_zero_label``), the usual 59-class
    protocol; the paper's "59 classes with one background class" could also be read
    as 60 classes with background, which this loader does not offer.
    """
    root = Path(root)
    base = _require(root / "VOCdevkit" / "VOC2010", "the VOC 2010 devkit", root)
    images = _require(base / "JPEGImages", "the VOC 2010 images", root)
    labels = _require(base / "SegmentationClassContext", "the Pascal Context labels", root)
    listing = _require(base / "ImageSets" / "SegmentationContext" / f"{split}.txt",
                       f"the {split} image list", root)
    return SegmentationFiles(_listed_pairs(listing, images, labels, split), train, crop,
                             scale_range, seed, label_map="reduce_zero",
                             num_classes=num_classes)


DATASETS = {"voc": (voc, VOC_CLASSES), "cityscapes": (cityscapes, CITYSCAPES_CLASSES),
            "pascal_context": (pascal_context, PASCAL_CONTEXT_CLASSES)}
"""The datasets read from a root: each one's loader and class names."""

CLASS_NAMES = {"voc": VOC_CLASSES, "cityscapes": CITYSCAPES_CLASSES,
               "pascal_context": PASCAL_CONTEXT_CLASSES, "digits": digits.CLASSES}
"""Each dataset's class names, by label."""


def load(config: PipelineConfig, root: str | Path | None, train: bool) -> Dataset[Any]:
    """The training (augmented) or evaluation split of ``config.dataset``.

    Raises:
        ValueError: a dataset read from a root without ``root``, or the digit scenes (square
            canvases of ``crop``'s side, not cropped) with a crop of two sides.
    """
    split = config.train_split if train else config.val_split
    if config.dataset == "digits":
        if not isinstance(config.crop, int):
            raise ValueError(f"the digit scenes are squares of --crop's side: give one int, "
                             f"got --crop {' '.join(map(str, config.crop))}")
        return digits.DigitDataset(split, config.scenes[0 if train else 1], size=config.crop)
    if root is None:
        raise ValueError(f"the {config.dataset} dataset needs --root, the folder that holds it")
    factory, _ = DATASETS[config.dataset]
    return factory(root, split, train, config.crop, config.scale_range, config.seed,
                   num_classes=config.num_classes)


def picture(config: PipelineConfig, image: Tensor) -> np.ndarray:
    """An evaluation sample's image as matplotlib shows it: (H, W) grey or (H, W, 3) RGB
    in [0, 1]."""
    if config.dataset == "digits":
        return image[0].clamp(0, 1).numpy()
    return (image * STD + MEAN).clamp(0, 1).permute(1, 2, 0).numpy()
