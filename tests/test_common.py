"""Properties every loss and module shares: module == functional, pickling,
state_dict round trips, autocast, torch.compile, devices and dtypes."""

from __future__ import annotations

import io
import pickle

import pytest
import torch

import segdistill as sd


# (module factory, functional twin, kwargs for both, input factory)
def _pair(cs, ct, hs=5, ws=4, ht=None, wt=None):
    return lambda dt, dev: (torch.randn(2, cs, hs, ws, dtype=dt, device=dev),
                            torch.randn(2, ct, ht or hs, wt or ws, dtype=dt, device=dev))


LOSSES = {
    "affinity": (sd.AffinityLoss, sd.affinity_loss, {"distance": "squared", "reduction": "sum"},
                 _pair(6, 3)),
    "affinity_dense": (sd.AffinityLoss, sd.affinity_loss, {"method": "dense", "chunk_size": 3},
                       _pair(6, 3)),
    "adaptation": (sd.AdaptationLoss, sd.adaptation_loss, {"p": 2.0, "normalize": "sample"},
                   _pair(6, 6)),
    "reconstruction": (
        sd.ReconstructionLoss, sd.reconstruction_loss, {"alpha": 0.01, "reduction": "none"},
        lambda dt, dev: (torch.randn(2, 6, 6, 4, dtype=dt, device=dev),
                         torch.randn(2, 6, 6, 4, dtype=dt, device=dev),
                         torch.randn(2, 6, 3, 2, dtype=dt, device=dev)),
    ),
    "kd": (sd.KDLoss, sd.kd_loss, {"temperature": 2.0}, _pair(5, 5, 3, 3, 6, 6)),
    "fitnet": (lambda **kw: sd.FitNetLoss(4, 4, **kw), sd.fitnet_loss, {"reduction": "sum"},
               _pair(4, 4, 3, 3, 6, 6)),
    "attention": (sd.AttentionTransferLoss, sd.attention_transfer_loss, {"p": 3.0},
                  _pair(3, 7)),
    "pairwise": (sd.PairwiseLoss, sd.pairwise_loss, {"patch_size": 2}, _pair(3, 7)),
    "cwd": (sd.CWDLoss, sd.cwd_loss, {"temperature": 2.0}, _pair(4, 4)),
}


@pytest.fixture(params=sorted(LOSSES))
def loss_case(request):
    return LOSSES[request.param]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_module_equals_functional(loss_case, dtype, device):
    module_cls, fn, kwargs, make = loss_case
    inputs = make(dtype, device)
    module_out = module_cls(**kwargs)(*inputs)
    assert module_out.dtype == dtype and module_out.device.type == device.type
    torch.testing.assert_close(module_out, fn(*inputs, **kwargs), rtol=0, atol=0)


def test_half_inputs_compute_in_float32(loss_case):
    module_cls, _, kwargs, make = loss_case
    inputs64 = make(torch.float64, "cpu")
    out_half = module_cls(**kwargs)(*(x.bfloat16() for x in inputs64))
    assert out_half.dtype == torch.float32
    assert torch.isfinite(out_half).all()
    # the same loss on the bf16-rounded values, in float64, agrees to float32 accuracy
    rounded = [x.bfloat16().double() for x in inputs64]
    torch.testing.assert_close(out_half.double(), module_cls(**kwargs)(*rounded),
                               rtol=1e-4, atol=1e-5)


def test_under_autocast_bf16(loss_case):
    module_cls, _, kwargs, make = loss_case
    inputs = [x.requires_grad_() for x in make(torch.float32, "cpu")]
    conv = torch.nn.Conv2d(inputs[0].shape[1], inputs[0].shape[1], 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = conv(inputs[0])  # a bf16 activation, as a student under autocast gives
        assert first.dtype == torch.bfloat16
        out = module_cls(**kwargs)(first, *inputs[1:])
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in inputs if x.grad is not None)


