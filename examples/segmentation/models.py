"""The networks: the paper's teacher (DeepLabV3-ResNet50, output stride 8) and students
(output stride 16), CIRKD's benchmark pairs (DeepLabV3-ResNet101 and SegFormer MiT-B4
teachers; DeepLabV3 and PSPNet on a dilated ResNet-18, DeepLabV3-MobileNetV2 and
SegFormer MiT-B0 students), and the small pair of the digit scenes (output strides 4
and 8).

Each architecture is named in :data:`TEACHERS` or :data:`STUDENTS` with the
module path of its last feature map (what the translator, the adapters and
the feature-based baselines read) and that map's channels. Every network returns
its logits as one tensor at the input's size.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
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


def deeplabv3_resnet101(num_classes: int, pretrained: bool = True) -> nn.Module:
    """torchvision's DeepLabV3-ResNet101, output stride 8, ASPP head (256 channels), no
    auxiliary head: CIRKD's teacher (58,630,483 parameters at 19 classes; CIRKD's count,
    61.1 M, includes its training-only auxiliary head on ``layer3``, 2.4 M, and its deep
    stem, examples/README.md)."""
    from torchvision.models import ResNet101_Weights
    from torchvision.models.segmentation import deeplabv3_resnet101 as build

    backbone = _weights(lambda: ResNet101_Weights.IMAGENET1K_V1, "ResNet-101") if pretrained \
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


def _dilate(conv: nn.Conv2d, dilation: int) -> None:
    """Make ``conv`` stride 1; a 3x3 one dilated by ``dilation``, padded to keep the grid."""
    conv.stride = (1, 1)
    if conv.kernel_size == (3, 3):
        conv.dilation, conv.padding = (dilation, dilation), (dilation, dilation)


def _dilate_stage(stage: Iterable[Any], dilation: int) -> None:
    """A stride-2 stage of torchvision's ResNet ``BasicBlock``\\ s at stride 1, dilated as
    CIRKD's dilated ResNet (gluon-cv's ``ResNetV1b``) does: the first block's first 3x3
    conv at half the stage's dilation, every other 3x3 conv at the full one."""
    for index, block in enumerate(stage):
        _dilate(block.conv1, dilation // 2 if index == 0 else dilation)
        _dilate(block.conv2, dilation)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)


def dilated_resnet18(pretrained: bool = True) -> nn.Sequential:
    """torchvision's ResNet-18 at output stride 8 (``layer3`` dilated 2, ``layer4`` 4), as
    CIRKD's students use it, without the pooling and the classifier: 11,176,512
    parameters, 512 channels out.

    CIRKD's ResNet-18 has a deep stem (three 3x3 convolutions to 128 channels) where
    torchvision's has one 7x7 convolution; torchvision's is kept, so that ImageNet
    weights come from torchvision (CIRKD's deep stem has 148,480 parameters more,
    examples/README.md).

    Args:
        pretrained: start from torchvision's ImageNet weights (``IMAGENET1K_V1``).
    """
    from torchvision.models import ResNet18_Weights, resnet18

    weights = _weights(lambda: ResNet18_Weights.IMAGENET1K_V1, "ResNet-18") if pretrained \
        else None
    net = resnet18(weights=weights)
    _dilate_stage(net.layer3, 2)
    _dilate_stage(net.layer4, 4)
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    return nn.Sequential(OrderedDict((name, getattr(net, name)) for name in names))


def dilated_mobilenet_v2(pretrained: bool = True) -> nn.Sequential:
    """torchvision's MobileNetV2 features at output stride 8, as CIRKD dilates them (its
    ``MobileNetV2Dilated``): blocks 7 to 13 dilated 2, blocks 14 on 4, each stage's
    strided conv at stride 1 and half the dilation; without the last 1x1 conv to 1280
    channels: 1,811,712 parameters, 320 channels out.

    Args:
        pretrained: start from torchvision's ImageNet weights (``IMAGENET1K_V1``).
    """
    from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

    weights = _weights(lambda: MobileNet_V2_Weights.IMAGENET1K_V1, "MobileNetV2") \
        if pretrained else None
    features: nn.Sequential = mobilenet_v2(weights=weights).features[:-1]
    for index, block in enumerate(features):
        if index < 7:
            continue
        dilation = 2 if index < 14 else 4
        for conv in block.modules():
            if isinstance(conv, nn.Conv2d):
                strided = conv.stride == (2, 2)
                if strided or conv.kernel_size == (3, 3):
                    _dilate(conv, dilation // 2 if strided else dilation)
    return features


def _fuse(in_channels: int, channels: int) -> nn.Sequential:
    """CIRKD's last block before the classifier: 3x3 conv, BN, ReLU, dropout 0.1. Its
    output is the map CIRKD distils (``x_feat_after_aspp``, PSPNet's ``feature``)."""
    return nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Dropout(0.1))


