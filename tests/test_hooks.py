"""FeatureHooks: capture by path, clear errors, release after each step."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from segdistill import FeatureHooks
from segdistill.hooks import feature_shapes, parse_layer, select_output, unwrap_model


def _model():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.ReLU(), nn.Conv2d(4, 2, 1)))


def test_captures_by_dotted_path_and_releases():
    model = _model()
    hooks = FeatureHooks(model, {"relu": "1.0", "last": "1.1"})
    x = torch.randn(2, 3, 6, 6)
    out = model(x)
    feats = hooks.pop()
    assert set(feats) == {"relu", "last"}
    torch.testing.assert_close(feats["last"], out)
    torch.testing.assert_close(feats["relu"], torch.relu(model[0](x)))
    assert hooks.pop() == {}


def test_sequence_of_paths_uses_paths_as_names():
    hooks = FeatureHooks(_model(), ["0", "1.1"])
    assert hooks.layers == {"0": "0", "1.1": "1.1"}


def test_popped_activations_are_not_kept_alive():
    model = _model()
    hooks = FeatureHooks(model, ["1.1"])
    model(torch.randn(1, 3, 6, 6))
    ref = weakref.ref(hooks.pop()["1.1"])
    gc.collect()
    assert ref() is None


def test_remove_and_detached():
    model = _model()
    hooks = FeatureHooks(model, ["0"])
    with hooks.detached():
        assert not model[0]._forward_hooks
        model(torch.randn(1, 3, 6, 6))
        assert hooks.pop() == {}
    assert len(model[0]._forward_hooks) == 1
    hooks.remove()
    assert not model[0]._forward_hooks


def test_wrong_path_lists_close_matches():
    with pytest.raises(ValueError, match=r"Sequential has no submodule '1.2'; closest valid "
                                         r"paths: .*'1.1'"):
        FeatureHooks(_model(), ["1.2"])


def test_paths_of_compiled_and_ddp_wrapped_models_are_the_users():
    model = _model()
    compiled = torch.compile(model)
    hooks = FeatureHooks(compiled, ["1.1"])
    model(torch.randn(1, 3, 6, 6))
    assert "1.1" in hooks.pop()


@pytest.mark.parametrize("model,layers,error,match", [
    ("not a model", ["0"], TypeError, r"expected an nn.Module, got str"),
    (None, "0", TypeError, r"expected layers as a mapping .* got str"),
])
def test_bad_arguments(model, layers, error, match):
    with pytest.raises(error, match=match):
        FeatureHooks(_model() if model is None else model, layers)


class _WithLogits:
    def __init__(self, logits):
        self.logits = logits


def test_select_output_automatic_rule():
    t = torch.zeros(1, 2, 3, 3)
    assert select_output(t) is t
    assert select_output({"out": t, "aux": None}) is t  # torchvision
    assert select_output({"logits": t, "hidden_states": (t,)}) is t  # a ModelOutput is a mapping
    assert select_output(_WithLogits(t)) is t
    with pytest.raises(ValueError, match=r"cannot find the logits in the model's output: it "
                                         r"holds tuple of 2 \(\[0\] Tensor\(1, 2, 3, 3\), "
                                         r"\[1\] NoneType\), with no 'out' or 'logits'"):
        select_output((t, None))  # never the first element silently
    with pytest.raises(ValueError, match=r"holds dict \{'pred': Tensor\(1, 2, 3, 3\)\}"):
        select_output({"pred": t})
    with pytest.raises(TypeError, match=r"the model's output\['out'\] holds list of 1"):
        select_output({"out": [t]})


def test_select_output_by_key_index_or_callable():
    t = torch.zeros(1)
    assert select_output({"pred": t}, "pred") is t
    assert select_output((None, t), 1) is t
    assert select_output((None, t), -1) is t
    assert select_output(_WithLogits(t), "logits") is t
    assert select_output([t], lambda out: out[0]) is t
    with pytest.raises(ValueError, match=r"the model's output has no element 3; it holds tuple "
                                         r"of 1"):
        select_output((t,), 3)
    with pytest.raises(ValueError, match=r"has no key 'logits'; it holds dict \{'out'"):
        select_output({"out": t}, "logits")
    with pytest.raises(TypeError, match=r"the output selector's result for the model's output "
                                        r"holds int, not a tensor"):
        select_output(t, lambda out: 3)
    with pytest.raises(TypeError, match=r"expected an output selector: None, a key \(str\), an "
                                        r"index \(int\) or a callable, got bool"):
        select_output((t,), True)


@pytest.mark.parametrize("layer,expected", [
    ("backbone.layer4", ("backbone.layer4", ())),
    ("encoder[-1]", ("encoder", (-1,))),
    ("backbone['high']", ("backbone", ("high",))),
    ('backbone["high"]', ("backbone", ("high",))),
    ("segformer['hidden_states'][ 2 ]", ("segformer", ("hidden_states", 2))),
    ("[0]", ("", (0,))),
])
def test_parse_layer(layer, expected):
    assert parse_layer(layer) == expected


@pytest.mark.parametrize("layer,match", [
    ("encoder[high]", r"layer path 'encoder\[high\]' has an invalid selector '\[high\]'"),
    ("encoder[1.5]", r"invalid selector '\[1.5\]'"),
    ("encoder[0]x", r"invalid selector 'x'"),
    ("encoder[", r"invalid selector '\['"),
])
def test_parse_layer_errors(layer, match):
    with pytest.raises(ValueError, match=match + r"; use Python indexing with an int or a quoted "
                                                 r"key, e.g. 'encoder\[-1\]'"):
        parse_layer(layer)


class _Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        return {"low": y, "all": [x, y]}


def test_selectors_on_hooked_structured_outputs():
    model = nn.Sequential(_Pair())
    hooks = FeatureHooks(model, {"low": "0['low']", "last": "0['all'][-1]", "raw": "0"},
                         owner="student")
    x = torch.randn(1, 3, 4, 4)
    model(x)
    with pytest.raises(ValueError, match=r"the student's layer '0' returns dict \{'low': "
                                         r"Tensor\(1, 4, 4, 4\), 'all': list of 2 .*\}, not a "
                                         r"tensor; .* e.g. \"0\['low'\]\""):
        hooks.pop()
    hooks = FeatureHooks(model, {"low": "0['low']", "last": "0['all'][-1]"})
    model(x)
    feats = hooks.pop()
    torch.testing.assert_close(feats["low"], model[0].conv(x))
    assert feats["last"] is not x and feats["last"].shape == (1, 4, 4, 4)


def test_a_wrong_selector_names_the_written_path():
    model = nn.Sequential(_Pair())
    hooks = FeatureHooks(model, ["0['high']"], owner="teacher")
    model(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"the teacher's layer \"0\['high'\]\" has no key "
                                         r"'high'; it holds dict"):
        hooks.pop()


def test_unwrap_model():
    model = _model()
    assert unwrap_model(model) is model
    assert unwrap_model(torch.compile(model)) is model
    assert unwrap_model(nn.DataParallel(torch.compile(model))) is model


def test_feature_shapes_restores_modes_and_removes_hooks():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4),
                          nn.Conv2d(4, 2, 1))
    model.train()
    model[1].eval()  # a mixed state comes back as it was
    before = model[1].running_mean.clone()
    shapes = feature_shapes(model, {"bn": "1"}, torch.randn(2, 3, 8, 8))
    assert shapes == {"bn": torch.Size([2, 4, 4, 4]), "output": torch.Size([2, 2, 4, 4])}
    assert model.training and model[0].training and not model[1].training
    assert torch.equal(model[1].running_mean, before)
    assert all(not m._forward_hooks for m in model.modules())
    assert "output" not in feature_shapes(model, ["1"], torch.randn(1, 3, 8, 8),
                                          with_output=False)


@pytest.mark.parametrize("path,match", [
    ("layer4.relu", r"no submodule 'layer4.relu'; closest valid paths: '0', '1'$"),  # children
    ("1.0.weight", r"no submodule '1.0.weight'; closest valid paths: '1.0', '1.1'"),  # a leaf's
])
def test_a_path_typo_lists_real_children(path, match):
    with pytest.raises(ValueError, match=match):
        FeatureHooks(_model(), [path])


@pytest.mark.parametrize("selector", ["mT", "T", "H", "real", "data", 0])
def test_a_selector_on_a_tensor_output_is_refused(selector):
    model = _model()
    hooks = FeatureHooks(model, [f"1[{selector!r}]"], owner="student")
    model(torch.randn(1, 3, 6, 7))
    with pytest.raises(ValueError, match=r"the student's layer .* is a tensor, Tensor\(1, 2, 4, "
                                         r"5\), which takes no selector: .* drop it"):
        hooks.pop()
    with pytest.raises(ValueError, match=r"the model's output is a tensor"):
        select_output(torch.zeros(1, 2, 3, 3), selector)


def test_selectors_still_read_output_objects_and_mappings():
    t = torch.zeros(1, 2, 3, 3)
    assert select_output(_WithLogits(t), "logits") is t  # a ModelOutput-like object
    assert select_output({"logits": t}, "logits") is t  # a ModelOutput is a mapping
