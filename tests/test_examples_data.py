"""The examples' datasets: Pascal Context on a tree that copies the real layout, and a clear
error naming the file for every broken sample (labels of another size, values outside the
classes, 16-bit values, RGB labels, unreadable files)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

PIL = pytest.importorskip("PIL.Image")

sys.path.append(str(Path(__file__).resolve().parent.parent))  # for `examples`

from examples.segmentation import run as run_module  # noqa: E402
from examples.segmentation.cli import main  # noqa: E402
from examples.segmentation.config import CONFIGS  # noqa: E402
from examples.segmentation.data import (  # noqa: E402
    DATASETS,
    PASCAL_CONTEXT_CLASSES,
    LabelRule,
    SegmentationFiles,
    cityscapes,
    cityscapes_train_ids,
    pascal_context,
    voc,
)

H, W = 20, 24


def _image(path: Path, h: int = H, w: int = W, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    PIL.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def _palette_png(path: Path, label: np.ndarray) -> None:
    img = PIL.fromarray(label.astype(np.uint8))
    img.putpalette([v for c in range(256) for v in (c, 0, 255 - c)])  # 'L' becomes 'P'
    img.save(path)


def make_voc(root: Path, n: int = 2) -> tuple[Path, list[str]]:
    base = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationClassAug",
                "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"2007_{i:06d}" for i in range(n)]
    rng = np.random.default_rng(0)
    for k, i in enumerate(ids):
        _image(base / "JPEGImages" / f"{i}.jpg", seed=k)
        label = rng.choice([0, 1, 20, 255], size=(H, W))
        for folder in ("SegmentationClass", "SegmentationClassAug"):
            _palette_png(base / folder / f"{i}.png", label)
    for split in ("train_aug", "val"):
        (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root, ids


def make_pascal_context(root: Path, n_train: int = 3, n_val: int = 2) -> Path:
    """VOCdevkit/VOC2010 with mmsegmentation's 59-class labels: 'L' PNGs, 0 background."""
    base = root / "VOCdevkit" / "VOC2010"
    for sub in ("JPEGImages", "SegmentationClassContext", "ImageSets/SegmentationContext"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"2008_{i:06d}" for i in range(n_train + n_val)]
    rng = np.random.default_rng(1)
    for k, i in enumerate(ids):
        h, w = H + k, W - k
        _image(base / "JPEGImages" / f"{i}.jpg", h, w, seed=k)
        label = rng.choice([0, 1, 2, 30, 59, 255], size=(h, w)).astype(np.uint8)
        PIL.fromarray(label).save(base / "SegmentationClassContext" / f"{i}.png")
    lists = base / "ImageSets" / "SegmentationContext"
    (lists / "train.txt").write_text("\n".join(ids[:n_train]) + "\n")
    (lists / "val.txt").write_text("\n".join(ids[n_train:]) + "\n")
    return root


def _voc_label(root: Path, i: str) -> Path:
    return root / "VOCdevkit" / "VOC2012" / "SegmentationClass" / f"{i}.png"


# ---- Pascal Context ------------------------------------------------------------------------

def test_pascal_context_loads_and_reduces_the_zero_label(tmp_path):
    root = make_pascal_context(tmp_path)
    val = pascal_context(root, "val", train=False, crop=16)
    assert len(val) == 2 and len(pascal_context(root, "train", train=False, crop=16)) == 3
    assert val.num_classes == 59 == len(PASCAL_CONTEXT_CLASSES)
    for index, (image_path, label_path) in enumerate(val.pairs):
        image, label = val.load(index)
        raw = np.asarray(PIL.open(label_path)).astype(np.int64)
        assert image.shape[-2:] == label.shape == raw.shape and label.dtype == torch.long
        expected = np.where((raw == 0) | (raw == 255), 255, raw - 1)  # reduce_zero_label
        assert (label.numpy() == expected).all()
        assert image_path.name == label_path.with_suffix(".jpg").name
    assert set(np.unique(val[0][1].numpy())) == {0, 1, 29, 58, 255}


def test_pascal_context_training_crops(tmp_path):
    data = pascal_context(make_pascal_context(tmp_path), "train", train=True, crop=16)
    image, label = data[4]
    assert image.shape == (3, 16, 16) and label.shape == (16, 16)
    assert set(np.unique(label.numpy())) <= {0, 1, 29, 58, 255}


