"""Write a Sphinx inventory of torch's public API for intersphinx, without the network.

pytorch.org publishes one page per public object under ``generated/``; this
walks the installed torch's main namespaces and links each public class and
function to that page, so ``:class:`torch.Tensor``` and friends resolve offline.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
import zlib
from pathlib import Path

NAMESPACES = [
    "torch", "torch.nn", "torch.nn.functional", "torch.optim", "torch.utils.data",
    "torch.nn.parallel", "torch.distributed", "torch.amp", "torch.autograd",
]
SPECIAL = {"torch.Tensor": "tensors.html#torch.Tensor", "torch.dtype":
           "tensor_attributes.html#torch.dtype", "torch.device":
           "tensor_attributes.html#torch.device"}


def _entries() -> list[tuple[str, str, str]]:
    entries = {name: ("py:class", uri) for name, uri in SPECIAL.items()}
    for namespace in NAMESPACES:
        module = importlib.import_module(namespace)
        for attr in getattr(module, "__all__", dir(module)):
            if attr.startswith("_"):
                continue
            name = f"{namespace}.{attr}"
            if name in entries:
                continue
            with warnings.catch_warnings():  # deprecated aliases warn when touched
                warnings.simplefilter("ignore")
                obj = getattr(module, attr, None)
                role = ("py:class" if inspect.isclass(obj)
                        else "py:function" if callable(obj) else None)
            if role is not None:
                entries[name] = (role, f"generated/{name}.html#{name}")
    return [(name, role, uri) for name, (role, uri) in sorted(entries.items())]


def write_inventory(folder: Path) -> Path:
    """Write ``torch.inv`` into ``folder`` (once) and return its path."""
    path = folder / "torch.inv"
    if path.exists():
        return path
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(f"{name} {role} 1 {uri} -\n" for name, role, uri in _entries())
    header = (f"# Sphinx inventory version 2\n# Project: PyTorch\n# Version: {torch.__version__}\n"
              "# The remainder of this file is compressed using zlib.\n")
    path.write_bytes(header.encode() + zlib.compress(lines.encode()))
    return path
