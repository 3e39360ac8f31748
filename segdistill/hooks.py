r"""Capture intermediate features of any eager model by dotted module path.

Layers are named by layer paths or :class:`~segdistill.FeatureSpec`\ s
(:mod:`segdistill.feature_spec`); a model's final output (its logits) is picked by
:func:`select_output`.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, NamedTuple, TypeAlias, cast

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from segdistill.feature_spec import FeatureLike, FeatureSpec, Selector, as_spec, parse_layer
from segdistill.tokens import tokens_to_map

__all__ = [
    "FeatureHooks",
    "OutputSelector",
    "Selector",
    "call_model",
    "captured",
    "check_map",
    "feature_shapes",
    "image_size",
    "parse_layer",
    "probe_features",
    "resolve_module",
    "select_output",
    "take_feature",
    "unwrap_model",
]

OutputSelector: TypeAlias = str | int | Callable[[Any], Tensor] | None
"""How to find the logits in a model's output: see :func:`select_output`."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's own module inside ``torch.compile`` and (Distributed)DataParallel wrappers.

    Those wrappers prefix the module paths and ``state_dict`` keys of the model
    they wrap (``_orig_mod.``, ``module.``); users name paths of their own model
    and deploy their own model.

    Args:
        model: a module, possibly compiled and/or wrapped, in any nesting.

    Returns:
        The innermost module; ``model`` itself when it is not wrapped.

    Example:
        >>> net = nn.Conv2d(3, 4, 1)
        >>> unwrap_model(torch.compile(net)) is net
        True
        >>> unwrap_model(nn.DataParallel(net)) is net
        True
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = cast(nn.Module, model.module)
        elif type(model).__name__ == "OptimizedModule" and isinstance(
            getattr(model, "_orig_mod", None), nn.Module
        ):
            model = cast(nn.Module, model._orig_mod)
        else:
            return model


def resolve_module(model: nn.Module, path: str, shown: str | None = None) -> nn.Module:
    """Return the submodule of ``model`` at dotted ``path`` (``''`` is the model).

    Paths are those of the user's own model, inside any ``torch.compile`` or
    DDP wrapper (see :func:`unwrap_model`).

    Args:
        model: the model.
        path: a dotted module path, without selectors.
        shown: the layer path as the user wrote it, for the message (default ``path``).

    Raises:
        ValueError: no such submodule; the message lists the closest valid paths (or,
            when none is close, the children of the deepest module the path reaches).

    Example:
        >>> resolve_module(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()), "layer4.relu")
        Traceback (most recent call last):
            ...
        ValueError: Sequential has no submodule 'layer4.relu'; closest valid paths: '0', '1'
    """
    inner = unwrap_model(model)
    try:
        return inner.get_submodule(path)
    except AttributeError:
        pass
    names = [name for name, _ in inner.named_modules() if name]
    close = difflib.get_close_matches(path, names, n=5, cutoff=0.5) or _children_on_the_way(
        inner, path)
    raise ValueError(
        f"{type(model).__name__} has no submodule {path!r}"
        + ("" if shown is None or shown == path else f" (in layer path {shown!r})")
        + f"; closest valid paths: {', '.join(repr(n) for n in close)}"
    )


def _children_on_the_way(model: nn.Module, path: str, n: int = 5) -> list[str]:
    """The paths of the first ``n`` children of the deepest module that ``path`` reaches
    (the model's own, when its first part is wrong); a leaf's: its parent's children."""
    reached, module, parts = "", model, path.split(".")
    for part in parts[:-1]:
        child = module._modules.get(part)
        if child is None:
            break
        reached, module = f"{reached}.{part}" if reached else part, child
    prefix = f"{reached}." if reached else ""
    children = [prefix + name for name in module._modules]
    if not children and reached:  # a leaf: its siblings
        parent = reached.rpartition(".")[0]
        owner = model.get_submodule(parent)
        children = [f"{parent}.{name}" if parent else name for name in owner._modules]
    return children[:n]


