"""The examples' networks: the paper's MobileNetV2 student (DeepLab's head with the
image-level feature), CIRKD's benchmark networks (their parameter counts, dilations and a
training step), every architecture's declared feature maps, and the optimiser's parameter
groups."""

from __future__ import annotations

import doctest
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("torchvision")

sys.path.append(str(Path(__file__).resolve().parent.parent))  # for `examples`

from examples.segmentation import models
from examples.segmentation.models import MobileNetV2Seg, param_groups


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_student_has_the_papers_parameter_count():
    # DeepLab's MobileNetV2 head with the image-level feature; the paper's S1: 2.11 M at
    # 21 classes (table 1), 2.12 M on Pascal Context (table 4)
    voc = MobileNetV2Seg(21, pretrained=False)
    assert _count(voc) == 2_113_557
    assert abs(_count(voc) - 2.11e6) / 2.11e6 < 0.01
    assert round(_count(MobileNetV2Seg(59, pretrained=False)) / 1e6, 2) == 2.12
    assert _count(voc.image_pooling) == 320 * 256 + 2 * 256
    assert _count(voc.project) == 512 * 256 + 2 * 256


def test_student_eval_any_batch_and_size():
    torch.manual_seed(0)
    arch = models.STUDENTS["mobilenet_v2"]
    net = arch.build(21, False).eval()
    x = torch.randn(1, 3, 65, 47)
    with torch.no_grad():
        out = net(x)
        features = net.backbone(x)  # the student layer the distillation hooks
        pooled = net.image_pooling(features)
    assert out.shape == (1, 21, 65, 47) and torch.isfinite(out).all()
    # the student layer, at output stride 16
    assert arch.features.layer == "backbone"
    assert features.shape == (1, arch.features.channels, 5, 3)
    assert pooled.shape == (1, 256, 5, 3)
    assert torch.equal(pooled, pooled[..., :1, :1].expand_as(pooled))  # one value per image


def test_student_trains_a_step_through_every_branch():
    torch.manual_seed(0)
    net = MobileNetV2Seg(5, pretrained=False).train()
    opt = torch.optim.SGD(param_groups(net, 4e-5, no_decay_norm_bias=True), lr=0.01,
                          momentum=0.9)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32))
    y[:, :4] = 255
    logits = net(x)
    with torch.no_grad():
        torch.manual_seed(1)  # no random layer: a resumed run repeats an uninterrupted one
        assert torch.equal(net(x), logits)
    loss = F.cross_entropy(logits, y, ignore_index=255)
    head = {n: p.detach().clone() for n, p in net.named_parameters()
            if not n.startswith("backbone")}
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    for name, before in head.items():
        assert not torch.equal(before, net.get_parameter(name)), name
    assert net.image_pooling.bn.num_batches_tracked == 2


def test_student_training_batch_of_one_says_why():
    net = MobileNetV2Seg(21, pretrained=False).train()
    with pytest.raises(ValueError, match=r"at least 2 images per process in training mode.*"
                                         r"got a batch of 1.*--sync-bn.*eval mode"):
        net(torch.randn(1, 3, 32, 32))


def test_param_groups_exempt_norms_and_biases():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4), nn.Conv2d(4, 2, 1))
    net[5].requires_grad_(False)  # frozen: in no group
    plain = param_groups(net, 1e-4)
    assert len(plain) == 1 and plain[0]["weight_decay"] == 1e-4
    assert len(plain[0]["params"]) == 7
    decay, no_decay = param_groups(net, 1e-4, no_decay_norm_bias=True)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert ids(decay["params"]) == ids([net[0].weight, net[3].weight])
    assert ids(no_decay["params"]) == ids([net[1].weight, net[1].bias, net[3].bias,
                                           net[4].weight, net[4].bias])


def test_param_groups_decay_only_what_they_say():
    net = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))
    net[0].weight.data.fill_(1.0)
    net[1].weight.data.fill_(1.0)
    opt = torch.optim.SGD(param_groups(net, 0.1, no_decay_norm_bias=True), lr=1.0)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.allclose(net[0].weight, torch.full_like(net[0].weight, 0.9))
    assert torch.equal(net[1].weight, torch.ones(2))


def test_param_groups_cover_the_student_once():
    net = MobileNetV2Seg(21, pretrained=False)
    groups = param_groups(net, 4e-5, no_decay_norm_bias=True)
    assert sum(p.numel() for g in groups for p in g["params"]) == _count(net)
    norms = sum(p.numel() for m in net.modules() if isinstance(m, nn.BatchNorm2d)
                for p in m.parameters())
    assert sum(p.numel() for p in groups[1]["params"]) == norms + 21  # + classifier bias


def test_param_groups_shared_parameter_once_and_bad_decay():
    shared = nn.Linear(3, 3)
    net = nn.Sequential(shared, shared)
    assert len(param_groups(net, 0.0)[0]["params"]) == 2
    with pytest.raises(ValueError, match=r"weight_decay must be >= 0, got -1"):
        param_groups(net, -1.0)


