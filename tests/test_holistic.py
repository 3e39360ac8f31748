"""SKD's holistic term: the hinge losses against their formulas, the discriminator against a
plain float64 forward written from CIRKD's utils/sagan.py, and which parameters each loss
trains."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from segdistill.losses.holistic import (
    Discriminator,
    HolisticLoss,
    attach_discriminator_loss,
    discriminator_optimizer,
    holistic_discriminator_loss,
    holistic_generator_loss,
)

f64 = torch.float64


def _randn(g, *shape, grad=False):
    return torch.randn(*shape, generator=g, dtype=f64, requires_grad=grad)


# ------------------------------------------------------------------ plain references


def reference_generator(d_s):
    return -d_s.mean()


def reference_hinge(d_s, d_t):
    return torch.relu(1.0 - d_t).mean() + torch.relu(1.0 + d_s).mean()


def reference_sn_weight(weight, u0):
    """CIRKD's SpectralNorm._update_u_v: one power iteration from u0 on the detached
    matrix, then W / (u . W v) with the gradient through W only."""
    w = weight.flatten(1)
    v = F.normalize(w.detach().t() @ u0, dim=0, eps=1e-12)
    u = F.normalize(w.detach() @ v, dim=0, eps=1e-12)
    return weight / torch.dot(u, w @ v)


def reference_attention(x, att):
    """CIRKD's Self_Attn.forward, line by line."""
    b, c, h, w = x.shape
    q = F.conv2d(x, att.query.weight, att.query.bias).view(b, -1, h * w).permute(0, 2, 1)
    k = F.conv2d(x, att.key.weight, att.key.bias).view(b, -1, h * w)
    attention = torch.softmax(torch.bmm(q, k), dim=-1)
    v = F.conv2d(x, att.value.weight, att.value.bias).view(b, -1, h * w)
    out = torch.bmm(v, attention.permute(0, 2, 1)).view(b, c, h, w)
    return att.gamma * out + x


def reference_discriminator(disc, us, x):
    """CIRKD's Discriminator.forward in training mode (batch-norm on the batch's
    statistics, one power iteration per SN conv from the buffers ``us``)."""
    bn = disc.input_norm
    mean = x.mean((0, 2, 3), keepdim=True)
    var = x.var((0, 2, 3), unbiased=False, keepdim=True)
    x = (x - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) \
        + bn.bias.view(1, -1, 1, 1)
    convs = [disc.conv1, disc.conv2, disc.conv3, disc.conv4]
    for i, (conv, u0) in enumerate(zip(convs, us)):
        x = F.leaky_relu(F.conv2d(x, reference_sn_weight(conv.weight, u0), conv.bias, 2, 1), 0.1)
        if i == 2:
            x = reference_attention(x, disc.attention1)
        if i == 3:
            x = reference_attention(x, disc.attention2)
    return F.conv2d(x, disc.head.weight, disc.head.bias)


def _discriminator(num_classes, image_channels=0, width=2, seed=0):
    torch.manual_seed(seed)
    disc = Discriminator(num_classes, image_channels=image_channels, width=width).double()
    with torch.no_grad():  # gamma starts at 0: give the attention a part to play
        disc.attention1.gamma.fill_(0.7)
        disc.attention2.gamma.fill_(-0.4)
    return disc


# ------------------------------------------------------------------ the hinge losses


@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4), seed=st.integers(0, 2**16))
@settings(max_examples=15, deadline=None)
def test_losses_match_the_plain_formulas(shape, seed):
    g = torch.Generator().manual_seed(seed)
    d_s, d_t = _randn(g, *shape, grad=True), _randn(g, *shape, grad=True)
    for actual, expected in [(holistic_generator_loss(d_s), reference_generator(d_s)),
                             (holistic_discriminator_loss(d_s, d_t), reference_hinge(d_s, d_t))]:
        torch.testing.assert_close(actual, expected)
        for a, e in zip(torch.autograd.grad(actual, (d_s, d_t), allow_unused=True),
                        torch.autograd.grad(expected, (d_s, d_t), allow_unused=True)):
            if e is None:
                assert a is None
            else:
                torch.testing.assert_close(a, e)


