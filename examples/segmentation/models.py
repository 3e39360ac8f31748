"""The networks: the paper's teacher (DeepLabV3-ResNet50, output stride 8) and students
(output stride 16), and the small pair of the digit scenes (output strides 4 and 8).

Each architecture is named in :data:`TEACHERS` or :data:`STUDENTS` with the
module path of its last feature map (what the translator, the adapters and
the feature-based baselines read) and that map's channels.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from examples.segmentation.config import TeacherLayer
from segdistill import FeatureSpec


def _weights(load: Callable[[], Any], what: str) -> Any:
    """Resolve torchvision weights, failing with a message that says what to do offline."""
    try:
        weights = load()
        weights.get_state_dict(progress=False)  # download now, not deep inside a constructor
        return weights
    except Exception as error:  # urllib / ssl / OS errors all mean the same to the user
        raise RuntimeError(
            f"could not load the ImageNet-pretrained {what} weights ({error}). Without "
            "network access, copy the file into $TORCH_HOME/hub/checkpoints/ (see "
            "examples/README.md), or pass --no-pretrained to start from random weights"
        ) from error


def deeplabv3_resnet50(num_classes: int, pretrained: bool = True) -> nn.Module:
    """torchvision's DeepLabV3-ResNet50, output stride 8, ASPP head, no auxiliary head."""
    from torchvision.models import ResNet50_Weights
    from torchvision.models.segmentation import deeplabv3_resnet50 as build

    backbone = _weights(lambda: ResNet50_Weights.IMAGENET1K_V1, "ResNet-50") if pretrained \
        else None
    net: nn.Module = build(weights=None, weights_backbone=backbone, num_classes=num_classes,
                           aux_loss=False)
    return net


class ImagePooling(nn.Module):
    """DeepLab's image-level feature: global average pool, 1x1 conv + BN + ReLU, broadcast.

    Batch norm here sees one value per channel and image (the pooled map is 1x1), so in
    training mode it needs at least two images per process, or SyncBatchNorm across
    processes; eval mode runs at any batch size. A training batch of one image fails with
    a ``ValueError`` that says so, instead of batch norm's bare "Expected more than 1 value
    per channel".

    Args:
        in_channels: channels of the input features.
        out_channels: channels of the image-level feature.

    Shape:
        - Input: :math:`(B, C_{in}, H, W)`.
        - Output: :math:`(B, C_{out}, H, W)`, constant over :math:`H, W`.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and x.shape[0] == 1 and isinstance(self.bn, nn.BatchNorm2d):
            raise ValueError(
                "the image-pooling branch needs at least 2 images per process in training "
                "mode (batch norm on a 1x1 pooled map of one image has a single value per "
                "channel), got a batch of 1: use a larger batch, SyncBatchNorm across "
                "processes (--sync-bn), or eval mode"
            )
        y: Tensor = self.relu(self.bn(self.conv(self.pool(x))))
        return y.expand(-1, -1, x.shape[2], x.shape[3])  # = bilinear upsampling of a 1x1 map


class MobileNetV2Seg(nn.Module):
    """MobileNetV2 at output stride 16 with DeepLab's MobileNetV2 head (the paper's S1).

    The last stride-2 stage is turned into a dilated one (stride 1, dilation 2),
    so the 320-channel features sit at output stride 16. The head is DeepLabV3's
    light ASPP for MobileNetV2, as in DeepLab's code: a 1x1 conv + BN + ReLU to 256
    channels beside the image-level feature (:class:`ImagePooling`, 256 channels),
    concatenated (image feature first), projected by a 1x1 conv + BN + ReLU to 256,
    and a 1x1 classifier; no atrous branches, no decoder. Logits are upsampled
    bilinearly to the input's size. 2,113,557 parameters at 21 classes (the paper's
    table 1 gives 2.11 M for S1). DeepLab's code also drops out 10 % after the
    projection; it is left out here because the trainer does not checkpoint the
    global random state, and a resumed run must repeat the uninterrupted one.

    Training needs at least two images per process (see :class:`ImagePooling`).

    Args:
        num_classes: output classes.
        pretrained: start the backbone from torchvision's ImageNet weights.
    """

    def __init__(self, num_classes: int, pretrained: bool = True) -> None:
        super().__init__()
        from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

        weights = _weights(lambda: MobileNet_V2_Weights.IMAGENET1K_V1, "MobileNetV2") \
            if pretrained else None
        features = mobilenet_v2(weights=weights).features[:-1]  # drop the 1280-channel conv
        for block in features[14:]:  # the last stride-2 stage and what follows it
            for module in block.modules():
                if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3):
                    module.stride, module.dilation, module.padding = (1, 1), (2, 2), (2, 2)
        self.backbone = features
        self.image_pooling = ImagePooling(320, 256)
        self.branch = nn.Sequential(
            nn.Conv2d(320, 256, 1, bias=False), nn.BatchNorm2d(256), nn.ReLU(inplace=True))
        self.project = nn.Sequential(
            nn.Conv2d(512, 256, 1, bias=False), nn.BatchNorm2d(256), nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(256, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        features = self.backbone(x)
        y = self.project(torch.cat([self.image_pooling(features), self.branch(features)], 1))
        logits = self.classifier(y)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def lraspp(num_classes: int, pretrained: bool = True) -> nn.Module:
    """torchvision's LR-ASPP MobileNetV3-Large (output stride 16)."""
    from torchvision.models import MobileNet_V3_Large_Weights
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    weights = _weights(lambda: MobileNet_V3_Large_Weights.IMAGENET1K_V1,
                       "MobileNetV3-Large") if pretrained else None
    net: nn.Module = lraspp_mobilenet_v3_large(weights=None, weights_backbone=weights,
                                               num_classes=num_classes)
    return net


