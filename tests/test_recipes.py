"""The docs' recipes run as shown, and do what their text says.

The programs of docs/guide/recipes.rst (Lightning, the Hugging Face Trainer, a DINOv2
teacher) and the snippets of docs/guide/wrapper.rst are read from the pages, by their
``:name:``, and executed here: the docs show the very code that runs. Each test then
checks the claims the page makes about it, against plain references.
"""

from __future__ import annotations

import copy
import pickle
import re
import textwrap
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from models import tiny_pair
from torch import nn

from segdistill import FeatureSpec, TokenGrid, Translator, presets

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "guide"
pytestmark = pytest.mark.skipif(not GUIDE.is_dir(), reason="run from a source checkout")


def code_block(page: str, name: str) -> str:
    """The code of the ``.. code-block::`` with ``:name: <name>`` on ``docs/guide/<page>``."""
    lines = (GUIDE / page).read_text().splitlines()
    for i, line in enumerate(lines):
        if not re.match(r"^\s*\.\. code-block:: \w+\s*$", line):
            continue
        indent = len(line) - len(line.lstrip())
        j = i + 1
        options = {}
        while j < len(lines) and re.match(r"^\s+:\w[\w-]*:", lines[j]):
            key, _, value = lines[j].strip()[1:].partition(":")
            options[key] = value.strip()
            j += 1
        if options.get("name") != name:
            continue
        body = []
        for text in lines[j:]:
            if text.strip() and len(text) - len(text.lstrip()) <= indent:
                break
            body.append(text)
        return textwrap.dedent("\n".join(body)).strip() + "\n"
    raise LookupError(f"no code block named {name!r} on {page}")


def run_block(page: str, name: str, code: str | None = None, **namespace: Any) -> dict:
    """Execute a named block (or ``code``, a variant of it) in a fresh namespace."""
    source = code_block(page, name) if code is None else code
    scope: dict[str, Any] = {"__name__": f"docs_{name.replace('-', '_')}", **namespace}
    exec(compile(source, f"{page}:{name}", "exec"), scope)
    return scope


def test_code_blocks_are_found_by_name_and_unknown_names_are_not():
    code = code_block("recipes.rst", "recipe-lightning")
    assert code.startswith("import lightning as L\n")
    assert "restored = Distillation.load_from_checkpoint" in code
    with pytest.raises(LookupError, match="no code block named 'nothing'"):
        code_block("recipes.rst", "nothing")


# ---- recipes.rst: PyTorch Lightning -------------------------------------------------------


def test_the_lightning_recipe_checkpoints_the_student_and_not_the_teacher(tmp_path,
                                                                            monkeypatch):
    pytest.importorskip("lightning")
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scope = run_block("recipes.rst", "recipe-lightning")
    module, trainer, restored = scope["module"], scope["trainer"], scope["restored"]
    assert trainer.global_step == 2

    path = Path(scope["checkpoint"].best_model_path)
    assert path.is_file() and path.parent == tmp_path / "checkpoints"
    state = torch.load(path, weights_only=True)["state_dict"]
    trained = module.wrapper
    assert set(state) == ({f"wrapper.student.{k}" for k in trained.student.state_dict()}
                          | {"wrapper.terms.fitnet.loss.regressor.weight"})
    assert not any(k.startswith("wrapper.teacher.") for k in state)
    for name, value in trained.student.state_dict().items():
        assert torch.equal(state[f"wrapper.student.{name}"], value), name

    # strict loading into a freshly built module; its own teacher is kept
    fresh = scope["Distillation"]()
    teacher_before = copy.deepcopy(fresh.wrapper.teacher.state_dict())
    fresh.load_state_dict(state, strict=True)
    for name, value in trained.student.state_dict().items():
        assert torch.equal(fresh.wrapper.student.state_dict()[name], value), name
    for name, value in teacher_before.items():
        assert torch.equal(fresh.wrapper.teacher.state_dict()[name], value), name
    for name, value in trained.student.state_dict().items():
        assert torch.equal(restored.wrapper.student.state_dict()[name], value), name
    student = scope["student"]
    assert type(student) is nn.Sequential and not any(m._forward_hooks for m in student.modules())

    # "modules in eval mode at the start of training": the teacher's, and only those
    teacher_modules = len(list(trained.teacher.modules()))
    module.train()
    assert [n for n, m in module.named_modules() if not m.training] == [
        n for n, _ in module.named_modules() if n.startswith("wrapper.teacher")]
    for warning in caught:
        found = re.search(r"Found (\d+) module\(s\) in eval mode", str(warning.message))
        if found:
            assert int(found.group(1)) == teacher_modules


