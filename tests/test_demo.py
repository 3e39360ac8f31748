"""The demo: data, a tiny end-to-end run of every method, the command line."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from segdistill.demo.data import NUM_CLASSES, make_digit_scenes
from segdistill.demo.run import (
    METHODS,
    DemoConfig,
    _variants,
    format_scales,
    format_table,
    loss_scales,
    main,
    run,
)


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


def test_scene_errors():
    with pytest.raises(ValueError, match=r"split must be one of 'train', 'val', got 'test'"):
        make_digit_scenes("test", 1)
    with pytest.raises(ValueError, match=r"digits of up to 40 px do not fit a 32 px canvas"):
        make_digit_scenes("train", 1, size=32, scale=(10, 40))


@pytest.mark.slow
def test_every_method_runs_end_to_end(tmp_path):
    config = DemoConfig(train_scenes=32, val_scenes=8, size=32, batch_size=4,
                        teacher_steps=3, student_steps=2, translator_steps=2,
                        methods=METHODS, seeds=(0, 1), out_dir=str(tmp_path), progress=False)
    results = run(config)
    methods = [s["method"] for s in results["summary"]]
    assert methods == ["teacher", *METHODS]
    assert all(s["runs"] == 2 for s in results["summary"][1:])
    students = results["summary"][1:]
    assert len({s["params"] for s in students}) == 1  # adapters are not part of the student
    assert students[0]["params"] < results["summary"][0]["params"]
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [(s["method"], s["miou_mean"]) for s in saved["summary"]] == [
        (s["method"], s["miou_mean"]) for s in results["summary"]]
    assert "| adaptation+affinity | 2 |" in format_table(results["summary"])


def test_command_line(tmp_path, capsys):
    code = main(["--steps", "2", "--teacher-steps", "2", "--translator-steps", "2",
                 "--train-scenes", "16", "--val-scenes", "4", "--batch-size", "4",
                 "--methods", "student", "adaptation", "--beta", "3", "0.5",
                 "--no-figure", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "| teacher | 1 |" in out and "| student | 1 |" in out
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["batch_size"] == 4 and saved["config"]["adaptation_weights"] == [3, 0.5]
    assert [(r["method"], r["weights"]["beta"]) for r in saved["rows"][2:]] == [
        ("adaptation (beta=3)", 3), ("adaptation (beta=0.5)", 0.5)]
    summary = (tmp_path / "summary.md").read_text()
    assert "beta = 3, 0.5, gamma = 1" in summary
    assert "| adaptation (beta=3) | adaptation |" in summary  # the loss-scale table
    assert "| student | loss |" not in summary  # plain students have no distillation terms


def test_weight_variants_label_only_the_swept_weights():
    config = DemoConfig(adaptation_weights=(50.0,), affinity_weights=(1.0, 10.0))
    assert _variants("adaptation", config) == [("adaptation", 50.0, 0.0)]
    assert _variants("affinity", config) == [("affinity (gamma=1)", 0.0, 1.0),
                                             ("affinity (gamma=10)", 0.0, 10.0)]
    assert [v[0] for v in _variants("adaptation+affinity", config)] == [
        "adaptation+affinity (gamma=1)", "adaptation+affinity (gamma=10)"]
    assert _variants("kd_T2", config) == [("kd_T2", 0.0, 0.0)]


def test_loss_scales_average_the_first_and_last_steps():
    history = [{"step": i + 1, "lr": 0.1, "loss": float(i), "ce": 1.0, "kd": float(2 * i)}
               for i in range(10)]
    start, end = loss_scales(history, window=3)
    assert start == {"loss": 1.0, "ce": 1.0, "kd": 2.0}
    assert end == {"loss": 8.0, "ce": 1.0, "kd": 16.0}
    assert loss_scales([]) == ({}, {})
    rows = [{"method": "kd_T2", "terms_start": start, "terms_end": end},
            {"method": "student", "terms_start": {"loss": 1.0, "ce": 1.0},
             "terms_end": {"loss": 1.0, "ce": 1.0}}]
    table = format_scales(rows)
    assert "| kd_T2 | kd | 2 | 16 |" in table and "student" not in table
    assert format_scales(rows[1:]) == ""


def test_ablation_flag_uses_the_papers_weights_and_the_plain_demo_rebalanced_ones(tmp_path):
    tiny = ["--steps", "1", "--teacher-steps", "1", "--translator-steps", "1",
            "--train-scenes", "8", "--val-scenes", "2", "--batch-size", "4", "--seeds", "0",
            "--methods", "adaptation+affinity", "--no-figure"]
    assert main([*tiny, "--ablation", "--out", str(tmp_path / "a")]) == 0
    assert main([*tiny, "--out", str(tmp_path / "b")]) == 0
    assert main([*tiny, "--ablation", "--beta", "2", "--out", str(tmp_path / "c")]) == 0
    weights = [json.loads((tmp_path / d / "results.json").read_text())["rows"][1]["weights"]
               for d in "abc"]
    assert weights == [{"beta": 50.0, "gamma": 1.0}, {"beta": 0.5, "gamma": 1.0},
                       {"beta": 2.0, "gamma": 1.0}]