def test_reductions_are_per_image():
    g = torch.Generator().manual_seed(1)
    d_s, d_t = _randn(g, 3, 1, 2, 5), _randn(g, 3, 1, 2, 5)
    per_image = holistic_discriminator_loss(d_s, d_t, reduction="none")
    assert per_image.shape == (3,)
    torch.testing.assert_close(per_image[1], reference_hinge(d_s[1], d_t[1]))
    torch.testing.assert_close(holistic_discriminator_loss(d_s, d_t, reduction="sum"),
                               per_image.sum())
    torch.testing.assert_close(holistic_generator_loss(d_s, reduction="none"),
                               -d_s.flatten(1).mean(1))


def test_gradcheck_losses():
    g = torch.Generator().manual_seed(2)
    # away from the hinge's kinks at +-1
    d_s = (_randn(g, 2, 1, 2, 2) * 0.3 - 1.5).requires_grad_()
    d_t = (_randn(g, 2, 1, 2, 2) * 0.3).requires_grad_()
    assert torch.autograd.gradcheck(holistic_discriminator_loss, (d_s, d_t))
    assert torch.autograd.gradcheck(holistic_generator_loss, (d_s,))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_nonfinite_score_makes_its_image_nan(bad):
    d_s, d_t = torch.zeros(2, 1, 1, 3), torch.full((2, 1, 1, 3), 5.0)
    d_t[1, 0, 0, 2] = bad  # relu(1 - inf) would be a finite 0
    per_image = holistic_discriminator_loss(d_s, d_t, reduction="none")
    assert per_image[0].item() == 1.0 and per_image[1].isnan()
    assert holistic_discriminator_loss(d_s, d_t).isnan()
    assert holistic_generator_loss(d_t).isnan()
    assert holistic_generator_loss(d_t, reduction="none")[0].item() == -5.0


# ------------------------------------------------------------------ the discriminator


@given(b=st.integers(1, 2), k=st.integers(1, 3), h=st.integers(64, 70), w=st.integers(64, 84),
       image_channels=st.sampled_from([0, 3]), seed=st.integers(0, 2**16))
@settings(max_examples=4, deadline=None)
def test_discriminator_matches_the_reference_forward(b, k, h, w, image_channels, seed):
    disc = _discriminator(k, image_channels, seed=seed % 100)
    g = torch.Generator().manual_seed(seed)
    x = _randn(g, b, k, h, w, grad=True)
    images = _randn(g, b, image_channels, h, w) if image_channels else None
    convs = [disc.conv1, disc.conv2, disc.conv3, disc.conv4]
    us = [conv.weight_u.clone() for conv in convs]
    actual = disc(x, images)
    inputs = x if images is None else torch.cat([x, images], 1)  # same grid: no resize
    expected = reference_discriminator(disc, us, inputs)
    torch.testing.assert_close(actual, expected)
    wrt = (x, disc.conv1.weight, disc.conv4.weight, disc.attention1.query.weight,
           disc.attention2.gamma, disc.head.weight, disc.input_norm.weight)
    for a, e in zip(torch.autograd.grad(actual.sum(), wrt),
                    torch.autograd.grad(expected.sum(), wrt)):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("size,out", [((64, 64), (1, 1)), ((80, 128), (2, 5))])
def test_architecture_and_output_size(size, out):
    disc = Discriminator(19, width=4)
    assert disc(torch.randn(2, 19, *size)).shape == (2, 1, *out)
    assert [c.out_channels for c in (disc.conv1, disc.conv2, disc.conv3, disc.conv4)] == \
        [4, 8, 16, 32]
    assert [(c.kernel_size, c.stride, c.padding) for c in (disc.conv1, disc.conv4)] == \
        [((4, 4), (2, 2), (1, 1))] * 2
    assert (disc.attention1.value.in_channels, disc.attention2.value.in_channels) == (16, 32)
    assert (disc.head.kernel_size, disc.head.padding, disc.head.out_channels) == ((4, 4), (0, 0), 1)
    assert not hasattr(disc.head, "weight_u")  # the last convolution is not normalised
    names = {n for n, _ in Discriminator(19).named_buffers()}
    assert {"conv1.weight_u", "conv4.weight_v", "input_norm.running_mean"} <= names
    reference = Discriminator(19)  # width 64: the reference's 256 and 512 attention channels
    assert (reference.attention1.value.in_channels, reference.attention2.value.in_channels) == \
        (256, 512)


