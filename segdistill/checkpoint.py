"""Atomic checkpoints that load with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_checkpoint", "save_checkpoint"]


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``state`` to ``path`` atomically.

    The state goes to a temporary file in the same directory, which is flushed
    to disk and then renamed over ``path``: a crash mid-write leaves the
    previous checkpoint intact, never a truncated one.

    Args:
        state: tensors, state dicts, numbers, strings and containers of them,
            so that :func:`load_checkpoint` can read it with
            ``weights_only=True``.
        path: where to write; parent directories are created.

    Returns:
        The path written.
    """
    if not isinstance(state, dict):
        raise TypeError(f"expected the checkpoint state to be a dict, got {type(state).__name__}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


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