def test_pascal_context_is_a_pipeline_dataset(tmp_path):
    config = CONFIGS["pascal_context"]
    assert (config.num_classes, config.crop, config.train_split, config.val_split) == \
        (59, 513, "train", "val")
    assert config.student_steps == config.teacher_steps == config.distill_steps == 30_000
    factory, classes = DATASETS["pascal_context"]
    assert factory is pascal_context and len(classes) == 59
    run = run_module.Run(config, make_pascal_context(tmp_path), tmp_path / "runs",
                         torch.device("cpu"))
    data = run_module.dataset(run, train=False)  # the stage passes the config's num_classes
    assert data.num_classes == 59 and data.label_map == "reduce_zero" and len(data) == 2


@pytest.mark.slow
def test_pascal_context_student_end_to_end(tmp_path, capsys):
    root, out = make_pascal_context(tmp_path / "data"), tmp_path / "runs"
    args = ["--dataset", "pascal_context", "--root", str(root), "--out", str(out),
            "--no-pretrained", "--crop", "32", "--batch-size", "2", "--student-steps", "2",
            "--workers", "0", "--log-every", "1", "--no-progress", "--device", "cpu"]
    assert main(["student", *args]) == 0
    assert main(["evaluate", "--models", "student", *args]) == 0
    result = json.loads((out / "student" / "eval.json").read_text())
    assert list(result["iou"]) == list(PASCAL_CONTEXT_CLASSES)
    assert 0.0 <= result["miou"] <= 1.0
    assert "| wood |" in capsys.readouterr().out


def test_pascal_context_missing_parts_are_named(tmp_path):
    root = make_pascal_context(tmp_path)
    base = root / "VOCdevkit" / "VOC2010"
    with pytest.raises(FileNotFoundError, match=r"missing .*SegmentationContext.test\.txt "
                                                r"\(the test image list\)"):
        pascal_context(root, "test", train=False, crop=16)
    (base / "SegmentationClassContext" / "2008_000004.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 files of the val list are missing, e\.g\. "
                                                r".*2008_000004\.png"):
        pascal_context(root, "val", train=False, crop=16)
    (base / "SegmentationClassContext").rename(base / "labels")
    with pytest.raises(FileNotFoundError, match=r"SegmentationClassContext \(the Pascal "
                                                r"Context labels\)"):
        pascal_context(root, "val", train=False, crop=16)


def test_pascal_context_label_above_59(tmp_path):
    root = make_pascal_context(tmp_path)
    path = root / "VOCdevkit" / "VOC2010" / "SegmentationClassContext" / "2008_000003.png"
    label = np.asarray(PIL.open(path)).copy()
    label[0, :3] = 60
    PIL.fromarray(label).save(path)
    with pytest.raises(ValueError, match=r"2008_000003\.png has 3 pixels with invalid values "
                                         r"\(60\); expected 0 \(background, ignored\), "
                                         r"classes 1\.\.59 or 255"):
        pascal_context(root, "val", train=False, crop=16)[0]


# ---- label checks --------------------------------------------------------------------------

@pytest.mark.parametrize("train", [False, True])
def test_label_of_another_size_names_both_files(tmp_path, train):
    root, ids = make_voc(tmp_path)
    folder = "SegmentationClassAug" if train else "SegmentationClass"
    _palette_png(root / "VOCdevkit" / "VOC2012" / folder / f"{ids[1]}.png",
                 np.zeros((H + 2, W), dtype=np.uint8))
    data = voc(root, "train_aug" if train else "val", train=train, crop=16)
    data[0]  # the other sample is fine
    with pytest.raises(ValueError, match=rf"label .*{ids[1]}\.png is 22 x 24 \(H x W\) but its "
                                         rf"image .*{ids[1]}\.jpg is 20 x 24; expected a label "
                                         "of the image's size"):
        data[1]  # in training this was silently stretched to the image


