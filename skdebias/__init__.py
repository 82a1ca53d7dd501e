"""skdebias: find and remove spurious-correlation ("Clever Hans") biases in deep
image classifiers with scikit-learn estimators.
"""

__version__ = "0.1.0.dev0"

from .concepts import CAVEstimator, cav_alignment
from .extraction import ActivationExtractor
from .ranking import SpuriosityRanker, propose_features
from .detection import SpectralRelevanceAnalysis

__all__ = [
    "ActivationExtractor",
    "CAVEstimator",
    "cav_alignment",
    "SpuriosityRanker",
    "propose_features",
    "SpectralRelevanceAnalysis",
    "__version__",
]
