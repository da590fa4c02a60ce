"""SimPO: a sigmoid loss on the gap of mean log-probs with a fixed target margin.

r = beta * delta, gamma = beta * gamma_beta_ratio, z = r - gamma.
"""
import torch

from .base import PairTerms, PreferenceLoss, sigmoid_loss


class SimPO(PreferenceLoss):
    name = "simpo"
    params = {"gamma_beta_ratio": 0.0}
    label_smoothing = True

    def terms(self, pairs, chosen, rejected, delta, group, *, beta, label_smoothing, gamma_beta_ratio):
        margin = torch.full_like(delta, beta * gamma_beta_ratio)
        rewards_chosen, rewards_rejected = beta * chosen, beta * rejected
        z = rewards_chosen - rewards_rejected - margin
        per_pair, grad = sigmoid_loss(z, label_smoothing)
        r = (rewards_chosen - rewards_rejected).detach()
        return PairTerms(per_pair, None, rewards_chosen, rewards_rejected, margin, r, margin, grad)
