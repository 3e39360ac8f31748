"""The preset registry, FeatureSpec, and the one label rule's cost."""

from __future__ import annotations

import inspect
import typing

import pytest
import torch
from models import tiny_pair
from torch import nn
from torch.overrides import TorchFunctionMode

import segdistill
from segdistill import DistillationWrapper, FeatureSpec, kd_loss, presets
from segdistill.hooks import FeatureHooks, probe_features


def test_registry_holds_every_preset_by_its_library_name():
    names = ["knowledge_adaptation", "kd", "fitnet", "attention_transfer", "pairwise", "cwd",
             "dist", "mgd", "ifvd", "holistic", "cirkd"]
    assert dict(presets.PRESETS) == {name: getattr(presets, name) for name in names}
    assert set(presets.__all__) >= set(names)
    with pytest.raises(TypeError):
        presets.PRESETS["mine"] = presets.kd  # type: ignore[index]  # read-only view


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_presets_have_typed_keyword_signatures(name):
    preset = presets.get_preset(name)
    signature = inspect.signature(preset)
    params = list(signature.parameters.values())
    assert [p.name for p in params[:2]] == ["teacher", "student"]
    assert all(p.kind is p.KEYWORD_ONLY for p in params[2:])
    hints = typing.get_type_hints(preset)
    assert hints["return"] is DistillationWrapper
    assert set(hints) == {p.name for p in params} | {"return"}


def test_the_wrapper_has_no_preset_shortcuts_and_imports_no_preset():
    import ast

    import segdistill.wrapper as wrapper_module

    for name in presets.PRESETS:
        assert not hasattr(DistillationWrapper, name)
    tree = ast.parse(inspect.getsource(wrapper_module))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                 for alias in node.names}
    assert "segdistill.presets" not in imported and "presets" not in imported


def test_register_and_look_up_errors():
    with pytest.raises(ValueError, match=r"unknown preset 'paper'; the presets are "
                                         r"'attention_transfer', 'cirkd', 'cwd', "):
        presets.get_preset("paper")
    with pytest.raises(ValueError, match=r"a preset named 'kd' is already registered "
                                         r"\(segdistill.presets.kd\)"):
        presets.register_preset("kd")(presets.kd)
    with pytest.raises(ValueError, match=r"must be a Python identifier, got 'my kd'"):
        presets.register_preset("my kd")
    with pytest.raises(TypeError, match=r"expected a preset name \(str\), got int"):
        presets.register_preset(3)  # type: ignore[arg-type]


def test_a_registered_preset_is_found_and_builds():
    @presets.register_preset("kd_at_two")
    def kd_at_two(teacher: nn.Module, student: nn.Module) -> DistillationWrapper:
        return presets.kd(teacher, student, temperature=2.0, resize="teacher")

    try:
        wrapper = presets.get_preset("kd_at_two")(*tiny_pair())
        assert wrapper.terms["kd"].loss.temperature == 2.0
    finally:
        presets._REGISTRY.pop("kd_at_two")


# ---- FeatureSpec ---------------------------------------------------------------------------

def test_feature_spec_parses_its_path_once_and_validates():
    spec = FeatureSpec("encoder['hidden_states'][2]", channels=64, stride=8)
    assert (spec.module_path, spec.selectors) == ("encoder", ("hidden_states", 2))
    assert spec == FeatureSpec("encoder['hidden_states'][2]", 64, 8)
    with pytest.raises(ValueError, match=r"invalid selector"):
        FeatureSpec("encoder[x]")
    with pytest.raises(ValueError, match=r"FeatureSpec.channels must be a positive int, got 0"):
        FeatureSpec("relu", channels=0)
    with pytest.raises(TypeError, match=r"FeatureSpec.stride must be an int, got float"):
        FeatureSpec("relu", stride=8.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"expected teacher_layer to be a layer path \(str\) or a "
                                         r"FeatureSpec, got int"):
        presets.attention_transfer(*tiny_pair(), teacher_layer=3,  # type: ignore[arg-type]
                                   student_layer="relu")


def test_probe_reads_channels_and_stride_in_one_forward_per_model():
    teacher, _ = tiny_pair()
    calls = []
    teacher.register_forward_hook(lambda *args: calls.append(1))
    specs = probe_features(teacher, {"a": "relu", "b": FeatureSpec("stem", channels=8)},
                           torch.zeros(1, 3, 16, 16), "teacher")
    assert calls == [1]
    assert specs == {"a": FeatureSpec("relu", channels=12, stride=2),
                     "b": FeatureSpec("stem", channels=8, stride=2)}
    assert not any(m._forward_hooks for m in teacher.modules() if m is not teacher)
    with pytest.raises(ValueError, match=r"the teacher's layer 'relu' has 12 channels on "
                                         r"example_input, but its FeatureSpec says channels=3"):
        probe_features(teacher, {"a": FeatureSpec("relu", channels=3)},
                       torch.zeros(1, 3, 16, 16), "teacher")


