"""Model size and cost: parameters, FLOPs (torch.utils.flop_counter), throughput."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "count_parameters", "measure_throughput"]


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


def measure_throughput(
    model: nn.Module, inputs: torch.Tensor, warmup: int = 2, repeats: int = 5
) -> float:
    """Images per second of ``model``'s forward pass in eval mode without gradients."""
    was_training = model.training
    model.eval()
    def sync() -> None:
        if inputs.is_cuda:
            torch.cuda.synchronize()

    try:
        with torch.no_grad():
            for _ in range(warmup):
                model(inputs)
            sync()
            start = time.perf_counter()
            for _ in range(repeats):
                model(inputs)
            sync()
            elapsed = time.perf_counter() - start
    finally:
        model.train(was_training)
    return repeats * inputs.shape[0] / elapsed
