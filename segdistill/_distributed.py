"""What data-parallel wrapping a model carries, and a plain copy of the user's own module.

DDP and FSDP all-reduce the gradients of the parameters they wrap, and only those: a
student wrapped on its own leaves the wrapper's adapters, regressors and discriminators
out (:func:`student_wrapper_kind` lets the wrapper say so). FSDP2 (``fully_shard``)
changes the module in place, swapping each sharded module's class and its parameters
for shards; :func:`plain_copy` undoes that in a copy, for export.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from segdistill.hooks import unwrap_model

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = ["plain_copy", "student_wrapper_kind"]

_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks",
               "_state_dict_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")
# keyed by the handle ids of the hooks above: an entry goes with its hook
_HOOK_FLAGS = ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called")
# set by fully_shard on every module it manages, for Dynamo; a copy is managed by no one
_FSDP_FLAGS = ("_is_fsdp_managed_module", "_fsdp_use_orig_params")
# torch.distributed's composable APIs (fully_shard, replicate, checkpoint) keep their
# state and registry in a module's __dict__ under keys with this prefix
_COMPOSABLE_PREFIX = "__composable_api_state_key"


def _fsdp_classes() -> tuple[type, type] | None:
    """``(FSDPModule, FullyShardedDataParallel)``, or ``None`` where torch was built
    without distributed support."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return FSDPModule, FullyShardedDataParallel


def student_wrapper_kind(module: nn.Module) -> str | None:
    """The data-parallel wrapping applied to ``module`` or to any module inside it.

    A look at the module tree only: cheap, and no collective, so any rank may call it
    at any time (the wrapper does, at every forward, since ``fully_shard`` can be
    applied after the wrapper was built).

    Args:
        module: a module, possibly compiled (``torch.compile``) and/or wrapped.

    Returns:
        ``'DistributedDataParallel'``, ``'FSDP2 fully_shard'`` (any module is an
        ``FSDPModule``), ``'FullyShardedDataParallel'`` (FSDP1), naming the outermost
        wrapping found; ``None`` when there is none (``nn.DataParallel`` runs in one
        process and all-reduces nothing, so it is none).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 1))
        >>> student_wrapper_kind(net) is None
        True
        >>> student_wrapper_kind(torch.compile(nn.DataParallel(net))) is None
        True
    """
    kinds: dict[type, str] = {nn.parallel.DistributedDataParallel: "DistributedDataParallel"}
    fsdp = _fsdp_classes()
    if fsdp is not None:
        kinds.update({fsdp[0]: "FSDP2 fully_shard", fsdp[1]: "FullyShardedDataParallel"})
    wrappers = tuple(kinds)
    for inner in module.modules():  # parents before children: the outermost comes first
        if isinstance(inner, wrappers):
            return next(kind for cls, kind in kinds.items() if isinstance(inner, cls))
    return None