def deeplabv3_head(in_channels: int, num_classes: int, channels: int = 128) -> nn.Sequential:
    """CIRKD's DeepLabV3 head for its ResNet-18 and MobileNetV2 students: ASPP (rates 12,
    24, 36 and the image-level feature, ``channels`` each, projected to ``channels`` with
    dropout 0.5; torchvision's :class:`~torchvision.models.segmentation.deeplabv3.ASPP`),
    then :func:`_fuse` (``fuse``) and a 1x1 classifier.

    Shape:
        - Input: :math:`(B, C_{in}, H, W)`.
        - Output: :math:`(B, K, H, W)`.
    """
    from torchvision.models.segmentation.deeplabv3 import ASPP

    return nn.Sequential(OrderedDict(
        context=ASPP(in_channels, (12, 24, 36), channels),
        fuse=_fuse(channels, channels),
        classifier=nn.Conv2d(channels, num_classes, 1),
    ))


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling as CIRKD builds it: average pools to 1x1, 2x2, 3x3 and 6x6,
    each a 1x1 conv + BN + ReLU to a quarter of the channels, upsampled bilinearly
    (corners aligned) and concatenated after the input.

    The 1x1 bin is an :class:`ImagePooling` (training needs two images per process).

    Args:
        in_channels: :math:`C`, divisible by 4.

    Shape:
        - Input: :math:`(B, C, H, W)`.
        - Output: :math:`(B, 2C, H, W)`.
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        if in_channels % 4:
            raise ValueError(f"in_channels must be divisible by 4, got {in_channels}")
        out = in_channels // 4
        self.image_pooling = ImagePooling(in_channels, out)
        self.grids = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(bins), nn.Conv2d(in_channels, out, 1, bias=False),
                          nn.BatchNorm2d(out), nn.ReLU(inplace=True))
            for bins in (2, 3, 6))

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        maps = [x, self.image_pooling(x)]
        for grid in self.grids:  # a loop, not a comprehension: TorchScript exports it
            maps.append(F.interpolate(grid(x), size=size, mode="bilinear", align_corners=True))
        return torch.cat(maps, 1)


def pspnet_head(in_channels: int, num_classes: int, channels: int = 128) -> nn.Sequential:
    """CIRKD's PSPNet head for ResNet-18: :class:`PyramidPooling` (``context``), then
    :func:`_fuse` from :math:`2C` to ``channels`` (``fuse``) and a 1x1 classifier.

    Shape:
        - Input: :math:`(B, C_{in}, H, W)`.
        - Output: :math:`(B, K, H, W)`.
    """
    return nn.Sequential(OrderedDict(
        context=PyramidPooling(in_channels),
        fuse=_fuse(2 * in_channels, channels),
        classifier=nn.Conv2d(channels, num_classes, 1),
    ))