def test_label_value_outside_the_classes_names_the_file(tmp_path):
    root, ids = make_voc(tmp_path)
    label = np.zeros((H, W), dtype=np.uint8)
    label[3, 4], label[5, 6:8] = 77, 21
    _palette_png(_voc_label(root, ids[0]), label)
    with pytest.raises(ValueError, match=rf"{ids[0]}\.png has 3 pixels with invalid values "
                                         r"\(21, 77\); expected class indices 0\.\.20 or 255 "
                                         r"\(ignored\)"):
        voc(root, "val", train=False, crop=16)[0]


# 16-bit PNGs open as 'I;16' (as 'I' in older Pillow); 32-bit 'I' has no PNG form: a TIFF
# under the .png name stands in for it (Pillow reads by content)
@pytest.mark.parametrize("dtype,fmt,mode", [(np.uint16, "PNG", "I;16"), (np.int32, "TIFF", "I")])
def test_wide_labels_are_read_without_wrapping(tmp_path, dtype, fmt, mode):
    root, ids = make_voc(tmp_path)
    label = np.zeros((H, W), dtype=dtype)
    label[0, 0], label[1, 1] = 20, 255
    PIL.fromarray(label).save(_voc_label(root, ids[0]), format=fmt)
    assert PIL.open(_voc_label(root, ids[0])).mode == mode
    data = voc(root, "val", train=False, crop=16)
    loaded = data.load(0)[1]
    assert loaded[0, 0] == 20 and loaded[1, 1] == 255 and loaded.sum() == 275
    label[2, 2] = 300  # a uint8 cast made this 44, a valid class
    PIL.fromarray(label).save(_voc_label(root, ids[0]), format=fmt)
    with pytest.raises(ValueError, match=rf"{ids[0]}\.png has 1 pixels with invalid values "
                                         r"\(300\); expected class indices 0\.\.20"):
        data[0]


def test_negative_and_mixed_invalid_values_in_a_wide_label():
    rule = LabelRule(21)
    raw = np.array([[-1, 0, 256], [21, 20, 255]], dtype=np.int32)
    with pytest.raises(ValueError, match=r"x\.png has 3 pixels with invalid values "
                                         r"\(-1, 21, 256\)"):
        rule(raw, "x.png")
    assert rule(raw[:, 1:2], "x.png").tolist() == [[0], [20]]


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA"])
def test_colour_label_asks_for_an_index_png(tmp_path, mode):
    root, ids = make_voc(tmp_path)
    PIL.new(mode, (W, H)).save(_voc_label(root, ids[0]))
    with pytest.raises(ValueError, match=rf"label .*{ids[0]}\.png is a '{mode}' image; expected "
                                         r"a single-channel index PNG .*palette \('P'\) or "
                                         r"grayscale \('L'\)"):
        voc(root, "val", train=False, crop=16)[0]


def test_grayscale_and_palette_labels_are_equal(tmp_path):
    root, ids = make_voc(tmp_path)
    data = voc(root, "val", train=False, crop=16)
    path = _voc_label(root, ids[0])
    assert PIL.open(path).mode == "P"
    palette = data.load(0)[1]
    PIL.fromarray(np.asarray(PIL.open(path))).save(path)  # the same indices as 'L'
    assert PIL.open(path).mode == "L"
    assert torch.equal(data.load(0)[1], palette)
    assert set(np.unique(palette.numpy())) == {0, 1, 20, 255}


@pytest.mark.parametrize("what", ["image", "label"])
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_unreadable_files_are_named(tmp_path, what, damage):
    root, ids = make_voc(tmp_path)
    base = root / "VOCdevkit" / "VOC2012"
    path = base / "JPEGImages" / f"{ids[0]}.jpg" if what == "image" else _voc_label(root, ids[0])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not an image" * 9)
    with pytest.raises(OSError, match=rf"cannot read the {what} .*{ids[0]}\.(jpg|png) \("):
        voc(root, "val", train=False, crop=16)[0]


def test_cityscapes_label_ids_outside_the_table(tmp_path):
    rule = LabelRule(19, "cityscapes")
    ids = np.array([[0, 7, 33], [255, 26, 24]], dtype=np.uint8)
    assert rule(ids, "a.png").tolist() == [[255, 0, 18], [255, 13, 11]]
    assert (cityscapes_train_ids(ids) == rule(ids, "a.png")).all()
    with pytest.raises(ValueError, match=r"b\.png has 1 pixels with invalid values \(40\); "
                                         r"expected Cityscapes labelIds 0\.\.33 or 255"):
        rule(np.array([[7, 40]], dtype=np.uint8), "b.png")