def test_models_doctests():
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    output: list[str] = []
    tests = finder.find(models, "models", globs=vars(models))
    assert any(t.examples for t in tests)
    for test in tests:
        runner.run(test, out=output.append)
    assert runner.summarize(verbose=False).failed == 0, "".join(output)


ARCHITECTURES = [(table, name) for table in ("TEACHERS", "STUDENTS")
                 for name in getattr(models, table)]
BIG = {"deeplabv3_resnet50", "deeplabv3_resnet101", "segformer_mit_b4"}
"""Networks that a 32 x 32 input keeps fast on a CPU (the others run at 64 x 64)."""


def _image(name: str) -> torch.Tensor:
    if name.startswith("digits"):
        return torch.randn(2, 1, 48, 48)
    size = 32 if name in BIG else 64
    return torch.randn(2, 3, size, size)


@pytest.mark.parametrize("table,name", ARCHITECTURES)
def test_declared_feature_specs_match_the_networks(table, name):
    """Each architecture's FeatureSpecs, declared once, are what a forward reads (both
    readings of --teacher-layer, probed in one forward)."""
    from segdistill import FeatureSpec
    from segdistill.hooks import probe_features

    arch = getattr(models, table)[name]
    specs = {reading: arch.layer(reading) for reading in ("head", "backbone")}
    torch.manual_seed(0)
    net = arch.build(5, False)
    probed = probe_features(net, {r: FeatureSpec(s.layer) for r, s in specs.items()},
                            _image(name))
    assert probed == specs


CIRKD_NETWORKS = {
    # ours at 19 classes (Cityscapes); examples/README.md sets them beside CIRKD's
    "deeplabv3_resnet101": 58_630_483,
    "deeplabv3_resnet18": 13_310_675,
    "pspnet_resnet18": 12_622_035,
    "deeplabv3_mobilenet_v2": 3_233_171,
    "segformer_mit_b4": 64_007_635,
    "segformer_mit_b0": 3_719_027,
}


def _architecture(name: str) -> models.Architecture:
    return models.TEACHERS.get(name) or models.STUDENTS[name]


@pytest.mark.parametrize("name", sorted(CIRKD_NETWORKS))
def test_cirkd_networks_have_their_counts_and_train_a_step(name):
    from segdistill.hooks import select_output

    torch.manual_seed(0)
    net = _architecture(name).build(19, False).train()
    assert _count(net) == CIRKD_NETWORKS[name]
    image = _image(name)
    labels = torch.randint(0, 19, (2, *image.shape[-2:]))
    labels[:, :3] = 255
    logits = select_output(net(image))
    assert logits.shape == (2, 19, *image.shape[-2:])  # at the input's size, any stride
    F.cross_entropy(logits, labels, ignore_index=255).backward()
    # every parameter takes part (DDP fails on unused ones) and its gradient is finite
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def _plain_count(*modules: nn.Module) -> int:
    return sum(_count(m) for m in modules)


