"""segdistill: knowledge adaptation for efficient semantic segmentation in PyTorch.

Implements He et al., "Knowledge Adaptation for Efficient Semantic
Segmentation" (CVPR 2019) as composable modules with functional twins.
"""

from segdistill.adapter import Adapter
from segdistill.checkpoint import load_checkpoint, save_checkpoint
from segdistill.hooks import FeatureHooks
from segdistill.losses import (
    AdaptationLoss,
    AffinityLoss,
    ReconstructionLoss,
    adaptation_loss,
    affinity_loss,
    affinity_matrix,
    reconstruction_loss,
)
from segdistill.translator import Translator, TranslatorOutput
from segdistill.translator_training import TranslatorTraining, train_translator
from segdistill.wrapper import DistillationOutput, DistillationTerm, DistillationWrapper

__version__ = "0.1.0"

__all__ = [
    "AdaptationLoss",
    "Adapter",
    "AffinityLoss",
    "DistillationOutput",
    "DistillationTerm",
    "DistillationWrapper",
    "FeatureHooks",
    "ReconstructionLoss",
    "Translator",
    "TranslatorOutput",
    "TranslatorTraining",
    "__version__",
    "adaptation_loss",
    "affinity_loss",
    "affinity_matrix",
    "load_checkpoint",
    "reconstruction_loss",
    "save_checkpoint",
    "train_translator",
]