class Segmenter(nn.Module):
    """A backbone and a head; the head's logits upsampled bilinearly to the input's size.

    Args:
        backbone: image to features, :math:`(B, 3, H, W) \\to (B, C, H/s, W/s)`.
        head: features to logits, :math:`(B, C, h, w) \\to (B, K, h, w)`.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        logits = self.head(self.backbone(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def deeplabv3_resnet18(num_classes: int, pretrained: bool = True) -> Segmenter:
    """CIRKD's DeepLabV3-ResNet18 student: :func:`dilated_resnet18` (output stride 8) and
    :func:`deeplabv3_head` (128 channels); 13,310,675 parameters at 19 classes (CIRKD's
    13.6 M counts its training-only auxiliary head and its deep stem too)."""
    return Segmenter(dilated_resnet18(pretrained), deeplabv3_head(512, num_classes))


def pspnet_resnet18(num_classes: int, pretrained: bool = True) -> Segmenter:
    """CIRKD's PSPNet-ResNet18 student: :func:`dilated_resnet18` (output stride 8) and
    :func:`pspnet_head` (128 channels); 12,622,035 parameters at 19 classes (CIRKD's
    12.9 M counts its training-only auxiliary head and its deep stem too)."""
    return Segmenter(dilated_resnet18(pretrained), pspnet_head(512, num_classes))


def deeplabv3_mobilenet_v2(num_classes: int, pretrained: bool = True) -> Segmenter:
    """CIRKD's DeepLabV3-MobileNetV2 student: :func:`dilated_mobilenet_v2` (output stride
    8) and :func:`deeplabv3_head` (128 channels); 3,233,171 parameters at 19 classes, as
    CIRKD's (3.2 M)."""
    return Segmenter(dilated_mobilenet_v2(pretrained), deeplabv3_head(320, num_classes))


MIT_SIZES: dict[str, dict[str, Any]] = {
    "b0": {"depths": [2, 2, 2, 2], "hidden_sizes": [32, 64, 160, 256],
           "decoder_hidden_size": 256},
    "b4": {"depths": [3, 8, 27, 3], "hidden_sizes": [64, 128, 320, 512],
           "decoder_hidden_size": 768},
}
"""The SegFormer sizes (Xie et al., 2021; CIRKD's ``MiT_B0``, ``MiT_B4``) that differ from
``transformers.SegformerConfig``'s defaults (heads 1, 2, 5, 8; reduction ratios 8, 4, 2, 1;
MLP ratio 4; stochastic depth 0.1; layer-norm eps 1e-6)."""

MIT_WEIGHTS = {"b0": "nvidia/mit-b0", "b4": "nvidia/mit-b4"}
"""The ImageNet-pretrained MiT encoders that ``pretrained`` loads, from the local Hugging
Face cache only (nothing is downloaded)."""


class SegFormer(nn.Module):
    """SegFormer (``transformers.SegformerForSemanticSegmentation``), its 1/4-resolution
    logits upsampled bilinearly to the input's size, so that it returns what every network
    of the pipeline returns.

    Built from a ``SegformerConfig`` of :data:`MIT_SIZES` (random weights); with
    ``weights``, the MiT encoder is loaded from a local folder or a hub name in the local
    Hugging Face cache (``local_files_only``: never downloaded), and the decode head stays
    random. No dropout before the classifier, as CIRKD builds it. The map CIRKD distils is
    the decode head's fused map (``net.decode_head.activation``, stride 4); the encoder's
    last stage (``net.segformer.stages.3``, stride 32) is the backbone's.

    Args:
        size: ``'b0'`` or ``'b4'`` (:data:`MIT_SIZES`).
        num_classes: output classes.
        weights: the encoder's weights: a local folder saved by ``save_pretrained`` or a hub
            name already in the cache (``'nvidia/mit-b0'``); ``None``: random.

    Raises:
        ValueError: an unknown ``size``, or weights of another size.
        RuntimeError: the weights cannot be read locally (the message says what to do).
    """

    def __init__(self, size: str, num_classes: int, weights: str | None = None) -> None:
        super().__init__()
        from transformers import SegformerConfig, SegformerForSemanticSegmentation

        if size not in MIT_SIZES:
            raise ValueError(f"size must be one of {sorted(MIT_SIZES)}, got {size!r}")
        config = SegformerConfig(classifier_dropout_prob=0.0, semantic_loss_ignore_index=255,
                                 **MIT_SIZES[size])
        config.num_labels = num_classes
        self.net = SegformerForSemanticSegmentation(config)
        if weights is not None:
            self._load_encoder(size, weights)

    def _load_encoder(self, size: str, weights: str) -> None:
        from transformers import SegformerModel

        try:
            encoder = SegformerModel.from_pretrained(weights, local_files_only=True)
        except Exception as error:  # missing folder, not in the cache, unreadable files
            raise RuntimeError(
                f"could not load the ImageNet-pretrained MiT-{size.upper()} weights "
                f"{weights!r} locally ({error}). Nothing is downloaded: fetch them once "
                f"(huggingface-cli download {MIT_WEIGHTS[size]}) or give a local folder, or "
                "pass --no-pretrained to start from random weights"
            ) from error
        wanted = {k: list(v) for k, v in MIT_SIZES[size].items() if k != "decoder_hidden_size"}
        found = {k: list(getattr(encoder.config, k)) for k in wanted}
        if found != wanted:
            raise ValueError(f"the weights {weights!r} are not MiT-{size.upper()}'s: expected "
                             f"{wanted}, got {found}")
        self.net.segformer.load_state_dict(encoder.state_dict())

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.net(pixel_values=x).logits
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def segformer_mit_b4(num_classes: int, pretrained: bool = True) -> SegFormer:
    """SegFormer MiT-B4, CIRKD's transformer teacher (64,007,635 parameters at 19 classes;
    the SegFormer paper's 64.1 M is at ADE20K's 150); ``pretrained``: the encoder from
    ``nvidia/mit-b4`` in the local Hugging Face cache."""
    return SegFormer("b4", num_classes, MIT_WEIGHTS["b4"] if pretrained else None)