def test_parameter_counts_against_cirkds():
    """Ours plus what CIRKD's networks have and ours leave out (its auxiliary FCN head on
    layer3, trained with weight 0.4 and dropped at inference, and its deep stem) give the
    counts of CIRKD's tables: 61.1 M, 13.6 M, 12.9 M and 3.2 M."""
    def aux(channels: int) -> int:  # CIRKD's _FCNHead(channels, 19): 3x3 to a quarter
        return _plain_count(nn.Conv2d(channels, channels // 4, 3, bias=False),
                            nn.BatchNorm2d(channels // 4), nn.Conv2d(channels // 4, 19, 1))

    deep_stem = _plain_count(nn.Conv2d(3, 64, 3, bias=False), nn.BatchNorm2d(64),
                             nn.Conv2d(64, 64, 3, bias=False), nn.BatchNorm2d(64),
                             nn.Conv2d(64, 128, 3, bias=False), nn.BatchNorm2d(128))
    seven = _plain_count(nn.Conv2d(3, 64, 7, bias=False), nn.BatchNorm2d(64))
    # layer1's first block takes 128 channels instead of 64 (and so needs a downsample)
    basic = 128 * 64 * 9 - 64 * 64 * 9 + _plain_count(nn.Conv2d(128, 64, 1, bias=False),
                                                      nn.BatchNorm2d(64))
    bottleneck = 128 * 64 - 64 * 64 + 128 * 256 - 64 * 256
    assert deep_stem - seven + basic == 148_480  # examples/README.md
    resnet18 = deep_stem - seven + basic + aux(256)
    cirkd = {
        "deeplabv3_resnet101": CIRKD_NETWORKS["deeplabv3_resnet101"] + deep_stem - seven
        + bottleneck + aux(1024),
        "deeplabv3_resnet18": CIRKD_NETWORKS["deeplabv3_resnet18"] + resnet18,
        "pspnet_resnet18": CIRKD_NETWORKS["pspnet_resnet18"] + resnet18,
        "deeplabv3_mobilenet_v2": CIRKD_NETWORKS["deeplabv3_mobilenet_v2"],
    }
    assert cirkd == {"deeplabv3_resnet101": 61_118_950, "deeplabv3_resnet18": 13_607_974,
                     "pspnet_resnet18": 12_919_334, "deeplabv3_mobilenet_v2": 3_233_171}
    assert (aux(1024), aux(256), deep_stem - seven + bottleneck) == (2_364_691, 148_819,
                                                                     123_776)
    assert {k: round(v / 1e6, 1) for k, v in cirkd.items()} == {
        "deeplabv3_resnet101": 61.1, "deeplabv3_resnet18": 13.6, "pspnet_resnet18": 12.9,
        "deeplabv3_mobilenet_v2": 3.2}
    # SegFormer's paper counts at ADE20K's 150 classes (the classifier's rows and biases)
    for name, decoder, paper in (("segformer_mit_b0", 256, 3.8), ("segformer_mit_b4", 768, 64.1)):
        at_ade = CIRKD_NETWORKS[name] + (150 - 19) * (decoder + 1)
        assert at_ade == {"segformer_mit_b0": 3_752_694, "segformer_mit_b4": 64_108_374}[name]
        assert round(at_ade / 1e6, 1) == paper


def _dilations(stage: nn.Module) -> list[tuple[int, int]]:
    return [(m.stride[0], m.dilation[0]) for m in stage.modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]


def test_dilated_backbones_follow_cirkds():
    resnet = models.dilated_resnet18(pretrained=False)
    # gluon-cv's ResNetV1b as CIRKD builds it: (stride, dilation) of each 3x3 conv
    assert _dilations(resnet.layer2) == [(2, 1), (1, 1), (1, 1), (1, 1)]
    assert _dilations(resnet.layer3) == [(1, 1), (1, 2), (1, 2), (1, 2)]
    assert _dilations(resnet.layer4) == [(1, 2), (1, 4), (1, 4), (1, 4)]
    assert [m.stride for m in resnet.modules() if isinstance(m, nn.Conv2d)
            and m.kernel_size == (1, 1)] == [(2, 2), (1, 1), (1, 1)]  # the downsamples
    features = models.dilated_mobilenet_v2(pretrained=False)
    # CIRKD's MobileNetV2Dilated: blocks 7-13 at dilation 2, 14-17 at 4, the strided
    # convs (blocks 7 and 14) at stride 1 and half of it
    assert [_dilations(features[i]) for i in (4, 7, 8, 13, 14, 15, 17)] == [
        [(2, 1)], [(1, 1)], [(1, 2)], [(1, 2)], [(1, 2)], [(1, 4)], [(1, 4)]]
    with torch.no_grad():
        assert features(torch.zeros(1, 3, 64, 64)).shape == (1, 320, 8, 8)
        assert resnet(torch.zeros(1, 3, 64, 64)).shape == (1, 512, 8, 8)


def test_pyramid_pooling_keeps_the_input_and_adds_four_bins():
    torch.manual_seed(0)
    ppm = models.PyramidPooling(8).eval()
    x = torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        y = ppm(x)
    assert y.shape == (2, 16, 12, 12)
    assert torch.equal(y[:, :8], x)
    image = y[:, 8:10]  # the 1x1 bin: one value per image and channel
    assert torch.equal(image, image[..., :1, :1].expand_as(image))
    # the 2x2 bin, by hand: pool, 1x1 conv, BN, ReLU, upsample with the corners aligned
    grid = ppm.grids[0]
    plain = F.relu(grid[2](grid[1](F.adaptive_avg_pool2d(x, 2))))
    assert torch.allclose(y[:, 10:12], F.interpolate(plain, size=(12, 12), mode="bilinear",
                                                     align_corners=True))
    with pytest.raises(ValueError, match=r"divisible by 4, got 6"):
        models.PyramidPooling(6)


def test_segformer_loads_a_local_encoder_and_nothing_else(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    encoder = transformers.SegformerModel(transformers.SegformerConfig(**models.MIT_SIZES["b0"]))
    encoder.save_pretrained(tmp_path / "mit-b0")
    net = models.SegFormer("b0", 5, weights=str(tmp_path / "mit-b0"))
    loaded = net.net.segformer.state_dict()
    assert loaded.keys() == encoder.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in encoder.state_dict().items())
    assert net.net.decode_head.classifier.out_channels == 5
    small = transformers.SegformerConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 32, 64])
    transformers.SegformerModel(small).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"not MiT-B0's: expected .*'depths': \[2, 2, 2, 2\]"):
        models.SegFormer("b0", 5, weights=str(tmp_path / "other"))
    with pytest.raises(RuntimeError, match=r"MiT-B0 weights .* locally .*Nothing is "
                                           r"downloaded.*--no-pretrained"):
        models.SegFormer("b0", 5, weights=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"size must be one of \['b0', 'b4'\], got 'b2'"):
        models.SegFormer("b2", 5)


def test_every_library_preset_is_a_pipeline_method():
    from examples.segmentation.methods import METHODS, OPTIONS
    from segdistill.presets import PRESETS

    assert set(METHODS) == set(OPTIONS) == set(PRESETS)