def _describe(value: Any) -> str:
    """A short account of what a structured output holds, for error messages."""
    if isinstance(value, Tensor):
        return f"Tensor{tuple(value.shape)}"
    if isinstance(value, Mapping):
        items = ", ".join(f"{k!r}: {_describe(v)}" for k, v in list(value.items())[:8])
        more = ", ..." if len(value) > 8 else ""
        return f"{type(value).__name__} {{{items}{more}}}"
    if isinstance(value, (tuple, list)):
        items = ", ".join(f"[{i}] {_describe(v)}" for i, v in enumerate(value[:8]))
        more = ", ..." if len(value) > 8 else ""
        return f"{type(value).__name__} of {len(value)} ({items}{more})"
    return type(value).__name__


def _index(value: Any, selector: Selector, what: str) -> Any:
    """One indexing step into a structured value, with an error that shows what is there.

    A tensor takes no selector: a string one would read a tensor attribute (``'T'``,
    ``'mT'``, ``'H'``, ``'real'``, ``'data'``), an int one a slice, neither of which is
    picking an output. Other objects (a Hugging Face ``ModelOutput`` outside a mapping,
    a dataclass) give their tensor attributes.
    """
    if isinstance(value, Tensor):
        raise ValueError(f"{what} is a tensor, {_describe(value)}, which takes no selector: "
                         f"{selector!r} would not pick an element of a tuple, a list, a mapping "
                         "or an output object, as selectors do; drop it")
    if isinstance(value, Mapping):
        if selector in value:
            return value[selector]
        raise ValueError(f"{what} has no key {selector!r}; it holds {_describe(value)}")
    if isinstance(value, (tuple, list)):
        if isinstance(selector, int) and -len(value) <= selector < len(value):
            return value[selector]
        raise ValueError(f"{what} has no element {selector!r}; it holds {_describe(value)}")
    if isinstance(selector, str) and isinstance(getattr(value, selector, None), Tensor):
        return getattr(value, selector)
    raise ValueError(f"cannot index {what} with {selector!r}; it holds {_describe(value)}")


def _example(layer: str, value: Any) -> str:
    """Layer paths that would pick a tensor out of ``value``, to suggest in a message:
    a mapping's first tensor key; a sequence's first and last elements (a Hugging Face
    layer's hidden states come first, a feature pyramid's deepest map last)."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(item, Tensor):
                return repr(f"{layer}[{key!r}]")
    if isinstance(value, (tuple, list)) and len(value) > 1:
        return f"{layer + '[0]'!r} (the first) or {layer + '[-1]'!r} (the last)"
    return repr(f"{layer}[-1]")


def _select_layer(value: Any, layer: str, selectors: tuple[Selector, ...], what: str) -> Tensor:
    """Apply a layer path's selectors to its module's output; demand a tensor at the end."""
    for selector in selectors:
        value = _index(value, selector, f"{what} {layer!r}")
    if isinstance(value, Tensor):
        return value
    raise ValueError(
        f"{what} {layer!r} returns {_describe(value)}, not a tensor; select one in the layer "
        f"path with Python indexing (an int or a quoted key), e.g. {_example(layer, value)}"
    )


def select_output(output: Any, selector: OutputSelector = None,
                  what: str = "the model's output") -> Tensor:
    """Pick the logits out of a model's output.

    Args:
        output: what the model returned.
        selector: ``None`` for the automatic rule: a tensor is the logits; a
            mapping with ``'out'`` gives ``output['out']`` (torchvision); a
            mapping or an object with ``logits`` gives those (Hugging Face
            ``ModelOutput``). Otherwise a key (``str``) of a mapping or an
            attribute, an index (``int``) of a tuple or list, or a callable
            that takes the output and returns the logits.
        what: what ``output`` is, for the error message.

    Returns:
        The logits tensor.

    Raises:
        TypeError: ``selector`` is none of the above, or the selected value
            is not a tensor.
        ValueError: the automatic rule finds no logits, or the key or index is
            not there; the message lists what the output holds.

    Example:
        >>> logits = torch.zeros(1, 3, 4, 4)
        >>> select_output({"out": logits, "aux": None}) is logits
        True
        >>> select_output((None, logits), 1) is logits
        True
        >>> select_output([logits], lambda out: out[0]) is logits
        True
    """
    if selector is None:
        if isinstance(output, Tensor):
            return output
        if isinstance(output, Mapping):
            for key in ("out", "logits"):
                if key in output:
                    return _tensor(output[key], f"{what}[{key!r}]")
        elif isinstance(getattr(output, "logits", None), Tensor):
            return cast(Tensor, output.logits)
        raise ValueError(
            f"cannot find the logits in {what}: it holds {_describe(output)}, with no 'out' or "
            f"'logits'; pass the key, the index or a callable that returns them "
            f"(teacher_output= / student_output=)"
        )
    if callable(selector):
        return _tensor(selector(output), f"the output selector's result for {what}")
    if isinstance(selector, bool) or not isinstance(selector, (str, int)):
        raise TypeError(f"expected an output selector: None, a key (str), an index (int) or "
                        f"a callable, got {type(selector).__name__}")
    return _tensor(_index(output, selector, what), f"{what}[{selector!r}]")


def _tensor(value: Any, what: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{what} holds {_describe(value)}, not a tensor")
    return value


def captured(features: Mapping[str, Tensor], name: str, what: str) -> Tensor:
    """The feature ``name`` of what the hooks captured (plus any outputs).

    Raises:
        RuntimeError: the feature was not captured (the forward did not run it).
    """
    if name not in features:
        raise RuntimeError(f"{what} was not captured: did the forward run that module?")
    return features[name]


def check_map(x: Tensor, what: str) -> Tensor:
    """``x``, checked to be a 4-D floating (B, C, H, W) feature map.

    Raises:
        ValueError: it is not 4-D.
        TypeError: it is not floating point.
    """
    if x.ndim != 4:
        raise ValueError(f"expected {what} to be a 4-D (B, C, H, W) tensor, got shape "
                         f"{tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected {what} to be floating point, got {x.dtype}")
    return x


def take_feature(features: Mapping[str, Tensor], name: str, what: str) -> Tensor:
    """One captured feature map, checked to be a 4-D floating (B, C, H, W) tensor
    (:func:`captured`, then :func:`check_map`).

    Args:
        features: what :meth:`FeatureHooks.pop` returned (plus any outputs).
        name: the feature's name.
        what: how to call the feature in messages (``"the teacher's layer 'x'"``).

    Raises:
        RuntimeError: the feature was not captured (the forward did not run it).
        ValueError: it is not 4-D.
        TypeError: it is not floating point.
    """
    return check_map(captured(features, name, what), what)


class _Capture:
    """One layer's forward hook: an object rather than a closure, so that a copy of the
    model or of a wrapper (``copy.deepcopy``, ``pickle``, ``torch.save``) carries a hook
    that refers to the copy's own :class:`FeatureHooks`."""

    def __init__(self, owner: FeatureHooks, name: str) -> None:
        self.owner = owner
        self.name = name

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        self.owner._record(self.name, module, output)


