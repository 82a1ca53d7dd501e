"""skdebias: find and remove spurious-correlation ("Clever Hans") biases in deep
image classifiers with scikit-learn estimators.
"""

__version__ = "0.1.0.dev0"

from .backbones import FrozenBackbone, LinearProbe, make_backbone, pretrain_backbone
from .concepts import (
    CAVEstimator,
    cav_alignment,
    concept_sensitivity,
    spatial_mean_tcav,
    tcav_score,
)
from .correction import (
    ClassArtifactCompensator,
    EnDClassifier,
    EnDRegularizer,
    FastModelDebiaser,
    GradientPenaltyCorrector,
    GroupBalancedClassifier,
    SpuriosityHeadFinetuner,
)
from .detection import SpectralRelevanceAnalysis
from .distributed import accelerated, setup_workers, transform_dask, write_activations
from .extraction import ActivationExtractor
from .ranking import SpuriosityRanker, propose_features
from .report import AuditReport

__all__ = [
    "ActivationExtractor",
    "CAVEstimator",
    "cav_alignment",
    "concept_sensitivity",
    "tcav_score",
    "spatial_mean_tcav",
    "SpuriosityRanker",
    "propose_features",
    "SpectralRelevanceAnalysis",
    "GradientPenaltyCorrector",
    "ClassArtifactCompensator",
    "SpuriosityHeadFinetuner",
    "FastModelDebiaser",
    "EnDRegularizer",
    "EnDClassifier",
    "GroupBalancedClassifier",
    "AuditReport",
    "transform_dask",
    "write_activations",
    "setup_workers",
    "accelerated",
    "pretrain_backbone",
    "make_backbone",
    "FrozenBackbone",
    "LinearProbe",
    "__version__",
]
