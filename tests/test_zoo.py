"""The wrapper on the model zoos people use, random init, small inputs, a few steps each.

torchvision segmentation models, segmentation_models_pytorch, timm ``features_only``
backbones inside a small model, and Hugging Face SegFormer as teacher and as student.
The README's and the wrapper guide's table of layer paths, channels and output strides
is generated here (``python tests/test_zoo.py`` prints it) and checked against both.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segdistill import FitNetLoss, Translator, kd_loss, presets
from segdistill.hooks import feature_shapes, select_output

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 5
SIZE = 32  # training tests: output stride 32 still leaves a 1 x 1 map
TABLE_SIZE = 64  # the table: every stride reads off exactly
SEGFORMER_SMALL = {"hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1],
                   "num_attention_heads": [1, 1, 2, 4], "decoder_hidden_size": 32}


def _batch(seed: int = 0, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (2, size, size), generator=g)
    labels[:, : size // 4] = 255
    return torch.randn(2, 3, SIZE, SIZE, generator=g), labels


# ---- the zoos ------------------------------------------------------------------------

def torchvision_model(name: str) -> nn.Module:
    from torchvision.models import segmentation

    return getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=CLASSES)


def smp_model(arch: str, encoder: str) -> nn.Module:
    smp = pytest.importorskip("segmentation_models_pytorch")
    return getattr(smp, arch)(encoder, encoder_weights=None, classes=CLASSES)


class TimmSegmenter(nn.Module):
    """A small segmenter around a timm ``features_only`` backbone (which returns a list)."""

    def __init__(self, name: str, out_indices: tuple[int, ...] = (2, 3)) -> None:
        super().__init__()
        timm = pytest.importorskip("timm")
        self.backbone = timm.create_model(name, features_only=True, pretrained=False,
                                          out_indices=out_indices)
        self.head = nn.Conv2d(self.backbone.feature_info.channels()[-1], CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.backbone(x)[-1])
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def segformer(small: bool = True) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.SegformerConfig(num_labels=CLASSES, **(SEGFORMER_SMALL if small
                                                                 else {}))
    return transformers.SegformerForSemanticSegmentation(config)


@functools.cache
def shared_teacher(name: str) -> nn.Module:
    """Teachers are frozen by the wrapper, so the slow ones are built once per session."""
    torch.manual_seed(0)
    return torchvision_model(name)


def _train(wrapper: Any, steps: int = 2, student_output: Any = None,
           with_labels: bool = True) -> Any:
    """A few optimiser steps of task loss + distillation; the student must change."""
    params = list(wrapper.trainable_parameters())
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    wrapper.train()
    try:
        for step in range(steps):
            images, labels = _batch(step)
            out = wrapper(images, target=labels if with_labels else None)
            logits = select_output(out.output, student_output)
            if logits.shape[-2:] != labels.shape[-2:]:
                logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear")
            loss = F.cross_entropy(logits, labels, ignore_index=255) + out.loss
            assert all(torch.isfinite(v) for v in out.losses.values()), out.losses
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        wrapper.remove_hooks()
    assert not any(p.requires_grad for p in wrapper.teacher.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(params, before))
    return out


# ---- torchvision -----------------------------------------------------------------------

def test_torchvision_fcn_teacher_kd_and_attention_to_deeplabv3_mobilenet():
    teacher = shared_teacher("fcn_resnet50")
    torch.manual_seed(0)
    student = torchvision_model("deeplabv3_mobilenet_v3_large")
    out = _train(presets.kd(teacher, student, temperature=2.0))
    assert set(out.losses) == {"kd"} and out.output["out"].shape == (2, CLASSES, SIZE, SIZE)
    wrapper = presets.attention_transfer(teacher, student, teacher_layer="classifier.2",
                                         student_layer="backbone['out']", resize="teacher")
    _train(wrapper)


def test_torchvision_lraspp_backbone_needs_a_selector_named_as_written():
    teacher = shared_teacher("deeplabv3_resnet50")
    student = torchvision_model("lraspp_mobilenet_v3_large")
    wrapper = presets.attention_transfer(teacher, student, teacher_layer="classifier.3",
                                         student_layer="backbone")
    with pytest.raises(ValueError, match=r"the student's layer 'backbone' returns OrderedDict "
                                         r"\{'low': Tensor\(2, 40, 4, 4\), 'high': Tensor\(2, "
                                         r"960, 2, 2\)\}, not a tensor.*e.g. \"backbone\['low'\]\""
                       ) as info:
        wrapper(_batch()[0])
    assert "features" not in str(info.value)
    wrapper.remove_hooks()


def test_torchvision_fitnet_channels_read_from_example_input():
    teacher = shared_teacher("deeplabv3_resnet50")
    student = torchvision_model("lraspp_mobilenet_v3_large")
    wrapper = presets.fitnet(teacher, student, teacher_layer="classifier.3",
                             student_layer="backbone['high']", example_input=_batch()[0][:1],
                             resize="teacher")
    loss = wrapper.terms["fitnet"].loss
    assert (loss.student_channels, loss.teacher_channels) == (960, 256)
    _train(wrapper)


# ---- segmentation_models_pytorch ------------------------------------------------------

def test_smp_unet_fitnet_on_the_encoders_last_stage():
    teacher = smp_model("Unet", "resnet34")
    student = smp_model("Unet", "mobilenet_v2")
    wrapper = presets.fitnet(teacher, student, teacher_layer="encoder[-1]",
                             student_layer="encoder[-1]", example_input=_batch()[0])
    assert isinstance(wrapper.terms["fitnet"].loss, FitNetLoss)
    assert wrapper.terms["fitnet"].loss.regressor.weight.shape[:2] == (512, 1280)
    _train(wrapper)


def test_smp_deeplabv3plus_pairwise_on_the_decoder_and_the_raw_encoder_error():
    teacher = smp_model("DeepLabV3Plus", "resnet34")
    student = smp_model("DeepLabV3Plus", "mobilenet_v2")
    _train(presets.pairwise(teacher, student, teacher_layer="decoder", student_layer="decoder"))
    # the encoder returns a list whose first element is the input image: never taken silently
    wrapper = presets.pairwise(teacher, student, teacher_layer="encoder[-1]",
                               student_layer="encoder")
    with pytest.raises(ValueError, match=r"the student's layer 'encoder' returns list of 6 "
                                         r"\(\[0\] Tensor\(2, 3, 32, 32\), .*e.g. 'encoder\[0\]' "
                                         r"\(the first\) or 'encoder\[-1\]'"):
        wrapper(_batch()[0])


# ---- timm ---------------------------------------------------------------------------------

def test_timm_features_only_backbones_with_the_paper_method():
    torch.manual_seed(0)
    teacher = TimmSegmenter("resnet18")  # [128, 256] channels at OS [8, 16]
    student = TimmSegmenter("mobilenetv3_small_100")  # [24, 48] at OS [8, 16]
    wrapper = presets.knowledge_adaptation(
        teacher, student, teacher_layer="backbone[0]", student_layer="backbone[-1]",
        translator=Translator(128, latent_channels=32), example_input=_batch()[0],
        adaptation_weight=1.0)  # OS 8, encoded at OS 16, against the student's OS 16
    assert wrapper.terms["adaptation"].student_adapter.in_channels == 48
    out = _train(wrapper, steps=3)
    assert set(out.losses) == {"adaptation", "affinity"}


# ---- Hugging Face SegFormer ---------------------------------------------------------------

def test_segformer_student_kd_at_another_logit_resolution():
    teacher = shared_teacher("deeplabv3_mobilenet_v3_large")  # logits at 32 x 32
    torch.manual_seed(0)
    student = segformer()  # a ModelOutput with .logits at 8 x 8
    images, labels = _batch()
    wrapper = presets.kd(teacher, student)  # both outputs found without a key
    with pytest.raises(ValueError, match=r"term 'kd': expected student and teacher features "
                                         r"on the same H x W, got \(8, 8\) and \(32, 32\); "
                                         r"pass resize='student' or resize='teacher'"):
        wrapper(images, target=labels)
    wrapper.remove_hooks()
    # the teacher's logits down to 8 x 8; the 32 x 32 labels follow the one label rule
    # (nearest-resized onto the 8 x 8 grid), as kd_loss does standalone
    wrapper = presets.kd(teacher, student, resize="student")
    out = wrapper(images, target=labels)
    with torch.no_grad():
        t_logits = teacher(images)["out"]
    expected = kd_loss(out.output.logits, t_logits, labels, resize="student")
    torch.testing.assert_close(out.losses["kd"], expected)
    wrapper.remove_hooks()
    out = _train(presets.kd(teacher, student, resize="teacher"), student_output="logits")
    assert out.output.logits.shape == (2, CLASSES, 8, 8)


def test_segformer_student_fitnet_on_a_stage():
    teacher = shared_teacher("deeplabv3_mobilenet_v3_large")
    student = segformer()
    wrapper = presets.fitnet(teacher, student, teacher_layer="backbone['out']",
                             student_layer="segformer.stages.2", example_input=_batch()[0])
    assert wrapper.terms["fitnet"].loss.student_channels == SEGFORMER_SMALL["hidden_sizes"][2]
    _train(wrapper)


def test_segformer_teacher_cwd_attention_and_the_paper_method():
    torch.manual_seed(0)
    teacher = segformer()
    student = torchvision_model("lraspp_mobilenet_v3_large")
    _train(presets.cwd(teacher, student, resize="student"))  # teacher's 8 x 8 onto 32 x 32
    _train(presets.attention_transfer(teacher, student,
                                      teacher_layer="segformer['hidden_states'][2]",
                                      student_layer="backbone['high']"))
    wrapper = presets.knowledge_adaptation(
        teacher, student, teacher_layer="segformer.stages.1", student_layer="backbone['high']",
        translator=Translator(32), example_input=_batch()[0], adaptation_weight=1.0)
    _train(wrapper)


def test_output_selectors_per_side_for_two_zoos():
    teacher = shared_teacher("deeplabv3_mobilenet_v3_large")
    student = segformer()
    images, _ = _batch()
    wrapper = presets.cwd(teacher, student, resize="teacher", teacher_output="out",
                          student_output=lambda out: out.logits).eval()  # no dropout
    automatic = presets.cwd(teacher, student, resize="teacher").eval()
    torch.testing.assert_close(wrapper(images).losses["cwd"], automatic(images).losses["cwd"])
    with pytest.raises(ValueError, match=r"the student's output has no key 'out'; it holds "
                                         r"SemanticSegmenterOutput \{'logits': Tensor\(2, 5, 8"):
        presets.cwd(teacher, student, resize="teacher", student_output="out")(images)


# ---- the table of layer paths ---------------------------------------------------------------

TABLE_MODELS: list[tuple[str, str, str, Any, list[str]]] = [
    ("torchvision", "deeplabv3_resnet50", "teacher",
     lambda: shared_teacher("deeplabv3_resnet50"), ["backbone.layer4", "classifier.3"]),
    ("torchvision", "fcn_resnet50", "teacher",
     lambda: shared_teacher("fcn_resnet50"), ["backbone.layer4", "classifier.2"]),
    ("torchvision", "deeplabv3_mobilenet_v3_large", "student",
     lambda: torchvision_model("deeplabv3_mobilenet_v3_large"),
     ["backbone['out']", "classifier.3"]),
    ("torchvision", "lraspp_mobilenet_v3_large", "student",
     lambda: torchvision_model("lraspp_mobilenet_v3_large"),
     ["backbone['high']", "backbone['low']"]),
    ("smp", "Unet('resnet34')", "teacher", lambda: smp_model("Unet", "resnet34"),
     ["encoder[-1]", "decoder"]),
    ("smp", "DeepLabV3Plus('resnet34')", "teacher",
     lambda: smp_model("DeepLabV3Plus", "resnet34"), ["encoder[-1]", "decoder"]),
    ("smp", "Unet('mobilenet_v2')", "student", lambda: smp_model("Unet", "mobilenet_v2"),
     ["encoder[-1]", "decoder"]),
    ("smp", "DeepLabV3Plus('mobilenet_v2')", "student",
     lambda: smp_model("DeepLabV3Plus", "mobilenet_v2"), ["encoder[-1]", "decoder"]),
    ("timm", "resnet50, features_only, out_indices=(2, 3)", "teacher",
     lambda: TimmSegmenter("resnet50"), ["backbone[0]", "backbone[-1]"]),
    ("timm", "mobilenetv3_large_100, features_only, out_indices=(2, 3)", "student",
     lambda: TimmSegmenter("mobilenetv3_large_100"), ["backbone[0]", "backbone[-1]"]),
    ("transformers", "SegformerForSemanticSegmentation, default config (MiT-b0)",
     "teacher or student", lambda: segformer(small=False),
     ["segformer.stages.3", "segformer['hidden_states'][1]", "decode_head.activation"]),
]
HEADER = ("Zoo", "Model", "Role", "Layer path", "Channels", "Output stride", "Logits stride")


def table_rows() -> list[tuple[str, ...]]:
    """One row per layer: the numbers read from a forward at 64 x 64."""
    rows = []
    images = torch.zeros(1, 3, TABLE_SIZE, TABLE_SIZE)
    for zoo, model, role, build, layers in TABLE_MODELS:
        torch.manual_seed(0)
        shapes = feature_shapes(build(), layers, images)
        logits = TABLE_SIZE // shapes["output"][-1]
        for layer in layers:
            rows.append((zoo, model, role, layer, str(shapes[layer][1]),
                         str(TABLE_SIZE // shapes[layer][-1]), str(logits)))
    return rows


def markdown_table(rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(f"`{c}`" if i == 3 else c for i, c in enumerate(row)) + " |"
              for row in rows]
    return "\n".join(lines)


def rst_table(rows: list[tuple[str, ...]]) -> str:
    cells = [HEADER] + [tuple(f"``{c}``" if i == 3 else c for i, c in enumerate(row))
                        for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEADER))]
    rule = "  ".join("=" * w for w in widths)

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()

    return "\n".join([rule, line(cells[0]), rule, *map(line, cells[1:]), rule])


@pytest.fixture(scope="module")
def rows() -> list[tuple[str, ...]]:
    pytest.importorskip("segmentation_models_pytorch")
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    return table_rows()


def test_readme_table_matches_the_models(rows):
    assert markdown_table(rows) in (ROOT / "README.md").read_text(), (
        "README's zoo table is stale; regenerate it with `python tests/test_zoo.py`")


def test_wrapper_guide_table_matches_the_models(rows):
    assert rst_table(rows) in (ROOT / "docs" / "guide" / "wrapper.rst").read_text(), (
        "docs/guide/wrapper.rst's zoo table is stale; regenerate it with "
        "`python tests/test_zoo.py`")


# ---- the README's snippet, as written ---------------------------------------------------------

def test_readme_distil_your_own_model_runs_as_written():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Distil your own model", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S)
    assert snippet is not None
    g = torch.Generator().manual_seed(0)
    train_loader = [(torch.randn(2, 3, SIZE, SIZE, generator=g),
                     torch.randint(0, 21, (2, SIZE, SIZE), generator=g))]
    namespace: dict[str, Any] = {"train_loader": train_loader}
    exec(compile(snippet.group(1), "README.md", "exec"), namespace)
    deployable = namespace["deployable"]
    assert type(deployable).__name__ == "LRASPP"
    assert not any(m._forward_hooks for m in deployable.modules())
    assert namespace["wrapper"].terms["affinity"].student_adapter.in_channels == 960


if __name__ == "__main__":
    table = table_rows()
    print(markdown_table(table), end="\n\n")
    print(rst_table(table))


# ---- the field's methods on a zoo pair -----------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("preset,options", [
    ("dist", {}),
    ("mgd", {"layers": True}),
    ("ifvd", {"layers": True, "num_classes": CLASSES}),
    ("cirkd", {"layers": True, "num_classes": CLASSES}),
    ("cwd", {"layers": True}),
])
def test_the_fields_methods_train_a_torchvision_pair(preset, options):
    """Each new method, through its preset, trains torchvision's pair two steps."""
    teacher = shared_teacher("deeplabv3_resnet50")
    torch.manual_seed(0)
    student = torchvision_model("lraspp_mobilenet_v3_large")
    options = dict(options)
    if options.pop("layers", False):
        options.update(teacher_layer="classifier.3", student_layer="backbone['high']")
        if preset != "ifvd":
            options["example_input"] = _batch()[0][:1]
    wrapper = presets.get_preset(preset)(teacher, student, resize="teacher", **options)
    out = _train(wrapper)
    assert set(out.losses) == set(wrapper.terms)


