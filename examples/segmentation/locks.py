"""One run per stage folder: the lock file a stage holds while it runs.

A stage takes ``OUT/<stage>/run.lock`` before it writes anything there (its log,
its checkpoints, its temporaries), and removes it when it ends, however it ends
but killed. The file says who holds it (process id, host, the process's start
time, the command), so that a second run on the folder fails at once naming the
first, and a lock whose process is gone (killed, the machine rebooted) is taken
over with a warning. Standard library only: a process that merely checks a lock
need not import torch.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["LOCK_NAME", "folder_lock", "process_alive"]

LOCK_NAME = "run.lock"
"""The lock file's name in a stage folder."""


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (Linux), else ``None``."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started, in clock ticks since boot (Linux), to tell it from a
    later process that reuses its id; ``None`` where the system does not say."""
    fields = _proc_stat(pid)
    return fields[19] if fields else None


def process_alive(pid: int, start: str | None = None) -> bool:
    """Whether process ``pid`` runs on this machine (a zombie does not), and, when
    ``start`` is given and the system tells, is the one that started then.

    Example:
        >>> process_alive(os.getpid())
        True
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    fields = _proc_stat(pid)
    if fields is None:
        return True
    return fields[0] != "Z" and (start is None or fields[19] == start)


def _holder() -> dict[str, Any]:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "start": _start_time(pid),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}


def _read(path: Path) -> dict[str, Any] | None:
    """The holder a lock file names; ``None`` when it cannot be read as one."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _describe(holder: dict[str, Any]) -> str:
    return (f"pid {holder['pid']} on {holder.get('host')}, since {holder.get('since')} "
            f"({holder.get('command') or 'unknown command'})")


def _refuse_or_clear(path: Path) -> None:
    """Raise when the lock at ``path`` is held; remove it, with a warning, when its
    process is gone."""
    holder = _read(path)
    if holder is None:
        if not path.exists():  # released meanwhile
            return
        raise RuntimeError(
            f"{path.parent} is locked by {path}, which names no process (unreadable); "
            f"if no run uses this folder, delete {path}")
    if holder.get("host") != socket.gethostname():
        raise RuntimeError(
            f"{path.parent} is in use by another run: {_describe(holder)}; its lock is {path}. "
            "A process on another machine cannot be checked from here: wait for it to end, "
            f"give this run another --out, or delete {path} if that run is gone")
    if process_alive(holder["pid"], holder.get("start")):
        raise RuntimeError(
            f"{path.parent} is in use by another run: {_describe(holder)}; its lock is {path}. "
            "Wait for it to end, or give this run another --out")
    warnings.warn(f"taking over the stale lock {path}: its run ({_describe(holder)}) is gone",
                  RuntimeWarning, stacklevel=4)
    path.unlink(missing_ok=True)


@contextmanager
def folder_lock(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold ``folder/run.lock`` for the duration of the ``with`` block.

    Yields:
        The lock file's path.

    Raises:
        RuntimeError: another live process holds the lock (the message names it and
            the lock file), or the lock file names no process.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> with folder_lock(folder) as lock:
        ...     lock.name, lock.exists()
        ('run.lock', True)
        >>> lock.exists()
        False
    """
    path = Path(folder) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    me = _holder()
    for _ in range(3):  # a stale lock cleared, or a lock released meanwhile: try again
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _refuse_or_clear(path)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise RuntimeError(f"cannot take the lock {path}: other runs keep taking it")
    try:
        yield path
    finally:
        if _read(path) == me:  # never remove a lock someone else has taken over
            path.unlink(missing_ok=True)