def test_spectral_norm_bounds_each_convolution():
    torch.manual_seed(0)
    disc = Discriminator(3, width=4)
    convs = (disc.conv1, disc.conv2, disc.conv3, disc.conv4)
    for conv in convs:
        with torch.no_grad():  # a clear top singular value (2, then 1, 0.5, ...): fast to find
            u, _, vh = torch.linalg.svd(conv.weight.flatten(1), full_matrices=False)
            spectrum = 2.0 ** -torch.arange(-1, u.shape[1] - 1, dtype=torch.float32)
            conv.weight.copy_(((u * spectrum) @ vh).view_as(conv.weight))
        x = torch.randn(1, conv.in_channels, 4, 4)
        for _ in range(10):  # power iterations, one per training forward
            conv(x)
        matrix = conv.weight.flatten(1)
        sigma = torch.dot(conv.weight_u, matrix @ conv.weight_v)
        top = torch.linalg.matrix_norm(matrix / sigma, ord=2)
        torch.testing.assert_close(top, torch.tensor(1.0), rtol=1e-3, atol=0)
    before = disc.conv2.weight_u.clone()
    disc.eval()(torch.randn(1, 3, 64, 64))
    assert torch.equal(disc.conv2.weight_u, before)  # eval mode keeps the estimate


def test_images_are_resized_onto_the_map_and_condition_the_score():
    disc = _discriminator(4, image_channels=3)
    plain = _discriminator(7, image_channels=0)
    plain.load_state_dict(disc.state_dict())  # same weights, the image as 3 more classes
    g = torch.Generator().manual_seed(3)
    maps, images = _randn(g, 2, 4, 64, 80), torch.rand(2, 3, 256, 320, generator=g, dtype=f64)
    small = F.interpolate(images, size=(64, 80), mode="bilinear", align_corners=False,
                          antialias=True)
    disc.eval(), plain.eval()
    torch.testing.assert_close(disc(maps, images), plain(torch.cat([maps, small], 1)))
    assert not torch.allclose(disc(maps, images), disc(maps, images.flip(-1)))


# ------------------------------------------------------------------ the module


def _student_and_inputs(seed=0, k=3, size=(64, 64)):
    torch.manual_seed(seed)
    student = torch.nn.Conv2d(2, k, 3, padding=1)
    x = torch.randn(2, 2, *size)
    return student, student(x), torch.randn(2, k, *size)


def test_the_generator_term_trains_the_student_through_a_frozen_discriminator():
    student, s, t = _student_and_inputs()
    criterion = HolisticLoss(3, width=4)
    criterion(s, t).backward()
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in criterion.discriminator.parameters())
    assert all(p.requires_grad for p in criterion.discriminator.parameters())


def test_the_discriminator_loss_trains_the_discriminator_alone():
    student, s, t = _student_and_inputs()
    criterion = HolisticLoss(3, width=4)
    criterion.discriminator_loss(s, t).backward()
    assert student.weight.grad is None
    assert all(p.grad is not None for p in criterion.discriminator.parameters())
    assert criterion.discriminator.conv1.weight.grad.abs().sum() > 0


def test_module_equals_functional():
    _, s, t = _student_and_inputs()
    s, t = s.detach().double(), t.double()
    criterion = HolisticLoss(3, width=4, discriminator_weight=0.25).double()
    twin = copy.deepcopy(criterion.discriminator)  # same state, same power iterations
    torch.testing.assert_close(criterion(s, t), holistic_generator_loss(twin(s)))
    torch.testing.assert_close(criterion.discriminator_loss(s, t),
                               0.25 * holistic_discriminator_loss(twin(s), twin(t)))
    torch.testing.assert_close(criterion.discriminator.conv3.weight_u, twin.conv3.weight_u)


def test_one_backward_gives_each_side_the_gradient_of_its_own_loss():
    student, s, t = _student_and_inputs()
    criterion = HolisticLoss(3, width=4).eval()  # eval: no state changes between the calls
    generator, disc_loss = 0.001 * criterion(s, t), criterion.discriminator_loss(s, t)
    params = [student.weight, *criterion.discriminator.parameters()]
    alone = [torch.autograd.grad(generator, student.weight, retain_graph=True)[0],
             *torch.autograd.grad(disc_loss, list(criterion.discriminator.parameters()),
                                  retain_graph=True)]
    total = attach_discriminator_loss(generator, disc_loss)
    assert total.item() == generator.item()
    for together, own in zip(torch.autograd.grad(total, params), alone):
        torch.testing.assert_close(together, own)


