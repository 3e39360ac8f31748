"""The one reduction helper every loss in segdistill uses."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from segdistill._checks import check_choice

__all__ = ["REDUCTIONS", "Reduction", "check_reduction", "nan_where_nonfinite", "reduce_loss"]

Reduction = Literal["none", "mean", "sum"]
REDUCTIONS: tuple[str, ...] = ("none", "mean", "sum")


def check_reduction(reduction: str) -> None:
    """Raise ``ValueError`` unless ``reduction`` is ``'none'``, ``'mean'`` or ``'sum'``."""
    check_choice("reduction", reduction, REDUCTIONS)


def reduce_loss(loss: Tensor, reduction: str) -> Tensor:
    """Reduce a tensor of per-element loss terms.

    Args:
        loss: the unreduced terms, any shape.
        reduction: ``'none'`` returns ``loss`` unchanged, ``'mean'`` its mean and
            ``'sum'`` its sum over all elements (validated once by the caller,
            with :func:`check_reduction`).
    """
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def nan_where_nonfinite(loss: Tensor, *inputs: Tensor, allow_neg_inf: bool = False) -> Tensor:
    """``loss`` with NaN in every image whose inputs hold a NaN or an infinity.

    The library's rule for non-finite inputs: the loss of such an image is NaN,
    never a finite number (a squared error would give ``inf``, a clamp or a
    mask could hide it). Losses whose arithmetic already turns every
    non-finite input into NaN do not need this.

    Args:
        loss: unreduced terms, any shape whose first dimension is the batch.
        inputs: tensors whose first dimension is the same batch.
        allow_neg_inf: let ``-inf`` through (logits of masked classes).
    """
    bad = torch.zeros(loss.shape[0], dtype=torch.bool, device=loss.device)
    for x in inputs:
        flat = x.flatten(1)
        wrong = (flat.isnan() | flat.isposinf()) if allow_neg_inf else ~flat.isfinite()
        bad = bad | wrong.any(1)
    return loss.masked_fill(bad.view(-1, *([1] * (loss.ndim - 1))), float("nan"))
