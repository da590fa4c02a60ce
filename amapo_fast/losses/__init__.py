"""The loss types, one small definition each (see base.py for what a definition declares)."""
from .amapo import AMAPO_LOSSES
from .base import PairLogps, PairTerms, PreferenceLoss
from .cpo import CPO
from .dpo import DPO
from .ipo import IPO
from .kto import KTO
from .orpo import ORPO
from .simpo import SimPO
from .slic import SLiC

LOSSES = {loss.name: loss for loss in (*AMAPO_LOSSES, SimPO(), DPO(), SLiC(), IPO(), CPO(), ORPO(), KTO())}
# Every keyword some loss type declares.
LOSS_PARAMS = sorted({name for loss in LOSSES.values() for name in loss.params})

__all__ = ["LOSSES", "LOSS_PARAMS", "PairLogps", "PairTerms", "PreferenceLoss"]