# ---- recipes.rst: the Hugging Face Trainer ------------------------------------------------


def test_the_hf_trainer_recipe_saves_the_student_only_with_safetensors(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    safetensors = pytest.importorskip("safetensors.torch")
    monkeypatch.chdir(tmp_path)
    scope = run_block("recipes.rst", "recipe-hf-trainer")
    wrapper, student = scope["wrapper"], scope["student"]
    assert scope["trainer"].state.global_step == 2

    saved = safetensors.load_file(tmp_path / "distillation" / "final" / "model.safetensors")
    expected = student.state_dict()
    assert sorted(saved) == sorted(f"student.{k}" for k in expected)  # once each, no teacher
    for name, value in expected.items():
        assert torch.equal(saved[f"student.{name}"], value), name
    pointers = [v.data_ptr() for v in saved.values()]
    assert len(set(pointers)) == len(pointers)

    fresh = scope["presets"].kd(scope["segformer"](32), scope["segformer"](16),
                                teacher_input=scope["teacher_pixels"])
    teacher_before = copy.deepcopy(fresh.teacher.state_dict())
    fresh.load_state_dict(saved, strict=True)
    for name, value in expected.items():
        assert torch.equal(fresh.student.state_dict()[name], value), name
    for name, value in teacher_before.items():
        assert torch.equal(fresh.teacher.state_dict()[name], value), name

    exported = transformers.SegformerForSemanticSegmentation.from_pretrained(tmp_path / "student")
    for name, value in expected.items():
        assert torch.equal(exported.state_dict()[name], value), name

    # without remove_unused_columns=False the batch arrives empty
    args = transformers.TrainingArguments(output_dir="other", max_steps=1, report_to=[],
                                          per_device_train_batch_size=2, use_cpu=True,
                                          save_strategy="no")
    other = scope["DistillationTrainer"](model=wrapper, args=args,
                                         train_dataset=scope["Pixels"]())
    with pytest.raises(ValueError, match="The batch received was empty"):
        other.train()


# ---- recipes.rst: a DINOv2 teacher --------------------------------------------------------


def _registers(code: str) -> str:
    """The DINOv2 recipe with registers: the two class names swapped, nothing else."""
    assert code.count("Dinov2Config") == 2 and code.count("Dinov2Model") == 3
    return (code.replace("Dinov2Config", "Dinov2WithRegistersConfig")
            .replace("Dinov2Model", "Dinov2WithRegistersModel"))


@pytest.mark.parametrize("registers", [False, True], ids=["dinov2", "with-registers"])
def test_the_dinov2_recipe_distils_patch_tokens_into_a_cnn(registers):
    transformers = pytest.importorskip("transformers")
    if registers and not hasattr(transformers, "Dinov2WithRegistersModel"):
        pytest.skip("this transformers has no DINOv2 with registers")
    torch.manual_seed(0)
    code = code_block("recipes.rst", "recipe-dinov2")
    scope = run_block("recipes.rst", "recipe-dinov2", _registers(code) if registers else code)
    teacher, student, wrapper = scope["teacher"], scope["student"], scope["wrapper"]
    images = scope["images"]
    prefix = 5 if registers else 1
    assert teacher.config.patch_size == 14
    assert getattr(teacher.config, "num_register_tokens", 0) == prefix - 1

    # the captured map: the patch tokens of the last hidden state, put on the 4 x 6 grid
    # by hand (the teacher saw 56 x 84 pixels)
    pixels = scope["teacher_input"](images)["pixel_values"]
    assert pixels.shape[-2:] == (56, 84)
    with torch.no_grad():
        hidden = teacher(pixel_values=pixels).last_hidden_state
    assert hidden.shape == (2, prefix + 4 * 6, 48)
    expected = hidden[:, prefix:].reshape(2, 4, 6, 48).permute(0, 3, 1, 2)
    torch.testing.assert_close(wrapper.run_teacher(images)["features"], expected,
                               rtol=0, atol=0)

    # the distillation term alone reaches the student; the teacher stayed frozen
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    student.zero_grad()
    wrapper(images).loss.backward()
    for name, p in student.named_parameters():
        if not name.startswith("head."):  # the head is after the distilled layer
            assert p.grad is not None and p.grad.abs().sum() > 0, name


# ---- wrapper.rst: the guide's snippets ----------------------------------------------------


def _backbone_pair(teacher_stride: int = 2, student_stride: int = 4,
                   pointwise_teacher: bool = False) -> tuple[nn.Module, nn.Module]:
    """Models with a ``backbone`` and a ``head``, as the guide's snippets name them. The
    pointwise teacher (2 x 2 average pooling, then 1 x 1 convolutions) commutes exactly
    with horizontal flips and with crops at even offsets."""
    torch.manual_seed(0)
    if pointwise_teacher:
        body: nn.Module = nn.Sequential(nn.AvgPool2d(teacher_stride), nn.Conv2d(3, 12, 1),
                                        nn.ReLU())
    else:
        body = nn.Sequential(nn.Conv2d(3, 12, 3, teacher_stride, 1), nn.ReLU())
    teacher = nn.Sequential(OrderedDict(backbone=body, head=nn.Conv2d(12, 5, 1)))
    student = nn.Sequential(OrderedDict(
        backbone=nn.Sequential(nn.Conv2d(3, 6, 3, student_stride, 1), nn.ReLU()),
        head=nn.Conv2d(6, 5, 1)))
    return teacher, student


def _fitnet(teacher: nn.Module, student: nn.Module, resize: str = "none", **kwargs: Any):
    return presets.fitnet(teacher, student, teacher_layer=FeatureSpec("backbone", channels=12),
                          student_layer=FeatureSpec("backbone", channels=6), resize=resize,
                          **kwargs)


def _resnets():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return (torchvision.models.resnet18(num_classes=5).eval(),
            torchvision.models.resnet18(num_classes=5).eval())


def test_guide_call_captures_the_last_use_of_a_shared_relu():
    teacher, student = _resnets()
    wrapper = run_block("wrapper.rst", "guide-call", teacher=teacher, student=student)["wrapper"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the block's output, by hand
        block_output = teacher.layer1[0](teacher.maxpool(teacher.relu(teacher.bn1(
            teacher.conv1(x)))))
    torch.testing.assert_close(wrapper.run_teacher(x)["features"], block_output, rtol=0, atol=0)
    assert torch.isfinite(wrapper(x).loss)
    # without call=, already the probe of example_input= raises
    with pytest.raises(RuntimeError, match=r"the teacher's layer 'layer1.0.relu' ran 2 times"):
        presets.fitnet(teacher, student, teacher_layer="layer1.0.relu",
                       student_layer="layer1.0.relu", example_input=x[:1])


def test_guide_tokens_layouts_and_the_functional_form():
    transformers = pytest.importorskip("transformers")
    timm = pytest.importorskip("timm")
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=64, patch_size=14)
    dinov2 = transformers.Dinov2WithRegistersModel(
        transformers.Dinov2WithRegistersConfig(num_register_tokens=4, **small))
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=1,
                            num_classes=0)
    tokens = torch.randn(2, 5 + 4 * 6, 8)
    scope = run_block("wrapper.rst", "guide-tokens", dinov2=dinov2, vit=vit, tokens=tokens)
    assert scope["teacher_layer"].tokens == TokenGrid(patch_size=14, prefix_tokens=5)
    assert scope["student_layer"].tokens == TokenGrid(patch_size=16, prefix_tokens=1)
    expected = tokens[:, 5:].reshape(2, 4, 6, 8).permute(0, 3, 1, 2)  # row by row
    torch.testing.assert_close(scope["fmap"], expected, rtol=0, atol=0)

    # Hugging Face's ViT at another size than its config's: only with the keyword
    config = transformers.ViTConfig(image_size=32, **small)
    model = transformers.ViTModel(config, add_pooling_layer=False)
    with pytest.raises(ValueError):
        model(pixel_values=torch.randn(1, 3, 28, 42))
    spec = FeatureSpec("layernorm", tokens=TokenGrid.of(model))
    _, student = tiny_pair()
    wrapper = presets.fitnet(model, student, teacher_layer=spec, student_layer="relu",
                             example_input=torch.zeros(1, 3, 28, 42), resize="teacher",
                             teacher_input=lambda x: {"pixel_values": x,
                                                      "interpolate_pos_encoding": True})
    assert wrapper.run_teacher(torch.randn(2, 3, 28, 42))["features"].shape == (2, 32, 2, 3)