def test_label_rule_arguments():
    with pytest.raises(ValueError, match=r"gives 19 train ids, got num_classes=21"):
        LabelRule(21, "cityscapes")
    with pytest.raises(ValueError, match=r"label_map must be None or one of \('cityscapes', "
                                         r"'reduce_zero'\), got 'ade'"):
        LabelRule(150, "ade")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"num_classes must be in \[1, 254\], got 255"):
        LabelRule(255, "reduce_zero")
    with pytest.raises(TypeError, match="num_classes"):
        SegmentationFiles([(Path("a.jpg"), Path("a.png"))], False, 16)  # type: ignore[call-arg]


def test_an_empty_split_names_its_file(tmp_path):
    root, _ = make_voc(tmp_path)
    listing = root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt"
    listing.write_text("\n  \n")
    with pytest.raises(ValueError, match=rf"the val list {re.escape(str(listing))} is empty"):
        voc(root, "val", train=False, crop=16)
    (tmp_path / "leftImg8bit" / "val").mkdir(parents=True)
    (tmp_path / "gtFine" / "val").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"the Cityscapes val split is empty: no "
                                         r"<city>/<name>_leftImg8bit.png under .*leftImg8bit/val"):
        cityscapes(tmp_path, "val", train=False, crop=16)


@pytest.mark.parametrize("bad", ["../../../../outside/x", "a/../../x", "/tmp/x"])
def test_split_ids_outside_the_root_are_refused(tmp_path, bad):
    root, ids = make_voc(tmp_path / "data")
    listing = root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt"
    listing.write_text("\n".join([*ids, bad]) + "\n")
    with pytest.raises(ValueError, match=rf"the val list {re.escape(str(listing))} has 1 ids "
                                         r"that lead out of the dataset's folders "
                                         rf"\({re.escape(repr(bad))}\); expected ids relative "
                                         r"to .*JPEGImages"):
        voc(root, "val", train=False, crop=16)


# ---- crops ---------------------------------------------------------------------------------

def _reference_augment(image, label, crop, scale_range, g):
    """data.augment as it was when crops were squares only (an int side), copied verbatim:
    square crops must draw and cut exactly as this did."""
    import torch.nn.functional as F

    from examples.segmentation.data import IGNORE_INDEX, normalize

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


def _sample(h: int = H, w: int = W, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    image = torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8))
    label = torch.from_numpy(rng.choice([0, 1, 7, 20, 255], size=(h, w)).astype(np.int64))
    return image, label


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 7, 12345])
@pytest.mark.parametrize("crop", [8, 16, 31, 60])  # inside the scaled image, and padded
def test_square_crops_draw_and_cut_as_before(seed, crop):
    from examples.segmentation.data import augment

    image, label = _sample(seed=seed)
    expected = _reference_augment(image, label, crop, (0.5, 2.0),
                                  torch.Generator().manual_seed(seed))
    for given in (crop, (crop, crop)):
        g = torch.Generator().manual_seed(seed)
        x, y = augment(image, label, given, (0.5, 2.0), g)
        assert torch.equal(x, expected[0]) and torch.equal(y, expected[1]), given
        after = torch.Generator().manual_seed(seed)
        _reference_augment(image, label, crop, (0.5, 2.0), after)
        assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=after))


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("crop", [(8, 40), (30, 12), (12, 16), (1, 24), (33, 7)])
def test_rectangular_crops_cut_height_by_width_with_labels_on_their_pixels(seed, crop):
    """At scale 1 the crop is a window of the image padded at the bottom and right (0 in the
    normalised image, 255 in the label), flipped or not: the one the draws pick."""
    from examples.segmentation.data import augment, normalize

    image, label = _sample(seed=seed)
    h, w = crop
    x, y = augment(image, label, crop, (1.0, 1.0), torch.Generator().manual_seed(seed))
    assert x.shape == (3, h, w) and y.shape == (h, w)
    assert x.dtype == torch.float32 and y.dtype == torch.long
    padded_h, padded_w = max(h, H), max(w, W)
    full_x = torch.zeros(3, padded_h, padded_w)
    full_x[:, :H, :W] = normalize(image)
    full_y = torch.full((padded_h, padded_w), 255, dtype=torch.long)
    full_y[:H, :W] = label
    g = torch.Generator().manual_seed(seed)
    torch.rand((), generator=g)  # the scale
    top = int(torch.randint(padded_h - h + 1, (), generator=g))
    left = int(torch.randint(padded_w - w + 1, (), generator=g))
    flip = bool(torch.rand((), generator=g) < 0.5)
    window_x, window_y = full_x[:, top:top + h, left:left + w], full_y[top:top + h, left:left + w]
    if flip:
        window_x, window_y = window_x.flip(-1), window_y.flip(-1)
    assert torch.equal(x, window_x) and torch.equal(y, window_y)


