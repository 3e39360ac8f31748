"""The pipeline's training loop: sampler, poly schedule, wrapper terms, AMP, exact resume."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from models import snapshot, tiny_pair
from torch.utils.data import Dataset, TensorDataset

pytest.importorskip("torchdata")
sys.path.append(str(Path(__file__).resolve().parent.parent))  # for `examples`

from examples.segmentation.training import (
    KeyedSampler,
    TrainConfig,
    decode_sample_key,
    fit,
)
from segdistill import FeatureSpec, Translator, presets


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


def test_sampler_shards_cover_an_epoch_disjointly_and_key_the_epoch():
    data = range(10)
    shards = [list(KeyedSampler(data, num_replicas=2, rank=r, seed=3, drop_last=True))
              for r in (0, 1)]
    indices = [k % 10 for shard in shards for k in shard]
    assert len(indices) == len(set(indices)) == 10
    assert all(k < 10 for shard in shards for k in shard)  # epoch 0
    sampler = KeyedSampler(data, num_replicas=1, rank=0, seed=3)
    sampler.set_epoch(2)
    keys = list(sampler)
    assert {decode_sample_key(k, 10)[0] for k in keys} == {2}
    assert [k % 10 for k in keys] != [k % 10 for k in shards[0] + shards[1]]  # reshuffled


def _wrapper():
    torch.manual_seed(0)
    teacher, student = tiny_pair()
    return presets.knowledge_adaptation(
        teacher, student, teacher_layer="relu", student_layer=FeatureSpec("relu", channels=6),
        translator=Translator(12, latent_channels=6))


def test_fit_a_wrapper_logs_every_term_with_the_poly_schedule(tmp_path):
    log = tmp_path / "log.jsonl"
    config = TrainConfig(steps=4, batch_size=4, lr=0.01, log_path=str(log), log_every=2,
                         progress=False)
    history = fit(_wrapper(), AugmentedShapes(), config)
    assert [row["step"] for row in history] == [1, 2, 3, 4]
    assert set(history[0]) == {"step", "lr", "loss", "ce", "adaptation", "affinity"}
    for row in history:
        assert row["loss"] == pytest.approx(row["ce"] + row["adaptation"] + row["affinity"])
    # lr_t = lr_0 (1 - t / T)^0.9, the lr of the step's update
    assert [row["lr"] for row in history] == pytest.approx(
        [0.01 * (1 - t / 4) ** 0.9 for t in range(4)])
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]


def test_teacher_is_untouched_by_fit():
    wrapper = _wrapper()
    before = snapshot(wrapper.teacher)
    fit(wrapper, AugmentedShapes(), TrainConfig(steps=3, batch_size=4, progress=False))
    for key, value in snapshot(wrapper.teacher).items():
        assert torch.equal(value, before[key])


@pytest.mark.parametrize("crash_at", [2, 3, 5])  # end of an epoch (3 steps), and within one
def test_resume_continues_bit_identically(tmp_path, crash_at):
    config = TrainConfig(steps=8, batch_size=4, lr=0.02, progress=False,
                         checkpoint_path=str(tmp_path / "ckpt.pt"), checkpoint_every=1,
                         log_path=str(tmp_path / "log.jsonl"), log_every=1)
    straight_model = _wrapper()
    straight = fit(straight_model, AugmentedShapes(), TrainConfig(
        steps=8, batch_size=4, lr=0.02, progress=False))
    first = fit(_wrapper(), AugmentedShapes(), config, stop_after=crash_at)  # "crash"
    assert len(first) == crash_at
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["step"] == crash_at
    resumed_model = _wrapper()  # a fresh process: new objects, the same construction
    resumed = fit(resumed_model, AugmentedShapes(), config, resume=True)
    assert resumed == straight  # every loss, term and learning rate, exactly
    for key, value in snapshot(resumed_model).items():
        assert torch.equal(value, snapshot(straight_model)[key]), key
    logged = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text()
              .splitlines()]
    assert logged == list(range(1, 9))  # no step logged twice


def test_a_plain_segmenter_and_bf16_autocast():
    torch.manual_seed(0)
    _, student = tiny_pair()
    data = TensorDataset(torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8, 16, 16)))
    history = fit(student, data, TrainConfig(steps=2, batch_size=4, amp="bf16",
                                             progress=False))
    assert set(history[0]) == {"step", "lr", "loss", "ce"}
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in history)


def test_a_dataset_too_small_for_a_batch():
    data = TensorDataset(torch.randn(3, 3, 16, 16), torch.randint(0, 5, (3, 16, 16)))
    with pytest.raises(ValueError, match=r"a dataset of 3 samples gives no full batch of 4"):
        fit(tiny_pair()[1], data, TrainConfig(steps=1, batch_size=4, progress=False))


@pytest.mark.parametrize("kwargs,match", [
    ({"steps": 0}, r"steps must be a positive int, got 0"),
    ({"amp": "fp8"}, r"amp must be one of 'none', 'bf16', 'fp16', got 'fp8'"),
    ({"checkpoint_every": 5}, r"checkpoint_every needs a checkpoint_path"),
    ({"lr": -0.1}, r"lr must be at least 0.0, got -0.1"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{"steps": 1, **kwargs})