def test_guide_inputs_a_bf16_teacher_normalised_at_twice_the_size():
    teacher, student = _backbone_pair()
    images = torch.rand(2, 3, 32, 32)
    scope = run_block("wrapper.rst", "guide-inputs", teacher=teacher, student=student,
                      images=images, labels=torch.randint(0, 5, (2, 8, 8)))
    wrapper, out = scope["wrapper"], scope["out"]
    assert out.loss.dtype == torch.float32 and out.output.dtype == torch.float32
    # the teacher's map, by hand: normalise, resize, cast, run
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = F.interpolate((images - mean) / std, size=(64, 64), mode="bilinear")
    with torch.no_grad():
        expected = teacher.backbone(x.to(torch.bfloat16))
    got = wrapper.run_teacher(images)["features"]
    assert got.dtype == torch.bfloat16 and got.shape == (2, 12, 32, 32)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    out.loss.backward()
    grad = student.backbone[0].weight.grad
    assert grad.dtype == torch.float32 and grad.abs().sum() > 0


def test_guide_dict_batches_give_a_hugging_face_teacher_its_keywords():
    transformers = pytest.importorskip("transformers")
    from segdistill import kd_loss

    torch.manual_seed(0)
    segformer = transformers.SegformerForSemanticSegmentation(transformers.SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
        num_attention_heads=[1, 2], decoder_hidden_size=8, num_labels=5)).eval()
    _, student = _backbone_pair(student_stride=1)
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32))
    scope = run_block("wrapper.rst", "guide-dict-batches", presets=presets,
                      segformer=segformer, student=student, images=images, labels=labels)
    with torch.no_grad():
        teacher_logits = segformer(pixel_values=images).logits
    expected = kd_loss(student(images), teacher_logits, labels, resize="teacher")
    torch.testing.assert_close(scope["out"].loss, expected)


