"""DistillationWrapper: presets, freezing, trainable parameters, grids, export, errors."""

from __future__ import annotations

import pytest
import torch
from models import deeplabv3_teacher, mobilenet_v2_os16, snapshot, tiny_pair
from torch import nn

from segdistill import (
    AffinityLoss,
    DistillationTerm,
    DistillationWrapper,
    FeatureSpec,
    Translator,
    affinity_loss,
    attention_transfer_loss,
    cwd_loss,
    fitnet_loss,
    kd_loss,
    pairwise_loss,
    presets,
)


def _paper_wrapper(latent=6):
    torch.manual_seed(0)
    teacher, student = tiny_pair()
    translator = Translator(12, latent_channels=latent)
    wrapper = presets.knowledge_adaptation(
        teacher, student, teacher_layer="relu", student_layer=FeatureSpec("relu", channels=6),
        translator=translator,
    )
    return wrapper, teacher, student, translator


def test_paper_preset_terms_and_values():
    wrapper, teacher, student, translator = _paper_wrapper()
    x = torch.randn(2, 3, 16, 16)
    out = wrapper(x)
    assert set(out.losses) == {"adaptation", "affinity"}
    torch.testing.assert_close(out.loss, out.losses["adaptation"] + out.losses["affinity"])
    # recompute by hand: E(phi_t) against C_f(phi_s) and C_a(phi_s)
    with torch.no_grad():
        phi_t = teacher.relu(teacher.body(teacher.act(teacher.stem(x))))
        target = translator.encode(phi_t)
    phi_s = student.relu(student.down(student.act(student.stem(x))))
    c_a = wrapper.terms["affinity"].student_adapter
    torch.testing.assert_close(out.losses["affinity"], affinity_loss(c_a(phi_s), target))
    assert wrapper.terms["adaptation"].weight == 50.0
    assert wrapper.terms["affinity"].weight == 1.0
    torch.testing.assert_close(out.output, student(x))


def test_optimiser_gets_student_and_adapters_only():
    wrapper, teacher, student, translator = _paper_wrapper()
    params = {id(p) for p in wrapper.trainable_parameters()}
    expected = {id(p) for p in student.parameters()}
    for name in ("adaptation", "affinity"):
        expected |= {id(p) for p in wrapper.terms[name].student_adapter.parameters()}
    assert params == expected
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not any(p.requires_grad for p in translator.parameters())