def test_a_few_adam_steps_widen_the_gap_between_teacher_and_student():
    torch.manual_seed(0)
    criterion = HolisticLoss(4, width=4, discriminator_weight=1.0)
    optimizer = discriminator_optimizer(criterion.separately_optimized_parameters(), lr=4e-3)
    teacher = 8.0 * F.one_hot(torch.randint(0, 4, (2, 64, 64)), 4).permute(0, 3, 1, 2).float()
    student = torch.randn(2, 4, 64, 64)

    def gap():
        with torch.no_grad():
            return (criterion.discriminator(teacher).mean()
                    - criterion.discriminator(student).mean()).item()

    start, losses = gap(), []
    for _ in range(5):
        optimizer.zero_grad()
        loss = criterion.discriminator_loss(student, teacher)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert gap() > start + 1.0
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.5 * losses[0]


def test_conditional_module_takes_images_of_any_size():
    _, s, t = _student_and_inputs(size=(64, 72))
    criterion = HolisticLoss(3, image_channels=3, width=4)
    images = torch.rand(2, 3, 512, 576)
    assert criterion(s, t, images).isfinite()
    assert criterion.discriminator_loss(s, t, images).isfinite()
    assert criterion.discriminator.conv1.in_channels == 6


def test_grids_follow_resize_and_a_half_teacher_is_cast():
    _, s, _ = _student_and_inputs(size=(64, 64))
    t = torch.randn(2, 3, 128, 128, dtype=torch.float16)
    criterion = HolisticLoss(3, width=4, resize="teacher")
    assert criterion(s, t).dtype == torch.float32
    assert criterion.discriminator_loss(s, t).isfinite()
    with pytest.raises(ValueError, match=r"same H x W, got \(64, 64\) and \(128, 128\)"):
        HolisticLoss(3, width=4)(s, t)


def test_nan_logits_give_nan():
    _, s, t = _student_and_inputs()
    s = s.detach().clone()
    s[1, 0, 3, 3] = float("nan")
    criterion = HolisticLoss(3, width=4)
    assert criterion(s, t).isnan()
    assert criterion.discriminator_loss(s, t).isnan()


def test_float32_under_bf16_autocast():
    student, s, t = _student_and_inputs()
    criterion = HolisticLoss(3, width=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = student(torch.randn(2, 2, 64, 64))
        generator, disc_loss = criterion(s, t), criterion.discriminator_loss(s, t)
    for value in (generator, disc_loss):
        assert value.dtype == torch.float32 and value.isfinite()
    attach_discriminator_loss(generator, disc_loss).backward()
    assert student.weight.grad.dtype == torch.float32


def test_gradcheck_through_the_discriminator():
    torch.manual_seed(0)
    criterion = HolisticLoss(2, width=2).double().eval()
    with torch.no_grad():
        criterion.discriminator.attention1.gamma.fill_(0.5)
    base, t = torch.randn(1, 2, 64, 64, dtype=f64), torch.randn(1, 2, 64, 64, dtype=f64)
    where = torch.tensor([5, 700, 4100, 8000])  # a few logits, flat indices

    def generator(delta):
        return criterion(base.flatten().index_add(0, where, delta).view_as(base), t)

    assert torch.autograd.gradcheck(generator, (torch.zeros(4, dtype=f64, requires_grad=True),))


def test_pickle_state_dict_and_optimizer():
    criterion = HolisticLoss(3, image_channels=3, width=4, discriminator_weight=0.5)
    clone = pickle.loads(pickle.dumps(criterion))
    assert repr(clone) == repr(criterion)
    fresh = HolisticLoss(3, image_channels=3, width=4)
    fresh.load_state_dict(criterion.state_dict())
    assert torch.equal(fresh.discriminator.conv2.weight_v, criterion.discriminator.conv2.weight_v)
    optimizer = discriminator_optimizer(criterion.separately_optimized_parameters())
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in criterion.discriminator.parameters()}
    assert (optimizer.defaults["lr"], optimizer.defaults["betas"]) == (4e-4, (0.9, 0.99))
    assert "discriminator_weight=0.5, resize='none', reduction='mean'" in repr(criterion)


