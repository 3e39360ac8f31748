"""The examples' MobileNetV2 student (DeepLab's head with the image-level feature) and the
optimiser's parameter groups."""

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


@pytest.mark.parametrize("table,name,reading", [
    ("TEACHERS", "deeplabv3_resnet50", "head"), ("TEACHERS", "deeplabv3_resnet50", "backbone"),
    ("TEACHERS", "digits_os4", "head"), ("STUDENTS", "mobilenet_v2", "head"),
    ("STUDENTS", "lraspp", "head"), ("STUDENTS", "digits_os8", "head"),
])
def test_declared_feature_specs_match_the_networks(table, name, reading):
    """Each architecture's FeatureSpec, declared once, is what a forward reads."""
    from segdistill import FeatureSpec
    from segdistill.hooks import probe_features

    arch = getattr(models, table)[name]
    spec = arch.layer(reading)
    torch.manual_seed(0)
    net = arch.build(5, False)
    size = 48 if name.startswith("digits") else 64
    image = torch.randn(2, 1 if name.startswith("digits") else 3, size, size)
    probed = probe_features(net, {"f": FeatureSpec(spec.layer)}, image)["f"]
    assert probed == spec


def test_every_library_preset_is_a_pipeline_method():
    from examples.segmentation.methods import METHODS, NOT_YET, OPTIONS
    from segdistill.presets import PRESETS

    assert set(METHODS) == set(OPTIONS) == set(PRESETS) - set(NOT_YET)
    assert set(NOT_YET) <= set(PRESETS)
