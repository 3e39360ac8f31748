"""The demo's teacher (output stride 4) and student (output stride 8)."""

from __future__ import annotations

from collections import OrderedDict

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["STUDENT_FEATURES", "TEACHER_FEATURES", "DemoSegmenter", "student", "teacher"]

TEACHER_FEATURES = "features"
"""Path of the teacher's last feature map (64 channels at output stride 4)."""
STUDENT_FEATURES = "features"
"""Path of the student's last feature map (48 channels at output stride 8)."""


def _conv(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation,
                  bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class DemoSegmenter(nn.Module):
    """An FCN: a feature extractor, a 1x1 classifier, bilinear upsampling to the input size."""

    def __init__(self, features: nn.Module, channels: int, num_classes: int) -> None:
        super().__init__()
        self.features = features
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.classifier(self.features(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def teacher(num_classes: int = 11) -> DemoSegmenter:
    """A wide teacher at output stride 4 with dilated context layers (~0.15 M parameters)."""
    features = nn.Sequential(OrderedDict(
        stem=_conv(1, 32, stride=2),
        conv=_conv(32, 32),
        down=_conv(32, 64, stride=2),
        context1=_conv(64, 64, dilation=2),
        context2=_conv(64, 64, dilation=4),
        context3=_conv(64, 64, dilation=2),
    ))
    return DemoSegmenter(features, 64, num_classes)


def student(num_classes: int = 11) -> DemoSegmenter:
    """A thin student at output stride 8 (~0.04 M parameters)."""
    features = nn.Sequential(OrderedDict(
        stem=_conv(1, 16, stride=2),
        down1=_conv(16, 32, stride=2),
        down2=_conv(32, 48, stride=2),
        conv=_conv(48, 48),
    ))
    return DemoSegmenter(features, 48, num_classes)