@pytest.mark.parametrize("seed", range(8))
def test_rectangular_crops_pad_where_the_scaled_image_is_smaller(seed):
    """Scaled to 10..40 x 12..48, the image takes a 32 x 56 crop's padding on the right
    always and at the bottom below scale 1.6: full rows and columns of ignored labels and
    of the image mean (0), the columns at one side (the flip takes them left)."""
    from examples.segmentation.data import augment

    image, _ = _sample(seed=seed)
    label = torch.zeros(H, W, dtype=torch.long)  # no 255 of its own: every 255 is padding
    for draw in range(4):
        key = 100 * seed + draw
        scale = 0.5 + 1.5 * float(torch.rand((), generator=torch.Generator().manual_seed(key)))
        x, y = augment(image, label, (32, 56), (0.5, 2.0), torch.Generator().manual_seed(key))
        assert x.shape == (3, 32, 56) and y.shape == (32, 56)
        padded = y == 255
        assert torch.equal(x.abs().sum(0) == 0, padded)  # the mean exactly where ignored
        columns = padded.all(0).nonzero().flatten().tolist()
        rows = padded.all(1).nonzero().flatten().tolist()
        assert len(columns) == 56 - round(W * scale)
        assert columns in (list(range(len(columns))), list(range(56 - len(columns), 56)))
        assert rows == list(range(32 - len(rows), 32))
        assert len(rows) == max(32 - round(H * scale), 0)
        assert padded.sum() == 32 * len(columns) + len(rows) * (56 - len(columns))


def test_datasets_crop_height_by_width(tmp_path):
    root, _ = make_voc(tmp_path)
    data = voc(root, "train_aug", train=True, crop=(8, 16))
    assert data.crop == (8, 16)
    for key in range(4):
        image, label = data[key]
        assert image.shape == (3, 8, 16) and label.shape == (8, 16)
    assert voc(root, "train_aug", train=True, crop=12)[0][0].shape == (3, 12, 12)
    for bad, error, match in [
        ((8, 0), ValueError, r"crop's sides must be positive, got \(8, 0\)"),
        ((8, 16, 4), ValueError, r"crop takes one int \(a square's side\) or two \(height, "
                                 r"width\), got 3 values: \(8, 16, 4\)"),
        ((), ValueError, r"got 0 values"),
        ("16", TypeError, r"crop must be an int \(a square's side\) or a pair of ints "
                          r"\(height, width\), got '16' \(str\)"),
        ((8, 16.0), TypeError, r"crop's sides must be ints, got \(8, 16\.0\)"),
        (True, TypeError, r"crop's sides must be ints, got True"),
    ]:
        with pytest.raises(error, match=match):
            voc(root, "train_aug", train=True, crop=bad)


# ---- the crop of the configuration, its flag and its resume record --------------------------

