"""The wrapper on the paths users take (issue 18): in-place models, modules called twice,
checkpointing, per-side and dict inputs, cached teachers, copies and saving.

Each test reproduces a case that was silently wrong or failed before, against a plain
reference (a hook that copies the module's output at its call, a run without the
wrapper's shortcuts)."""

from __future__ import annotations

import copy
import io
import pickle
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from models import tiny_pair
from torch import nn
from torch.utils.checkpoint import checkpoint

from segdistill import DistillationTerm, DistillationWrapper, FeatureSpec, Translator, presets

torchvision = pytest.importorskip("torchvision")


class Recorder(nn.Module):
    """A loss that keeps what it was given: ``mean((s - t)^2)`` (of the means where the
    shapes differ)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen.append((s, t))
        if s.shape != t.shape:
            return (s.mean() - t.mean()).pow(2)
        return (s - t).pow(2).mean()


def _recording_wrapper(teacher, student, t_layer, s_layer, **kwargs):
    recorder = Recorder()
    wrapper = DistillationWrapper(
        teacher, student, {"r": DistillationTerm(recorder, student="s", teacher="t")},
        {"t": t_layer}, {"s": s_layer}, **kwargs)
    return wrapper, recorder


def _copy_at_call(module: nn.Module, store: list):
    return module.register_forward_hook(lambda m, a, out: store.append(out.clone()))


def _resnets():
    torch.manual_seed(0)
    return (torchvision.models.resnet18(num_classes=5).eval(),
            torchvision.models.resnet18(num_classes=5).eval())


# ---- in-place writes after capture ---------------------------------------------------


def test_a_map_written_in_place_later_is_captured_as_the_module_gave_it():
    teacher, student = _resnets()
    wrapper, recorder = _recording_wrapper(teacher, student, "layer2.1.bn2", "layer2.1.bn2")
    wrapper.eval()
    true_t, true_s = [], []
    handles = [_copy_at_call(teacher.layer2[1].bn2, true_t),
               _copy_at_call(student.layer2[1].bn2, true_s)]
    x = torch.randn(2, 3, 64, 64)
    for _ in range(3):  # the first step copies by default; the later ones know to copy
        wrapper(x)
    for h in handles:
        h.remove()
    for (s, t), ts, tt in zip(recorder.seen, true_s, true_t):
        assert t.min() < -1  # bn2's output has negative values; after += and ReLU it would not
        torch.testing.assert_close(t, tt, rtol=0, atol=0)
        torch.testing.assert_close(s, ts, rtol=0, atol=0)


def test_the_student_gradient_is_that_of_the_module_output_at_its_call():
    teacher, student = _resnets()
    reference = copy.deepcopy(student)
    wrapper, _ = _recording_wrapper(teacher, student, "layer2.1.bn2", "layer2.1.bn2")
    wrapper.eval()
    x = torch.randn(2, 3, 64, 64)
    wrapper(x).loss.backward()
    # reference: copy bn2's output at its call, by hand
    with torch.no_grad():
        t_ref: list = []
        h = _copy_at_call(teacher.layer2[1].bn2, t_ref)
        teacher(x)
        h.remove()
    s_ref: list = []
    h = reference.layer2[1].bn2.register_forward_hook(lambda m, a, o: s_ref.append(o.clone()))
    reference(x)
    h.remove()
    (s_ref[0] - t_ref[0]).pow(2).mean().backward()
    for (name, p), q in zip(student.named_parameters(), reference.parameters()):
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), name
        else:
            torch.testing.assert_close(p.grad, q.grad, msg=name)


class _SometimesInPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.write = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.write:
            y.add_(100.0)
        return y


def test_a_write_that_the_first_step_did_not_show_raises_then_is_copied():
    torch.manual_seed(0)
    teacher, student = _SometimesInPlace(), _SometimesInPlace()
    wrapper, recorder = _recording_wrapper(teacher, student, "conv", "conv")
    x = torch.randn(2, 3, 4, 4)
    wrapper(x)
    teacher.write = True
    with pytest.raises(RuntimeError, match=r"the teacher's layer 'conv' was written in place "
                                           r"after it was captured"):
        wrapper(x)
    wrapper(x)  # from now on it is copied: the map is conv's output, before the write
    torch.testing.assert_close(recorder.seen[-1][1], teacher.conv(x).detach())


def test_a_layer_that_is_not_written_is_not_copied_after_the_first_step():
    torch.manual_seed(0)
    teacher, student = tiny_pair()
    wrapper, recorder = _recording_wrapper(teacher, student, "body", "down")
    outputs: list = []
    h = teacher.body.register_forward_hook(lambda m, a, o: outputs.append(o))
    x = torch.randn(2, 3, 8, 8)
    wrapper(x)
    wrapper(x)
    h.remove()
    assert recorder.seen[0][1].data_ptr() != outputs[0].data_ptr()  # first step: a copy
    assert recorder.seen[1][1].data_ptr() == outputs[1].data_ptr()  # then the output itself


# ---- modules called several times ----------------------------------------------------


def test_a_module_called_twice_raises_with_its_path_and_count():
    teacher, student = _resnets()
    wrapper, _ = _recording_wrapper(teacher, student, FeatureSpec("layer1.0.relu"), "layer1.0")
    with pytest.raises(RuntimeError, match=r"the teacher's layer 'layer1.0.relu' ran 2 times in "
                                           r"one forward.*FeatureSpec\('layer1.0.relu', call=0\)"):
        wrapper(torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("call", [0, 1, -1, -2])
def test_call_chooses_one_use_of_a_shared_relu(call):
    teacher, student = _resnets()
    wrapper, recorder = _recording_wrapper(
        teacher, student, FeatureSpec("layer1.0.relu", call=call), "layer1.0")
    uses: list = []
    h = _copy_at_call(teacher.layer1[0].relu, uses)
    x = torch.randn(2, 3, 32, 32)
    wrapper(x)
    h.remove()
    assert len(uses) == 2
    torch.testing.assert_close(recorder.seen[0][1], uses[call], rtol=0, atol=0)
    block = teacher.layer1[0]
    first = torch.relu(block.bn1(block.conv1(teacher.maxpool(teacher.relu(
        teacher.bn1(teacher.conv1(x)))))))
    torch.testing.assert_close(uses[0], first.detach())


@pytest.mark.parametrize("call", [2, -3])
def test_a_call_that_does_not_happen_raises(call):
    teacher, student = _resnets()
    wrapper, _ = _recording_wrapper(teacher, student, FeatureSpec("layer1.0.relu", call=call),
                                    "layer1.0")
    with pytest.raises(RuntimeError, match=rf"ran 2 times in one forward, but its FeatureSpec "
                                           rf"asks for call={call}"):
        wrapper(torch.randn(2, 3, 32, 32))


# ---- gradient checkpointing ----------------------------------------------------------


class _Checkpointed(nn.Module):
    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.block = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(6, 5, 1)
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.reentrant is None:
            x = self.block(x)
        else:
            x = checkpoint(self.block, x, use_reentrant=self.reentrant)
        return self.head(x)


def _checkpoint_pair(reentrant):
    torch.manual_seed(0)
    teacher, _ = tiny_pair()
    return teacher, _Checkpointed(reentrant)


def test_reentrant_checkpointing_around_a_captured_layer_raises():
    teacher, student = _checkpoint_pair(True)
    wrapper = presets.fitnet(teacher, student, teacher_layer=FeatureSpec("relu", channels=12),
                             student_layer=FeatureSpec("block.1", channels=6))
    x = torch.randn(2, 3, 8, 8).requires_grad_()
    with pytest.raises(RuntimeError, match=r"the student's layer 'block.1' ran with gradients "
                                           r"disabled.*use_reentrant=False"):
        wrapper(x)
    with torch.no_grad():  # evaluation needs no gradient: no complaint
        wrapper(x)


def test_non_reentrant_checkpointing_keeps_the_graph_and_releases_the_recomputation():
    grads = {}
    for mode in (None, False):
        teacher, student = _checkpoint_pair(mode)
        wrapper = presets.fitnet(teacher, student, teacher_layer=FeatureSpec("relu", channels=12),
                                 student_layer=FeatureSpec("block.1", channels=6))
        wrapper(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))).loss.backward()
        assert wrapper._student_hooks._calls == {}  # the recomputation in backward is not kept
        grads[mode] = [p.grad for p in (*student.stem.parameters(), *student.block.parameters())]
    assert any(g.abs().sum() > 0 for g in grads[False])
    for a, b in zip(grads[None], grads[False]):
        torch.testing.assert_close(a, b)


# ---- per-side and keyword inputs -----------------------------------------------------


def test_a_bf16_teacher_beside_an_fp32_student_through_teacher_input():
    teacher, student = tiny_pair()
    x = torch.randn(2, 3, 8, 8)
    plain = presets.attention_transfer(copy.deepcopy(teacher), copy.deepcopy(student),
                                       teacher_layer="relu", student_layer="relu",
                                       resize="teacher")
    teacher = teacher.to(torch.bfloat16)
    bare = presets.attention_transfer(teacher, copy.deepcopy(student), teacher_layer="relu",
                                      student_layer="relu", resize="teacher")
    with pytest.raises(RuntimeError):  # what users met before: the teacher's first conv fails
        bare(x)
    wrapper = presets.attention_transfer(teacher, student, teacher_layer="relu",
                                         student_layer="relu", resize="teacher",
                                         teacher_input=lambda b: b.to(torch.bfloat16))
    out = wrapper(x)
    assert out.loss.dtype == torch.float32 and out.loss.requires_grad
    torch.testing.assert_close(out.loss, plain(x).loss, rtol=5e-2, atol=1e-4)


def test_the_teacher_at_another_resolution():
    teacher, student = tiny_pair()
    wrapper, recorder = _recording_wrapper(
        teacher, student, "relu", "relu",
        teacher_input=lambda b: F.interpolate(b, scale_factor=2.0, mode="bilinear"))
    wrapper(torch.randn(2, 3, 8, 8))
    s, t = recorder.seen[0]
    assert s.shape[-2:] == (2, 2) and t.shape[-2:] == (8, 8)


def test_dict_batches_are_keyword_arguments_on_both_sides():
    torch.manual_seed(0)

    class Keyword(nn.Module):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, pixel_values: torch.Tensor) -> dict:
            return {"logits": self.net(pixel_values)}

    teacher, student = (Keyword(m) for m in tiny_pair())
    wrapper = presets.kd(teacher, student, resize="teacher")
    x = torch.randn(2, 3, 8, 8)
    y = torch.randint(0, 5, (2, 4, 4))
    out = wrapper({"pixel_values": x}, y)
    plain = presets.kd(teacher.net, student.net, resize="teacher")
    torch.testing.assert_close(out.loss, plain(x, y).loss)
    # the student takes a tensor: student_input picks it out of the batch
    mixed = presets.kd(teacher, student.net, resize="teacher",
                       student_input=lambda b: b["pixel_values"])
    torch.testing.assert_close(mixed({"pixel_values": x}, y).loss, out.loss)


def test_input_functions_are_checked():
    teacher, student = tiny_pair()
    with pytest.raises(TypeError, match="expected teacher_input to be None or a callable"):
        presets.kd(teacher, student, teacher_input="pixel_values")  # type: ignore[arg-type]


# ---- cached teacher outputs ----------------------------------------------------------


def _paper_wrapper():
    torch.manual_seed(0)
    teacher, student = tiny_pair()
    return presets.knowledge_adaptation(
        teacher, student, teacher_layer="relu", student_layer=FeatureSpec("relu", channels=6),
        translator=Translator(12, latent_channels=6))


def test_cached_teacher_features_equal_running_the_teacher_which_does_not_run():
    wrapper = _paper_wrapper()
    twin = copy.deepcopy(wrapper)
    x = torch.randn(2, 3, 16, 16)
    cache = wrapper.run_teacher(x)
    assert set(cache) == {"features"}
    calls = []
    wrapper.teacher.register_forward_pre_hook(lambda m, a: calls.append(1))
    out = wrapper(x, teacher_features=cache)
    ref = twin(x)
    assert calls == []
    assert out.losses.keys() == ref.losses.keys()
    for name in out.losses:
        torch.testing.assert_close(out.losses[name], ref.losses[name], rtol=0, atol=0)
    out.loss.backward()
    ref.loss.backward()
    for p, q in zip(wrapper.trainable_parameters(), twin.trainable_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


def test_a_cache_with_the_logits_for_kd():
    teacher, student = tiny_pair()
    wrapper = presets.kd(teacher, student, resize="teacher")
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 5, (2, 4, 4))
    cache = wrapper.run_teacher(x)
    assert set(cache) == {"output"}
    torch.testing.assert_close(wrapper(x, y, teacher_features=cache).loss, wrapper(x, y).loss)


def test_a_cache_that_does_not_fit_is_refused():
    wrapper = _paper_wrapper()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"missing \['features'\], unknown \['feats'\]"):
        wrapper(x, teacher_features={"feats": torch.zeros(2, 12, 8, 8)})
    with pytest.raises(TypeError, match=r"teacher_features\['features'\] to be a tensor"):
        wrapper(x, teacher_features={"features": [1.0]})
    with pytest.raises(ValueError, match=r"has 7 channels but its FeatureSpec"):
        wrapper.teacher_hooks_spec = None
        spec_wrapper = presets.fitnet(*tiny_pair(), teacher_layer=FeatureSpec("relu", channels=12),
                                      student_layer=FeatureSpec("relu", channels=6))
        spec_wrapper(x, teacher_features={"features": torch.zeros(2, 7, 8, 8)})


# ---- copies and saving ---------------------------------------------------------------


def test_a_deep_copy_trains_on_its_own():
    wrapper = _paper_wrapper()
    twin = copy.deepcopy(wrapper)
    x = torch.randn(2, 3, 16, 16)
    out = twin(x)
    assert wrapper._student_hooks._calls == {} and wrapper._teacher_hooks._calls == {}
    out.loss.backward()
    assert all(p.grad is None for p in wrapper.parameters())
    assert any(p.grad is not None and p.grad.any() for p in twin.trainable_parameters())
    torch.testing.assert_close(out.loss, wrapper(x).loss)


def test_pickle_and_torch_save_round_trip():
    wrapper = _paper_wrapper()
    x = torch.randn(2, 3, 16, 16)
    expected = wrapper(x).loss
    again = pickle.loads(pickle.dumps(wrapper))
    torch.testing.assert_close(again(x).loss, expected)
    buffer = io.BytesIO()
    torch.save(wrapper, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(x).loss, expected)
    assert loaded(x).loss.requires_grad


def test_an_ema_of_the_student_stores_nothing():
    from torch.optim.swa_utils import AveragedModel

    wrapper = _paper_wrapper()
    ema = AveragedModel(wrapper.student)
    x = torch.randn(2, 3, 16, 16)
    wrapper(x)
    ema(x)
    ema.update_parameters(wrapper.student)
    assert wrapper._student_hooks._calls == {}
    copied = [hook for m in ema.modules() for hook in m._forward_hooks.values()]
    assert copied and all(getattr(h, "owner", None) is not None for h in copied)
    assert all(h.owner._calls == {} for h in copied)  # the copy's hooks record nothing
    wrapper(x).loss.backward()  # the wrapper is unaffected


def test_the_state_dict_holds_what_is_trained_once():
    wrapper = _paper_wrapper()
    state = wrapper.state_dict()
    assert not any(k.startswith("teacher.") for k in state)
    assert not any("teacher_transform" in k for k in state)  # the translator, twice before
    trained = {n for n, p in wrapper.named_parameters() if p.requires_grad}
    assert trained <= set(state)
    values = sum(v.numel() for v in state.values())
    parts = [wrapper.student] + [m for term in wrapper.terms.values()
                                 for m in (term.student_adapter, term.loss) if m is not None]
    assert values == sum(v.numel() for m in parts for v in m.state_dict().values())
    fresh = _paper_wrapper()
    with torch.no_grad():
        for p in fresh.trainable_parameters():
            p.add_(1.0)
    fresh.load_state_dict(state)  # strict: the frozen parts are the wrapper's own
    for (k, a), b in zip(state.items(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    full = DistillationWrapper(wrapper.teacher, wrapper.student, dict(wrapper.terms.items()),
                               {"features": "relu"}, {"features": "relu"}, save_frozen=True)
    assert any(k.startswith("teacher.") for k in full.state_dict())


def test_the_state_dict_saves_with_safetensors():
    safetensors = pytest.importorskip("safetensors.torch")
    wrapper = _paper_wrapper()
    data = safetensors.save({k: v.contiguous() for k, v in wrapper.state_dict().items()})
    loaded = safetensors.load(data)
    fresh = _paper_wrapper()
    fresh.load_state_dict(loaded)


def test_a_wrapper_inside_a_module_keeps_its_rule_under_a_prefix():
    wrapper = _paper_wrapper()
    holder = nn.Module()
    holder.model = wrapper
    state = holder.state_dict()
    assert state and all(k.startswith("model.") for k in state)
    assert not any(k.startswith("model.teacher.") for k in state)
    again = nn.Module()
    again.model = _paper_wrapper()
    again.load_state_dict(state)


def test_token_tensors_are_not_needed_for_plain_cnn_pairs():
    # a regression guard for the default path: OrderedDict models, one call, no tokens
    teacher = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 1)))
    student = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 1)))
    wrapper, recorder = _recording_wrapper(teacher, student, "conv", "conv")
    wrapper(torch.randn(1, 3, 2, 2))
    assert recorder.seen[0][0].shape == (1, 4, 2, 2)