def test_teacher_and_translator_stay_frozen_through_training():
    wrapper, teacher, student, translator = _paper_wrapper()
    wrapper.train()
    assert not teacher.training and not translator.encoder.training
    assert wrapper.terms["affinity"].student_adapter.training and student.training
    before_t, before_tr = snapshot(teacher), snapshot(translator)
    before_s = snapshot(student)
    before_a = snapshot(wrapper.terms["affinity"].student_adapter)
    opt = torch.optim.SGD(wrapper.trainable_parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        out = wrapper(torch.randn(2, 3, 16, 16))
        loss = out.loss + nn.functional.cross_entropy(
            out.output, torch.randint(0, 5, (2, 4, 4)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        wrapper.train()
    for name, value in snapshot(teacher).items():
        assert torch.equal(value, before_t[name]), name
    for name, value in snapshot(translator).items():  # BN running stats included
        assert torch.equal(value, before_tr[name]), name
    assert any(not torch.equal(v, before_s[k]) for k, v in snapshot(student).items())
    adapter = wrapper.terms["affinity"].student_adapter
    assert any(not torch.equal(v, before_a[k]) for k, v in snapshot(adapter).items())


def test_captured_features_are_released_after_each_step():
    wrapper, *_ = _paper_wrapper()
    wrapper(torch.randn(2, 3, 16, 16))
    assert wrapper._teacher_hooks._calls == {} and wrapper._student_hooks._calls == {}


def test_export_student_has_the_students_parameters_and_flops():
    from torch.utils.flop_counter import FlopCounterMode

    wrapper, _, student, _ = _paper_wrapper()
    exported = wrapper.export_student().eval()
    student.eval()
    assert sum(p.numel() for p in exported.parameters()) == sum(
        p.numel() for p in student.parameters())
    assert all(not m._forward_hooks for m in exported.modules())
    x = torch.randn(1, 3, 16, 16)

    def flops(model):
        with FlopCounterMode(display=False) as counter:
            model(x)
        return counter.get_total_flops()

    assert flops(exported) == flops(student) > 0
    torch.testing.assert_close(exported(x), student(x))
    wrapper(x)  # the wrapper still works after exporting


def test_grids_differing_by_stride_rounding_are_aligned():
    teacher, student = tiny_pair()
    term = DistillationTerm(AffinityLoss(), student="s", teacher="t")
    wrapper = DistillationWrapper(teacher, student, {"aff": term},
                                  {"t": "body"}, {"s": "relu"})
    with pytest.raises(ValueError, match=r"term 'aff': expected student and teacher features on "
                                         r"the same H x W, got \(4, 4\) and \(8, 8\); pass "
                                         r"resize='student' or resize='teacher'.*about 2x"):
        wrapper(torch.randn(2, 3, 16, 16))
    teacher.body = nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=0))  # 8 -> 3 at 16 px
    wrapper = DistillationWrapper(teacher, student, {"aff": term}, {"t": "body"}, {"s": "relu"})
    x = torch.randn(2, 3, 16, 16)
    out = wrapper(x)  # 3 x 3 against 4 x 4: rounding, the teacher's map aligned onto 4 x 4
    phi_t = teacher.body(teacher.act(teacher.stem(x))).detach()
    phi_s = student.relu(student.down(student.act(student.stem(x))))
    expected = affinity_loss(phi_s, nn.functional.interpolate(
        phi_t, size=(4, 4), mode="bilinear", align_corners=True))
    torch.testing.assert_close(out.losses["aff"], expected)


def test_real_mismatch_resizes_only_when_asked():
    teacher, student = tiny_pair()
    term = DistillationTerm(AffinityLoss(resize="student"), student="s", teacher="t")
    wrapper = DistillationWrapper(teacher, student, {"aff": term}, {"t": "body"}, {"s": "relu"})
    assert torch.isfinite(wrapper(torch.randn(2, 3, 16, 16)).loss)


def test_under_autocast():
    wrapper, *_ = _paper_wrapper()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = wrapper(torch.randn(2, 3, 16, 16))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.losses.values())
    out.loss.backward()


@pytest.mark.slow
def test_compiled_student_trains_two_steps_like_the_eager_one_and_exports_plain():
    def run(compile_student):
        wrapper, teacher, student, _ = _paper_wrapper()
        if compile_student:
            wrapper = DistillationWrapper(teacher, torch.compile(student), dict(wrapper.terms),
                                          {"features": "relu"}, {"features": "relu"})
        optimizer = torch.optim.SGD(wrapper.trainable_parameters(), lr=0.1)
        g = torch.Generator().manual_seed(0)
        history = []
        for _ in range(2):
            out = wrapper(torch.randn(2, 3, 16, 16, generator=g))
            loss = out.loss + nn.functional.cross_entropy(
                out.output, torch.randint(0, 5, (2, 4, 4), generator=g))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append(loss.detach())
        return history, wrapper.export_student(), student

    eager, _, _ = run(False)
    compiled, exported, student = run(True)
    torch.testing.assert_close(torch.stack(compiled), torch.stack(eager), rtol=1e-4, atol=1e-5)
    assert type(exported) is nn.Sequential
    assert list(exported.state_dict()) == list(student.state_dict())  # no '_orig_mod.'
    for key, value in student.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[key], value)