@pytest.mark.slow
def test_the_holistic_term_trains_a_torchvision_pair_and_its_discriminator():
    from segdistill import discriminator_optimizer

    teacher = shared_teacher("deeplabv3_resnet50")
    torch.manual_seed(0)
    student = torchvision_model("lraspp_mobilenet_v3_large")
    wrapper = presets.holistic(teacher, student, num_classes=CLASSES, width=8).train()
    optimizer = torch.optim.SGD(wrapper.trainable_parameters(), lr=0.01)
    d_optimizer = discriminator_optimizer(wrapper.separately_optimized_parameters())
    disc = wrapper.terms["holistic"].loss.discriminator
    before = [p.detach().clone() for p in disc.parameters()]
    try:
        for step in range(2):  # the discriminator takes logits of at least 64 x 64
            images, labels = _batch(step, size=64)
            images = F.interpolate(images, size=(64, 64), mode="bilinear")
            out = wrapper(images)
            loss = F.cross_entropy(out.output["out"], labels, ignore_index=255) + out.loss
            assert torch.isfinite(out.losses["holistic"])
            for opt in (optimizer, d_optimizer):
                opt.zero_grad()
            loss.backward()
            for opt in (optimizer, d_optimizer):
                opt.step()
    finally:
        wrapper.remove_hooks()
    assert any(not torch.equal(p, b) for p, b in zip(disc.parameters(), before))
