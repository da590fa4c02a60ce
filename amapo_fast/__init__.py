"""amapo-fast: fused AMaPO / SimPO / DPO preference losses from hidden states, and a lean trainer."""
from .loss import IMPLS, LinearPreferenceHead, ResponseTokens, linear_preference_loss, sequence_logps
from .objective import LOSS_TYPES, METRIC_KEYS, preference_objective

__all__ = [
    "IMPLS",
    "LOSS_TYPES",
    "METRIC_KEYS",
    "LinearPreferenceHead",
    "ResponseTokens",
    "linear_preference_loss",
    "preference_objective",
    "sequence_logps",
]
