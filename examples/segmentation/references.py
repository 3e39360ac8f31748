"""Distillation checkpoints that name the frozen teacher and translator they were trained
against.

A :class:`~segdistill.DistillationWrapper`'s ``state_dict`` leaves the teacher and the
teacher-side transforms (the translator) out: they are the ones the wrapper was built
with. A resumed distillation must be built with the very same ones, so
:func:`reference_frozen` makes the wrapper's ``state_dict`` hold, under
``'frozen_files'``, the path and SHA-256 of the file each was loaded from. Loading
such a state dict checks each file's hash against the one the checkpoint recorded,
raises naming the file if it changed; the wrapper fills the frozen modules' entries
from the modules themselves (which were built from those files), so a strict
``load_state_dict`` works as before; an older checkpoint that holds the frozen modules
loads too.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from segdistill import DistillationWrapper

__all__ = ["FROZEN_FILES", "reference_frozen", "sha256", "teacher_transforms"]

FROZEN_FILES = "frozen_files"
"""The ``state_dict`` key of the references: ``{name: {"path": ..., "sha256": ...}}``."""


def sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _transforms(wrapper: DistillationWrapper) -> dict[str, nn.Module]:
    """Each term's teacher-side transform, by term name."""
    found = {}
    for name, term in wrapper.terms.items():
        transform = getattr(term, "teacher_transform", None)
        if isinstance(transform, nn.Module):
            found[name] = transform
    return found


def teacher_transforms(wrapper: DistillationWrapper) -> list[nn.Module]:
    """The distinct teacher-side transforms of ``wrapper``'s terms (the paper's two terms
    share one, the translator's encoder)."""
    return list({id(m): m for m in _transforms(wrapper).values()}.values())


def _frozen_prefixes(wrapper: DistillationWrapper) -> tuple[str, ...]:
    """Where the teacher and the teacher-side transforms sit in the wrapper's state dict."""
    return ("teacher.", *(f"terms.{name}.teacher_transform." for name in _transforms(wrapper)))


def reference_frozen(wrapper: DistillationWrapper,
                     files: Mapping[str, tuple[nn.Module, str | os.PathLike[str]]]) -> None:
    """Make ``wrapper``'s state dict reference the frozen modules' files, not copy them.

    Args:
        wrapper: the wrapper whose checkpoints to slim.
        files: ``{name: (module, path)}``: each frozen module (the teacher, the
            translator) and the file its weights were loaded from. Every
            parameter and buffer of the teacher and of the teacher-side
            transforms must sit under one of these modules.

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: a frozen module's entries are not covered by ``files``; and,
            when a state dict is loaded, a referenced file whose SHA-256 is not
            the one the state dict recorded (the message names the file), or a
            reference missing from the state dict.

    Example:
        >>> import tempfile, torch
        >>> teacher, student = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        >>> wrapper = presets.kd(teacher, student)
        >>> path = Path(tempfile.mkdtemp()) / "teacher.pt"
        >>> torch.save(teacher.state_dict(), path)
        >>> reference_frozen(wrapper, {"teacher": (teacher, path)})
        >>> state = wrapper.state_dict()
        >>> sorted(state), sorted(state[FROZEN_FILES]["teacher"])
        (['frozen_files', 'student.bias', 'student.weight'], ['path', 'sha256'])
        >>> wrapper.load_state_dict(state)
        <All keys matched successfully>
    """
    references: dict[str, dict[str, str]] = {}
    for name, (_, path) in files.items():
        if not Path(path).is_file():
            raise FileNotFoundError(f"no {name} file at {path}")
        references[name] = {"path": str(Path(path).resolve()), "sha256": sha256(path)}
    owners = {id(module): name for name, (module, _) in files.items()}
    # every path under which a referenced module sits (a shared translator sits under
    # each term that uses it)
    prefixes = {name + ".": owners[id(module)]
                for name, module in wrapper.named_modules(remove_duplicate=False)
                if id(module) in owners}
    # the frozen parts' entries under every name they have (the wrapper's state_dict
    # leaves them out, so they are listed from the modules)
    names = [n for n, _ in wrapper.named_parameters(remove_duplicate=False)] + [
        n for n, _ in wrapper.named_buffers(remove_duplicate=False)]
    uncovered = sorted(key for key in names
                       if key.startswith(_frozen_prefixes(wrapper))
                       and not key.startswith(tuple(prefixes)))
    if uncovered:
        raise ValueError(f"frozen entries without a file reference: {uncovered[:5]}"
                         f"{' ...' if len(uncovered) > 5 else ''}; pass the module that holds "
                         "them in files=")

    # the wrapper's own state_dict leaves the frozen modules out and a load fills them in
    # from the wrapper (segdistill.DistillationWrapper, save_frozen=False): these hooks
    # only add the files' references and check them
    def record(module: nn.Module, state: dict[str, Any], prefix: str, local: Any) -> None:
        state[prefix + FROZEN_FILES] = {k: dict(v) for k, v in references.items()}

    def check(module: nn.Module, state: dict[str, Any], prefix: str, local: Any,
              strict: bool, missing: list[str], unexpected: list[str],
              errors: list[str]) -> None:
        recorded = state.pop(prefix + FROZEN_FILES, None)
        if recorded is None:
            return  # a state dict with the frozen modules in it (an older checkpoint)
        for name, current in references.items():
            if name not in recorded:
                raise ValueError(f"the checkpoint has no reference to the {name} file "
                                 f"{current['path']}; it references {sorted(recorded)}")
            old = recorded[name]
            if old["sha256"] != current["sha256"]:
                raise ValueError(
                    f"the {name} file {current['path']} has changed since the checkpoint was "
                    f"written: its SHA-256 is {current['sha256'][:16]}..., the checkpoint "
                    f"recorded {old['sha256'][:16]}... (of {old['path']}). Restore that file, "
                    "or start this stage afresh (without --resume)")

    wrapper.register_state_dict_post_hook(record)  # type: ignore[no-untyped-call]
    wrapper.register_load_state_dict_pre_hook(check)  # type: ignore[no-untyped-call]

