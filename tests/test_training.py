"""The training loop: sampler, poly schedule, wrapper terms, AMP, exact resume."""

from __future__ import annotations

import json

import pytest
import torch
from models import snapshot, tiny_pair
from torch.utils.data import Dataset, TensorDataset

from segdistill import DistillationWrapper, Translator
from segdistill.training import EpochSampler, TrainConfig, decode_sample_key, fit, poly_lr


class AugmentedShapes(Dataset):
    """Random images whose flip is drawn from a generator seeded by the sample key."""

    uses_sample_keys = True

    def __init__(self, n=12):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, 16, 16, generator=g)
        self.labels = torch.randint(0, 5, (n, 16, 16), generator=g)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        _, index = decode_sample_key(key, len(self))
        g = torch.Generator().manual_seed(key)
        image, label = self.images[index], self.labels[index]
        if torch.rand((), generator=g) < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        return image, label


def test_sampler_shards_cover_an_epoch_disjointly():
    shards = [list(EpochSampler(10, batch_size=2, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    indices = [k % 10 for shard in shards for k in shard]
    assert len(indices) == len(set(indices)) == 8  # 2 steps of 2 per rank, tail dropped
    assert all(k < 10 for shard in shards for k in shard)  # epoch 0


def test_sampler_position_spans_epochs():
    sampler = EpochSampler(6, batch_size=2, seed=0)
    epoch0 = list(sampler)
    sampler.set_position(4)  # 3 steps per epoch: epoch 1, second batch
    keys = list(sampler)
    assert [decode_sample_key(k, 6)[0] for k in keys] == [1, 1, 1, 1]
    sampler.set_position(3)
    assert list(sampler)[2:] == keys
    assert sorted(k % 6 for k in epoch0) == list(range(6))


def test_sampler_errors():
    with pytest.raises(ValueError, match=r"gives no full batch of 8 on each of 2 ranks"):
        EpochSampler(10, batch_size=8, world_size=2)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got 2"):
        EpochSampler(10, batch_size=1, rank=2, world_size=2)


def test_poly_lr():
    assert poly_lr(0.01, 0, 10) == 0.01
    assert poly_lr(0.01, 10, 10) == 0.0
    assert poly_lr(0.01, 5, 10, power=1.0) == pytest.approx(0.005)


def _wrapper():
    torch.manual_seed(0)
    teacher, student = tiny_pair()
    return DistillationWrapper.knowledge_adaptation(
        teacher, student, teacher_layer="relu", student_layer="relu",
        translator=Translator(12, latent_channels=6), student_channels=6)


def test_fit_a_wrapper_logs_every_term(tmp_path):
    log = tmp_path / "log.jsonl"
    config = TrainConfig(steps=4, batch_size=4, lr=0.01, log_path=str(log), log_every=2,
                         progress=False)
    history = fit(_wrapper(), AugmentedShapes(), config)
    assert [row["step"] for row in history] == [1, 2, 3, 4]
    assert set(history[0]) == {"step", "lr", "loss", "ce", "adaptation", "affinity"}
    for row in history:
        assert row["loss"] == pytest.approx(row["ce"] + row["adaptation"] + row["affinity"])
    assert history[0]["lr"] == 0.01 and history[1]["lr"] == pytest.approx(poly_lr(0.01, 1, 4))
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]


def test_teacher_is_untouched_by_fit():
    wrapper = _wrapper()
    before = snapshot(wrapper.teacher)
    fit(wrapper, AugmentedShapes(), TrainConfig(steps=3, batch_size=4, progress=False))
    for key, value in snapshot(wrapper.teacher).items():
        assert torch.equal(value, before[key])


def test_resume_continues_exactly(tmp_path):
    config = TrainConfig(steps=8, batch_size=4, lr=0.02, progress=False,
                         checkpoint_path=str(tmp_path / "ckpt.pt"), checkpoint_every=2)
    straight_model = _wrapper()
    straight = fit(straight_model, AugmentedShapes(), TrainConfig(
        steps=8, batch_size=4, lr=0.02, progress=False))
    crashed_model = _wrapper()
    first = fit(crashed_model, AugmentedShapes(), config, stop_after=5)  # "crash" after step 5
    assert len(first) == 5
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["step"] == 5
    resumed_model = _wrapper()  # a fresh process: new objects, the same construction
    resumed = fit(resumed_model, AugmentedShapes(), config, resume=True)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(resumed, straight):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7)
    for key, value in snapshot(resumed_model).items():
        torch.testing.assert_close(value, snapshot(straight_model)[key], msg=key)


def test_a_plain_segmenter_and_bf16_autocast():
    torch.manual_seed(0)
    _, student = tiny_pair()
    data = TensorDataset(torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8, 16, 16)))
    history = fit(student, data, TrainConfig(steps=2, batch_size=4, amp="bf16",
                                             progress=False))
    assert set(history[0]) == {"step", "lr", "loss", "ce"}
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in history)


@pytest.mark.parametrize("kwargs,match", [
    ({"steps": 0}, r"steps must be a positive int, got 0"),
    ({"amp": "fp8"}, r"amp must be one of 'none', 'bf16', 'fp16', got 'fp8'"),
    ({"checkpoint_every": 5}, r"checkpoint_every needs a checkpoint_path"),
    ({"lr": -0.1}, r"lr must be at least 0.0, got -0.1"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{"steps": 1, **kwargs})