def _training_scope() -> dict[str, Any]:
    teacher, student = _backbone_pair()
    wrapper = _fitnet(teacher, student, resize="teacher")
    g = torch.Generator().manual_seed(1)
    dataset = torch.utils.data.TensorDataset(torch.randn(8, 3, 16, 16, generator=g),
                                             torch.randint(0, 5, (8, 4, 4), generator=g))
    optimizer = torch.optim.SGD(wrapper.trainable_parameters(), lr=0.1, momentum=0.9)
    return {"wrapper": wrapper, "dataset": dataset, "optimizer": optimizer, "F": F}


def test_guide_cache_trains_as_running_the_teacher_does():
    scope = run_block("wrapper.rst", "guide-cache", **_training_scope())
    assert len(scope["cache"]) == 2
    reference = _training_scope()  # the same loop, the teacher run each step
    wrapper, optimizer = reference["wrapper"], reference["optimizer"]
    loader = torch.utils.data.DataLoader(reference["dataset"], batch_size=4, shuffle=False)
    for _ in range(2):
        for images, labels in loader:
            out = wrapper(images, labels)
            loss = F.cross_entropy(out.output, labels) + out.loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    trained = scope["wrapper"].state_dict()
    assert trained.keys() == wrapper.state_dict().keys()
    for name, value in wrapper.state_dict().items():
        torch.testing.assert_close(trained[name], value, msg=name)
    assert not torch.equal(trained["student.backbone.0.weight"],
                           _training_scope()["wrapper"].student.backbone[0].weight)