def test_hooks_take_specs_and_paths_alike():
    teacher, _ = tiny_pair()
    hooks = FeatureHooks(teacher, {"spec": FeatureSpec("relu", 12), "path": "relu"})
    teacher(torch.randn(1, 3, 8, 8))
    features = hooks.pop()
    assert torch.equal(features["spec"], features["path"])
    assert hooks.layers == {"spec": "relu", "path": "relu"}
    hooks.remove()


def test_top_level_exports():
    assert segdistill.FeatureSpec is FeatureSpec and segdistill.presets is presets
    assert {"FeatureSpec", "presets"} <= set(segdistill.__all__)


# ---- the label rule's host sync ------------------------------------------------------------

class _CountSyncs(TorchFunctionMode):
    """Counts the calls that read a tensor's value on the host."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.__int__,
                    torch.Tensor.tolist):
            self.syncs += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("validate_args,expected", [(True, 1), (False, 0)])
def test_label_range_check_syncs_once_per_call_or_never(validate_args, expected):
    s, t = torch.randn(2, 5, 4, 4), torch.randn(2, 5, 8, 8)
    labels = torch.randint(0, 5, (2, 16, 16))
    labels[:, :4] = 255
    with _CountSyncs() as counter:
        kd_loss(s, t, labels, validate_args=validate_args)
    assert counter.syncs == expected
    teacher, student = tiny_pair()
    wrapper = presets.kd(teacher, student, resize="teacher", validate_args=validate_args)
    x = torch.randn(2, 3, 16, 16)
    with _CountSyncs() as counter:
        wrapper(x, target=labels)
    assert counter.syncs == expected


# ---- CWD on features -----------------------------------------------------------------------

def test_cwd_on_features_equals_the_loss_through_its_connector():
    from segdistill import cwd_loss

    teacher, student = tiny_pair()
    wrapper = presets.cwd(teacher, student, teacher_layer=FeatureSpec("relu", channels=12),
                          student_layer=FeatureSpec("relu", channels=6), resize="teacher")
    assert wrapper.terms["cwd_features"].weight == 50.0 and wrapper.terms["cwd"].weight == 3.0
    connector = wrapper.terms["cwd_features"].student_adapter
    assert {id(p) for p in connector.parameters()} <= {
        id(p) for p in wrapper.trainable_parameters()}
    x = torch.randn(2, 3, 16, 16)
    out = wrapper(x)
    with torch.no_grad():
        phi_t = teacher.relu(teacher.body(teacher.act(teacher.stem(x))))
    phi_s = student.relu(student.down(student.act(student.stem(x))))
    expected = 50.0 * cwd_loss(connector(phi_s), phi_t, resize="teacher")
    torch.testing.assert_close(out.losses["cwd_features"], expected)
    only = presets.cwd(*tiny_pair(), teacher_layer=FeatureSpec("relu", channels=12),
                       student_layer=FeatureSpec("relu", channels=6), logits=False,
                       resize="teacher")
    assert list(only.terms) == ["cwd_features"]


@pytest.mark.parametrize("kwargs,match", [
    ({"teacher_layer": "relu"}, r"needs both teacher_layer and student_layer, got only "
                                r"teacher_layer"),
    ({"logits": False}, r"logits=False and no layers: nothing to distil"),
    ({"teacher_layer": "relu", "student_layer": "relu"}, r"cwd needs the channels of "
                                                        r"student_layer 'relu' and teacher_layer"),
])
def test_cwd_preset_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        presets.cwd(*tiny_pair(), **kwargs)


def test_dist_and_mgd_presets():
    from segdistill import dist_loss

    teacher, student = tiny_pair()
    wrapper = presets.dist(teacher, student, resize="teacher")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        t = teacher(x)
    out = wrapper(x)
    torch.testing.assert_close(out.losses["dist"], dist_loss(out.output, t, resize="teacher"))
    mgd = presets.mgd(*tiny_pair(), teacher_layer=FeatureSpec("relu", channels=12),
                      student_layer=FeatureSpec("relu", channels=6), resize="teacher",
                      rng=torch.Generator().manual_seed(0))
    loss = mgd.terms["mgd"].loss
    assert mgd.terms["mgd"].weight == 2e-5
    assert {id(p) for p in loss.parameters()} <= {id(p) for p in mgd.trainable_parameters()}
    assert torch.isfinite(mgd(x).loss)


def test_ifvd_preset_passes_the_labels():
    from segdistill import ifvd_loss

    teacher, student = tiny_pair()
    wrapper = presets.ifvd(teacher, student, teacher_layer="relu", student_layer="relu",
                           num_classes=5, resize="student")
    x, labels = torch.randn(2, 3, 16, 16), torch.randint(0, 5, (2, 16, 16))
    labels[:, :4] = 255
    out = wrapper(x, target=labels)
    with torch.no_grad():
        phi_t = teacher.relu(teacher.body(teacher.act(teacher.stem(x))))
    phi_s = student.relu(student.down(student.act(student.stem(x))))
    expected = 20.0 * ifvd_loss(phi_s, phi_t, labels, num_classes=5, resize="student")
    torch.testing.assert_close(out.losses["ifvd"], expected)


def test_cirkd_preset_terms_and_the_memory_head():
    from segdistill import cirkd_loss

    teacher, student = tiny_pair()
    wrapper = presets.cirkd(teacher, student, teacher_layer=FeatureSpec("relu", channels=12),
                            student_layer=FeatureSpec("relu", channels=6), num_classes=5,
                            resize="teacher")
    assert {n: t.weight for n, t in wrapper.terms.items()} == {
        "minibatch": 1.0, "memory": 1.0, "kd": 1.0}
    head = wrapper.terms["memory"].loss.parameters()
    assert {id(p) for p in head} <= {id(p) for p in wrapper.trainable_parameters()}
    x, labels = torch.randn(2, 3, 16, 16), torch.randint(0, 5, (2, 16, 16))
    out = wrapper(x, target=labels)
    with torch.no_grad():
        phi_t = teacher.relu(teacher.body(teacher.act(teacher.stem(x))))
    phi_s = student.relu(student.down(student.act(student.stem(x))))
    torch.testing.assert_close(out.losses["minibatch"],
                               cirkd_loss(phi_s, phi_t, resize="teacher"))
    assert all(torch.isfinite(v) for v in out.losses.values())
    only_kd = presets.cirkd(*tiny_pair(), teacher_layer=FeatureSpec("relu", channels=12),
                            student_layer=FeatureSpec("relu", channels=6), num_classes=5,
                            minibatch_weight=0.0, memory_pixel_weight=0.0,
                            memory_region_weight=0.0)
    assert list(only_kd.terms) == ["kd"]
    with pytest.raises(ValueError, match=r"every weight is 0: nothing to distil"):
        presets.cirkd(*tiny_pair(), teacher_layer="relu", student_layer="relu", num_classes=5,
                      minibatch_weight=0.0, memory_pixel_weight=0.0, memory_region_weight=0.0,
                      kd_weight=0.0)


def test_combine_sums_the_parts_and_captures_a_shared_layer_once():
    from models import tiny_pair

    torch.manual_seed(0)
    teacher, student = tiny_pair()
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 5, (2, 4, 4))
    parts = [presets.kd(teacher, student, resize="teacher"),
             presets.attention_transfer(teacher, student, teacher_layer="relu",
                                        student_layer="relu", resize="teacher"),
             presets.fitnet(teacher, student, teacher_layer=FeatureSpec("relu", channels=12),
                            student_layer=FeatureSpec("relu", channels=6), resize="teacher")]
    separate = {name: value for part in parts for name, value in part(x, y).losses.items()}
    both = presets.combine(*parts)
    # relu with and without its channels: two specs (renamed apart) on one module
    assert both.teacher_layers == {"features": FeatureSpec("relu"),
                                   "features_2": FeatureSpec("relu", channels=12)}
    out = both(x, y)
    assert out.losses.keys() == separate.keys()
    for name, value in separate.items():
        torch.testing.assert_close(out.losses[name], value)
    same = presets.combine(
        presets.attention_transfer(teacher, student, teacher_layer="relu", student_layer="relu",
                                   resize="teacher"),
        presets.pairwise(teacher, student, teacher_layer="relu", student_layer="relu",
                         resize="student"))
    assert same.teacher_layers == {"features": FeatureSpec("relu")}  # captured once
    same(x)
    same.remove_hooks()
    assert all(not m._forward_hooks or all(
        getattr(h, "owner", None) in (both._teacher_hooks, both._student_hooks)
        for h in m._forward_hooks.values()) for m in (*teacher.modules(), *student.modules()))


def test_combine_refuses_what_would_be_wrong():
    from models import tiny_pair

    teacher, student = tiny_pair()
    with pytest.raises(ValueError, match=r"term names \['kd'\] are in more than one wrapper"):
        presets.combine(presets.kd(teacher, student), presets.kd(teacher, student))
    other, _ = tiny_pair()
    with pytest.raises(ValueError, match="same teacher and student"):
        presets.combine(presets.kd(teacher, student), presets.dist(other, student))
    with pytest.raises(ValueError, match="at least two DistillationWrappers"):
        presets.combine(presets.kd(teacher, student))
