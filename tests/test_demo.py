"""The demo: the pipeline on the digit scenes (data, a tiny end-to-end run), and the
ablation driver over the same stages."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("torchmetrics")
pytest.importorskip("torchdata")
sys.path.append(str(Path(__file__).resolve().parent.parent))  # for `examples`

from examples.segmentation import ablation
from examples.segmentation.cli import main
from examples.segmentation.digits import NUM_CLASSES, DigitDataset, make_digit_scenes

TINY = ["--teacher-steps", "2", "--student-steps", "2", "--distill-steps", "2",
        "--translator-steps", "2", "--scenes", "16", "8", "--batch-size", "4",
        "--eval-batch-size", "4", "--no-progress", "--device", "cpu"]


def test_scenes_are_deterministic_and_labelled():
    a = make_digit_scenes("train", 8, size=32, scale=(10, 14), seed=3)
    b = make_digit_scenes("train", 8, size=32, scale=(10, 14), seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.images.shape == (8, 1, 32, 32) and a.labels.dtype == torch.long
    assert 0 < (a.labels > 0).float().mean() < 0.5
    assert int(a.labels.max()) < NUM_CLASSES
    # labelled pixels are bright digit strokes, background is dark (before noise)
    assert a.images[:, 0][a.labels > 0].mean() > a.images[:, 0][a.labels == 0].mean() + 0.3
    val = make_digit_scenes("val", 8, size=32, scale=(10, 14), seed=3)
    assert not torch.equal(val.images, a.images)


def test_the_pipeline_dataset_serves_the_scenes():
    data = DigitDataset("val", 5)
    scenes = make_digit_scenes("val", 5, seed=0)
    image, label = data[3]
    assert len(data) == 5 and image.shape == (1, 48, 48) and label.shape == (48, 48)
    assert torch.equal(image, scenes.images[3]) and torch.equal(label, scenes.labels[3])


def test_scene_errors():
    with pytest.raises(ValueError, match=r"split must be one of 'train', 'val', got 'test'"):
        make_digit_scenes("test", 1)
    with pytest.raises(ValueError, match=r"digits of up to 40 px do not fit a 32 px canvas"):
        make_digit_scenes("train", 1, size=32, scale=(10, 40))


@pytest.mark.slow
def test_the_demo_runs_every_stage(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["all", "--dataset", "digits", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    for name in ("teacher", "student", "distill-knowledge_adaptation"):
        assert f"| {name} |" in printed
        result = json.loads((out / name / "eval.json").read_text())
        assert 0 <= result["miou"] <= 1 and len(result["iou"]) == NUM_CLASSES
    assert (out / "translator" / "model.pt").is_file()
    student = json.loads((out / "student" / "eval.json").read_text())
    distilled = json.loads((out / "distill-knowledge_adaptation" / "eval.json").read_text())
    assert student["params"] == distilled["params"] and student["flops"] == distilled["flops"]
    assert (out / "figures" / "digits.png").stat().st_size > 10_000
    summary = (out / "summary.md").read_text()
    assert "| distill-knowledge_adaptation |" in summary
    assert " s on " in summary and "threads" in summary
    assert "Command: `python -m examples.segmentation all --dataset digits --out" in summary
    log = [json.loads(line) for line in
           (out / "distill-knowledge_adaptation" / "log.jsonl").read_text().splitlines()]
    assert {"ce", "adaptation", "affinity", "lr"} <= set(log[-1])
    assert log[-1]["adaptation"] > 0  # the demo's beta, 0.5


@pytest.mark.slow
def test_the_ablation_driver(tmp_path, capsys):
    out = tmp_path / "results"
    code = ablation.main(["--out", str(out), "--runs", str(tmp_path / "runs"),
                          "--rows", "student", "kd_T2", "adaptation", "adaptation+affinity",
                          "--seeds", "0", "1", "--beta", "3", "0.5", *TINY])
    assert code == 0
    saved = json.loads((out / "results.json").read_text())
    labels = [s["method"] for s in saved["summary"]]
    assert labels == ["teacher", "student", "kd_T2", "adaptation (beta=3)",
                      "adaptation (beta=0.5)", "adaptation+affinity (beta=3)",
                      "adaptation+affinity (beta=0.5)"]
    assert all(s["runs"] == 2 for s in saved["summary"][1:])
    assert len({s["params"] for s in saved["summary"][1:]}) == 1  # adapters are not kept
    assert saved["summary"][1]["params"] < saved["summary"][0]["params"]
    rows = {(r["method"], r["seed"]): r for r in saved["rows"]}
    assert rows[("adaptation (beta=3)", 1)]["weights"] == {"adaptation_weight": 3.0,
                                                          "affinity_weight": 0.0}
    assert "kd" in rows[("kd_T2", 0)]["terms_start"]
    summary = (out / "summary.md").read_text()
    assert "| adaptation (beta=3) | 2 |" in summary
    assert "| adaptation (beta=3) | adaptation |" in summary  # the loss-scale table
    assert "| student | loss |" not in summary  # a plain student has no distillation term
    assert "beta = 3, 0.5, gamma = 1" in summary
    assert (out / "ablation.png").stat().st_size > 10_000
    assert not (out / "teacher").exists()  # the models go under --runs

    # the same command again reads every finished row back, training nothing
    def no_training(*args, **kwargs):
        raise AssertionError("a finished row was trained again")

    again = tmp_path / "again"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ablation.stages, "distill", no_training)
        patch.setattr(ablation.stages, "train_student", no_training)
        patch.setattr(ablation.stages, "train_teacher", no_training)
        patch.setattr(ablation.stages, "train_translator_stage", no_training)
        assert ablation.main(["--out", str(again), "--runs", str(tmp_path / "runs"),
                              "--rows", "student", "kd_T2", "adaptation", "adaptation+affinity",
                              "--seeds", "0", "1", "--beta", "3", "0.5", "--reuse-teacher",
                              "--no-figure", *TINY]) == 0
    reread = json.loads((again / "results.json").read_text())
    assert [(r["method"], r["seed"], r["miou"]) for r in reread["rows"]] == [
        (r["method"], r["seed"], r["miou"]) for r in saved["rows"]]
    # merged with itself: every row twice as many runs, the teacher once
    merged = tmp_path / "merged"
    assert ablation.main(["--merge", str(out), str(again), "--out", str(merged), *TINY]) == 0
    summary = json.loads((merged / "results.json").read_text())["summary"]
    assert summary[0]["method"] == "teacher" and summary[0]["runs"] == 1
    assert all(s["runs"] == 4 for s in summary[1:])


def test_weight_variants_label_only_the_swept_weights():
    assert ablation.variants("adaptation", [50.0], [1.0, 10.0]) == [
        ("adaptation", {"adaptation_weight": 50.0, "affinity_weight": 0.0})]
    assert [v[0] for v in ablation.variants("adaptation+affinity", [50.0], [1.0, 10.0])] == [
        "adaptation+affinity (gamma=1)", "adaptation+affinity (gamma=10)"]
    assert ablation.variants("kd_T2", [1.0, 2.0], [1.0]) == [("kd_T2", {"kd_temperature": 2.0})]
    assert ablation.variants("student", [1.0], [1.0]) == [("student", {})]


def test_unknown_rows_fail_before_training(tmp_path):
    with pytest.raises(SystemExit):
        ablation.main(["--rows", "kd_T3", "--out", str(tmp_path)])


def test_loss_scales_average_the_first_and_last_steps():
    history = [{"step": i + 1, "lr": 0.1, "loss": float(i), "ce": 1.0, "kd": float(2 * i)}
               for i in range(10)]
    start, end = ablation.loss_scales(history, window=3)
    assert start == {"loss": 1.0, "ce": 1.0, "kd": 2.0}
    assert end == {"loss": 8.0, "ce": 1.0, "kd": 16.0}
    assert ablation.loss_scales([]) == ({}, {})
    rows = [{"method": "kd_T2", "terms_start": start, "terms_end": end},
            {"method": "student", "terms_start": {"loss": 1.0, "ce": 1.0},
             "terms_end": {"loss": 1.0, "ce": 1.0}}]
    table = ablation.format_scales(rows)
    assert "| kd_T2 | kd | 2 | 16 |" in table and "student" not in table
    assert ablation.format_scales(rows[1:]) == ""


def test_summary_mean_and_sample_deviation():
    rows = [{"method": "a", "miou": v, "params": 1, "flops": 2} for v in (0.3, 0.5)]
    (summary,) = ablation.summarize(rows)
    assert summary["miou_mean"] == pytest.approx(0.4)
    assert summary["miou_std"] == pytest.approx(0.1414213, rel=1e-6)
    assert "| a | 2 | 40.00 ± 14.14 |" in ablation.format_table([summary])