def test_guide_replay_a_flip_or_a_crop_on_the_cache():
    """With a teacher that commutes with both, a replayed cache equals a fresh run; the
    cache as it is pulls each pixel toward its mirror image's teacher feature, and refuses
    a crop's grid (or, with resize=, stretches the whole image over it)."""
    teacher, student = _backbone_pair(teacher_stride=2, student_stride=2, pointwise_teacher=True)
    wrapper = _fitnet(teacher, student)
    images = torch.randn(2, 3, 48, 48)
    cached = wrapper.run_teacher(images)
    scope = run_block("wrapper.rst", "guide-replay", wrapper=wrapper, images=images,
                      cached=cached)
    flipped, crop = scope["flipped"], scope["crop"]
    assert scope["stride"] == 2 and scope["cropped"]["features"].shape[-2:] == (16, 16)

    fresh = wrapper(flipped).loss
    torch.testing.assert_close(wrapper(flipped, teacher_features=scope["mirrored"]).loss, fresh)
    stale = wrapper(flipped, teacher_features=cached).loss
    term = wrapper.terms["fitnet"]
    with torch.no_grad():
        student_map = student.backbone(flipped)
        mirror = wrapper.run_teacher(flipped)["features"].flip(-1)  # column W - 1 - j
        torch.testing.assert_close(stale, term.weight * term.loss(student_map, mirror))
    assert not torch.allclose(stale, fresh)

    torch.testing.assert_close(scope["out"].loss, wrapper(crop).loss)
    with pytest.raises(ValueError, match="term 'fitnet'"):
        wrapper(crop, teacher_features=cached)  # (24, 24) beside (16, 16)
    stretched = _fitnet(teacher, student, resize="student")
    assert not torch.allclose(stretched(crop, teacher_features=cached).loss, wrapper(crop).loss)


def test_guide_ema_and_the_student_alone_store_nothing():
    scope = _training_scope()
    wrapper = scope["wrapper"]
    loader = torch.utils.data.DataLoader(scope["dataset"], batch_size=4)
    scope = run_block("wrapper.rst", "guide-ema", loader=loader, **scope)
    ema = scope["ema"]
    assert scope["predictions"].shape == (4, 5, 4, 4)
    copies = [h for m in ema.modules() for h in m._forward_hooks.values()]
    assert copies and all(h.owner is not wrapper._student_hooks for h in copies)
    assert all(h.owner._calls == {} and h.owner._counts == {} for h in copies)
    assert wrapper._student_hooks._calls == {}
    wrapper.student(torch.randn(1, 3, 16, 16))  # the student on its own
    assert wrapper._student_hooks._calls == {} and wrapper._student_hooks._counts == {}
    averaged = dict(ema.module.named_parameters())
    assert any(not torch.equal(averaged[n], p) for n, p in wrapper.student.named_parameters())


def test_guide_saving_keeps_the_trained_parts_and_loads_strictly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def build_wrapper():
        return _fitnet(*_backbone_pair(), resize="teacher")

    wrapper = build_wrapper()
    with torch.no_grad():
        for p in wrapper.trainable_parameters():
            p.add_(1.0)  # "trained"
    scope = run_block("wrapper.rst", "guide-saving", torch=torch, wrapper=wrapper,
                      build_wrapper=build_wrapper)
    saved = torch.load("distillation.pt", weights_only=True)
    student_keys = {f"student.{k}" for k in wrapper.student.state_dict()}
    assert set(saved) == student_keys | {"terms.fitnet.loss.regressor.weight"}
    again = scope["again"]
    for name, value in wrapper.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name
    for p, q in zip(again.teacher.parameters(), build_wrapper().teacher.parameters()):
        assert torch.equal(p, q)  # the teacher it was built with

    # any discriminator is trained, so saved
    holistic = presets.holistic(*_backbone_pair(), num_classes=5)
    state = holistic.state_dict()
    discriminator = {id(p) for p in holistic.separately_optimized_parameters()}
    names = [n for n, p in holistic.named_parameters() if id(p) in discriminator]
    assert names and set(names) <= set(state)


