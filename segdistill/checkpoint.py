"""Atomic checkpoints that load with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["changed_settings", "load_checkpoint", "save_checkpoint"]


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``state`` to ``path`` atomically.

    The state goes to a temporary file in the same directory
    (``.<name>.<pid>.<random>.tmp``: the writer's process id tells a killed
    writer's leftovers from a live one's), which is flushed to disk, renamed
    over ``path``, and the directory is flushed too, so the rename itself
    survives a power cut: a crash mid-write leaves the previous checkpoint
    intact, never a truncated one.

    Args:
        state: tensors, state dicts, numbers, strings and containers of them,
            so that :func:`load_checkpoint` can read it with
            ``weights_only=True``.
        path: where to write; parent directories are created.

    Returns:
        The path written.

    Raises:
        TypeError: ``state`` is not a dict.
        OSError: the write failed (a full disk, a quota, a read-only folder);
            the message says what happened, while saving which path, and that
            the previous file there is intact (the temporary file is removed).
        RuntimeError: ``torch.save`` failed otherwise; the message says so likewise.
    """
    if not isinstance(state, dict):
        raise TypeError(f"expected the checkpoint state to be a dict, got {type(state).__name__}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp",
                               dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except Exception as error:
        Path(tmp).unlink(missing_ok=True)
        raise _save_error(error, target) from error
    except BaseException:  # KeyboardInterrupt, SystemExit: as they are
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_folder(target.parent)
    return target


def _save_error(error: Exception, target: Path) -> Exception:
    """What went wrong while writing ``target``, from the first ``OSError`` in the chain:
    torch's writer reports a full disk as ``RuntimeError: [enforce fail at
    inline_container.cc] unexpected pos``, the ``OSError`` that says why only under it."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    kept = ("the previous checkpoint is intact" if target.exists()
            else "nothing was written there")
    if not isinstance(cause, OSError):
        return RuntimeError(f"{type(error).__name__}: {error} while saving {target}; {kept}")
    what = cause.strerror[0].lower() + cause.strerror[1:] if cause.strerror else str(cause)
    message = f"{what} while saving {target}; {kept}"
    return OSError(message) if cause.errno is None else OSError(cause.errno, message)


def _sync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename in it) to disk, where the system allows it."""
    if os.name != "posix":  # pragma: no cover - Windows cannot open a folder to fsync it
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device | None = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises:
        FileNotFoundError: if there is no file at ``path``.
        RuntimeError: if the file is truncated or not a checkpoint (the message names it).
        ValueError: if it holds something other than a dict.
    """
    target = Path(path)
    if not target.is_file():
        raise FileNotFoundError(f"no checkpoint at {target}")
    try:
        state = torch.load(target, map_location=map_location, weights_only=True)
    except Exception as error:  # EOFError, UnpicklingError, RuntimeError, ... without the path
        raise RuntimeError(f"cannot read the checkpoint {target} ({type(error).__name__}: "
                           f"{error}); it is truncated or corrupt") from error
    if not isinstance(state, dict):
        raise ValueError(f"{target} does not hold a checkpoint dict")
    return state


def changed_settings(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The settings a checkpoint ``recorded`` that differ from the ``current`` run's, one
    line each with both values: what a resume that refuses other settings lists.

    The names come in ``current``'s order, then those only ``recorded`` has; a name that
    one side lacks shows ``(none)`` there. Values are compared with ``==``.

    Example:
        >>> changed_settings({"lr": 0.1, "batch": 8}, {"lr": 0.05, "batch": 8, "seed": 0})
        ['  lr: 0.1 in the checkpoint, 0.05 now', '  seed: (none) in the checkpoint, 0 now']
    """
    def shown(values: Mapping[str, Any], name: str) -> str:
        return repr(values[name]) if name in values else "(none)"

    names = [*current, *(name for name in recorded if name not in current)]
    return [f"  {name}: {shown(recorded, name)} in the checkpoint, {shown(current, name)} now"
            for name in names
            if name not in recorded or name not in current or recorded[name] != current[name]]