@pytest.mark.slow
def test_torchvision_deeplabv3_teacher_and_mobilenet_v2_student():
    torch.manual_seed(0)
    teacher = deeplabv3_teacher()
    student = mobilenet_v2_os16()
    translator = Translator(2048, latent_channels=32)
    wrapper = presets.knowledge_adaptation(
        teacher, student, teacher_layer="backbone.layer4",
        student_layer=FeatureSpec("backbone", channels=96), translator=translator,
    )
    x = torch.randn(2, 3, 65, 65)  # OS 8: 9 x 9, encoded 5 x 5; OS 16: 5 x 5
    out = wrapper(x)
    assert out.output.shape == (2, 21, 5, 5)
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.backbone[0][0].weight.grad is not None


def test_plain_sequential_pair_with_custom_terms():
    teacher, student = tiny_pair()
    terms = {
        "aff": DistillationTerm(AffinityLoss(distance="squared", resize="teacher"),
                                student="s", teacher="t", weight=2.0),
    }
    wrapper = DistillationWrapper(teacher, student, terms, {"t": "relu"}, {"s": "relu"})
    out = wrapper(torch.randn(2, 3, 8, 8))
    assert out.losses["aff"].ndim == 0 and out.losses["aff"] > 0


def test_kd_preset_with_torchvision_dict_outputs_and_an_ignore_mask():
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    torch.manual_seed(0)
    teacher = deeplabv3_teacher(num_classes=4)
    student = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4)
    wrapper = presets.kd(teacher, student, temperature=2.0)
    x = torch.randn(2, 3, 32, 32)
    target = torch.randint(0, 4, (2, 32, 32))
    target[:, :16] = 255
    out = wrapper(x, target=target)
    with torch.no_grad():
        t_logits = teacher(x)["out"]
    expected = kd_loss(out.output["out"], t_logits, target, temperature=2.0)
    torch.testing.assert_close(out.losses["kd"], expected)
    assert not torch.allclose(expected, kd_loss(out.output["out"], t_logits, temperature=2.0))


def test_fitnet_preset_trains_its_regressor():
    teacher, student = tiny_pair()
    wrapper = presets.fitnet(teacher, student, teacher_layer=FeatureSpec("relu", channels=12),
                             student_layer=FeatureSpec("relu", channels=6), resize="teacher")
    regressor = wrapper.terms["fitnet"].loss.regressor
    assert {id(p) for p in regressor.parameters()} <= {
        id(p) for p in wrapper.trainable_parameters()}
    x = torch.randn(2, 3, 16, 16)
    out = wrapper(x)
    phi_t = teacher.relu(teacher.body(teacher.act(teacher.stem(x))))
    phi_s = student.relu(student.down(student.act(student.stem(x))))
    torch.testing.assert_close(out.losses["fitnet"],
                               fitnet_loss(regressor(phi_s), phi_t.detach()))


@pytest.mark.parametrize("preset,kwargs,fn", [
    ("attention_transfer", {"teacher_layer": "relu", "student_layer": "relu",
                            "resize": "teacher"},
     lambda s, t: 1000 * attention_transfer_loss(
         nn.functional.interpolate(s, size=t.shape[-2:], mode="bilinear"), t)),
    ("pairwise", {"teacher_layer": "relu", "student_layer": "relu", "resize": "student"},
     lambda s, t: pairwise_loss(s, nn.functional.interpolate(t, size=s.shape[-2:],
                                                             mode="bilinear"))),
])
def test_feature_presets(preset, kwargs, fn):
    teacher, student = tiny_pair()
    wrapper = presets.get_preset(preset)(teacher, student, **kwargs)
    x = torch.randn(2, 3, 16, 16)
    out = wrapper(x)
    phi_t = teacher.relu(teacher.body(teacher.act(teacher.stem(x)))).detach()
    phi_s = student.relu(student.down(student.act(student.stem(x))))
    (name,) = out.losses
    torch.testing.assert_close(out.losses[name], fn(phi_s, phi_t))


