"""Capture intermediate features of any eager model by dotted module path."""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["FeatureHooks", "resolve_module", "select_output"]


def _unwrap(model: nn.Module) -> nn.Module:
    """The module whose submodule paths the user sees.

    ``torch.compile`` and DistributedDataParallel wrap a model and prefix its
    paths (``_orig_mod.``, ``module.``); users name paths of their own model.
    """
    for attribute in ("_orig_mod", "module"):
        inner = getattr(model, attribute, None)
        if isinstance(inner, nn.Module) and type(model).__name__ in (
            "OptimizedModule",
            "DistributedDataParallel",
        ):
            return _unwrap(inner)
    return model


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """Return the submodule of ``model`` at dotted ``path`` (``''`` is the model).

    Raises:
        ValueError: no such submodule; the message lists the closest valid paths.
    """
    modules: dict[str, nn.Module] = dict(_unwrap(model).named_modules())
    if path in modules:
        return modules[path]
    names = [name for name in modules if name]
    close = difflib.get_close_matches(path, names, n=5, cutoff=0.5)
    if not close:  # fall back to the paths that share the longest prefix
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        close = [n for n in names if n.startswith(parent)][:5] if parent else names[:5]
    raise ValueError(
        f"{type(model).__name__} has no submodule {path!r}; closest valid paths: "
        f"{', '.join(repr(n) for n in close)}"
    )


def select_output(output: Any, key: str | int | None = None, what: str = "model output") -> Tensor:
    """Pick the tensor out of a model's output.

    Args:
        output: a tensor, a mapping (torchvision segmentation models return an
            ``OrderedDict`` with ``'out'`` and ``'aux'``) or a tuple/list.
        key: which entry of a mapping or sequence to take; by default
            ``'out'`` for a mapping and the first element for a sequence.
        what: what ``output`` is, for the error message.

    Raises:
        TypeError: ``output`` holds no tensor at ``key``.
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        k = "out" if key is None else key
        if k not in output:
            raise TypeError(
                f"{what} is a mapping without key {k!r} (keys: {list(output)}); "
                f"pass the key that holds the tensor"
            )
        return select_output(output[k], None, f"{what}[{k!r}]")
    if isinstance(output, (tuple, list)) and output:
        index = 0 if key is None else key
        if not isinstance(index, int) or not -len(output) <= index < len(output):
            raise TypeError(f"{what} is a {type(output).__name__} of {len(output)}; "
                            f"cannot take element {index!r}")
        return select_output(output[index], None, f"{what}[{index}]")
    raise TypeError(f"expected {what} to be a tensor, a mapping or a sequence of tensors, "
                    f"got {type(output).__name__}")


class FeatureHooks:
    """Forward hooks that store the outputs of named submodules, one step at a time.

    Like torchvision's ``create_feature_extractor`` the user maps dotted module
    paths to names; unlike it, this works on any eager model (no tracing), by
    registering forward hooks. A wrong path fails here, at construction, with
    the closest valid paths. Captured tensors are handed out once by
    :meth:`pop`, which clears them, so activations are not kept alive across
    steps.

    Args:
        model: the model to watch.
        layers: ``{name: dotted_path}``, or a sequence of paths used as names.

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

    def __init__(self, model: nn.Module, layers: Mapping[str, str] | Sequence[str]) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
        if isinstance(layers, str) or not isinstance(layers, (Mapping, Sequence)):
            raise TypeError(
                "expected layers as a mapping {name: module_path} or a sequence of paths, "
                f"got {type(layers).__name__}"
            )
        mapping = dict(layers) if isinstance(layers, Mapping) else {p: p for p in layers}
        self.layers: dict[str, str] = mapping
        self._modules = {name: resolve_module(model, path) for name, path in mapping.items()}
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

    def pop(self) -> dict[str, Any]:
        """Return the outputs captured since the last call and forget them."""
        features, self._features = self._features, {}
        return features

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
