"""segdistill: knowledge adaptation for efficient semantic segmentation in PyTorch.

Implements He et al., "Knowledge Adaptation for Efficient Semantic
Segmentation" (CVPR 2019) as composable modules with functional twins.
"""

from segdistill.adapter import Adapter
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

__version__ = "0.1.0"

__all__ = [
    "AdaptationLoss",
    "Adapter",
    "AffinityLoss",
    "ReconstructionLoss",
    "Translator",
    "TranslatorOutput",
    "__version__",
    "adaptation_loss",
    "affinity_loss",
    "affinity_matrix",
    "reconstruction_loss",
]
