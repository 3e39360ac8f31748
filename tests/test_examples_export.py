"""The export stage (TorchScript, torch.export, ONNX; loadable with torch alone) and the
distillation checkpoints that reference the frozen teacher and translator by hash."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("torchvision")
pytest.importorskip("torchmetrics")

sys.path.append(str(Path(__file__).resolve().parent.parent))  # for `examples`

from examples.segmentation import models
from examples.segmentation.cli import main
from examples.segmentation.export import FILES, check_formats, export_student
from examples.segmentation.references import (
    FROZEN_FILES,
    reference_frozen,
    sha256,
)
from segdistill import DistillationWrapper, FeatureSpec, Translator, load_checkpoint, presets

ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))
FORMATS = ["torchscript", "pt2", *(["onnx"] if ONNX else [])]
TINY = ["--dataset", "digits", "--teacher-steps", "2", "--student-steps", "2",
        "--distill-steps", "3", "--translator-steps", "2", "--scenes", "8", "4",
        "--batch-size", "4", "--eval-batch-size", "4", "--checkpoint-every", "1",
        "--no-progress", "--device", "cpu"]

# Run in a fresh interpreter in isolated mode (-I: no PYTHONPATH, no current folder on
# the path): torch (and onnxruntime) only; the examples' code is not importable.
LOAD_WITH_TORCH_ONLY = r"""
import importlib.util, json, sys
import torch
folder = sys.argv[1]
assert importlib.util.find_spec("examples") is None, "the examples are importable"
sample = torch.load(f"{folder}/sample.pt", weights_only=True)
x, want = sample["input"], sample["output"]
got = {"torchscript": torch.jit.load(f"{folder}/student.torchscript.pt")(x),
       "pt2": torch.export.load(f"{folder}/student.pt2").module()(x)}
if importlib.util.find_spec("onnxruntime") and len(sys.argv) > 2:
    import onnxruntime
    session = onnxruntime.InferenceSession(f"{folder}/student.onnx")
    got["onnx"] = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
print(json.dumps({k: float((v - want).abs().max()) for k, v in got.items()}))
"""


def _load_with_torch_only(folder: Path, onnx: bool) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-I", "-c", LOAD_WITH_TORCH_ONLY, str(folder), *(["onnx"] * onnx)],
        cwd=folder, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_the_digits_student_exports_and_loads_with_torch_only(tmp_path):
    torch.manual_seed(0)
    net = models.STUDENTS["digits_os8"].build(11, False)
    net.eval()(torch.randn(4, 1, 48, 48))  # give the batch norms statistics of their own
    result = export_student(net, torch.randn(2, 1, 48, 48), tmp_path, FORMATS)
    assert result["inputs"] == [[2, 1, 48, 48], [1, 1, 80, 112]]
    for fmt in FORMATS:
        assert (tmp_path / FILES[fmt]).is_file()
        assert result["formats"][fmt]["max_abs_diff"] < 1e-4
    assert json.loads((tmp_path / "export.json").read_text()) == result
    diffs = _load_with_torch_only(tmp_path, onnx=ONNX)
    assert set(diffs) == set(FORMATS) and all(d < 1e-4 for d in diffs.values())


@pytest.mark.slow
def test_the_papers_student_exports_every_format(tmp_path):
    # MobileNetV2 with DeepLab's head: dilated convs, the image-level feature's pooling and
    # broadcast, the bilinear upsampling to the input's (dynamic) size
    torch.manual_seed(0)
    net = models.STUDENTS["mobilenet_v2"].build(21, False)
    result = export_student(net, torch.randn(2, 3, 65, 97), tmp_path, FORMATS)
    assert set(result["formats"]) == set(FORMATS)
    assert all(r["max_abs_diff"] <= r["tolerance"] for r in result["formats"].values())
    diffs = _load_with_torch_only(tmp_path, onnx=ONNX)
    assert all(d < 1e-3 for d in diffs.values())


def test_the_segformer_student_exports_and_says_what_to_do_where_it_cannot(tmp_path):
    # the MiT-B0 student of the cirkd-cityscapes-b4-b0 recipe: torch.export and ONNX at a
    # size that divides by its stride (32); TorchScript cannot script a Hugging Face model,
    # and a size that does not divide fails in the tracer: each error says what to do
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    net = models.STUDENTS["segformer_mit_b0"].build(5, False)
    formats = [f for f in FORMATS if f != "torchscript"]
    result = export_student(net, torch.randn(2, 3, 64, 96), tmp_path / "ok", formats)
    assert all(r["max_abs_diff"] <= r["tolerance"] for r in result["formats"].values())
    with pytest.raises(RuntimeError, match=r"the torchscript export of SegFormer failed "
                                           r"\(.*\)\. .*leave it out \(--formats pt2 onnx\)"):
        export_student(net, torch.randn(2, 3, 64, 64), tmp_path / "ts", ["torchscript"])
    with pytest.raises(RuntimeError, match=r"the pt2 export of SegFormer failed .* from the "
                                           r"48 x 48 images; .*divide by its stride"):
        export_student(net, torch.randn(2, 3, 48, 48), tmp_path / "odd", ["pt2"])


class _Cancelling(nn.Module):
    """A 1x1 convolution of ``x + 1e5`` less that of ``1e5``: float32 rounds ``x`` there to
    about 1e-2, float64 does not (an ill-conditioned network)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x + 1e5) - self.conv(torch.full_like(x, 1e5))