@pytest.mark.parametrize("call,error,match", [
    (lambda: holistic_generator_loss(torch.tensor(1.0)), ValueError,
     r"expected d_student with a batch dimension"),
    (lambda: holistic_generator_loss(torch.ones(2, 3, dtype=torch.long)), TypeError,
     r"floating-point dtype, got torch.int64"),
    (lambda: holistic_discriminator_loss(torch.ones(2, 1, 1, 3), torch.ones(2, 1, 1, 4)),
     ValueError, r"of one shape .* got \(2, 1, 1, 3\) and \(2, 1, 1, 4\)"),
    (lambda: holistic_discriminator_loss(torch.ones(2), torch.ones(2), reduction="avg"),
     ValueError, r"reduction must be one of 'none', 'mean', 'sum', got 'avg'"),
    (lambda: Discriminator(0), ValueError, r"num_classes must be a positive int"),
    (lambda: Discriminator(3, image_channels=-1), ValueError, r"image_channels must be at least 0"),
    (lambda: Discriminator(3, width=2.0), TypeError, r"width must be an int, got float"),
    (lambda: HolisticLoss(3, discriminator_weight=-1), ValueError,
     r"discriminator_weight must be at least 0.0, got -1.0"),
    (lambda: HolisticLoss(3, resize="both"), ValueError, r"resize must be one of"),
    (lambda: HolisticLoss(3, width=2)(torch.randn(1, 4, 64, 64), torch.randn(1, 4, 64, 64)),
     ValueError, r"expected maps with 3 channels \(one per class\), got 4"),
    (lambda: HolisticLoss(3, width=2)(torch.randn(1, 3, 64, 64), torch.randn(1, 4, 64, 64)),
     ValueError, r"same number of channels, got 3 and 4 \(one per class\)"),
    (lambda: HolisticLoss(3, width=2)(torch.randn(1, 3, 33, 65), torch.randn(1, 3, 33, 65)),
     ValueError, r"at least 64 x 64 for the discriminator .* got \(33, 65\)"),
    (lambda: HolisticLoss(3, width=2)(torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64),
                                      torch.rand(1, 3, 64, 64)),
     ValueError, r"built with image_channels=0 and takes no images"),
    (lambda: HolisticLoss(3, image_channels=3, width=2).discriminator_loss(
        torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)),
     ValueError, r"scores \(map, image\) pairs \(image_channels=3\): pass the input images"),
    (lambda: HolisticLoss(3, image_channels=3, width=2)(
        torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64), torch.rand(1, 1, 64, 64)),
     ValueError, r"expected images with 3 channels, got 1"),
    (lambda: HolisticLoss(3, image_channels=3, width=2)(
        torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64), torch.rand(1, 3, 64, 64)),
     ValueError, r"expected maps and images with the same batch size, got 2 and 1"),
    (lambda: discriminator_optimizer([], lr=0), ValueError, r"lr must be greater than 0.0"),
])
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_min_size_equals_the_loss_on_logits_upsampled_by_hand():
    torch.manual_seed(0)
    small = HolisticLoss(5, width=8, min_size=64)
    plain = HolisticLoss(5, width=8)
    plain.load_state_dict(small.state_dict())
    s = torch.randn(2, 5, 48, 40, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 48, 40, dtype=torch.float64)
    small.double()
    plain.double()
    up = torch.nn.functional.interpolate
    s_up = up(s, size=(77, 64), mode="bilinear", align_corners=False)  # 40 -> 64: x1.6
    t_up = up(t, size=(77, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(small(s, t), plain(s_up, t_up))
    grad = torch.autograd.grad(small(s, t), s)[0]
    s2 = s.detach().clone().requires_grad_()
    ref = torch.autograd.grad(plain(up(s2, size=(77, 64), mode="bilinear",
                                       align_corners=False), t_up), s2)[0]
    torch.testing.assert_close(grad, ref)
    torch.testing.assert_close(small.discriminator_loss(s, t), plain.discriminator_loss(s_up, t_up))
    big = torch.randn(2, 5, 64, 64, dtype=torch.float64)
    torch.testing.assert_close(small(big, big), plain(big, big))  # large enough: unchanged
    with pytest.raises(ValueError, match=r"min_size >= 64"):
        HolisticLoss(5, min_size=48)
