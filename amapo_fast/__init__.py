"""amapo-fast: fused AMaPO / SimPO / DPO preference losses from hidden states, and a lean trainer."""
from .cross_entropy import LinearCrossEntropyHead, linear_cross_entropy
from .loss import IMPLS, LinearPreferenceHead, ResponseTokens, linear_preference_loss, sequence_logps
from .objective import LOSS_TYPES, METRIC_KEYS, preference_objective

__all__ = [
    "IMPLS",
    "LOSS_TYPES",
    "METRIC_KEYS",
    "LinearCrossEntropyHead",
    "LinearPreferenceHead",
    "ResponseTokens",
    "linear_cross_entropy",
    "linear_preference_loss",
    "preference_objective",
    "sequence_logps",
]