def _conv(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation,
                  bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SmallFCN(nn.Module):
    """An FCN: a feature extractor, a 1x1 classifier, bilinear upsampling to the input size."""

    def __init__(self, features: nn.Module, channels: int, num_classes: int) -> None:
        super().__init__()
        self.features = features
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.classifier(self.features(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def digits_os4(num_classes: int = 11, pretrained: bool = False) -> SmallFCN:
    """The digit scenes' teacher: wide, output stride 4, dilated context layers (0.14 M
    parameters). Nothing is pretrained."""
    features = nn.Sequential(OrderedDict(
        stem=_conv(1, 32, stride=2),
        conv=_conv(32, 32),
        down=_conv(32, 64, stride=2),
        context1=_conv(64, 64, dilation=2),
        context2=_conv(64, 64, dilation=4),
        context3=_conv(64, 64, dilation=2),
    ))
    return SmallFCN(features, 64, num_classes)


def digits_os8(num_classes: int = 11, pretrained: bool = False) -> SmallFCN:
    """The digit scenes' student: thin, output stride 8 (0.04 M parameters)."""
    features = nn.Sequential(OrderedDict(
        stem=_conv(1, 16, stride=2),
        down1=_conv(16, 32, stride=2),
        down2=_conv(32, 48, stride=2),
        conv=_conv(48, 48),
    ))
    return SmallFCN(features, 48, num_classes)


@dataclass(frozen=True)
class Architecture:
    """A network the pipeline builds, and its feature maps for distillation, each declared
    once as a :class:`~segdistill.FeatureSpec` (layer path, channels, output stride).

    Example:
        >>> TEACHERS["deeplabv3_resnet50"].layer("head")
        FeatureSpec(layer='classifier.3', channels=256, stride=8)
        >>> TEACHERS["deeplabv3_resnet50"].layer("backbone")
        FeatureSpec(layer='backbone.layer4', channels=2048, stride=8)
        >>> TEACHERS["digits_os4"].layer("backbone")  # no head: both readings agree
        FeatureSpec(layer='features', channels=64, stride=4)
    """

    build: Callable[[int, bool], nn.Module]
    """``build(num_classes, pretrained)``."""
    features: FeatureSpec
    """The last feature map before the classifier (the head's output)."""
    backbone: FeatureSpec | None = None
    """The backbone's last feature map, where a head with convolutions of its own follows
    it (None: the same as ``features``)."""

    def layer(self, reading: TeacherLayer) -> FeatureSpec:
        """The feature map a reading of "the last feature maps" names: ``'head'``, the
        last before the classifier, or ``'backbone'``, the backbone's last (the pipeline's
        ``--teacher-layer``)."""
        if reading not in get_args(TeacherLayer):
            raise ValueError(f"reading must be one of {get_args(TeacherLayer)}, got {reading!r}")
        if reading == "backbone" and self.backbone is not None:
            return self.backbone
        return self.features


TEACHERS = {
    # classifier = DeepLabHead: ASPP, 3x3 conv (256), BN, ReLU (index 3), 1x1 classifier
    "deeplabv3_resnet50": Architecture(deeplabv3_resnet50, FeatureSpec("classifier.3", 256, 8),
                                       backbone=FeatureSpec("backbone.layer4", 2048, 8)),
    "digits_os4": Architecture(digits_os4, FeatureSpec("features", 64, 4)),
}
"""Teachers by name."""
STUDENTS = {
    "mobilenet_v2": Architecture(MobileNetV2Seg, FeatureSpec("backbone", 320, 16)),
    "lraspp": Architecture(lraspp, FeatureSpec("backbone.16", 960, 16)),
    "digits_os8": Architecture(digits_os8, FeatureSpec("features", 48, 8)),
}
"""Students by name."""


def param_groups(model: nn.Module, weight_decay: float,
                 no_decay_norm_bias: bool = False) -> list[dict[str, Any]]:
    """Optimiser parameter groups with ``weight_decay``, optionally none on norms and biases.

    Only trainable parameters (``requires_grad``) are returned, each once. With
    ``no_decay_norm_bias``, the affine parameters of normalisation layers (batch,
    group, layer, instance norm and their synced forms) and every bias go to a
    group with weight decay 0, as in torchvision's classification references;
    everything else keeps ``weight_decay``. Empty groups are left out.

    Args:
        model: the model whose parameters to group.
        weight_decay: the decay of the decayed group.
        no_decay_norm_bias: exempt normalisation parameters and biases from decay.

    Returns:
        A list for ``torch.optim`` constructors: ``[{"params": [...], "weight_decay":
        weight_decay}, {"params": [...], "weight_decay": 0.0}]``.

    Raises:
        ValueError: if ``weight_decay`` is negative.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        >>> groups = param_groups(net, 4e-5, no_decay_norm_bias=True)
        >>> [(len(g["params"]), g["weight_decay"]) for g in groups]
        [(1, 4e-05), (3, 0.0)]
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    norms = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
             nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            exempt = no_decay_norm_bias and (isinstance(module, norms) or name == "bias")
            (no_decay if exempt else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