def test_the_export_tolerance_follows_the_models_own_float32_rounding(tmp_path, monkeypatch):
    from examples.segmentation import export

    torch.manual_seed(0)
    net, images = _Cancelling().eval(), torch.randn(2, 3, 8, 8)
    inputs = [images, torch.randn(1, 3, 40, 72, generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        references = [net(x) for x in inputs]
        rounding = export._float32_rounding(net, inputs, references)
    base = max(1e-3 * max(1.0, float(r.abs().max())) for r in references)
    assert 2 * rounding > base  # a difference the plain tolerance would reject
    offset = 2 * rounding  # a runtime whose kernels round otherwise, as far as float32 does
    monkeypatch.setitem(export.WRITERS, "pt2",
                        lambda model, path, example: lambda x: model(x) + offset)
    result = export_student(net, images, tmp_path, ["pt2"])
    assert result["float32_rounding"] == pytest.approx(rounding)
    assert result["formats"]["pt2"]["tolerance"] == pytest.approx(4 * rounding)
    assert "own float32 rounding" in export.format_export("s", result)
    offset = 10 * rounding  # more than rounding explains
    with pytest.raises(ValueError, match=r"differs from the eager model by .* 4 times the "
                                         r"eager model's own float32 rounding"):
        export_student(net, images, tmp_path, ["pt2"])


def test_export_errors(tmp_path):
    net = nn.Conv2d(3, 2, 1)
    with pytest.raises(ValueError, match=r"at least 2 images .* got shape \(1, 3, 8, 8\)"):
        export_student(net, torch.randn(1, 3, 8, 8), tmp_path, ["pt2"])
    with pytest.raises(ValueError, match=r"unknown export formats \['tflite'\]"):
        check_formats(["tflite"])


def test_onnx_without_its_packages_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"needs onnxscript: pip install '\.\[export\]'"):
        check_formats(["torchscript", "onnx"])
    check_formats(["torchscript", "pt2"])  # no ONNX asked for: nothing missing


def _wrapper() -> tuple[DistillationWrapper, Translator]:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    student = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU())
    translator = Translator(8, 6)
    wrapper = presets.knowledge_adaptation(
        teacher, student, teacher_layer="2", student_layer=FeatureSpec("1", channels=4),
        translator=translator)
    return wrapper, translator


