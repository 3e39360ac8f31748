"""The one reduction helper every loss in segdistill uses."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from segdistill._checks import check_choice

__all__ = ["REDUCTIONS", "Reduction", "check_reduction", "reduce_loss"]

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
            ``'sum'`` its sum over all elements.
    """
    check_reduction(reduction)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss
