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
    Translator,
    affinity_loss,
    attention_transfer_loss,
    cwd_loss,
    fitnet_loss,
    kd_loss,
    pairwise_loss,
)


def _paper_wrapper(latent=6):
    torch.manual_seed(0)
    teacher, student = tiny_pair()
    translator = Translator(12, latent_channels=latent)
    wrapper = DistillationWrapper.knowledge_adaptation(
        teacher, student, teacher_layer="relu", student_layer="relu", translator=translator,
        student_channels=6,
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
    assert wrapper._teacher_hooks._features == {} and wrapper._student_hooks._features == {}


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
    # 15 x 15 input: teacher body 8 x 8, student 'down' 4 x 4 ... use an extra pool for 3 x 3
    wrapper = DistillationWrapper(teacher, student, {"aff": term},
                                  {"t": "body"}, {"s": "relu"})
    with pytest.raises(ValueError, match=r"term 'aff': student features on a 4 x 4 grid but "
                                         r"teacher features on 8 x 8 \(about 2x\)"):
        wrapper(torch.randn(2, 3, 16, 16))
    teacher.body = nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=0))  # 8 -> 3 at 16 px
    wrapper = DistillationWrapper(teacher, student, {"aff": term}, {"t": "body"}, {"s": "relu"})
    out = wrapper(torch.randn(2, 3, 16, 16))  # 3 x 3 against 4 x 4: rounding, aligned
    assert torch.isfinite(out.loss)


def test_real_mismatch_resizes_only_when_asked():
    teacher, student = tiny_pair()
    term = DistillationTerm(AffinityLoss(), student="s", teacher="t", resize="student")
    wrapper = DistillationWrapper(teacher, student, {"aff": term}, {"t": "body"}, {"s": "relu"})
    assert torch.isfinite(wrapper(torch.randn(2, 3, 16, 16)).loss)


def test_under_autocast():
    wrapper, *_ = _paper_wrapper()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = wrapper(torch.randn(2, 3, 16, 16))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.losses.values())
    out.loss.backward()


@pytest.mark.slow
def test_compiled_student():
    wrapper, teacher, student, _ = _paper_wrapper()
    x = torch.randn(2, 3, 16, 16)
    wrapper.eval()
    eager = wrapper(x).losses
    compiled = DistillationWrapper(
        teacher, torch.compile(student), dict(wrapper.terms),
        {"features": "relu"}, {"features": "relu"},
    ).eval()
    out = compiled(x)
    for name, value in eager.items():
        torch.testing.assert_close(out.losses[name], value, rtol=1e-4, atol=1e-5)
    out.loss.backward()
    assert student.stem.weight.grad is not None


@pytest.mark.slow
def test_torchvision_deeplabv3_teacher_and_mobilenet_v2_student():
    torch.manual_seed(0)
    teacher = deeplabv3_teacher()
    student = mobilenet_v2_os16()
    translator = Translator(2048, latent_channels=32)
    wrapper = DistillationWrapper.knowledge_adaptation(
        teacher, student, teacher_layer="backbone.layer4", student_layer="backbone",
        translator=translator, student_channels=96,
    )
    x = torch.randn(2, 3, 65, 65)  # OS 8: 9 x 9, encoded 5 x 5; OS 16: 5 x 5
    out = wrapper(x)
    assert out.output.shape == (2, 21, 5, 5)
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.backbone[0][0].weight.grad is not None


@pytest.mark.slow
def test_torchvision_lraspp_student_with_dict_outputs():
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    torch.manual_seed(0)
    teacher = deeplabv3_teacher()
    student = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21)
    translator = Translator(2048, latent_channels=16)
    wrapper = DistillationWrapper.knowledge_adaptation(
        teacher, student, teacher_layer="backbone.layer4", student_layer="backbone.16",
        translator=translator, student_channels=960, adapter_layers=1,
    )
    out = wrapper(torch.randn(2, 3, 65, 65))
    assert isinstance(out.output, dict) and out.output["out"].shape == (2, 21, 65, 65)
    assert torch.isfinite(out.loss)
    out.loss.backward()


def test_plain_sequential_pair_with_custom_terms():
    teacher, student = tiny_pair()
    terms = {
        "aff": DistillationTerm(AffinityLoss(distance="squared"), student="s", teacher="t",
                                weight=2.0, resize="teacher"),
    }
    wrapper = DistillationWrapper(teacher, student, terms, {"t": "relu"}, {"s": "relu"})
    out = wrapper(torch.randn(2, 3, 8, 8))
    assert out.losses["aff"].ndim == 0 and out.losses["aff"] > 0


