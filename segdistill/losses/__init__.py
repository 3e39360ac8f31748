"""Distillation losses, each a functional twin and an ``nn.Module``."""

from segdistill.losses.adaptation import AdaptationLoss, adaptation_loss
from segdistill.losses.affinity import AffinityLoss, affinity_loss, affinity_matrix
from segdistill.losses.attention import (
    AttentionTransferLoss,
    attention_map,
    attention_transfer_loss,
)
from segdistill.losses.cirkd import CIRKDLoss, cirkd_loss
from segdistill.losses.cirkd_memory import CIRKDMemory, memory_contrast_loss
from segdistill.losses.cwd import CWDLoss, cwd_loss
from segdistill.losses.dist import DISTLoss, dist_loss
from segdistill.losses.fitnet import FitNetLoss, fitnet_loss
from segdistill.losses.holistic import (
    Discriminator,
    HolisticLoss,
    attach_discriminator_loss,
    discriminator_optimizer,
    holistic_discriminator_loss,
    holistic_generator_loss,
)
from segdistill.losses.ifvd import IFVDLoss, ifvd_loss
from segdistill.losses.kd import KDLoss, kd_loss
from segdistill.losses.mgd import MGDLoss, mgd_loss
from segdistill.losses.pairwise import PairwiseLoss, pairwise_loss
from segdistill.losses.reconstruction import ReconstructionLoss, reconstruction_loss

__all__ = [
    "AdaptationLoss",
    "AffinityLoss",
    "AttentionTransferLoss",
    "CIRKDLoss",
    "CIRKDMemory",
    "CWDLoss",
    "DISTLoss",
    "Discriminator",
    "FitNetLoss",
    "HolisticLoss",
    "IFVDLoss",
    "KDLoss",
    "MGDLoss",
    "PairwiseLoss",
    "ReconstructionLoss",
    "adaptation_loss",
    "affinity_loss",
    "affinity_matrix",
    "attach_discriminator_loss",
    "attention_map",
    "attention_transfer_loss",
    "cirkd_loss",
    "cwd_loss",
    "discriminator_optimizer",
    "dist_loss",
    "fitnet_loss",
    "holistic_discriminator_loss",
    "holistic_generator_loss",
    "ifvd_loss",
    "kd_loss",
    "memory_contrast_loss",
    "mgd_loss",
    "pairwise_loss",
    "reconstruction_loss",
]
