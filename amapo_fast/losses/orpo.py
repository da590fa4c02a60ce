"""ORPO (TRL's form): the chosen NLL minus beta times the log-sigmoid of the log odds ratio of mean log-probs.

log_odds = (a_w - a_l) - (log(1 - e^{a_w}) - log(1 - e^{a_l})), loss = NLL_w - beta log sigmoid(log_odds).
Dynamics: r = log_odds (positive exactly when a_w > a_l), gamma = 0, |d loss / d z| = beta sigmoid(-z).
"""
import torch
import torch.nn.functional as F

from .base import PairTerms, PreferenceLoss

# A mean log-prob of exactly 0 (every token certain) would make log(1 - e^a) = -inf; capped just below 0.
MAX_MEAN_LOGP = -1e-9


def log1m_exp(a):
    """log(1 - e^a) for a < 0, computed as log(-expm1(a)) (exact where 1 - e^a would round)."""
    return torch.log(-torch.expm1(torch.clamp(a, max=MAX_MEAN_LOGP)))


class ORPO(PreferenceLoss):
    name = "orpo"

    def terms(self, pairs, chosen, rejected, delta, group, *, beta, label_smoothing):
        log_odds = (chosen - rejected) - (log1m_exp(chosen) - log1m_exp(rejected))
        per_pair = -beta * F.logsigmoid(log_odds)
        margin = torch.zeros_like(delta)
        lo = log_odds.detach()
        return PairTerms(per_pair, pairs.chosen_nll(), beta * chosen, beta * rejected, margin, lo, margin,
                         beta * torch.sigmoid(-lo))