def test_backward_inside_autocast_matches_float32(loss_case):
    """``backward()`` called inside the autocast region (as some training loops do):
    the backward pass inherits autocast, and the gradients must still be the float32
    ones, in float32 (the dense Gram path, through autograd, once came out
    bf16-rounded)."""
    module_cls, _, kwargs, make = loss_case
    inputs = [x.requires_grad_() for x in make(torch.float32, "cpu")]
    expected = torch.autograd.grad(module_cls(**kwargs)(*inputs).sum(), inputs,
                                   allow_unused=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grads = torch.autograd.grad(module_cls(**kwargs)(*inputs).sum(), inputs,
                                    allow_unused=True)
    for g, e in zip(grads, expected):
        if e is None:
            assert g is None
            continue
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("call", [
    lambda s, t: sd.affinity_loss(s, t, method="linear"),
    lambda s, t: sd.affinity_loss(s, t, method="linear", distance="squared"),
    lambda s, t: sd.pairwise_loss(s, t, method="linear"),
], ids=["affinity l2", "affinity squared", "pairwise"])
@pytest.mark.parametrize("teacher_channels", [6, 9])
def test_gram_kernel_backward_inside_autocast_is_float32(call, teacher_channels):
    """The memory-linear kernel's hand-written backward (which once crashed on CUDA
    under bf16 autocast: an in-place product of mixed dtypes) runs in float32 when
    ``backward()`` is called inside the autocast region."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 6, 5, 7, generator=g).requires_grad_()
    t = torch.randn(2, teacher_channels, 5, 7, generator=g).requires_grad_()
    expected = torch.autograd.grad(call(s, t), (s, t))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grads = torch.autograd.grad(call(s.bfloat16(), t), (s, t))
    for grad, e in zip(grads, expected):
        assert grad.dtype == torch.float32
        assert ((grad - e).norm() / e.norm()).item() < 2e-2  # s rounded to bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grads = torch.autograd.grad(call(s, t), (s, t))
    for grad, e in zip(grads, expected):
        torch.testing.assert_close(grad, e, rtol=1e-5, atol=1e-8)


def test_pickle_and_state_dict(loss_case):
    module_cls, _, kwargs, make = loss_case
    module = module_cls(**kwargs)
    clone = pickle.loads(pickle.dumps(module))
    assert repr(clone) == repr(module)
    inputs = make(torch.float64, "cpu")
    torch.testing.assert_close(clone(*inputs), module(*inputs))
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    module_cls(**kwargs).load_state_dict(torch.load(buffer, weights_only=True))


@pytest.mark.parametrize("factory,shape", [
    (lambda: sd.Translator(4, 3), (2, 4, 7, 6)),
    (lambda: sd.Adapter(4, 3), (2, 4, 7, 6)),
])
def test_modules_pickle_and_state_dict_round_trip(factory, shape):
    torch.manual_seed(0)
    module = factory()
    module(torch.randn(*shape))  # move the BN running statistics off their defaults
    module.eval()
    x = torch.randn(*shape)
    clone = pickle.loads(pickle.dumps(module))
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    fresh = factory().eval()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    expected = module(x)
    for other in (clone, fresh):
        torch.testing.assert_close(other(x), expected, rtol=0, atol=0)


@pytest.mark.slow
def test_torch_compile_runs_each_loss():
    torch._dynamo.reset()
    for module_cls, fn, kwargs, make in LOSSES.values():
        inputs = [x.requires_grad_() for x in make(torch.float32, "cpu")]
        compiled = torch.compile(module_cls(**kwargs), fullgraph=True)
        out = compiled(*inputs)
        torch.testing.assert_close(out, fn(*inputs, **kwargs), rtol=1e-5, atol=1e-6)
        out.sum().backward()
        assert all(torch.isfinite(x.grad).all() for x in inputs)
    translator = torch.compile(sd.Translator(4), fullgraph=True)
    assert translator(torch.randn(2, 4, 9, 9)).reconstruction.shape == (2, 4, 9, 9)