def test_cwd_preset_on_logits():
    teacher, student = tiny_pair()
    wrapper = presets.cwd(teacher, student, resize="teacher")
    x = torch.randn(2, 3, 16, 16)
    out = wrapper(x)
    t_logits = teacher(x).detach()
    s_up = nn.functional.interpolate(out.output, size=t_logits.shape[-2:], mode="bilinear")
    torch.testing.assert_close(out.losses["cwd"], 3.0 * cwd_loss(s_up, t_logits))


def test_zero_weight_leaves_a_term_out():
    teacher, student = tiny_pair()
    wrapper = presets.knowledge_adaptation(
        teacher, student, teacher_layer="relu", student_layer=FeatureSpec("relu", channels=6),
        translator=Translator(12), adaptation_weight=0.0)
    assert list(wrapper.terms) == ["affinity"]
    with pytest.raises(ValueError, match=r"both 0: nothing to distil"):
        presets.knowledge_adaptation(
            teacher, student, teacher_layer="relu", student_layer=FeatureSpec("relu", channels=6),
            translator=Translator(12), adaptation_weight=0.0, affinity_weight=0.0)


# ---- errors ----------------------------------------------------------------------------

def _term(**kwargs):
    return DistillationTerm(AffinityLoss(), **{"student": "s", "teacher": "t", **kwargs})


@pytest.mark.parametrize("make,error,match", [
    (lambda t, s: DistillationWrapper("teacher", s, {"a": _term()}), TypeError,
     r"expected the teacher to be an nn.Module, got str"),
    (lambda t, s: DistillationWrapper(t, 3, {"a": _term()}), TypeError,
     r"expected the student to be an nn.Module, got int"),
    (lambda t, s: DistillationWrapper(t, t, {"a": _term()}), ValueError,
     r"the teacher and the student are the same module"),
    (lambda t, s: DistillationWrapper(t, s, {}), ValueError, r"expected at least one term"),
    (lambda t, s: DistillationWrapper(t, s, {"a": AffinityLoss()}), TypeError,
     r"expected term 'a' to be a DistillationTerm, got AffinityLoss"),
    (lambda t, s: DistillationWrapper(t, s, {"a": _term()}, {"t": "relu"}, {"x": "relu"}),
     ValueError, r"term 'a' uses the student feature 's', but the student layers capture "
                 r"only \['x'\]"),
    (lambda t, s: DistillationWrapper(t, s, {"a": _term()}, {"t": "rel"}, {"s": "relu"}),
     ValueError, r"Sequential has no submodule 'rel'; closest valid paths: 'relu'"),
    (lambda t, s: DistillationTerm(AffinityLoss(), student=1, teacher="t"), TypeError,
     r"expected student to be a feature name \(str\), got int"),
    (lambda t, s: _term(weight=-1.0), ValueError, r"weight must be at least 0.0, got -1.0"),
    (lambda t, s: _term(student_adapter="conv"), TypeError,
     r"expected student_adapter to be an nn.Module, got str"),
    (lambda t, s: presets.knowledge_adaptation(
        t, s, teacher_layer="relu", student_layer=FeatureSpec("relu", channels=6),
        translator=nn.Conv2d(1, 1, 1)), TypeError,
     r"expected translator to be a segdistill.Translator"),
])
def test_construction_errors(make, error, match):
    teacher, student = tiny_pair()
    with pytest.raises(error, match=match):
        make(teacher, student)


def test_feature_that_is_not_4d():
    teacher, student = tiny_pair()
    teacher.head = nn.Sequential(teacher.head, nn.Flatten())
    wrapper = DistillationWrapper(teacher, student, {"a": _term()}, {"t": "head.1"},
                                  {"s": "relu"})
    with pytest.raises(ValueError, match=r"expected the teacher's layer 'head.1' to be a 4-D "
                                         r"\(B, C, H, W\) tensor, got shape \(2, 80\)"):
        wrapper(torch.randn(2, 3, 8, 8))
    assert wrapper._teacher_hooks._calls == {}  # released even though the step raised