def test_guide_save_frozen_stores_a_shared_transform_once():
    safetensors = pytest.importorskip("safetensors.torch")
    from segdistill import DistillationWrapper

    teacher, student = tiny_pair()
    paper = presets.knowledge_adaptation(
        teacher, student, teacher_layer="relu", student_layer=FeatureSpec("relu", channels=6),
        translator=Translator(12, latent_channels=6))
    full = DistillationWrapper(teacher, student, dict(paper.terms.items()),
                               {"features": "relu"}, {"features": "relu"}, save_frozen=True)
    state = full.state_dict()
    assert any(k.startswith("teacher.") for k in state)
    key = "teacher_transform.translator.encoder.0.0.weight"
    assert f"terms.adaptation.{key}" in state and f"terms.affinity.{key}" not in state
    loaded = safetensors.load(safetensors.save(state))  # no tensor stored twice
    again = DistillationWrapper(*tiny_pair(), dict(presets.knowledge_adaptation(
        *tiny_pair(), teacher_layer="relu", student_layer=FeatureSpec("relu", channels=6),
        translator=Translator(12, latent_channels=6)).terms.items()),
        {"features": "relu"}, {"features": "relu"}, save_frozen=True)
    again.load_state_dict(loaded)  # strict; the shared translator comes back under both names
    for name, value in full.terms.affinity.teacher_transform.state_dict().items():
        torch.testing.assert_close(again.terms.affinity.teacher_transform.state_dict()[name],
                                   value)
    torch.testing.assert_close(again.teacher.stem.weight, teacher.stem.weight)
    safetensors.save(paper.state_dict())  # the default state has no shared tensors


def _teacher_pixels(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0


def test_guide_pickle_needs_module_level_input_functions():
    teacher, student = _backbone_pair()
    with_lambda = _fitnet(teacher, student, resize="teacher", teacher_input=lambda x: x * 2.0)
    with pytest.raises((pickle.PicklingError, AttributeError)):
        pickle.dumps(with_lambda)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(copy.deepcopy(with_lambda)(x).loss, with_lambda(x).loss)
    named = _fitnet(teacher, student, resize="teacher", teacher_input=_teacher_pixels)
    torch.testing.assert_close(pickle.loads(pickle.dumps(named))(x).loss, named(x).loss)


def test_guide_ddp_student_error_is_the_one_shown(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch built without distributed")
    from torch.nn.parallel import DistributedDataParallel

    shown = " ".join(code_block("wrapper.rst", "guide-ddp-error").split())
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 1))
    student = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 1))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0,
                            world_size=1)
    try:
        wrapper = presets.fitnet(teacher, DistributedDataParallel(student),
                                 teacher_layer=FeatureSpec("1", channels=8),
                                 student_layer=FeatureSpec("1", channels=4))
        with pytest.raises(ValueError) as raised:
            wrapper(torch.randn(2, 3, 8, 8))
    finally:
        dist.destroy_process_group()
    assert shown == f"ValueError: {raised.value}"


def test_every_named_block_of_the_two_pages_runs_here():
    source = Path(__file__).read_text()
    for page in ("recipes.rst", "wrapper.rst"):
        names = re.findall(r"^\s+:name: (\S+)$", (GUIDE / page).read_text(), flags=re.MULTILINE)
        assert names, page
        for name in names:
            assert f'"{name}"' in source, f"{page}'s block {name!r} is run by no test"


def test_guide_reentrant_checkpointing_is_fine_for_a_layer_outside_the_block():
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, 2, 1), nn.ReLU())
            self.block = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU())
            self.head = nn.Conv2d(6, 5, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(checkpoint(self.block, self.stem(x), use_reentrant=True))

    teacher, _ = tiny_pair()
    torch.manual_seed(0)
    student = Checkpointed()
    reference = copy.deepcopy(student)
    spec = FeatureSpec("relu", channels=12)
    inside = presets.fitnet(teacher, student, teacher_layer=spec,
                            student_layer=FeatureSpec("block.1", channels=6))
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        inside(x)
    outside = presets.fitnet(teacher, student, teacher_layer=spec,
                             student_layer=FeatureSpec("stem", channels=6))
    outside(x).loss.backward()
    # the same gradient as the plain (unhooked) student's map gives
    with torch.no_grad():
        target = teacher.relu(teacher.body(teacher.act(teacher.stem(x))))
    term = outside.terms["fitnet"]
    (term.weight * term.loss(reference.stem(x), target)).backward()
    for p, q in zip(student.stem.parameters(), reference.stem.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0
        torch.testing.assert_close(p.grad, q.grad)