def segformer_mit_b0(num_classes: int, pretrained: bool = True) -> SegFormer:
    """SegFormer MiT-B0, CIRKD's transformer student (3,719,027 parameters at 19 classes;
    the SegFormer paper's 3.8 M is at ADE20K's 150); ``pretrained``: the encoder from
    ``nvidia/mit-b0`` in the local Hugging Face cache."""
    return SegFormer("b0", num_classes, MIT_WEIGHTS["b0"] if pretrained else None)


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
        >>> TEACHERS["segformer_mit_b4"].layer("backbone")  # the encoder's last stage
        FeatureSpec(layer='net.segformer.stages.3', channels=512, stride=32)
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


# CIRKD's students: the map after the head's 3x3 conv, BN, ReLU and dropout (head.fuse)
_RESNET18 = FeatureSpec("backbone.layer4", 512, 8)
TEACHERS = {
    # classifier = DeepLabHead: ASPP, 3x3 conv (256), BN, ReLU (index 3), 1x1 classifier
    "deeplabv3_resnet50": Architecture(deeplabv3_resnet50, FeatureSpec("classifier.3", 256, 8),
                                       backbone=FeatureSpec("backbone.layer4", 2048, 8)),
    "deeplabv3_resnet101": Architecture(deeplabv3_resnet101,
                                        FeatureSpec("classifier.3", 256, 8),
                                        backbone=FeatureSpec("backbone.layer4", 2048, 8)),
    # the decode head's fused map (stride 4), and the encoder's last stage (stride 32)
    "segformer_mit_b4": Architecture(segformer_mit_b4,
                                     FeatureSpec("net.decode_head.activation", 768, 4),
                                     backbone=FeatureSpec("net.segformer.stages.3", 512, 32)),
    "digits_os4": Architecture(digits_os4, FeatureSpec("features", 64, 4)),
}
"""Teachers by name."""
STUDENTS = {
    "mobilenet_v2": Architecture(MobileNetV2Seg, FeatureSpec("backbone", 320, 16)),
    "lraspp": Architecture(lraspp, FeatureSpec("backbone.16", 960, 16)),
    "deeplabv3_resnet18": Architecture(deeplabv3_resnet18, FeatureSpec("head.fuse", 128, 8),
                                       backbone=_RESNET18),
    "pspnet_resnet18": Architecture(pspnet_resnet18, FeatureSpec("head.fuse", 128, 8),
                                    backbone=_RESNET18),
    "deeplabv3_mobilenet_v2": Architecture(deeplabv3_mobilenet_v2,
                                           FeatureSpec("head.fuse", 128, 8),
                                           backbone=FeatureSpec("backbone", 320, 8)),
    "segformer_mit_b0": Architecture(segformer_mit_b0,
                                     FeatureSpec("net.decode_head.activation", 256, 4),
                                     backbone=FeatureSpec("net.segformer.stages.3", 256, 32)),
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
