"""Distillation losses, each a functional twin and an ``nn.Module``."""

from segdistill.losses.adaptation import AdaptationLoss, adaptation_loss
from segdistill.losses.affinity import AffinityLoss, affinity_loss, affinity_matrix
from segdistill.losses.reconstruction import ReconstructionLoss, reconstruction_loss

__all__ = [
    "AdaptationLoss",
    "AffinityLoss",
    "ReconstructionLoss",
    "adaptation_loss",
    "affinity_loss",
    "affinity_matrix",
    "reconstruction_loss",
]
