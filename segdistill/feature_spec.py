"""Layer paths and FeatureSpec: a feature map to capture, declared in one place.

Like timm's ``FeatureInfo``, a spec keeps a feature's layer path beside its channels and
output stride, so that a preset, the hooks and a model zoo entry share one object
instead of loose ``layer``/``channels`` arguments per side.
:func:`~segdistill.hooks.probe_features` fills in what was left out from one forward of
the model. A layer path is a dotted module path (``'backbone.layer4'``), optionally
followed by Python indexing selectors for a module that returns a list, a tuple or a
mapping: ``'encoder[-1]'``, ``"backbone['high']"``, ``"encoder['hidden_states'][2]"``.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import TypeAlias, cast

from segdistill._checks import check_positive_int
from segdistill.tokens import TokenGrid

__all__ = ["FeatureLike", "FeatureSpec", "Selector", "as_spec", "parse_layer"]
Selector: TypeAlias = str | int
"""One indexing step into a structured output: a mapping key or a sequence index."""


_SELECTOR = re.compile(r"\[\s*(-?\d+|'[^']*'|\"[^\"]*\")\s*\]")
_SYNTAX = ("Python indexing with an int or a quoted key, e.g. 'encoder[-1]' or "
           "\"backbone['high']\"")


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


@dataclass(frozen=True)
class FeatureSpec:
    """Where a feature map is captured, and its channels and output stride where known.

    The layer path is parsed once, here (its module path and selectors are
    kept), so a malformed selector fails when the spec is made.

    Args:
        layer: a layer path: a dotted module path, optionally followed by
            Python indexing for a module that returns a list, a tuple or a
            mapping (``'encoder[-1]'``, ``"backbone['high']"``).
        channels: the map's channels :math:`C`, or ``None`` if unknown.
        stride: the map's output stride (input size / map size), or ``None``.
        call: which call of a module that runs several times in one forward to
            capture: ``0`` the first, ``-1`` the last (torchvision's ResNet blocks
            call one ``relu`` two or three times). ``None``: the module must run
            exactly once per forward, and the first step raises when it does not.
        tokens: the layer gives ViT tokens :math:`(B, P + N, C)`: put them on their
            patch grid as :math:`(B, C, H, W)` (see :mod:`segdistill.tokens`)
            before anything else reads them.

    Raises:
        TypeError: ``layer`` is not a string, a count is not an int, or ``tokens``
            is not a :class:`~segdistill.TokenGrid`.
        ValueError: a malformed selector, or a count below 1.

    Example:
        >>> spec = FeatureSpec("backbone['high']", channels=960, stride=16)
        >>> spec
        FeatureSpec(layer="backbone['high']", channels=960, stride=16)
        >>> spec.module_path, spec.selectors
        ('backbone', ('high',))
    """

    layer: str
    channels: int | None = None
    stride: int | None = None
    call: int | None = None
    tokens: TokenGrid | None = None
    module_path: str = field(init=False, repr=False, compare=False)
    selectors: tuple[Selector, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        path, selectors = parse_layer(self.layer)
        object.__setattr__(self, "module_path", path)
        object.__setattr__(self, "selectors", selectors)
        for name in ("channels", "stride"):
            value = getattr(self, name)
            if value is not None:
                check_positive_int(f"FeatureSpec.{name}", value)
        if self.call is not None and (isinstance(self.call, bool)
                                      or not isinstance(self.call, int)):
            raise TypeError(f"expected FeatureSpec.call to be an int (0 = the first call, "
                            f"-1 = the last) or None, got {type(self.call).__name__}")
        if self.tokens is not None and not isinstance(self.tokens, TokenGrid):
            raise TypeError(f"expected FeatureSpec.tokens to be a TokenGrid, got "
                            f"{type(self.tokens).__name__}")

    def __repr__(self) -> str:
        shown = [f"layer={self.layer!r}", f"channels={self.channels}", f"stride={self.stride}"]
        shown += [f"{name}={getattr(self, name)!r}" for name in ("call", "tokens")
                  if getattr(self, name) is not None]
        return f"FeatureSpec({', '.join(shown)})"


FeatureLike: TypeAlias = str | FeatureSpec
"""A layer path, or a :class:`FeatureSpec` that also gives its channels and stride."""


def as_spec(value: FeatureLike, name: str = "layer") -> FeatureSpec:
    """``value`` as a :class:`FeatureSpec` (a layer path becomes a spec with nothing known).

    Raises:
        TypeError: ``value`` is neither a string nor a spec.
    """
    if isinstance(value, FeatureSpec):
        return value
    if isinstance(value, str):
        return FeatureSpec(value)
    raise TypeError(f"expected {name} to be a layer path (str) or a FeatureSpec, got "
                    f"{type(value).__name__}")
