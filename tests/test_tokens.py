"""ViT tokens as feature maps (segdistill.tokens), on either side of the wrapper, for
Hugging Face ViT and DINOv2 (with and without registers) and timm ViTs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import tiny_pair
from torch import nn

from segdistill import FeatureSpec, Translator, presets
from segdistill.tokens import TokenGrid, tokens_to_map


def _reference(tokens: torch.Tensor, prefix: int, h: int, w: int) -> torch.Tensor:
    """F[b, c, i, j] = X[b, P + i W + j, c], one element at a time."""
    b, _, c = tokens.shape
    out = torch.empty(b, c, h, w, dtype=tokens.dtype)
    for i in range(h):
        for j in range(w):
            out[:, :, i, j] = tokens[:, prefix + i * w + j, :]
    return out


@settings(deadline=None, max_examples=30)
@given(b=st.integers(1, 3), h=st.integers(1, 5), w=st.integers(1, 6), c=st.integers(1, 4),
       prefix=st.integers(0, 5), patch=st.integers(1, 16))
def test_tokens_to_map_equals_the_formula_values_and_gradients(b, h, w, c, prefix, patch):
    tokens = torch.randn(b, prefix + h * w, c, dtype=torch.float64, requires_grad=True)
    layout = TokenGrid(patch_size=patch, prefix_tokens=prefix)
    fmap = tokens_to_map(tokens, layout, image_size=(h * patch + patch - 1, w * patch))
    expected = _reference(tokens.detach(), prefix, h, w)
    torch.testing.assert_close(fmap, expected, rtol=0, atol=0)
    weights = torch.randn_like(fmap)
    (fmap * weights).sum().backward()
    grad = torch.zeros_like(tokens)
    grad[:, prefix:] = weights.flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens.grad, grad, rtol=0, atol=0)


def test_a_fixed_grid_and_a_square_grid_without_an_image_size():
    x = torch.randn(2, 1 + 12, 3)
    assert tokens_to_map(x, TokenGrid(grid=(3, 4))).shape == (2, 3, 3, 4)
    assert tokens_to_map(torch.randn(2, 1 + 16, 3), TokenGrid()).shape == (2, 3, 4, 4)


@pytest.mark.parametrize(("tokens", "layout", "size", "message"), [
    (torch.randn(2, 10, 3), TokenGrid(patch_size=8), (32, 32),
     r"expected 1 prefix tokens \+ 16 patch tokens \(a 4 x 4 grid: image 32 x 32, patch 8 x 8"
     r"\), got 10 tokens"),
    (torch.randn(2, 11, 3), TokenGrid(), None, r"square, as no image size is known"),
    (torch.randn(2, 3, 4, 4), TokenGrid(), None, r"tokens of shape \(B, tokens, C\)"),
])
def test_tokens_that_do_not_fit_are_refused(tokens, layout, size, message):
    with pytest.raises(ValueError, match=message):
        tokens_to_map(tokens, layout, size)


def test_layout_arguments_are_checked():
    with pytest.raises(ValueError, match="prefix_tokens to be an int >= 0"):
        TokenGrid(patch_size=8, prefix_tokens=-1)
    with pytest.raises(ValueError, match=r"patch_size as an int or a pair"):
        TokenGrid(patch_size=(8, 8, 8))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="floating tensor"):
        tokens_to_map(torch.zeros(1, 2, 3, dtype=torch.long), TokenGrid(grid=(1, 1)))
    with pytest.raises(TypeError, match="cannot read the token layout of Conv2d"):
        TokenGrid.of(nn.Conv2d(3, 3, 1))
    with pytest.raises(TypeError, match=r"FeatureSpec\.tokens to be a TokenGrid"):
        FeatureSpec("x", tokens=8)  # type: ignore[arg-type]


# ---- zoo ViTs ------------------------------------------------------------------------


def _hf(kind: str):
    transformers = pytest.importorskip("transformers")
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, patch_size=8, image_size=64)
    torch.manual_seed(0)
    if kind == "vit":
        return transformers.ViTModel(transformers.ViTConfig(**small), add_pooling_layer=False)
    if kind == "dinov2":
        return transformers.Dinov2Model(transformers.Dinov2Config(**small))
    registers = getattr(transformers, "Dinov2WithRegistersModel", None)
    if registers is None:
        pytest.skip("this transformers has no DINOv2 with registers")
    return registers(transformers.Dinov2WithRegistersConfig(num_register_tokens=4, **small))


def _timm():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=8,
                             depth=2, num_classes=0, dynamic_img_size=True)


@pytest.mark.parametrize(("kind", "prefix"), [("vit", 1), ("dinov2", 1), ("registers", 5)])
def test_the_layout_of_hugging_face_vits(kind, prefix):
    model = _hf(kind)
    assert TokenGrid.of(model) == TokenGrid(patch_size=8, prefix_tokens=prefix)


def test_the_layout_of_a_timm_vit():
    assert TokenGrid.of(_timm()) == TokenGrid(patch_size=8, prefix_tokens=1)


@pytest.mark.parametrize("kind", ["vit", "dinov2", "registers"])
def test_a_hugging_face_teacher_gives_its_last_hidden_state_on_the_grid(kind):
    teacher = _hf(kind)
    _, student = tiny_pair()
    x = torch.randn(2, 3, 64, 48)  # a non-square grid: 8 x 6 patches
    spec = FeatureSpec("layernorm", tokens=TokenGrid.of(teacher))
    # Hugging Face's ViT wants interpolate_pos_encoding= at another size than its config's:
    # a keyword batch, made by teacher_input (DINOv2 interpolates by itself)
    keywords = {"interpolate_pos_encoding": True} if kind == "vit" else {}
    wrapper = presets.fitnet(teacher, student, teacher_layer=spec, student_layer="relu",
                             example_input=x[:1], resize="teacher",
                             teacher_input=lambda b: {"pixel_values": b, **keywords})
    features = wrapper.run_teacher(x)["features"]
    with torch.no_grad():
        hidden = teacher(pixel_values=x, **keywords).last_hidden_state
    expected = tokens_to_map(hidden, TokenGrid.of(teacher), (64, 48))
    assert features.shape == (2, 32, 8, 6)
    torch.testing.assert_close(features, expected, rtol=0, atol=0)
    wrapper(x).loss.backward()
    assert student.down.weight.grad.abs().sum() > 0


def _cwd(teacher, student, t, s, x):
    return presets.cwd(teacher, student, teacher_layer=t, student_layer=s, example_input=x,
                       logits=False, resize="teacher")


def _paper(teacher, student, t, s, x):
    channels = 32 if isinstance(t, FeatureSpec) else 12
    return presets.knowledge_adaptation(teacher, student, teacher_layer=t, student_layer=s,
                                        translator=Translator(channels, latent_channels=6),
                                        example_input=x, resize="teacher")


BUILDERS = {
    "fitnet": lambda t_, s_, t, s, x: presets.fitnet(t_, s_, teacher_layer=t, student_layer=s,
                                                     example_input=x, resize="teacher"),
    "attention_transfer": lambda t_, s_, t, s, x: presets.attention_transfer(
        t_, s_, teacher_layer=t, student_layer=s, resize="teacher"),
    "pairwise": lambda t_, s_, t, s, x: presets.pairwise(t_, s_, teacher_layer=t,
                                                         student_layer=s, resize="teacher"),
    "cwd_features": _cwd,
    "knowledge_adaptation": _paper,
}


@pytest.mark.parametrize("method", sorted(BUILDERS))
def test_every_feature_method_distils_a_dinov2_teacher_into_a_cnn(method):
    teacher = _hf("registers") if method == "pairwise" else _hf("dinov2")
    _, student = tiny_pair()
    x = torch.randn(2, 3, 64, 48)
    spec = FeatureSpec("encoder.layer.1", tokens=TokenGrid.of(teacher))
    wrapper = BUILDERS[method](teacher, student, spec, "relu", x[:1])
    out = wrapper(x)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert student.down.weight.grad.abs().sum() > 0


def test_a_timm_vit_student_learns_from_a_cnn_teacher():
    teacher, _ = tiny_pair()
    student = _timm()
    x = torch.randn(2, 3, 64, 48)
    wrapper = presets.fitnet(teacher, student,
                             teacher_layer="relu",
                             student_layer=FeatureSpec("blocks.1", tokens=TokenGrid.of(student)),
                             example_input=x[:1], resize="teacher")
    wrapper(x).loss.backward()
    assert student.patch_embed.proj.weight.grad.abs().sum() > 0


def test_a_teacher_transform_may_turn_tokens_into_a_map():
    """The 4-D check comes after the teacher's transform."""
    from segdistill import DistillationTerm, DistillationWrapper
    from segdistill.losses import FitNetLoss

    class ToMap(nn.Module):
        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return tokens_to_map(tokens, TokenGrid(grid=(8, 6)))

    teacher = _hf("dinov2")
    _, student = tiny_pair()
    term = DistillationTerm(FitNetLoss(6, 32, resize="teacher"), student="s", teacher="t",
                            teacher_transform=ToMap())
    wrapper = DistillationWrapper(teacher, student, {"fitnet": term}, {"t": "layernorm"},
                                  {"s": "relu"})
    wrapper(torch.randn(2, 3, 64, 48)).loss.backward()
    bare = DistillationWrapper(teacher, student, {"fitnet": DistillationTerm(
        FitNetLoss(6, 32), student="s", teacher="t")}, {"t": "layernorm"}, {"s": "relu"})
    with pytest.raises(ValueError, match=r"expected the teacher's layer 'layernorm' to be a 4-D "
                                         r"\(B, C, H, W\) tensor, got shape \(2, 49, 32\)"):
        bare(torch.randn(2, 3, 64, 48))


def test_stage_one_trains_a_translator_on_a_vit_teachers_tokens():
    from segdistill import TranslatorTrainingConfig, train_translator

    teacher = _hf("dinov2")
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(2, 3, 64, 48, generator=g), torch.zeros(2, 64, 48, dtype=torch.long))
              for _ in range(2)]
    spec = FeatureSpec("layernorm", tokens=TokenGrid.of(teacher))
    result = train_translator(teacher, loader, spec, config=TranslatorTrainingConfig(epochs=1))
    assert result.translator.in_channels == 32
    _, student = tiny_pair()
    wrapper = presets.knowledge_adaptation(teacher, student, teacher_layer=spec,
                                           student_layer="relu", translator=result.translator,
                                           example_input=loader[0][0], resize="teacher")
    wrapper(loader[0][0]).loss.backward()
    assert student.down.weight.grad.abs().sum() > 0
