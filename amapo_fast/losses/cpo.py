"""CPO (TRL's sigmoid form): DPO without a reference model, on summed log-probs, plus the chosen NLL.

loss = -log sigmoid(beta (pi_w - pi_l)) + nll_weight * NLL_w (label smoothing as TRL's).
Dynamics: r = beta (pi_w - pi_l), gamma = 0.
"""
import torch

from .base import PairTerms, PreferenceLoss, sigmoid_loss


class CPO(PreferenceLoss):
    name = "cpo"
    params = {"nll_weight": 1.0}
    label_smoothing = True
    summed = True

    def terms(self, pairs, chosen, rejected, delta, group, *, beta, label_smoothing, nll_weight):
        rewards_chosen, rewards_rejected = beta * chosen, beta * rejected
        z = rewards_chosen - rewards_rejected
        per_pair, grad = sigmoid_loss(z, label_smoothing)
        margin = torch.zeros_like(delta)
        return PairTerms(per_pair, nll_weight * pairs.chosen_nll(), rewards_chosen, rewards_rejected, margin,
                         z.detach(), margin, grad)