def _version(x: Any) -> int | None:
    """A tensor's version counter (bumped by every in-place write); ``None`` where there is
    none (inference tensors, non-tensors)."""
    if not isinstance(x, Tensor) or x.is_inference():
        return None
    return int(x._version)


class _Call(NamedTuple):
    """One captured call: the value kept, the tensor it came from and that tensor's
    version at capture (``None``: nothing to check, the value is a copy)."""

    value: Any
    source: Tensor | None
    version: int | None
    selected: bool
    without_grad: bool
    """Whether the call ran with gradients disabled."""


class FeatureHooks:
    """Forward hooks that store the outputs of named submodules, one step at a time.

    Like torchvision's ``create_feature_extractor`` the user maps layer paths
    to names; unlike it, this works on any eager model (no tracing), by
    registering forward hooks. A wrong module path or a malformed selector
    fails here, at construction, with the closest valid paths. Captured
    tensors are handed out once by :meth:`pop`, which clears them, so
    activations are not kept alive across steps. A module that returns a
    list, a tuple or a mapping needs a selector in its path
    (``'encoder[-1]'``, ``"backbone['high']"``): :meth:`pop` never takes an
    element silently.

    What is handed out is exactly the module's output at that call:

    * A later in-place write (torchvision's ``out += identity`` and
      ``ReLU(inplace=True)`` after a block's ``bn2``) is caught by the tensor's
      version counter. The first capture of each layer is a copy; a layer whose
      output was written after capture is copied from then on (one copy of that
      map per step), the others are not. A write in a later step that the first
      step did not show raises (never a silently different map).
    * A module that runs more than once per forward (one ``relu`` called per
      block stage) raises at :meth:`pop`, naming the path and the count, unless
      its :class:`~segdistill.FeatureSpec` chooses a call (``call=0``, ``call=-1``).
    * Only calls made while :attr:`active` count: the wrapper switches its hooks on
      for its own forward only, so a recomputation in a checkpointed backward or
      the forward of a copy (an EMA model) stores nothing.

    Args:
        model: the model to watch (compiled or DDP-wrapped models are
            unwrapped; paths are those of the user's model).
        layers: ``{name: layer path or FeatureSpec}``, or a sequence of them
            (named by their layer paths).
        owner: how messages call the model (``'teacher'``, ``'student'``).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``layers`` has the wrong type.
        ValueError: a module path does not exist, or a selector is malformed.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
        >>> hooks = FeatureHooks(model, {"mid": "1"})
        >>> _ = model(torch.randn(1, 3, 8, 8))
        >>> {k: tuple(v.shape) for k, v in hooks.pop().items()}
        {'mid': (1, 4, 6, 6)}
        >>> hooks.pop()  # released after each step
        {}
        >>> hooks.remove()
    """

    def __init__(self, model: nn.Module,
                 layers: Mapping[str, FeatureLike] | Sequence[FeatureLike],
                 owner: str = "model") -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
        if isinstance(layers, (str, FeatureSpec)) or not isinstance(layers, (Mapping, Sequence)):
            raise TypeError(
                "expected layers as a mapping {name: layer path or FeatureSpec} or a sequence "
                f"of them, got {type(layers).__name__}"
            )
        specs = ({name: as_spec(layer, f"layer {name!r}") for name, layer in layers.items()}
                 if isinstance(layers, Mapping) else
                 {spec.layer: spec for spec in (as_spec(layer) for layer in layers)})
        self.specs: dict[str, FeatureSpec] = specs
        self.layers: dict[str, str] = {name: spec.layer for name, spec in specs.items()}
        self.owner = owner
        self.active = True
        """Whether forwards are recorded now (the wrapper sets it around its own forward)."""
        self.without_grad: set[str] = set()
        """The layers that :meth:`pop` last handed out from a call made with gradients
        disabled (``torch.no_grad``, or ``torch.utils.checkpoint(use_reentrant=True)``)."""
        self._modules = {name: resolve_module(model, spec.module_path, spec.layer)
                         for name, spec in specs.items()}
        self._calls: dict[str, list[_Call]] = {}
        self._counts: dict[str, int] = {}
        self._copied: set[str] = set()  # layers written in place after capture: copied
        self._checked: set[str] = set()  # layers seen once without a later write
        self._handles: list[RemovableHandle] = []
        self.attach()

    def attach(self) -> None:
        """(Re-)register the hooks; a no-op when they are registered."""
        if self._handles:
            return
        for name, module in self._modules.items():
            self._handles.append(module.register_forward_hook(_Capture(self, name)))

    @contextmanager
    def capturing(self) -> Iterator[None]:
        """Record forwards inside this block only (:attr:`active`), starting empty."""
        previous, self.active = self.active, True
        self.clear()
        try:
            yield
        finally:
            self.active = previous

    def _record(self, name: str, module: nn.Module, output: Any) -> None:
        if not self.active or module is not self._modules.get(name):
            return
        count = self._counts[name] = self._counts.get(name, 0) + 1
        call = self.specs[name].call
        if (call is None and count > 1) or (call is not None and 0 <= call != count - 1):
            return  # raised at pop (None), or not the chosen call
        value, source, selected = output, None, True
        if self.specs[name].selectors:
            try:
                value = _select_layer(output, self.layers[name], self.specs[name].selectors,
                                      f"the {self.owner}'s layer")
            except ValueError:
                value, selected = output, False  # pop raises with the full message
        if selected and isinstance(value, Tensor):
            traced = torch.compiler.is_compiling()
            copy_now = traced or name in self._copied or name not in self._checked
            # traced: the copy is the module's output, and there is no counter to read
            source, value = (None if traced else value), (value.clone() if copy_now else value)
        kept = _Call(value, source, _version(source), selected, not torch.is_grad_enabled())
        calls = self._calls.setdefault(name, [])
        calls.append(kept)
        if call is not None and call < 0:
            del calls[:call]  # the last -call calls

    def what(self, name: str) -> str:
        """How messages call the feature ``name``: by the layer path the user wrote."""
        return f"the {self.owner}'s layer {self.layers[name]!r}"

    def pop(self, image_size: tuple[int, int] | None = None) -> dict[str, Tensor]:
        """Return the tensors captured since the last call (selectors applied, tokens put on
        their grid) and forget them.

        Args:
            image_size: the input's ``(height, width)``, for layers whose spec has
                ``tokens=`` (their patch grid).

        Raises:
            ValueError: a captured output is not a tensor after its selectors
                (the message shows what it holds and the selector syntax), or a
                selector does not fit it, or tokens do not fit their grid.
            RuntimeError: a module ran more than once with no call chosen, fewer
                times than the chosen call, or its output was written in place
                after capture in a step where the first step showed no write.
        """
        calls, counts = self._calls, self._counts
        self._calls, self._counts = {}, {}
        self.without_grad = {name for name, kept in calls.items()
                             if kept and kept[0].without_grad}
        return {name: self._handed_out(name, calls.get(name, []), counts[name], image_size)
                for name in counts}

    def _handed_out(self, name: str, calls: list[_Call], count: int,
                    image_size: tuple[int, int] | None) -> Tensor:
        spec = self.specs[name]
        if spec.call is None and count > 1:
            raise RuntimeError(
                f"{self.what(name)} ran {count} times in one forward, so which output to "
                f"capture is ambiguous (torchvision's ResNet blocks call one relu 2 or 3 "
                f"times); choose a call with FeatureSpec({spec.layer!r}, call=0) (0 = the "
                "first, -1 = the last), or a module that runs once")
        if not calls or (spec.call is not None and spec.call < 0 and count < -spec.call):
            raise RuntimeError(f"{self.what(name)} ran {count} times in one forward, but its "
                               f"FeatureSpec asks for call={spec.call}")
        kept = calls[0]
        if kept.source is not None and _version(kept.source) != kept.version:
            self._written_in_place(name)
        self._checked.add(name)
        value = _select_layer(kept.value, spec.layer, () if kept.selected else spec.selectors,
                              f"the {self.owner}'s layer")
        if spec.tokens is not None and value.ndim == 3:
            value = tokens_to_map(value, spec.tokens, image_size)
        return value

    def _written_in_place(self, name: str) -> None:
        """The captured tensor was written after capture: copy it from now on; raise if the
        value handed out now is not a copy."""
        first_time = name not in self._copied
        self._copied.add(name)
        if name in self._checked and first_time:
            raise RuntimeError(
                f"{self.what(name)} was written in place after it was captured (e.g. "
                "`out += identity` or ReLU(inplace=True) later in the block), which the "
                "first step did not show; this step's map is not the module's output, so "
                "the step is refused. Later steps copy it at capture")

    def clear(self) -> None:
        """Forget captured outputs (e.g. after a step that raised)."""
        self._calls, self._counts = {}, {}

    def remove(self) -> None:
        """Unregister every hook; :meth:`attach` registers them again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    @contextmanager
    def detached(self) -> Iterator[None]:
        """Temporarily unregister the hooks (e.g. to copy the model without them)."""
        attached = bool(self._handles)
        self.remove()
        try:
            yield
        finally:
            if attached:
                self.attach()

    def __repr__(self) -> str:
        return f"FeatureHooks({self.layers})"


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` on one batch: a mapping as keyword arguments (a Hugging Face batch,
    ``{"pixel_values": x}``), anything else as the one positional argument."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def image_size(inputs: Any) -> tuple[int, int] | None:
    """The ``(height, width)`` of a batch's images: a tensor's last two sizes, or those
    of a mapping's ``pixel_values`` (else its first 4-D tensor); ``None`` if none."""
    if isinstance(inputs, Mapping):
        values = [inputs["pixel_values"]] if "pixel_values" in inputs else list(inputs.values())
        inputs = next((v for v in values if isinstance(v, Tensor) and v.ndim == 4), None)
    if isinstance(inputs, Tensor) and inputs.ndim >= 3:
        return int(inputs.shape[-2]), int(inputs.shape[-1])
    return None


