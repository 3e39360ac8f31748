"""FeatureHooks: capture by path, clear errors, release after each step."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from segdistill import FeatureHooks
from segdistill.hooks import select_output


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


def test_select_output():
    t = torch.zeros(1)
    assert select_output(t) is t
    assert select_output({"out": t, "aux": None}) is t
    assert select_output((t, None)) is t
    assert select_output({"logits": t}, "logits") is t
    with pytest.raises(TypeError, match=r"mapping without key 'out' \(keys: \['logits'\]\)"):
        select_output({"logits": t})
    with pytest.raises(TypeError, match=r"cannot take element 3"):
        select_output((t,), 3)
    with pytest.raises(TypeError, match=r"got int"):
        select_output(3)
