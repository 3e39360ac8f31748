"""Capture intermediate features of any eager model by dotted module path.

A layer path is a dotted module path (``'backbone.layer4'``), optionally
followed by Python indexing selectors for a module that returns a list, a
tuple or a mapping: ``'encoder[-1]'``, ``"backbone['high']"``,
``"encoder['hidden_states'][2]"``. A model's final output (its logits) is
picked by :func:`select_output`.
"""

from __future__ import annotations

import ast
import difflib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeAlias, cast

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = [
    "FeatureHooks",
    "OutputSelector",
    "Selector",
    "feature_shapes",
    "parse_layer",
    "resolve_module",
    "select_output",
    "take_feature",
    "unwrap_model",
]

Selector: TypeAlias = str | int
"""One indexing step into a structured output: a mapping key or a sequence index."""

OutputSelector: TypeAlias = str | int | Callable[[Any], Tensor] | None
"""How to find the logits in a model's output: see :func:`select_output`."""

_SELECTOR = re.compile(r"\[\s*(-?\d+|'[^']*'|\"[^\"]*\")\s*\]")
_SYNTAX = ("Python indexing with an int or a quoted key, e.g. 'encoder[-1]' or "
           "\"backbone['high']\"")


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


def parse_layer(layer: str) -> tuple[str, tuple[Selector, ...]]:
    """Split a layer path into its dotted module path and its selectors.

    Args:
        layer: e.g. ``'backbone.layer4'``, ``'encoder[-1]'`` or ``"backbone['high']"``.

    Returns:
        The module path and the selectors, in order.

    Raises:
        TypeError: ``layer`` is not a string.
        ValueError: a selector is not an int or a quoted key in brackets.

    Example:
        >>> parse_layer("encoder[-1]")
        ('encoder', (-1,))
        >>> parse_layer("backbone['high']")
        ('backbone', ('high',))
        >>> parse_layer("backbone.layer4")
        ('backbone.layer4', ())
    """
    if not isinstance(layer, str):
        raise TypeError(f"expected a layer path (str), got {type(layer).__name__}")
    start = layer.find("[")
    if start < 0:
        return layer, ()
    path, rest = layer[:start], layer[start:]
    selectors: list[Selector] = []
    position = 0
    while position < len(rest):
        match = _SELECTOR.match(rest, position)
        if match is None:
            raise ValueError(f"layer path {layer!r} has an invalid selector "
                             f"{rest[position:]!r}; use {_SYNTAX}")
        selectors.append(cast(Selector, ast.literal_eval(match.group(1))))
        position = match.end()
    return path, tuple(selectors)


