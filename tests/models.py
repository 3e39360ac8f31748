"""Small models the tests distil between (random weights, no downloads)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


def tiny_pair(num_classes: int = 5) -> tuple[nn.Module, nn.Module]:
    """A teacher at output stride 2 and a student at output stride 4, BN-free."""
    teacher = nn.Sequential(OrderedDict(
        stem=nn.Conv2d(3, 8, 3, stride=2, padding=1),
        act=nn.ReLU(),
        body=nn.Conv2d(8, 12, 3, padding=1),
        relu=nn.ReLU(),
        head=nn.Conv2d(12, num_classes, 1),
    ))
    student = nn.Sequential(OrderedDict(
        stem=nn.Conv2d(3, 4, 3, stride=2, padding=1),
        act=nn.ReLU(),
        down=nn.Conv2d(4, 6, 3, stride=2, padding=1),
        relu=nn.ReLU(),
        head=nn.Conv2d(6, num_classes, 1),
    ))
    return teacher, student


def tiny_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Four 16 x 16 images and labels on the tiny pair's logit grid (4 x 4), seeded."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 5, (4, 4, 4), generator=g)


def task_and_distillation_loss(model: nn.Module, x: torch.Tensor,
                               y: torch.Tensor) -> torch.Tensor:
    """A wrapper's (or a DDP/FSDP-wrapped wrapper's) distillation loss plus the student's
    cross-entropy on ``y``."""
    out = model(x)
    return out.loss + nn.functional.cross_entropy(out.output, y)


def mobilenet_v2_os16(num_classes: int = 21) -> nn.Module:
    """A MobileNetV2 student at output stride 16 (features up to the 96-channel stage)."""
    from torchvision.models import mobilenet_v2

    return nn.Sequential(OrderedDict(
        backbone=mobilenet_v2(weights=None).features[:14],
        classifier=nn.Conv2d(96, num_classes, 1),
    ))


def deeplabv3_teacher(num_classes: int = 21) -> nn.Module:
    from torchvision.models.segmentation import deeplabv3_resnet50

    return deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=num_classes)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