def test_a_wrappers_state_references_the_frozen_files(tmp_path):
    wrapper, translator = _wrapper()
    assert not any(k.startswith("teacher.") for k in wrapper.state_dict())  # left out
    wrapper.save_frozen = True  # the state an older checkpoint held
    full = wrapper.state_dict()
    wrapper.save_frozen = False
    assert any(k.startswith("teacher.") for k in full)
    assert sum(".teacher_transform.translator." in k for k in full) == len(
        translator.state_dict())  # stored once, though two terms share it
    paths = {"teacher": tmp_path / "t.pt", "translator": tmp_path / "tr.pt"}
    torch.save(wrapper.teacher.state_dict(), paths["teacher"])
    torch.save(translator.state_dict(), paths["translator"])
    transform = wrapper.terms["adaptation"].teacher_transform
    reference_frozen(wrapper, {"teacher": (wrapper.teacher, paths["teacher"]),
                               "translator": (transform, paths["translator"])})
    state = wrapper.state_dict()
    kept = sorted(k for k in state if k != FROZEN_FILES)
    assert kept and all(k.startswith(("student.", "terms.")) for k in kept)
    assert not any("teacher_transform" in k for k in kept)
    assert {k: set(v) for k, v in state[FROZEN_FILES].items()} == {
        "teacher": {"path", "sha256"}, "translator": {"path", "sha256"}}
    assert state[FROZEN_FILES]["teacher"]["sha256"] == sha256(paths["teacher"])
    # round trip through a file, strict
    torch.save(state, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert str(wrapper.load_state_dict(loaded)) == "<All keys matched successfully>"
    # an older checkpoint with the frozen modules in it still loads
    assert str(wrapper.load_state_dict(full)) == "<All keys matched successfully>"
    # the teacher file changed since: loading names it
    torch.save({"other": torch.zeros(1)}, paths["teacher"])
    other, _ = _wrapper()
    reference_frozen(other, {"teacher": (other.teacher, paths["teacher"]),
                             "translator": (other.terms["affinity"].teacher_transform,
                                            paths["translator"])})
    with pytest.raises(ValueError, match=r"the teacher file .*t\.pt has changed since the "
                                         r"checkpoint was written"):
        other.load_state_dict(loaded)


def test_reference_errors(tmp_path):
    wrapper, _ = _wrapper()
    with pytest.raises(FileNotFoundError, match=r"no teacher file at .*missing\.pt"):
        reference_frozen(wrapper, {"teacher": (wrapper.teacher, tmp_path / "missing.pt")})
    torch.save({}, tmp_path / "t.pt")
    with pytest.raises(ValueError, match=r"frozen entries without a file reference: "
                                         r"\['terms\.adaptation\.teacher_transform\."):
        reference_frozen(wrapper, {"teacher": (wrapper.teacher, tmp_path / "t.pt")})


@pytest.mark.slow
def test_the_distill_checkpoint_and_the_export_stage(tmp_path, capsys):
    out = tmp_path / "runs"
    common = [*TINY, "--out", str(out)]
    for stage in ("teacher", "translator"):
        assert main([stage, *common]) == 0
    assert main(["distill", *common, "--stop-after", "2"]) == 0  # a crash after step 2
    state = load_checkpoint(out / "distill-knowledge_adaptation" / "checkpoint.pt")
    keys = set(state["model"])
    assert not any(k.startswith("teacher.") or "teacher_transform" in k for k in keys)
    assert any(k.startswith("student.") for k in keys)
    assert any(".student_adapter." in k for k in keys)
    refs = state["model"][FROZEN_FILES]
    assert refs["teacher"] == {"path": str((out / "teacher" / "model.pt").resolve()),
                               "sha256": sha256(out / "teacher" / "model.pt")}
    assert refs["translator"]["sha256"] == sha256(out / "translator" / "model.pt")
    # resuming over a retrained teacher fails and names its file
    assert main(["teacher", *common, "--seed", "1"]) == 0
    with pytest.raises(ValueError, match=r"the teacher file .*teacher/model\.pt has changed"):
        main(["distill", *common, "--resume"])
    # the export stage on the plain student
    assert main(["student", *common]) == 0
    capsys.readouterr()
    assert main(["export", *common, "--models", "student", "--formats", *FORMATS]) == 0
    printed = capsys.readouterr().out
    assert "## student: exported, checked against eager" in printed
    result = json.loads((out / "student" / "export" / "export.json").read_text())
    assert set(result["formats"]) == set(FORMATS)
    with pytest.raises(ValueError, match=r"export writes a student .* not the teacher"):
        main(["export", *common, "--models", "teacher"])
