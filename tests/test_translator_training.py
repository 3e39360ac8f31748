"""Stage 1: train_translator on a frozen teacher, checkpoints and resume."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from models import snapshot, tiny_pair
from torch.utils.data import DataLoader, TensorDataset

from segdistill import (
    Translator,
    TranslatorTrainingConfig,
    load_checkpoint,
    save_checkpoint,
    train_translator,
)

_config = TranslatorTrainingConfig
_FIELDS = {f.name for f in dataclasses.fields(TranslatorTrainingConfig)}


def _loader(n=24, batch=4):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, 16, 16, generator=g)
    labels = torch.zeros(n, 16, 16, dtype=torch.long)
    return DataLoader(TensorDataset(images, labels), batch_size=batch, shuffle=False)


def test_trains_and_leaves_the_teacher_untouched():
    torch.manual_seed(0)
    teacher, _ = tiny_pair()
    before = snapshot(teacher)
    result = train_translator(teacher, _loader(), "relu",
                              config=_config(epochs=4, lr=0.05, progress=False))
    assert len(result.history) == 4 * 6
    assert sum(result.history[-3:]) < 0.7 * sum(result.history[:3])
    assert not result.translator.training
    assert result.translator.in_channels == 12
    for name, value in snapshot(teacher).items():
        assert torch.equal(value, before[name])
    assert not teacher.relu._forward_hooks  # hooks removed


def test_paper_defaults_in_the_optimiser(monkeypatch):
    seen = {}
    original = torch.optim.SGD.__init__

    def spy(self, params, **kwargs):
        seen.update(kwargs)
        original(self, params, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "__init__", spy)
    teacher, _ = tiny_pair()
    train_translator(teacher, _loader(8), "relu", config=_config(progress=False))
    assert seen == {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}


def test_batches_as_dicts_and_tensors():
    teacher, _ = tiny_pair()
    images = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    assert len(train_translator(teacher, images, "relu",
                                config=_config(progress=False)).history) == 2
    dicts = [{"image": x, "label": None} for x in images]
    assert len(train_translator(teacher, dicts, "relu",
                                config=_config(max_steps=1, progress=False)).history) == 1


def test_checkpoint_loads_with_weights_only_and_resume_is_exact(tmp_path):
    teacher, _ = tiny_pair()
    straight = train_translator(teacher, _loader(), "relu", translator=_seeded_translator(),
                                config=_config(epochs=2, progress=False))
    path = tmp_path / "ckpt" / "translator.pt"
    first = train_translator(teacher, _loader(), "relu", translator=_seeded_translator(),
                             config=_config(epochs=2, max_steps=5, progress=False,
                                            checkpoint_path=path, checkpoint_every=2))
    assert len(first.history) == 5
    state = torch.load(path, weights_only=True)
    assert state["step"] == 5 and len(state["history"]) == 5
    resumed = train_translator(teacher, _loader(), "relu",
                               config=_config(epochs=2, progress=False,
                                              checkpoint_path=path, resume=True))
    assert resumed.history == pytest.approx(straight.history, rel=1e-6, abs=1e-7)
    for name, value in snapshot(resumed.translator).items():
        torch.testing.assert_close(value, snapshot(straight.translator)[name])
    assert not list(path.parent.glob("*.tmp"))


def test_resume_with_other_settings_is_refused(tmp_path):
    teacher, _ = tiny_pair()
    path = tmp_path / "translator.pt"
    first = dict(max_steps=2, progress=False, checkpoint_path=path, record={"batch": 4})
    train_translator(teacher, _loader(), "relu", translator=_seeded_translator(),
                     config=_config(**first))
    state = torch.load(path, weights_only=True)
    assert state["settings"] == {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4,
                                 "alpha": 1e-7, "input_key": None, "batch": 4}
    again = {**first, "resume": True}
    with pytest.raises(ValueError, match=r"(?s)other settings.*  lr: 0.1 in the checkpoint, "
                       r"0.05 now"):
        train_translator(teacher, _loader(), "relu", config=_config(**again, lr=0.05))
    with pytest.raises(ValueError, match=r"  batch: 4 in the checkpoint, 8 now"):
        train_translator(teacher, _loader(), "relu",
                         config=_config(**{**again, "record": {"batch": 8}}))
    with pytest.raises(ValueError, match=r"  batch: 4 in the checkpoint, \(none\) now"):
        train_translator(teacher, _loader(), "relu", config=_config(**{**again, "record": None}))
    # more steps and more epochs continue the same run; an older checkpoint records nothing
    longer = train_translator(teacher, _loader(), "relu",
                              config=_config(**{**again, "max_steps": 3, "epochs": 2}))
    assert len(longer.history) == 3
    del state["settings"]
    torch.save(state, path)
    assert len(train_translator(teacher, _loader(), "relu",
                                config=_config(**{**again, "max_steps": 3, "lr": 0.05})
                                ).history) == 3


def _seeded_translator():
    torch.manual_seed(3)
    return Translator(12, latent_channels=4)


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint({"step": 1}, path)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": 2}, path)
    assert load_checkpoint(path) == {"step": 1}  # the old checkpoint survives intact
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


@pytest.mark.parametrize("kwargs,error,match", [
    ({"teacher": "t"}, TypeError, r"expected the teacher to be an nn.Module, got str"),
    ({"feature_layer": "rel"}, ValueError, r"no submodule 'rel'; closest valid paths: 'relu'"),
    ({"lr": -1.0}, ValueError, r"lr must be at least 0.0, got -1.0"),
    ({"epochs": 0}, ValueError, r"epochs must be a positive int, got 0"),
    ({"resume": True}, ValueError, r"resume and checkpoint_every need a checkpoint_path"),
    ({"loader": []}, ValueError, r"the loader yielded no batches"),
    ({"translator": Translator(5)}, ValueError, r"expected translator input with 5 channels"),
])
def test_errors(kwargs, error, match):
    teacher, _ = tiny_pair()
    settings = {"progress": False, **{k: v for k, v in kwargs.items() if k in _FIELDS}}
    args = {"teacher": teacher, "loader": _loader(8), "feature_layer": "relu",
            **{k: v for k, v in kwargs.items() if k not in _FIELDS}}
    with pytest.raises(error, match=match):
        train_translator(**args, config=_config(**settings))


def test_feature_that_is_not_4d():
    teacher, _ = tiny_pair()
    teacher.flat = torch.nn.Flatten()
    with pytest.raises(ValueError, match=r"expected the teacher's layer 'flat' to be a 4-D "
                                         r"\(B, C, H, W\) tensor, got shape \(2, 80\)"):
        train_translator(teacher, [torch.randn(2, 3, 8, 8)], "flat",
                         config=_config(progress=False))


def test_load_checkpoint_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nope.pt")


class _ListEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, stride=2, padding=1)

    def forward(self, x):
        return [x, self.conv(x)]


@pytest.mark.parametrize("batches", [
    [torch.randn(2, 3, 8, 8)],
    [(torch.randn(2, 3, 8, 8), torch.zeros(2, 8, 8))],
    [{"image": torch.randn(2, 3, 8, 8)}],
])
def test_a_selector_on_the_feature_layer_and_batch_forms(batches):
    teacher = torch.nn.Sequential(_ListEncoder())
    result = train_translator(teacher, batches, "0[-1]", config=_config(progress=False))
    assert result.translator.in_channels == 6
    with pytest.raises(ValueError, match=r"the teacher's layer '0' returns list of 2 .*e.g. "
                                         r"'0\[0\]' \(the first\) or '0\[-1\]' \(the last\)"):
        train_translator(teacher, batches, "0", config=_config(progress=False))


@pytest.mark.parametrize("fields,error,match", [
    ({"epochs": 1.5}, TypeError, r"epochs must be an int, got float"),
    ({"max_steps": 0}, ValueError, r"max_steps must be a positive int, got 0"),
    ({"latent_channels": "4"}, TypeError, r"latent_channels must be an int, got str"),
    ({"alpha": float("nan")}, ValueError, r"alpha must be finite, got nan"),
    ({"momentum": "0.9"}, TypeError, r"momentum must be a real number, got str"),
    ({"input_key": 1.0}, TypeError, r"input_key must be a str, an int or None, got float"),
    ({"device": 0}, TypeError, r"device must be a str, a torch.device or None, got int"),
    ({"device": "gpu"}, ValueError, r"device must name a torch device .*, got 'gpu'"),
    ({"checkpoint_path": 3}, TypeError, r"checkpoint_path must be a str or an os.PathLike, "
                                        r"got int"),
    ({"resume": "yes", "checkpoint_path": "c.pt"}, TypeError, r"resume must be a bool, got str"),
    ({"checkpoint_every": 5}, ValueError, r"resume and checkpoint_every need a checkpoint_path"),
])
def test_the_config_checks_its_fields(fields, error, match):
    with pytest.raises(error, match=match):
        TranslatorTrainingConfig(**fields)


def test_the_config_is_frozen_and_defaults_to_the_paper():
    config = TranslatorTrainingConfig()
    assert (config.epochs, config.lr, config.momentum, config.weight_decay, config.alpha) == (
        1, 0.1, 0.9, 1e-4, 1e-7)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError, match=r"expected config to be a "
                                        r"segdistill.TranslatorTrainingConfig, got dict"):
        train_translator(torch.nn.ReLU(), [], "0", config={"epochs": 1})