def plain_copy(module: nn.Module) -> nn.Module:
    """A plain, full, deep copy of the user's own module inside any wrapping.

    ``torch.compile``, ``DistributedDataParallel`` and ``nn.DataParallel`` are
    unwrapped (:func:`~segdistill.hooks.unwrap_model`). A module sharded by FSDP2
    (``fully_shard``, on the root and/or on any of its blocks), which
    ``copy.deepcopy`` refuses, is copied with its shards gathered: every module of the
    copy has the user's class again (``fully_shard`` swaps in a generated subclass),
    every parameter and buffer is a plain full ``torch.Tensor`` (no ``DTensor``), and
    FSDP's hooks and bookkeeping are left out; hooks of anyone else are copied, as
    ``copy.deepcopy`` copies them. The original is not changed: it stays sharded and
    keeps training.

    With FSDP2 this is a collective (one all-gather per sharded parameter, in the
    same order on every rank): **every rank must call it**, and each gets the full
    copy, on the device of its shards.

    Args:
        module: a plain, compiled, DDP/DataParallel-wrapped or FSDP2-sharded module.

    Returns:
        The copy: the user's module class, ``state_dict`` keys without
        ``_orig_mod.`` or ``module.`` prefixes, parameters of the full shapes
        with the values and ``requires_grad`` of the original's, no gradients.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``, or holds an FSDP1
            ``FullyShardedDataParallel``, whose flattened parameters have no plain
            copy here (gather them with its ``summon_full_params``, or shard with
            ``fully_shard``).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 1))
        >>> copied = plain_copy(torch.compile(net))
        >>> type(copied) is nn.Sequential, copied is net
        (True, False)
        >>> torch.equal(copied[0].weight, net[0].weight)
        True
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(module).__name__}")
    inner = unwrap_model(module)
    fsdp = _fsdp_classes()
    if fsdp is None:
        return copy.deepcopy(inner)
    if any(isinstance(m, fsdp[1]) for m in inner.modules()):
        raise TypeError("plain_copy cannot copy a module holding an FSDP1 "
                        "FullyShardedDataParallel (flattened parameters); gather it with "
                        "FullyShardedDataParallel.summon_full_params, or shard with FSDP2's "
                        "fully_shard")
    from torch.distributed.tensor import DTensor

    tensors = [t for m in inner.modules()
               for t in (*m._parameters.values(), *m._buffers.values())]
    if not any(isinstance(m, fsdp[0]) for m in inner.modules()) and not any(
            isinstance(t, DTensor) for t in tensors):
        return copy.deepcopy(inner)
    memo = _gathered(inner, DTensor)
    return _unsharded_copy(inner, fsdp[0], memo)


@torch.no_grad()
def _gathered(module: nn.Module, dtensor: type[DTensor]) -> dict[int, Any]:
    """A deepcopy memo mapping each sharded parameter and buffer of ``module`` to a plain
    full tensor (a collective: the order is the module tree's, the same on every rank)."""
    memo: dict[int, Any] = {}
    for inner in module.modules():
        for tensors in (inner._parameters, inner._buffers):
            for value in tensors.values():
                if not isinstance(value, dtensor) or id(value) in memo:
                    continue
                full: Tensor = value.full_tensor().detach().clone()
                if isinstance(value, nn.Parameter):
                    full = nn.Parameter(full, requires_grad=value.requires_grad)
                memo[id(value)] = full
    return memo


def _unsharded_copy(module: nn.Module, fsdp_module: type, memo: dict[int, Any]) -> nn.Module:
    """Copy ``module`` with each module's class and state as before ``fully_shard``.

    Every module gets an empty instance of its user class first, in the memo, so that
    deep-copying a module's attributes reaches its children's copies instead of
    recursing into the (undeepcopyable) FSDP classes.
    """
    originals = list(module.modules())
    for original in originals:
        cls = _user_class(type(original), fsdp_module)
        memo[id(original)] = cls.__new__(cls)
    for original in originals:
        state = copy.deepcopy(_plain_state(original), memo)
        memo[id(original)].__dict__.update(state)
    return memo[id(module)]  # type: ignore[no-any-return]


def _user_class(cls: type[nn.Module], fsdp_module: type) -> type[nn.Module]:
    """The user's class behind the ``FSDP<Name>`` subclass that ``fully_shard`` makes."""
    if not issubclass(cls, fsdp_module):
        return cls
    bases = [base for base in cls.__bases__ if not issubclass(base, fsdp_module)]
    if len(bases) == 1 and issubclass(bases[0], nn.Module):
        return bases[0]
    raise TypeError(f"cannot tell the module class that FSDP's {cls.__name__} was made from "
                    f"(its bases: {[base.__name__ for base in cls.__bases__]})")


def _plain_state(module: nn.Module) -> dict[str, Any]:
    """``module.__dict__`` without FSDP's hooks, flags and composable-API state (a
    shallow copy: the caller deep-copies it)."""
    dropped = {handle for name in _HOOK_DICTS
               for handle, hook in module.__dict__.get(name, {}).items() if _is_fsdp_hook(hook)}
    state: dict[str, Any] = {}
    for key, value in module.__dict__.items():
        if key in _FSDP_FLAGS:
            continue
        if key in _HOOK_DICTS or key in _HOOK_FLAGS:
            value = type(value)((k, v) for k, v in value.items() if k not in dropped)
        elif key.startswith(_COMPOSABLE_PREFIX) and isinstance(value, dict):
            value = type(value)((k, v) for k, v in value.items()
                                if getattr(k, "__name__", k) != "fully_shard")
            if not value:
                continue
        state[key] = value
    return state


def _is_fsdp_hook(hook: Any) -> bool:
    """Whether a module hook is one that FSDP registered (a bound method, closure or
    lambda of its own modules, possibly inside ``nn.Module``'s hook wrapper)."""
    hook = getattr(hook, "hook", hook)  # the wrapper of _register_load_state_dict_pre_hook
    hook = getattr(hook, "func", hook)  # functools.partial
    return str(getattr(hook, "__module__", "")).startswith("torch.distributed.fsdp")