def test_kd_preset_with_torchvision_dict_outputs_and_an_ignore_mask():
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    torch.manual_seed(0)
    teacher = deeplabv3_teacher(num_classes=4)
    student = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4)
    wrapper = DistillationWrapper.kd(teacher, student, temperature=2.0)
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
    wrapper = DistillationWrapper.fitnet(teacher, student, teacher_layer="relu",
                                         student_layer="relu", student_channels=6,
                                         teacher_channels=12)
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
    ("attention_transfer", {"teacher_layer": "relu", "student_layer": "relu"},
     lambda s, t: 1000 * attention_transfer_loss(
         nn.functional.interpolate(s, size=t.shape[-2:], mode="bilinear"), t)),
    ("pairwise", {"teacher_layer": "relu", "student_layer": "relu", "resize": "student"},
     lambda s, t: pairwise_loss(s, nn.functional.interpolate(t, size=s.shape[-2:],
                                                             mode="bilinear"))),
])
def test_feature_presets(preset, kwargs, fn):
    teacher, student = tiny_pair()
    wrapper = getattr(DistillationWrapper, preset)(teacher, student, **kwargs)
    x = torch.randn(2, 3, 16, 16)
    out = wrapper(x)
    phi_t = teacher.relu(teacher.body(teacher.act(teacher.stem(x)))).detach()
    phi_s = student.relu(student.down(student.act(student.stem(x))))
    (name,) = out.losses
    torch.testing.assert_close(out.losses[name], fn(phi_s, phi_t))


def test_cwd_preset_on_logits():
    teacher, student = tiny_pair()
    wrapper = DistillationWrapper.cwd(teacher, student)
    x = torch.randn(2, 3, 16, 16)
    out = wrapper(x)
    t_logits = teacher(x).detach()
    s_up = nn.functional.interpolate(out.output, size=t_logits.shape[-2:], mode="bilinear")
    torch.testing.assert_close(out.losses["cwd"], 3.0 * cwd_loss(s_up, t_logits))


def test_zero_weight_leaves_a_term_out():
    teacher, student = tiny_pair()
    wrapper = DistillationWrapper.knowledge_adaptation(
        teacher, student, teacher_layer="relu", student_layer="relu",
        translator=Translator(12), student_channels=6, adaptation_weight=0.0)
    assert list(wrapper.terms) == ["affinity"]
    with pytest.raises(ValueError, match=r"both 0: nothing to distil"):
        DistillationWrapper.knowledge_adaptation(
            teacher, student, teacher_layer="relu", student_layer="relu",
            translator=Translator(12), student_channels=6, adaptation_weight=0.0,
            affinity_weight=0.0)


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
    (lambda t, s: DistillationWrapper.knowledge_adaptation(
        t, s, teacher_layer="relu", student_layer="relu", translator=nn.Conv2d(1, 1, 1),
        student_channels=6), TypeError, r"expected translator to be a segdistill.Translator"),
])
def test_construction_errors(make, error, match):
    teacher, student = tiny_pair()
    with pytest.raises(error, match=match):
        make(teacher, student)


def test_feature_that_is_not_4d():
    teacher, student = tiny_pair()
    teacher.flat = nn.Flatten()
    teacher.head = nn.Sequential(teacher.head, teacher.flat)
    wrapper = DistillationWrapper(teacher, student, {"a": _term()}, {"t": "head.1"},
                                  {"s": "relu"})
    with pytest.raises(ValueError, match=r"expected the teacher's feature 't' to be a 4-D "
                                         r"\(B, C, H, W\) tensor, got shape \(2, 80\)"):
        wrapper(torch.randn(2, 3, 8, 8))
    assert wrapper._teacher_hooks._features == {}  # released even though the step raised


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


def test_translator_channels_do_not_match_the_teacher():
    teacher, student = tiny_pair()
    wrapper = DistillationWrapper.knowledge_adaptation(
        teacher, student, teacher_layer="relu", student_layer="relu",
        translator=Translator(32), student_channels=6)
    with pytest.raises(ValueError, match=r"expected translator input with 32 channels, got 12"):
        wrapper(torch.randn(2, 3, 8, 8))


def test_student_channels_do_not_match_the_adapter():
    teacher, student = tiny_pair()
    wrapper = DistillationWrapper.knowledge_adaptation(
        teacher, student, teacher_layer="relu", student_layer="relu",
        translator=Translator(12), student_channels=7)
    with pytest.raises(ValueError, match=r"expected adapter input with 7 channels, got 6"):
        wrapper(torch.randn(2, 3, 8, 8))
