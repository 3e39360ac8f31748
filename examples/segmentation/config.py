"""Per-dataset configurations with the paper's hyperparameters (DESIGN section 1)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any


@dataclass(frozen=True)
class PipelineConfig:
    """Everything a pipeline run needs; command-line flags override any field."""

    dataset: str
    num_classes: int
    crop: int
    train_split: str
    val_split: str
    # the paper's recipe: SGD momentum 0.9, weight decay 4e-5, lr 0.007, poly 0.9, batch 16
    batch_size: int = 16
    lr: float = 0.007
    momentum: float = 0.9
    weight_decay: float = 4e-5
    poly_power: float = 0.9
    scale_range: tuple[float, float] = (0.5, 2.0)
    # iterations: the paper gives none; these are the usual DeepLabV3 schedules
    teacher_steps: int = 30_000
    student_steps: int = 30_000
    distill_steps: int = 30_000
    translator_epochs: int = 1
    translator_channels: int | None = None  # the code's channels; None: C_t, as in the paper
    translator_lr: float = 0.1
    translator_weight_decay: float = 1e-4
    adaptation_weight: float = 50.0
    affinity_weight: float = 1.0
    kd_temperature: float = 4.0
    student: str = "mobilenet_v2"
    pretrained: bool = True
    amp: str = "none"
    sync_bn: bool = False
    workers: int = 4
    checkpoint_every: int = 1000
    log_every: int = 20
    seed: int = 0
    eval_batch_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def override(self, **values: Any) -> PipelineConfig:
        """A copy with the given fields replaced (``None`` values are ignored)."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}; known: {sorted(names)}")
        return replace(self, **{k: v for k, v in values.items() if v is not None})


CONFIGS = {
    "voc": PipelineConfig(dataset="voc", num_classes=21, crop=513, train_split="train_aug",
                          val_split="val"),
    "cityscapes": PipelineConfig(dataset="cityscapes", num_classes=19, crop=769,
                                 train_split="train", val_split="val", teacher_steps=90_000,
                                 student_steps=90_000, distill_steps=90_000,
                                 eval_batch_size=2),
}