def test_batch_mismatch():
    teacher, student = tiny_pair()

    class FirstOnly(nn.Module):
        def forward(self, x):
            return x[:1]

    teacher.relu = nn.Sequential(nn.ReLU(), FirstOnly())
    wrapper = DistillationWrapper(teacher, student, {"a": _term()}, {"t": "relu"},
                                  {"s": "relu"})
    with pytest.raises(ValueError, match=r"term 'a': the student's batch has 2 images but "
                                         r"the teacher's 1"):
        wrapper(torch.randn(2, 3, 8, 8))


def test_translator_channels_do_not_match_the_teacher_layer():
    teacher, student = tiny_pair()
    wrapper = presets.knowledge_adaptation(
        teacher, student, teacher_layer="relu", student_layer=FeatureSpec("relu", channels=6),
        translator=Translator(32))
    with pytest.raises(ValueError, match=r"the teacher's layer 'relu' has 12 channels but its "
                                         r"FeatureSpec says channels=32 .*or a layer with 32 "
                                         r"channels"):
        wrapper(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"the translator takes 32 channels but the teacher's "
                                         r"layer 'relu' has 12: pass the teacher_layer the "
                                         r"translator was trained on"):
        presets.knowledge_adaptation(
            teacher, student, teacher_layer="relu", student_layer="relu",
            translator=Translator(32), example_input=torch.randn(1, 3, 8, 8))


def test_student_channels_do_not_match_the_adapter():
    teacher, student = tiny_pair()
    wrapper = presets.knowledge_adaptation(
        teacher, student, teacher_layer="relu", student_layer=FeatureSpec("relu", channels=7),
        translator=Translator(12))
    with pytest.raises(ValueError, match=r"the student's layer 'relu' has 6 channels but its "
                                         r"FeatureSpec says channels=7 .*pass "
                                         r"FeatureSpec\('relu', channels=6\)"):
        wrapper(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"the student's layer 'relu' has 6 channels on "
                                         r"example_input, but its FeatureSpec says channels=7; "
                                         r"pass channels=6"):
        presets.knowledge_adaptation(
            teacher, student, teacher_layer="relu", student_layer=FeatureSpec("relu", channels=7),
            translator=Translator(12), example_input=torch.randn(1, 3, 8, 8))


def test_fitnet_student_channels_mismatch_names_the_term_and_argument():
    teacher, student = tiny_pair()
    wrapper = presets.fitnet(teacher, student, teacher_layer=FeatureSpec("relu", channels=12),
                             student_layer=FeatureSpec("relu", channels=5), resize="teacher")
    with pytest.raises(ValueError, match=r"the student's layer 'relu' has 6 channels but its "
                                         r"FeatureSpec says channels=5 .*pass "
                                         r"FeatureSpec\('relu', channels=6\)"):
        wrapper(torch.randn(2, 3, 8, 8))


# ---- channel counts from example_input ---------------------------------------------------

@pytest.mark.parametrize("preset,kwargs,missing", [
    ("knowledge_adaptation", {"translator": Translator(12)},
     r"knowledge_adaptation needs the channels of student_layer 'relu'"),
    ("fitnet", {}, r"fitnet needs the channels of student_layer 'relu' and teacher_layer 'relu'"),
    ("fitnet", {"student_layer": FeatureSpec("relu", channels=6)},
     r"fitnet needs the channels of teacher_layer 'relu'"),
])
def test_missing_channels_without_example_input(preset, kwargs, missing):
    teacher, student = tiny_pair()
    kwargs = {"teacher_layer": "relu", "student_layer": "relu", **kwargs}
    with pytest.raises(ValueError, match=missing + r": pass FeatureSpec\(layer, channels=C\), "
                                         r"or example_input= \(one batch\)"):
        presets.get_preset(preset)(teacher, student, **kwargs)


