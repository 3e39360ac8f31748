"""The reference pipeline end to end on tiny synthetic VOC and Cityscapes trees; its
command line (a flag per config field)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("torchmetrics")
pytest.importorskip("torchdata")
PIL = pytest.importorskip("PIL.Image")

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))  # for `examples`; segdistill still comes from the installed package

from examples.segmentation.cli import main, parser  # noqa: E402
from examples.segmentation.config import (  # noqa: E402
    CONFIGS,
    PipelineConfig,
    Student,
    Teacher,
    from_flags,
)
from examples.segmentation.data import cityscapes_train_ids, voc  # noqa: E402
from examples.segmentation.methods import METHODS, TRANSLATOR_METHODS  # noqa: E402
from examples.segmentation.models import STUDENTS, TEACHERS  # noqa: E402

SMALL = ["--no-pretrained", "--crop", "32", "--batch-size", "2", "--teacher-steps", "2",
         "--student-steps", "2", "--distill-steps", "2", "--workers", "0",
         "--checkpoint-every", "1", "--log-every", "1", "--translator-channels", "16",
         "--no-progress", "--device", "cpu"]


def _image(path: Path, h: int, w: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    PIL.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def make_voc(root: Path, n_train: int = 4, n_val: int = 2) -> Path:
    base = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationClassAug",
                "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"2007_{i:06d}" for i in range(n_train + n_val)]
    rng = np.random.default_rng(0)
    for k, i in enumerate(ids):
        h, w = 36 + 2 * k, 44 - k
        _image(base / "JPEGImages" / f"{i}.jpg", h, w, k)
        label = rng.choice([0, 1, 2, 15, 255], size=(h, w)).astype(np.uint8)
        for folder in ("SegmentationClass", "SegmentationClassAug"):
            img = PIL.fromarray(label, mode="P")
            img.putpalette([v for c in range(256) for v in (c, c, c)])
            img.save(base / folder / f"{i}.png")
    lists = base / "ImageSets" / "Segmentation"
    (lists / "train_aug.txt").write_text("\n".join(ids[:n_train]) + "\n")
    (lists / "val.txt").write_text("\n".join(ids[n_train:]) + "\n")
    return root


def make_cityscapes(root: Path) -> Path:
    rng = np.random.default_rng(1)
    for split, n in (("train", 4), ("val", 2)):
        for k in range(n):
            city = "aachen" if k % 2 else "bremen"
            name = f"{city}_{k:06d}_000019"
            img_dir = root / "leftImg8bit" / split / city
            lab_dir = root / "gtFine" / split / city
            img_dir.mkdir(parents=True, exist_ok=True)
            lab_dir.mkdir(parents=True, exist_ok=True)
            _image(img_dir / f"{name}_leftImg8bit.png", 32, 64, k)
            ids = rng.choice([0, 7, 8, 11, 24, 26, 33], size=(32, 64)).astype(np.uint8)
            PIL.fromarray(ids).save(lab_dir / f"{name}_gtFine_labelIds.png")
    return root


def test_cityscapes_label_mapping():
    ids = np.array([[0, 7, 8], [26, 33, 34]], dtype=np.uint8)
    assert cityscapes_train_ids(ids).tolist() == [[255, 0, 1], [13, 18, 255]]


def test_training_samples_are_augmented_deterministically(tmp_path):
    data = voc(make_voc(tmp_path), "train_aug", train=True, crop=24)
    (a_img, a_lab), (b_img, b_lab) = data[5], data[5]
    assert a_img.shape == (3, 24, 24) and a_lab.shape == (24, 24)
    assert (a_img == b_img).all() and (a_lab == b_lab).all()
    assert set(np.unique(a_lab.numpy())) <= {0, 1, 2, 15, 255}
    other = data[5 + len(data)]  # the same image in the next epoch: another crop
    assert not (other[0] == a_img).all()


@pytest.mark.slow
@pytest.mark.parametrize("dataset,make", [("voc", make_voc), ("cityscapes", make_cityscapes)])
def test_every_stage_end_to_end(tmp_path, dataset, make, capsys):
    root, out = make(tmp_path / "data"), tmp_path / "runs"
    assert main(["all", "--dataset", dataset, "--root", str(root), "--out", str(out),
                 *SMALL]) == 0
    for stage in ("teacher", "student", "translator", "distill-knowledge_adaptation"):
        assert (out / stage / "model.pt").is_file(), stage
    for name in ("teacher", "student", "distill-knowledge_adaptation"):
        result = json.loads((out / name / "eval.json").read_text())
        assert 0.0 <= result["miou"] <= 1.0 and result["flops"] > 0 and result["params"] > 0
    student = json.loads((out / "student" / "eval.json").read_text())
    distilled = json.loads((out / "distill-knowledge_adaptation" / "eval.json").read_text())
    assert student["params"] == distilled["params"] and student["flops"] == distilled["flops"]
    teacher = json.loads((out / "teacher" / "eval.json").read_text())
    assert teacher["params"] > 5 * student["params"]
    log = [json.loads(line) for line in
           (out / "distill-knowledge_adaptation" / "log.jsonl").read_text().splitlines()]
    assert {"ce", "adaptation", "affinity", "lr"} <= set(log[-1])
    assert (out / "figures" / f"{dataset}.png").stat().st_size > 5_000
    printed = capsys.readouterr().out
    assert "| model | val mIoU (%) | params | MFLOPs / image | images/s |" in printed
    assert "| distill-knowledge_adaptation |" in printed


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(set(METHODS) - TRANSLATOR_METHODS))
def test_baseline_methods(tmp_path, method):
    root, out = make_voc(tmp_path / "data"), tmp_path / "runs"
    args = ["--dataset", "voc", "--root", str(root), "--out", str(out), *SMALL]
    if not (out / "teacher" / "model.pt").exists():
        main(["teacher", *args])
    assert main(["distill", "--method", method, *args]) == 0
    log = (out / f"distill-{method}" / "log.jsonl").read_text().splitlines()
    assert len(log) == 2


@pytest.mark.slow
def test_resume_after_a_crash_continues_exactly(tmp_path):
    root = make_voc(tmp_path / "data")
    common = ["student", "--dataset", "voc", "--root", str(root), *SMALL,
              "--student-steps", "4"]
    main([*common, "--out", str(tmp_path / "straight")])
    main([*common, "--out", str(tmp_path / "crashed"), "--stop-after", "2"])
    assert not (tmp_path / "crashed" / "student" / "model.pt").exists()
    main([*common, "--out", str(tmp_path / "crashed"), "--resume"])

    def losses(folder):
        rows = (tmp_path / folder / "student" / "log.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"]) for r in map(json.loads, rows)]

    resumed, straight = losses("crashed"), losses("straight")
    assert [s for s, _ in resumed] == [s for s, _ in straight] == [1, 2, 3, 4]
    assert resumed == straight  # bit for bit
    weights = [torch.load(tmp_path / run / "student" / "model.pt", weights_only=True)["model"]
               for run in ("crashed", "straight")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[1])


@pytest.mark.slow
def test_two_process_torchrun(tmp_path):
    root = make_voc(tmp_path / "data")
    # a folder with only `examples` in it, so the workers import segdistill as this process
    # does: installed, or from a PYTHONPATH that holds it
    (tmp_path / "path").mkdir()
    (tmp_path / "path" / "examples").symlink_to(REPO / "examples")
    path = os.pathsep.join(p for p in (str(tmp_path / "path"), os.environ.get("PYTHONPATH"))
                           if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", "29531", "-m", "examples.segmentation", "student", "--dataset",
         "voc", "--root", str(root), "--out", str(tmp_path / "runs"), *SMALL,
         "--batch-size", "4"],  # 2 images per process: the image-pooling branch's batch norm
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "runs" / "student" / "model.pt").is_file()


@pytest.mark.parametrize("remove,match", [
    ("VOCdevkit/VOC2012/SegmentationClassAug", r"missing .*SegmentationClassAug \(the SBD "
                                               r"trainaug labels\)"),
    ("VOCdevkit/VOC2012/JPEGImages", r"missing .*JPEGImages \(the VOC images\)"),
    ("VOCdevkit/VOC2012/ImageSets/Segmentation/train_aug.txt",
     r"missing .*train_aug.txt \(the train_aug image list\)"),
    ("VOCdevkit", r"missing .*VOCdevkit/VOC2012 \(the VOC 2012 devkit\)"),
])
def test_incomplete_voc_root(tmp_path, remove, match):
    import shutil

    root = make_voc(tmp_path)
    target = root / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(FileNotFoundError, match=match):
        main(["teacher", "--dataset", "voc", "--root", str(root), *SMALL])


@pytest.mark.parametrize("remove,match", [
    ("gtFine", r"missing .*gtFine/train \(the train fine labels\)"),
    ("leftImg8bit", r"missing .*leftImg8bit/train \(the train images\)"),
])
def test_incomplete_cityscapes_root(tmp_path, remove, match):
    import shutil

    root = make_cityscapes(tmp_path)
    shutil.rmtree(root / remove)
    with pytest.raises(FileNotFoundError, match=match):
        main(["student", "--dataset", "cityscapes", "--root", str(root), *SMALL])


def test_a_stage_without_its_inputs(tmp_path):
    root = make_voc(tmp_path / "data")
    with pytest.raises(FileNotFoundError, match=r"no trained teacher at .*teacher/model.pt: "
                                                r"run that stage first"):
        main(["distill", "--dataset", "voc", "--root", str(root), "--out",
              str(tmp_path / "runs"), *SMALL])


def test_every_config_field_is_a_flag():
    """Each field of PipelineConfig parses from its flag, typed, for every dataset."""
    given = {
        "num_classes": ("7", 7), "crop": ("65", 65), "train_split": ("train", "train"),
        "val_split": ("test", "test"), "teacher": ("digits_os4", "digits_os4"),
        "student": ("lraspp", "lraspp"), "batch_size": ("8", 8), "lr": ("0.01", 0.01),
        "momentum": ("0.8", 0.8), "weight_decay": ("1e-3", 1e-3), "poly_power": ("1", 1.0),
        "scale_range": (["0.75", "1.5"], (0.75, 1.5)), "teacher_steps": ("3", 3),
        "student_steps": ("4", 4), "distill_steps": ("5", 5), "translator_epochs": ("2", 2),
        "translator_steps": ("9", 9), "translator_channels": ("16", 16),
        "translator_lr": ("0.2", 0.2), "translator_weight_decay": ("0.01", 0.01),
        "adaptation_weight": ("2", 2.0), "affinity_weight": ("3", 3.0),
        "kd_temperature": ("6", 6.0), "amp": ("bf16", "bf16"), "workers": ("1", 1),
        "cirkd_memory_weight": ("0.05", 0.05), "optimizer": ("adamw", "adamw"),
        "checkpoint_every": ("7", 7), "log_every": ("3", 3), "seed": ("11", 11),
        "threads": ("2", 2),
        "eval_batch_size": ("4", 4), "scenes": (["10", "5"], (10, 5)),
        "teacher_weight_decay": ("2e-4", 2e-4), "accumulate": ("2", 2),
        "val_every": ("50", 50), "translator_timeout": ("30", 30.0),
    }
    if "teacher_layer" in PipelineConfig.__dataclass_fields__:
        given["teacher_layer"] = ("backbone", "backbone")
    booleans = {"pretrained", "sync_bn", "decay_norm_bias"}
    names = {f for f in PipelineConfig.__dataclass_fields__} - {"dataset"}
    assert names == set(given) | booleans, "a new field: add it here"
    argv = ["all", "--dataset", "voc"]
    for name, (text, _) in given.items():
        argv += [f"--{name.replace('_', '-')}", *([text] if isinstance(text, str) else text)]
    argv += ["--no-pretrained", "--sync-bn", "--no-decay-norm-bias"]
    config = from_flags(parser().parse_args(argv), "voc")
    for name, (_, value) in given.items():
        assert getattr(config, name) == value, name
    assert config.pretrained is False and config.sync_bn is True
    assert config.decay_norm_bias is False
    # none resets an optional field; flags not given keep the dataset's defaults
    config = from_flags(parser().parse_args(
        ["all", "--dataset", "digits", "--translator-steps", "none"]), "digits")
    assert config.translator_steps is None and config.lr == CONFIGS["digits"].lr


def test_flag_errors_name_the_choices(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["all", "--dataset", "voc", "--amp", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser().parse_args(["all", "--dataset", "voc", "--lr", "fast"])
    assert "invalid float value: 'fast'" in capsys.readouterr().err


def test_network_names_match_the_registries():
    from typing import get_args

    assert set(get_args(Teacher)) == set(TEACHERS)
    assert set(get_args(Student)) == set(STUDENTS)


def test_a_dataset_that_needs_a_root():
    with pytest.raises(ValueError, match=r"the voc dataset needs --root"):
        main(["teacher", "--dataset", "voc", *SMALL])


@pytest.mark.parametrize("name", ["training", "profiling", "figures", "digits", "ablation"])
def test_doctests(name):
    import doctest
    import importlib

    module = importlib.import_module(f"examples.segmentation.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


@pytest.mark.slow
def test_the_pipeline_benchmark_runs(tmp_path):
    # every row and ratio, both readings of the teacher's layer, fp32 and bf16, on the digit
    # scenes' networks (the paper's: test_the_pipeline_benchmark_reads_the_papers_layers)
    table = tmp_path / "pipeline.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "pipeline.py"), "--device", "cpu",
         "--networks", "digits", "--size", "32", "32", "--batch", "2", "--steps", "1",
         "--rounds", "1", "--translator-channels", "16", "--markdown", str(table)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for text in (proc.stdout, table.read_text()):
        assert "| distill | distillation step (paper) | head | bf16 |" in text
        assert "| distill, part | losses (forward, backward) | backbone | fp32 |" in text
        assert "| translator | translator step | backbone | bf16 |" in text
        assert "| evaluate | teacher forward |  | bf16 |" in text
        assert "teacher layer `backbone` (features, 64 channels), bf16: " in text
        assert "teacher layer `head` (features, 64 channels), fp32: " in text


def test_the_pipeline_benchmark_reads_the_papers_layers():
    # the paper's networks at their smallest: the layers and channels each reading names,
    # checked on a forward pass, as the benchmark's ratio lines print them
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_pipeline",
                                                  REPO / "benchmarks" / "pipeline.py")
    assert spec is not None and spec.loader is not None
    pipeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pipeline)
    bench = pipeline.Bench(pipeline.parse_args(["--device", "cpu", "--size", "33", "33",
                                                "--batch", "1"]))
    assert (bench.t_name, bench.s_name) == ("deeplabv3_resnet50", "mobilenet_v2")
    layers = {reading: bench.teacher_layer(reading) for reading in ("head", "backbone")}
    assert layers == {"head": ("classifier.3", 256), "backbone": ("backbone.layer4", 2048)}
    assert pipeline.layer_label("backbone", *layers["backbone"]) == \
        "teacher layer `backbone` (backbone.layer4, 2048 channels)"
    with torch.no_grad():  # torchvision's dict of outputs, as the teacher step reads it
        assert pipeline._logits(bench.teacher.eval()(bench.x)).shape == (1, 21, 33, 33)