def resolve_module(model: nn.Module, path: str, shown: str | None = None) -> nn.Module:
    """Return the submodule of ``model`` at dotted ``path`` (``''`` is the model).

    Paths are those of the user's own model, inside any ``torch.compile`` or
    DDP wrapper (see :func:`unwrap_model`).

    Args:
        model: the model.
        path: a dotted module path, without selectors.
        shown: the layer path as the user wrote it, for the message (default ``path``).

    Raises:
        ValueError: no such submodule; the message lists the closest valid paths.
    """
    inner = unwrap_model(model)
    try:
        return inner.get_submodule(path)
    except AttributeError:
        pass
    names = [name for name, _ in inner.named_modules() if name]
    close = difflib.get_close_matches(path, names, n=5, cutoff=0.5)
    if not close:  # fall back to the paths that share the longest prefix
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        close = [n for n in names if n.startswith(parent)][:5] if parent else names[:5]
    raise ValueError(
        f"{type(model).__name__} has no submodule {path!r}"
        + ("" if shown is None or shown == path else f" (in layer path {shown!r})")
        + f"; closest valid paths: {', '.join(repr(n) for n in close)}"
    )


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
    """One indexing step into a structured value, with an error that shows what is there."""
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
    """A layer path that would pick a tensor out of ``value``, to suggest in a message."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(item, Tensor):
                return f"{layer}[{key!r}]"
    return f"{layer}[-1]"


def _select_layer(value: Any, layer: str, selectors: tuple[Selector, ...], what: str) -> Tensor:
    """Apply a layer path's selectors to its module's output; demand a tensor at the end."""
    for selector in selectors:
        value = _index(value, selector, f"{what} {layer!r}")
    if isinstance(value, Tensor):
        return value
    raise ValueError(
        f"{what} {layer!r} returns {_describe(value)}, not a tensor; select one in the layer "
        f"path with Python indexing (an int or a quoted key), e.g. {_example(layer, value)!r}"
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


def take_feature(features: Mapping[str, Tensor], name: str, what: str) -> Tensor:
    """One captured feature map, checked to be a 4-D floating (B, C, H, W) tensor.

    Args:
        features: what :meth:`FeatureHooks.pop` returned (plus any outputs).
        name: the feature's name.
        what: how to call the feature in messages (``"the teacher's layer 'x'"``).

    Raises:
        RuntimeError: the feature was not captured (the forward did not run it).
        ValueError: it is not 4-D.
        TypeError: it is not floating point.
    """
    if name not in features:
        raise RuntimeError(f"{what} was not captured: did the forward run that module?")
    x = features[name]
    if x.ndim != 4:
        raise ValueError(f"expected {what} to be a 4-D (B, C, H, W) tensor, got shape "
                         f"{tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected {what} to be floating point, got {x.dtype}")
    return x


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

    Args:
        model: the model to watch (compiled or DDP-wrapped models are
            unwrapped; paths are those of the user's model).
        layers: ``{name: layer path}``, or a sequence of layer paths used as names.
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

    def __init__(self, model: nn.Module, layers: Mapping[str, str] | Sequence[str],
                 owner: str = "model") -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
        if isinstance(layers, str) or not isinstance(layers, (Mapping, Sequence)):
            raise TypeError(
                "expected layers as a mapping {name: module_path} or a sequence of paths, "
                f"got {type(layers).__name__}"
            )
        mapping = dict(layers) if isinstance(layers, Mapping) else {p: p for p in layers}
        self.layers: dict[str, str] = mapping
        self.owner = owner
        self._selectors: dict[str, tuple[Selector, ...]] = {}
        self._modules: dict[str, nn.Module] = {}
        for name, layer in mapping.items():
            path, self._selectors[name] = parse_layer(layer)
            self._modules[name] = resolve_module(model, path, layer)
        self._features: dict[str, Any] = {}
        self._handles: list[RemovableHandle] = []
        self.attach()

    def attach(self) -> None:
        """(Re-)register the hooks; a no-op when they are registered."""
        if self._handles:
            return
        for name, module in self._modules.items():
            self._handles.append(module.register_forward_hook(self._store(name)))

    def _store(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._features[name] = output

        return hook

    def what(self, name: str) -> str:
        """How messages call the feature ``name``: by the layer path the user wrote."""
        return f"the {self.owner}'s layer {self.layers[name]!r}"

    def pop(self) -> dict[str, Tensor]:
        """Return the tensors captured since the last call (selectors applied) and forget them.

        Raises:
            ValueError: a captured output is not a tensor after its selectors
                (the message shows what it holds and the selector syntax), or a
                selector does not fit it.
        """
        features, self._features = self._features, {}
        return {
            name: _select_layer(value, self.layers[name], self._selectors[name],
                                f"the {self.owner}'s layer")
            for name, value in features.items()
        }

    def clear(self) -> None:
        """Forget captured outputs (e.g. after a step that raised)."""
        self._features = {}

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


def feature_shapes(model: nn.Module, layers: Mapping[str, str] | Sequence[str],
                   example_input: Any, *, output: OutputSelector = None,
                   with_output: bool = True, owner: str = "model") -> dict[str, torch.Size]:
    """The shapes of a model's features and logits on one batch, from a no-grad forward.

    The model runs in eval mode (batch-norm statistics are not updated) and
    its train/eval flags are restored afterwards; no hook is left behind.
    Use it to find a layer's channels and output stride.

    Args:
        model: the model.
        layers: ``{name: layer path}`` or a sequence of layer paths.
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
    hooks = FeatureHooks(model, layers, owner)
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            out = model(example_input)
        features = hooks.pop()
    finally:
        hooks.remove()
        for module, mode in modes:
            module.training = mode
    shapes: dict[str, torch.Size] = {}
    for name in hooks.layers:
        if name not in features:
            raise RuntimeError(f"{hooks.what(name)} did not run in the {owner}'s forward")
        shapes[name] = features[name].shape
    if with_output:
        shapes["output"] = select_output(out, output, f"the {owner}'s output").shape
    return shapes
