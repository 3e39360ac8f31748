"""The one label rule: every loss that takes labels validates and masks them here.

A label map is an integer ``(B, H_l, W_l)`` tensor beside logits ``(B, K, H, W)``:

- **Grid.** Labels may sit on any grid (typically the input's): they are
  resized onto the grid the loss computes on by nearest neighbour
  (``F.interpolate(mode='nearest')``) before the mask is taken. Through a
  :class:`~segdistill.DistillationWrapper` the rule is the same, since the
  wrapper hands the labels to the loss unchanged.
- **Values.** Every label is in ``[0, K)`` or equals ``ignore_index``; pixels
  labelled ``ignore_index`` are left out. Anything else (a 7 for 4 classes, a
  -1 without ``ignore_index=-1``) raises ``ValueError``.
- **Cost.** The range check reads one boolean from the device (one host
  sync per call). Pass ``validate_args=False`` to the loss to skip it in a hot
  loop whose labels are known to be valid (as torchmetrics does); the shape,
  dtype and device checks cost nothing and always run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from segdistill._checks import check_same_batch, check_same_device

__all__ = ["check_ignore_index", "counted_pixels", "labels_on_grid"]


def check_ignore_index(ignore_index: object) -> None:
    """Raise ``TypeError`` unless ``ignore_index`` is an int or ``None``."""
    if ignore_index is not None and (isinstance(ignore_index, bool)
                                     or not isinstance(ignore_index, int)):
        raise TypeError(f"ignore_index must be an int or None, got {type(ignore_index).__name__}")


def _check_label_tensor(target: object, logits: Tensor) -> Tensor:
    """The checks that need no host sync: a (B, H, W) integer tensor beside the logits."""
    if not isinstance(target, Tensor):
        raise TypeError(f"expected target to be a torch.Tensor, got "
                        f"{type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"expected target to hold integer labels, got {target.dtype}")
    if target.ndim != 3:
        raise ValueError(f"expected target of shape (B, H, W), got a {target.ndim}-D tensor of "
                         f"shape {tuple(target.shape)}")
    check_same_device(logits, target, ("logits", "target"))
    check_same_batch(logits, target, ("logits", "target"))
    return target


def _check_label_values(target: Tensor, classes: int, ignore_index: int | None) -> None:
    """Labels in ``[0, classes)`` or ``ignore_index``: one host sync, more only to word
    the error."""
    outside = (target < 0) | (target >= classes)
    if ignore_index is not None:
        outside &= target != ignore_index
    if bool(outside.any()):
        counted = target if ignore_index is None else target[target != ignore_index]
        allowed = f"[0, {classes})" + ("" if ignore_index is None
                                       else f" or ignore_index={ignore_index}")
        raise ValueError(f"labels must be in {allowed}, got values from {int(counted.min())} "
                         f"to {int(counted.max())}")


def labels_on_grid(target: Tensor, size: tuple[int, int]) -> Tensor:
    """Integer labels (B, H_l, W_l) nearest-resized onto ``size`` (the rule's grid step;
    unchanged when already there). Every loss that reads the label values, not only the
    mask, calls this, so values and mask come from the same source pixel.

    Example:
        >>> labels_on_grid(torch.tensor([[[0, 1], [2, 3]]]), (4, 4))[0, 0]
        tensor([0, 0, 1, 1])
    """
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    resized = F.interpolate(target[:, None].float(), size=size, mode="nearest")[:, 0]
    return resized.to(target.dtype)


def counted_pixels(target: Tensor | None, logits: Tensor, ignore_index: int | None,
                   validate_args: bool = True) -> Tensor | None:
    """Validate labels by the library's one rule and return the pixels a loss counts.

    Args:
        target: integer labels ``(B, H_l, W_l)`` on any grid, or ``None``.
        logits: the ``(B, K, H, W)`` logits the labels mask, on the grid the
            loss computes on.
        ignore_index: the label to leave out, or ``None``.
        validate_args: check the label values (one host sync); shapes, dtype
            and device are always checked.

    Returns:
        A boolean ``(B, H, W)`` mask on the logits' grid, ``True`` where the
        pixel counts; ``None`` when every pixel counts (no labels, or no
        ``ignore_index``).

    Raises:
        TypeError: labels that are not an integer tensor.
        ValueError: labels not 3-D, on another device or batch than the logits,
            or (with ``validate_args``) outside ``[0, K)`` and not ``ignore_index``.

    Example:
        >>> logits = torch.zeros(1, 4, 2, 2)
        >>> counted_pixels(torch.tensor([[[0, 255], [3, 1]]]), logits, 255)
        tensor([[[ True, False],
                 [ True,  True]]])
        >>> counted_pixels(torch.full((1, 4, 4), 7), logits, 255)
        Traceback (most recent call last):
            ...
        ValueError: labels must be in [0, 4) or ignore_index=255, got values from 7 to 7
    """
    if target is None:
        return None
    target = _check_label_tensor(target, logits)
    if validate_args:
        _check_label_values(target, logits.shape[1], ignore_index)
    if ignore_index is None:
        return None
    return labels_on_grid(target, (logits.shape[-2], logits.shape[-1])) != ignore_index
