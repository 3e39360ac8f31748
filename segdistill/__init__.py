"""segdistill: knowledge adaptation for efficient semantic segmentation in PyTorch.

Implements He et al., "Knowledge Adaptation for Efficient Semantic
Segmentation" (CVPR 2019) as composable modules with functional twins, beside
the baselines it is compared with (KD, FitNet, attention transfer, pair-wise
similarity, channel-wise distillation, DIST, MGD, IFVD, CIRKD and the holistic term).
Teachers and students may be CNNs or ViTs (:mod:`segdistill.tokens`). The presets
that wire each method into a :class:`DistillationWrapper` are in
:mod:`segdistill.presets`, by name in :data:`segdistill.presets.PRESETS`.
"""

from segdistill import presets
from segdistill.adapter import Adapter
from segdistill.checkpoint import changed_settings, load_checkpoint, save_checkpoint
from segdistill.feature_spec import FeatureSpec
from segdistill.hooks import FeatureHooks
from segdistill.losses import (
    AdaptationLoss,
    AffinityLoss,
    AttentionTransferLoss,
    CIRKDLoss,
    CIRKDMemory,
    CWDLoss,
    Discriminator,
    DISTLoss,
    FitNetLoss,
    HolisticLoss,
    IFVDLoss,
    KDLoss,
    MGDLoss,
    PairwiseLoss,
    ReconstructionLoss,
    adaptation_loss,
    affinity_loss,
    affinity_matrix,
    attach_discriminator_loss,
    attention_map,
    attention_transfer_loss,
    cirkd_loss,
    cwd_loss,
    discriminator_optimizer,
    dist_loss,
    fitnet_loss,
    holistic_discriminator_loss,
    holistic_generator_loss,
    ifvd_loss,
    kd_loss,
    memory_contrast_loss,
    mgd_loss,
    pairwise_loss,
    reconstruction_loss,
)
from segdistill.tokens import TokenGrid, tokens_to_map
from segdistill.translator import Translator, TranslatorOutput
from segdistill.translator_training import (
    TranslatorTraining,
    TranslatorTrainingConfig,
    train_translator,
)
from segdistill.visualize import pixel_affinity
from segdistill.wrapper import (
    AdversarialLoss,
    DistillationOutput,
    DistillationTerm,
    DistillationWrapper,
)

__version__ = "0.1.0"

__all__ = [
    "AdaptationLoss",
    "Adapter",
    "AdversarialLoss",
    "AffinityLoss",
    "AttentionTransferLoss",
    "CIRKDLoss",
    "CIRKDMemory",
    "CWDLoss",
    "DISTLoss",
    "Discriminator",
    "DistillationOutput",
    "DistillationTerm",
    "DistillationWrapper",
    "FeatureHooks",
    "FeatureSpec",
    "FitNetLoss",
    "HolisticLoss",
    "IFVDLoss",
    "KDLoss",
    "MGDLoss",
    "PairwiseLoss",
    "ReconstructionLoss",
    "TokenGrid",
    "Translator",
    "TranslatorOutput",
    "TranslatorTraining",
    "TranslatorTrainingConfig",
    "__version__",
    "adaptation_loss",
    "affinity_loss",
    "affinity_matrix",
    "attach_discriminator_loss",
    "attention_map",
    "attention_transfer_loss",
    "changed_settings",
    "cirkd_loss",
    "cwd_loss",
    "discriminator_optimizer",
    "dist_loss",
    "fitnet_loss",
    "holistic_discriminator_loss",
    "holistic_generator_loss",
    "ifvd_loss",
    "kd_loss",
    "load_checkpoint",
    "memory_contrast_loss",
    "mgd_loss",
    "pairwise_loss",
    "pixel_affinity",
    "presets",
    "reconstruction_loss",
    "save_checkpoint",
    "tokens_to_map",
    "train_translator",
]