def test_channels_read_from_example_input_before_the_optimiser_is_built():
    teacher, student = tiny_pair()
    teacher.train()
    student.train()
    wrapper = presets.fitnet(teacher, student, teacher_layer="relu",
                                         student_layer="relu", resize="teacher",
                                         example_input=torch.randn(1, 3, 8, 8))
    regressor = wrapper.terms["fitnet"].loss.regressor
    assert regressor.weight.shape[:2] == (12, 6)
    assert {id(p) for p in regressor.parameters()} <= {
        id(p) for p in wrapper.trainable_parameters()}
    assert student.training  # the probe ran in eval mode and restored the flags
    paper = presets.knowledge_adaptation(
        *tiny_pair(), teacher_layer="relu", student_layer="relu", translator=Translator(12),
        example_input=torch.randn(1, 3, 8, 8))
    assert paper.terms["affinity"].student_adapter.in_channels == 6


# ---- outputs ------------------------------------------------------------------------------

class _Logits:
    def __init__(self, logits):
        self.logits = logits


def _logit_models():
    teacher, student = tiny_pair()
    t_model = nn.Sequential(teacher, _ToDict())
    s_model = nn.Sequential(student, _ToObject())
    return t_model, s_model


class _ToDict(nn.Module):
    def forward(self, x):
        return {"out": x, "aux": x.detach()}


class _ToObject(nn.Module):
    def forward(self, x):
        return _Logits(x)


def test_outputs_are_selected_per_side():
    t_model, s_model = _logit_models()
    x = torch.randn(2, 3, 16, 16)
    automatic = presets.cwd(t_model, s_model, resize="teacher")
    explicit = presets.cwd(t_model, s_model, resize="teacher", teacher_output="out",
                                       student_output=lambda out: out.logits)
    expected = 3.0 * cwd_loss(
        nn.functional.interpolate(s_model(x).logits, size=(8, 8), mode="bilinear"),
        t_model(x)["out"])
    torch.testing.assert_close(automatic(x).losses["cwd"], expected)
    torch.testing.assert_close(explicit(x).losses["cwd"], expected)
    by_index = presets.kd(nn.Sequential(t_model[0], _ToTuple()), s_model,
                                      teacher_output=1, resize="teacher")
    assert torch.isfinite(by_index(x).loss)


class _ToTuple(nn.Module):
    def forward(self, x):
        return (x.detach(), x)


@pytest.mark.parametrize("teacher_output,error,match", [
    (None, ValueError, r"cannot find the logits in the teacher's output: it holds tuple of 2 "
                       r"\(\[0\] Tensor\(2, 5, 8, 8\), \[1\] Tensor\(2, 5, 8, 8\)\), "
                       r"with no 'out' or 'logits'; pass the key, the index or a callable"),
    (2, ValueError, r"the teacher's output has no element 2; it holds tuple of 2"),
    ("out", ValueError, r"the teacher's output has no element 'out'; it holds tuple of 2"),
    (lambda out: out, TypeError, r"the output selector's result for the teacher's output holds "
                                 r"tuple of 2 \(.*\), not a tensor"),
])
def test_output_selection_errors(teacher_output, error, match):
    t_model = nn.Sequential(tiny_pair()[0], _ToTuple())
    wrapper = presets.kd(t_model, _logit_models()[1], teacher_output=teacher_output,
                                     resize="teacher")
    with pytest.raises(error, match=match):
        wrapper(torch.randn(2, 3, 16, 16))


def test_output_selector_type_is_checked_at_construction():
    with pytest.raises(TypeError, match=r"expected student_output to be None, a key \(str\), an "
                                        r"index \(int\) or a callable returning the logits, got "
                                        r"float"):
        presets.kd(*tiny_pair(), student_output=1.5)


def test_feature_presets_ignore_outputs_they_do_not_use():
    t_model = nn.Sequential(tiny_pair()[0], _ToTuple())  # no logits found automatically
    wrapper = presets.attention_transfer(
        t_model, tiny_pair()[1], teacher_layer="0.relu", student_layer="relu", resize="teacher")
    assert torch.isfinite(wrapper(torch.randn(2, 3, 16, 16)).loss)


