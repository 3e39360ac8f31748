"""The paper's teacher (DeepLabV3-ResNet50, output stride 8) and students (output stride 16)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

TEACHER_LAYER = "backbone.layer4"
TEACHER_CHANNELS = 2048
# student name -> (feature path, channels)
STUDENT_LAYERS = {"mobilenet_v2": ("backbone", 320), "lraspp": ("backbone.16", 960)}


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


def teacher(num_classes: int, pretrained: bool = True) -> nn.Module:
    """torchvision's DeepLabV3-ResNet50, output stride 8, ASPP head, no auxiliary head."""
    from torchvision.models import ResNet50_Weights
    from torchvision.models.segmentation import deeplabv3_resnet50

    backbone = _weights(lambda: ResNet50_Weights.IMAGENET1K_V1, "ResNet-50") if pretrained \
        else None
    return deeplabv3_resnet50(weights=None, weights_backbone=backbone, num_classes=num_classes,
                              aux_loss=False)


class MobileNetV2Seg(nn.Module):
    """MobileNetV2 at output stride 16 with the light head of the MobileNetV2 paper.

    The last stride-2 stage is turned into a dilated one (stride 1, dilation 2),
    so the 320-channel features sit at output stride 16; the head is a 1x1
    conv + BN + ReLU to 256 channels and a 1x1 classifier (no ASPP, no
    decoder). Logits are upsampled bilinearly to the input's size.
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
        self.head = nn.Sequential(
            nn.Conv2d(320, 256, 1, bias=False), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
            nn.Conv2d(256, num_classes, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        logits = self.head(self.backbone(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def student(name: str, num_classes: int, pretrained: bool = True) -> nn.Module:
    """``'mobilenet_v2'`` (the paper's) or ``'lraspp'`` (torchvision's LR-ASPP MobileNetV3)."""
    if name == "mobilenet_v2":
        return MobileNetV2Seg(num_classes, pretrained)
    if name == "lraspp":
        from torchvision.models import MobileNet_V3_Large_Weights
        from torchvision.models.segmentation import lraspp_mobilenet_v3_large

        weights = _weights(lambda: MobileNet_V3_Large_Weights.IMAGENET1K_V1,
                           "MobileNetV3-Large") if pretrained else None
        return lraspp_mobilenet_v3_large(weights=None, weights_backbone=weights,
                                         num_classes=num_classes)
    raise ValueError(f"student must be one of {sorted(STUDENT_LAYERS)}, got {name!r}")