def test_the_config_keeps_one_form_per_crop():
    from examples.segmentation.config import PipelineConfig

    pair = PipelineConfig(crop=[512, 1024])  # as JSON gives it back
    assert type(pair.crop) is tuple and pair.crop == (512, 1024)
    assert pair == PipelineConfig(crop=(512, 1024)) and hash(pair) == hash(
        PipelineConfig(crop=(512, 1024)))
    assert PipelineConfig(crop=(512, 512)).crop == 512 == PipelineConfig(crop=[512]).crop
    side = PipelineConfig(crop=np.int64(48)).crop
    assert type(side) is int and side == 48  # torch.load(weights_only=True) reads it back
    assert CONFIGS["voc"].override(crop=(64, 32)).crop == (64, 32)
    with pytest.raises(ValueError, match=r"crop's sides must be positive, got -1"):
        PipelineConfig(crop=-1)
    with pytest.raises(ValueError, match=r"got 3 values"):
        CONFIGS["voc"].override(crop=(1, 2, 3))
    from examples.segmentation import data

    digits = CONFIGS["digits"].override(scenes=(2, 2))
    assert data.load(digits.override(crop=(32, 32)), None, train=True)[0][0].shape[-2:] == (32, 32)
    with pytest.raises(ValueError, match=r"the digit scenes are squares of --crop's side: give "
                                         r"one int, got --crop 32 48"):
        data.load(digits.override(crop=(32, 48)), None, train=True)


def test_the_crop_flag_takes_one_side_or_two(capsys):
    from examples.segmentation.cli import parser
    from examples.segmentation.config import from_flags

    def crop(*words: str):
        argv = ["student", "--dataset", "cityscapes", *(["--crop", *words] if words else [])]
        return from_flags(parser().parse_args(argv), "cityscapes").crop

    assert crop("512", "1024") == (512, 1024) and crop("1024", "512") == (1024, 512)
    assert type(crop("512")) is int and crop("512") == 512 == crop("512", "512")
    assert crop() == 769  # the dataset's
    with pytest.raises(ValueError, match=r"crop takes one int \(a square's side\) or two "
                                         r"\(height, width\), got 3 values: \(1, 2, 3\)"):
        crop("1", "2", "3")
    with pytest.raises(ValueError, match=r"crop's sides must be positive, got \(512, 0\)"):
        crop("512", "0")
    with pytest.raises(SystemExit):
        crop("wide")
    assert "argument --crop: invalid int value: 'wide'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser().parse_args(["student", "--dataset", "voc", "--crop"])
    assert "argument --crop: expected at least one argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser().parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "--crop H [W ...] the training crop: one int, a square's side, or two" in shown


def test_crops_record_as_given_and_resume_only_with_the_same(tmp_path):
    from test_examples import make_cityscapes

    from examples.segmentation.training import check_resume
    from segdistill import load_checkpoint, save_checkpoint

    config = CONFIGS["cityscapes"].override(crop=(512, 1024))
    run = run_module.Run(config, tmp_path, tmp_path / "runs", torch.device("cpu"))
    record = run_module.resume_record(run, "student")
    assert record["--crop"] == (512, 1024)
    save_checkpoint({"config": record}, tmp_path / "record.pt")
    saved = load_checkpoint(tmp_path / "record.pt")["config"]
    check_resume("c.pt", saved, record, 10, 10)  # the same crop: no complaint
    square = run_module.resume_record(run.with_config(crop=512), "student")
    with pytest.raises(ValueError, match=r"  --crop: \(512, 1024\) in the checkpoint, 512 now"):
        check_resume("c.pt", saved, square, 10, 10)
    # JSON gives a list back: the config makes it the tuple again
    assert run_module.resume_record(run.with_config(crop=json.loads(json.dumps(
        config.crop))), "student") == record

    # the command line end to end: one step, then resumes with the flags it records or others
    root = make_cityscapes(tmp_path / "data")

    def student(out: str, *crop: str, resume: bool = False) -> int:
        return main(["student", "--dataset", "cityscapes", "--root", str(root), "--out",
                     str(tmp_path / out), "--no-pretrained", "--crop", *crop, "--batch-size",
                     "2", "--student-steps", "1", "--workers", "0", "--no-progress",
                     "--device", "cpu", *(["--resume"] if resume else [])])

    assert student("pair", "16", "32") == 0
    assert student("pair", "16", "32", resume=True) == 0
    for other, shown in [(("16",), "16"), (("32", "16"), r"\(32, 16\)")]:
        with pytest.raises(ValueError, match=rf"  --crop: \(16, 32\) in the checkpoint, "
                                             rf"{shown} now"):
            student("pair", *other, resume=True)
    assert student("side", "16") == 0  # a square side, given as one int or as a pair
    assert student("side", "16", resume=True) == student("side", "16", "16", resume=True) == 0
