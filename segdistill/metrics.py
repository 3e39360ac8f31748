"""Segmentation metrics: a confusion matrix and the IoUs computed from it."""

from __future__ import annotations

import torch
from torch import Tensor

from segdistill._checks import check_positive_int

__all__ = ["ConfusionMatrix"]


class ConfusionMatrix:
    """Accumulate a K x K confusion matrix over batches; read IoU and mIoU off it.

    Rows are ground-truth classes, columns predictions. Pixels labelled
    ``ignore_index`` (or any label outside ``[0, K)``) are left out. In
    distributed runs, :meth:`all_reduce` sums the matrices of all ranks.

    Args:
        num_classes: K.
        ignore_index: the label of pixels to leave out (255 for VOC and Cityscapes).

    Example:
        >>> cm = ConfusionMatrix(3)
        >>> cm.update(torch.tensor([[0, 1, 2, 2]]), torch.tensor([[0, 1, 1, 255]]))
        >>> cm.iou()
        tensor([1.0000, 0.5000, 0.0000])
        >>> round(cm.miou(), 4)
        0.5
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255) -> None:
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def update(self, prediction: Tensor, target: Tensor) -> None:
        """Add a batch of predicted and true label maps of the same shape."""
        if prediction.shape != target.shape:
            raise ValueError(
                f"expected prediction and target of the same shape, got "
                f"{tuple(prediction.shape)} and {tuple(target.shape)}"
            )
        if prediction.is_floating_point() or target.is_floating_point():
            raise TypeError(
                f"expected integer label maps, got {prediction.dtype} and {target.dtype}; "
                "take the argmax over the class dimension of the logits first"
            )
        k = self.num_classes
        valid = (target >= 0) & (target < k)
        if self.ignore_index is not None:
            valid &= target != self.ignore_index
        index = target[valid].long() * k + prediction[valid].long().clamp(0, k - 1)
        counts = torch.bincount(index.flatten(), minlength=k * k).reshape(k, k)
        self.matrix = self.matrix.to(counts.device) + counts

    def all_reduce(self) -> None:
        """Sum the matrix over all processes of the default process group."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix)

    def iou(self) -> Tensor:
        """Per-class intersection over union; NaN for a class absent from both."""
        m = self.matrix.double()
        inter = m.diagonal()
        union = m.sum(0) + m.sum(1) - inter
        return (inter / union).float().cpu()

    def miou(self) -> float:
        """Mean IoU over the classes that appear in the ground truth or the predictions."""
        iou = self.iou()
        return float(iou[~iou.isnan()].mean()) if (~iou.isnan()).any() else float("nan")

    def pixel_accuracy(self) -> float:
        """The fraction of counted pixels predicted correctly."""
        total = self.matrix.sum()
        return float(self.matrix.diagonal().sum() / total) if total else float("nan")
