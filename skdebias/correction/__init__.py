"""Bias correction estimators: RR-ClArC, A-/P-ClArC, spuriosity head fine-tuning, FMD, EnD."""

__all__ = []

from ._clarc import ClassArtifactCompensator, CompensatedLayer, ConceptCompensation  # noqa: E402
from ._rrclarc import GradientPenaltyCorrector, gradient_penalty  # noqa: E402

__all__ += [
    "GradientPenaltyCorrector", "gradient_penalty", "ClassArtifactCompensator",
    "ConceptCompensation", "CompensatedLayer",
]

from ._end import EnDClassifier, EnDRegularizer, IgnoreBiasInput, end_terms  # noqa: E402
from ._fmd import FastModelDebiaser, softmax_cross_entropy_hessian  # noqa: E402
from ._reweight import GroupBalancedClassifier, group_balanced_weights  # noqa: E402
from ._spuriosity import SpuriosityHeadFinetuner  # noqa: E402

__all__ += [
    "FastModelDebiaser", "softmax_cross_entropy_hessian",
    "EnDClassifier", "EnDRegularizer", "IgnoreBiasInput", "end_terms",
    "GroupBalancedClassifier", "group_balanced_weights",
]

__all__ += ["SpuriosityHeadFinetuner"]