def _probe(model: nn.Module, layers: Mapping[str, FeatureLike] | Sequence[FeatureLike],
           example_input: Any, owner: str) -> tuple[FeatureHooks, Any, dict[str, Tensor]]:
    """One no-grad forward in eval mode with hooks on ``layers``: the hooks (already
    removed), the output and every layer's capture. The train/eval flags are restored."""
    hooks = FeatureHooks(model, layers, owner)
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            out = call_model(model, example_input)
        captured = hooks.pop(image_size(example_input))
    finally:
        hooks.remove()
        for module, mode in modes:
            module.training = mode
    for name in hooks.layers:
        if name not in captured:
            raise RuntimeError(f"{hooks.what(name)} did not run in the {owner}'s forward")
    return hooks, out, captured


def feature_shapes(model: nn.Module, layers: Mapping[str, FeatureLike] | Sequence[FeatureLike],
                   example_input: Any, *, output: OutputSelector = None,
                   with_output: bool = True, owner: str = "model") -> dict[str, torch.Size]:
    """The shapes of a model's features and logits on one batch, from a no-grad forward.

    The model runs in eval mode (batch-norm statistics are not updated) and
    its train/eval flags are restored afterwards; no hook is left behind.
    Use it to find a layer's channels and output stride.

    Args:
        model: the model.
        layers: ``{name: layer path or FeatureSpec}`` or a sequence of them.
        example_input: one batch, as the model takes it.
        output: how to find the logits (see :func:`select_output`).
        with_output: also return the logits' shape, under ``'output'``.
        owner: how messages call the model.

    Returns:
        ``{name: shape}`` for every layer (and ``'output'``).

    Raises:
        ValueError: as :class:`FeatureHooks` and :func:`select_output`.
        RuntimeError: a layer did not run in the forward.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Conv2d(8, 2, 1))
        >>> shapes = feature_shapes(model, {"stem": "0"}, torch.zeros(1, 3, 32, 32))
        >>> {k: tuple(v) for k, v in shapes.items()}
        {'stem': (1, 8, 16, 16), 'output': (1, 2, 16, 16)}
    """
    hooks, out, captured = _probe(model, layers, example_input, owner)
    shapes = {name: captured[name].shape for name in hooks.layers}
    if with_output:
        shapes["output"] = select_output(out, output, f"the {owner}'s output").shape
    return shapes