# ---- labels -------------------------------------------------------------------------------

@pytest.mark.parametrize("labels,error,match", [
    (torch.zeros(2, 8, 8), TypeError,
     r"term 'kd': expected target to hold integer labels, got torch.float32"),
    (torch.zeros(2, 1, 8, 8, dtype=torch.long), ValueError,
     r"term 'kd': expected target of shape \(B, H, W\), got a 4-D tensor of shape "
     r"\(2, 1, 8, 8\)"),
    (torch.zeros(3, 8, 8, dtype=torch.long), ValueError,
     r"term 'kd': expected logits and target with the same batch size, got 2 and 3"),
    (torch.full((2, 8, 8), 5), ValueError,
     r"term 'kd': labels must be in \[0, 5\) or ignore_index=255, got values from 5 to 5"),
    (torch.full((2, 8, 8), -1), ValueError, r"labels must be in \[0, 5\) or ignore_index=255, "
                                            r"got values from -1 to -1"),
])
def test_kd_labels_are_checked(labels, error, match):
    wrapper = presets.kd(*tiny_pair(), resize="teacher")
    with pytest.raises(error, match=match):
        wrapper(torch.randn(2, 3, 16, 16), target=labels)


@pytest.mark.parametrize("labels,ignore_index", [
    (torch.full((2, 16, 16), 7), 255),   # 7 for 5 classes
    (torch.full((2, 16, 16), -1), 255),  # -1 without ignore_index=-1
    (torch.full((2, 16, 16), 255), None),
])
def test_one_label_rule_standalone_and_through_the_wrapper(labels, ignore_index):
    """The same labels give the same answer by kd_loss and by the kd preset: an error."""
    teacher, student = tiny_pair()
    wrapper = presets.kd(teacher, student, resize="teacher", ignore_index=ignore_index)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        s, t = student(x), teacher(x)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\)") as standalone:
        kd_loss(s, t, labels, ignore_index=ignore_index)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\)") as wrapped:
        wrapper(x, target=labels)
    assert str(wrapped.value) == f"term 'kd': {standalone.value}"


def test_labels_on_another_grid_are_resized_alike_standalone_and_in_the_wrapper():
    teacher, student = tiny_pair()
    wrapper = presets.kd(teacher, student, resize="teacher", temperature=2.0)
    x = torch.randn(2, 3, 16, 16)
    labels = torch.randint(0, 5, (2, 16, 16))  # the input's grid; the logits are 8 x 8
    labels[:, :8] = 255
    with torch.no_grad():
        s, t = student(x), teacher(x)
    expected = kd_loss(s, t, labels, temperature=2.0)
    torch.testing.assert_close(wrapper(x, target=labels).losses["kd"], expected)
    assert not torch.allclose(expected, kd_loss(s, t, temperature=2.0))  # the mask acted


def test_validate_args_off_skips_the_range_check_only():
    teacher, student = tiny_pair()
    wrapper = presets.kd(teacher, student, resize="teacher", validate_args=False)
    labels = torch.full((2, 8, 8), 7)
    assert torch.isfinite(wrapper(torch.randn(2, 3, 16, 16), target=labels).loss)
    with pytest.raises(TypeError, match=r"term 'kd': expected target to hold integer labels"):
        wrapper(torch.randn(2, 3, 16, 16), target=labels.float())


def test_kd_labels_at_ignore_index_or_in_range_pass():
    wrapper = presets.kd(*tiny_pair(), resize="teacher", ignore_index=None)
    labels = torch.randint(0, 5, (2, 8, 8))
    assert torch.isfinite(wrapper(torch.randn(2, 3, 16, 16), target=labels).loss)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\), got values from 0 to 255"):
        wrapper(torch.randn(2, 3, 16, 16), target=torch.where(labels > 2, 255, labels))


# ---- selectors on layer paths ---------------------------------------------------------------

