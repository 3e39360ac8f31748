"""Model size and cost: parameters, FLOPs (torch.utils.flop_counter), throughput
(torch.utils.benchmark)."""

from __future__ import annotations

import logging
import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "count_parameters", "cpu_model", "throughput"]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else :func:`platform.processor`), for the
    machine line of every result."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def count_parameters(model: nn.Module) -> int:
    """The number of parameters of ``model`` (buffers excluded).

    Example:
        >>> count_parameters(nn.Conv2d(3, 8, 3))
        224
    """
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, inputs: Any) -> int:
    """FLOPs of one forward pass on ``inputs``, counted by ``torch.utils.flop_counter``.

    A multiply-add counts as two FLOPs. The model runs in eval mode without
    gradients and is put back in the mode it had.

    Example:
        >>> count_flops(nn.Conv2d(1, 1, 1, bias=False), torch.zeros(1, 1, 2, 2))
        8
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(inputs)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def throughput(model: nn.Module, inputs: torch.Tensor, min_run_time: float = 0.5) -> float:
    """Images per second of ``model``'s forward pass in eval mode without gradients.

    ``torch.utils.benchmark`` runs the pass in blocks for at least
    ``min_run_time`` seconds (synchronising CUDA) and this returns the batch
    size over the median time per pass.
    """
    # imported late and quietly: importing it probes for a CUDA toolkit (for C++ timers this
    # does not use) and warns on machines without one
    cpp = logging.getLogger("torch.utils.cpp_extension")
    level = cpp.level
    cpp.setLevel(logging.ERROR)
    try:
        from torch.utils.benchmark import Timer
    finally:
        cpp.setLevel(level)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(inputs)  # warm up
            timer = Timer("model(inputs)", globals={"model": model, "inputs": inputs},
                          num_threads=torch.get_num_threads())
            seconds = timer.blocked_autorange(min_run_time=min_run_time).median
    finally:
        model.train(was_training)
    return inputs.shape[0] / seconds