def _stride(example_input: Any, feature: Tensor) -> int | None:
    """The output stride of ``feature`` on an image batch, rounded (513 / 65 -> 8)."""
    size = image_size(example_input)
    if size is None or feature.ndim != 4:
        return None
    ratio = size[0] / max(feature.shape[-2], 1)
    return max(1, round(ratio)) if math.isfinite(ratio) else None


def probe_features(model: nn.Module, specs: Mapping[str, FeatureLike], example_input: Any,
                   owner: str = "model") -> dict[str, FeatureSpec]:
    """Each spec with its channels and stride read from one no-grad forward on
    ``example_input``.

    Every layer path is resolved once, for all the specs; the model runs in
    eval mode (batch-norm statistics are not updated), its train/eval flags
    are restored, and no hook is left behind.

    Args:
        model: the model.
        specs: ``{name: layer path or FeatureSpec}``.
        example_input: one batch, as the model takes it.
        owner: how messages call the model (``'teacher'``, ``'student'``).

    Returns:
        ``{name: FeatureSpec}`` with ``channels`` (and, for an image batch,
        ``stride``) filled in.

    Raises:
        ValueError: a layer does not give a 4-D map, or a spec's channels
            differ from the ones read (the message says which to pass).
        RuntimeError: a layer did not run in the forward.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Conv2d(8, 2, 1))
        >>> probe_features(model, {"f": "0"}, torch.zeros(1, 3, 32, 32))
        {'f': FeatureSpec(layer='0', channels=8, stride=2)}
    """
    hooks, _, captured = _probe(model, specs, example_input, owner)
    probed: dict[str, FeatureSpec] = {}
    for name, spec in hooks.specs.items():
        x = captured[name]
        if x.ndim != 4:
            raise ValueError(f"expected {hooks.what(name)} to give a 4-D (B, C, H, W) tensor, "
                             f"got shape {tuple(x.shape)}")
        channels = int(x.shape[1])
        if spec.channels is not None and spec.channels != channels:
            raise ValueError(
                f"{hooks.what(name)} has {channels} channels on example_input, but its "
                f"FeatureSpec says channels={spec.channels}; pass channels={channels} or "
                "leave it out"
            )
        probed[name] = replace(spec, channels=channels,
                               stride=spec.stride or _stride(example_input, x))
    return probed