class _Pyramid(nn.Module):
    """A backbone that returns a list and a dict, like smp encoders and torchvision's getter."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.down = nn.Conv2d(6, 6, 3, stride=2, padding=1)

    def forward(self, x):
        a = self.stem(x)
        return [x, a, self.down(a)]


class _PyramidNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = _Pyramid()
        self.head = nn.Conv2d(6, 5, 1)

    def forward(self, x):
        return {"out": self.head(self.encoder(x)[-1])}


def test_layer_selectors_pick_the_named_element():
    teacher, _ = tiny_pair()
    student = _PyramidNet()
    wrapper = presets.attention_transfer(teacher, student, teacher_layer="relu",
                                                     student_layer="encoder[1]")
    x = torch.randn(2, 3, 16, 16)
    phi_t = teacher.relu(teacher.body(teacher.act(teacher.stem(x)))).detach()
    expected = 1000 * attention_transfer_loss(student.encoder.stem(x), phi_t)
    torch.testing.assert_close(wrapper(x).losses["attention"], expected)


def test_structured_layer_without_selector_raises_with_what_it_holds():
    wrapper = presets.attention_transfer(tiny_pair()[0], _PyramidNet(),
                                                     teacher_layer="relu",
                                                     student_layer="encoder")
    with pytest.raises(ValueError, match=r"the student's layer 'encoder' returns list of 3 "
                                         r"\(\[0\] Tensor\(2, 3, 16, 16\), \[1\] Tensor\(2, "
                                         r"6, 8, 8\), \[2\] Tensor\(2, 6, 4, 4\)\), not a "
                                         r"tensor; select one in the layer path with Python "
                                         r"indexing .*e.g. 'encoder\[0\]' \(the first\) or "
                                         r"'encoder\[-1\]' \(the last\)"):
        wrapper(torch.randn(2, 3, 16, 16))
    assert wrapper._student_hooks._calls == {}


def test_wrong_selector_raises_at_the_first_step_with_the_written_path():
    wrapper = presets.attention_transfer(tiny_pair()[0], _PyramidNet(),
                                                     teacher_layer="relu",
                                                     student_layer="encoder[3]")
    with pytest.raises(ValueError, match=r"the student's layer 'encoder\[3\]' has no element 3; "
                                         r"it holds list of 3"):
        wrapper(torch.randn(2, 3, 16, 16))


@pytest.mark.parametrize("layer,match", [
    ("encoder[x]", r"layer path 'encoder\[x\]' has an invalid selector '\[x\]'; use Python "
                   r"indexing with an int or a quoted key"),
    ("encoder[-1", r"invalid selector '\[-1'"),
    ("encodr[-1]", r"_PyramidNet has no submodule 'encodr' \(in layer path 'encodr\[-1\]'\); "
                   r"closest valid paths: 'encoder'"),
])
def test_bad_layer_paths_fail_at_construction(layer, match):
    with pytest.raises(ValueError, match=match):
        presets.attention_transfer(tiny_pair()[0], _PyramidNet(),
                                               teacher_layer="relu", student_layer=layer)


# ---- compiled and wrapped students ----------------------------------------------------------

def test_export_student_unwraps_a_compiled_student():
    teacher, student = tiny_pair()
    wrapper = presets.attention_transfer(
        teacher, torch.compile(student), teacher_layer="relu", student_layer="relu",
        resize="teacher")
    exported = wrapper.export_student()
    assert type(exported) is nn.Sequential and exported is not student
    assert set(exported.state_dict()) == set(student.state_dict())
    assert not any(k.startswith("_orig_mod") for k in exported.state_dict())


def test_presets_are_reachable_from_the_class_and_the_module():
    from segdistill import presets

    teacher, student = tiny_pair()
    a = presets.kd(teacher, student, temperature=2.0)
    b = presets.kd(*tiny_pair(), temperature=2.0)
    assert type(a) is type(b) is DistillationWrapper
    assert repr(a.terms) == repr(b.terms)
