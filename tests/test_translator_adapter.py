"""Translator and Adapter: shapes, round trips, gradients, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from segdistill import Adapter, Translator


@given(h=st.integers(1, 20), w=st.integers(1, 20))
def test_translator_round_trips_any_size(h, w):
    translator = Translator(3, latent_channels=2, num_layers=2)
    out = translator(torch.randn(2, 3, h, w))
    assert out.reconstruction.shape == (2, 3, h, w)
    assert out.latent.shape == (2, 2, (h + 1) // 2, (w + 1) // 2)


def test_translator_lands_on_the_student_grid():
    """A 513 x 513 input: teacher at OS 8 gives 65 x 65, the student at OS 16 33 x 33."""
    translator = Translator(16)
    latent = translator.encode(torch.randn(1, 16, 65, 65))
    assert latent.shape == (1, 16, 33, 33)


def test_translator_architecture():
    t = Translator(8, latent_channels=4)
    convs = [m for m in t.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    deconvs = [m for m in t.decoder.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [c.stride for c in convs] == [(2, 2), (1, 1), (1, 1)]
    assert [d.stride for d in deconvs] == [(1, 1), (1, 1), (2, 2)]
    assert all(c.kernel_size == (3, 3) for c in convs + deconvs)
    assert deconvs[-1].out_channels == 8 and convs[0].out_channels == 4
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in t.modules()) == 6
    assert repr(t).startswith("Translator(\n  in_channels=8, latent_channels=4, num_layers=3")


def test_translator_learns_to_reconstruct():
    """A few SGD steps reduce the reconstruction error: the decoder really inverts."""
    from segdistill import reconstruction_loss

    torch.manual_seed(0)
    translator = Translator(4)
    features = torch.rand(8, 4, 9, 9)
    opt = torch.optim.SGD(translator.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(30):
        out = translator(features)
        loss = reconstruction_loss(features, out.reconstruction, out.latent)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_decode_output_size_checks():
    t = Translator(2)
    z = torch.randn(1, 2, 5, 5)
    assert t.decode(z).shape[-2:] == (10, 10)
    assert t.decode(z, (9, 10)).shape[-2:] == (9, 10)
    with pytest.raises(ValueError, match=r"output_size \(12, 10\) cannot be decoded from a "
                                         r"5 x 5 code; expected \(9 or 10, 9 or 10\)"):
        t.decode(z, (12, 10))


def test_adapter_shapes_and_layers():
    adapter = Adapter(5, 7, num_layers=1)
    assert adapter(torch.randn(2, 5, 3, 4)).shape == (2, 7, 3, 4)
    assert len(Adapter(5, 7).layers) == 3
    assert repr(Adapter(5, 7)).startswith("Adapter(\n  in_channels=5, out_channels=7, num_layers=3")


@pytest.mark.parametrize(
    "factory,x",
    [
        (lambda: Translator(3, 2), torch.randn(2, 3, 5, 4, dtype=torch.float64)),
        (lambda: Adapter(3, 2, num_layers=2), torch.randn(2, 3, 3, 3, dtype=torch.float64)),
    ],
)
def test_gradcheck(factory, x):
    torch.manual_seed(0)
    module = factory().double().eval()
    # random BN statistics so eval mode is not the identity
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)

    def fn(inp):
        out = module(inp)
        return out.reconstruction if isinstance(out, tuple) else out

    x.requires_grad_()
    assert torch.autograd.gradcheck(fn, (x,))


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: Translator(0), ValueError, r"in_channels must be a positive int, got 0"),
        (lambda: Translator(4, latent_channels=2.5), TypeError,
         r"latent_channels must be an int, got float"),
        (lambda: Adapter(4, 4, num_layers=0), ValueError, r"num_layers must be a positive int"),
        (lambda: Translator(4)(torch.randn(1, 3, 8, 8)), ValueError,
         r"expected translator input with 4 channels, got 3"),
        (lambda: Translator(4).decode(torch.randn(1, 3, 8, 8)), ValueError,
         r"expected latent code with 4 channels, got 3"),
        (lambda: Translator(4)(torch.randn(4, 8, 8)), ValueError,
         r"expected translator input of shape \(B, C, H, W\), got a 3-D tensor"),
        (lambda: Adapter(4, 2)(torch.randn(1, 5, 8, 8)), ValueError,
         r"expected adapter input with 4 channels, got 5"),
        (lambda: Adapter(4, 2)(torch.ones(1, 4, 8, 8, dtype=torch.uint8)), TypeError,
         r"expected adapter input to have a floating-point dtype, got torch.uint8"),
    ],
)
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
