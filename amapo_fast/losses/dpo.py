"""DPO: a sigmoid loss on summed log-probs measured against a frozen reference model.

r = beta (pi_w - pi_l), gamma = beta (rho_w - rho_l) (the reference's own preference), z = r - gamma.
"""
import torch

from .base import PairTerms, PreferenceLoss, sigmoid_loss


class DPO(PreferenceLoss):
    name = "dpo"
    label_smoothing = True
    needs_reference = True
    summed = True  # DPO scores summed log-probs

    def terms(self, pairs, chosen, rejected, delta, group, *, beta, label_smoothing):
        num_pairs = pairs.num_pairs
        # Rewards are measured against the frozen reference model.
        ref = pairs.ref
        rewards_chosen = beta * (chosen - ref[:num_pairs])
        rewards_rejected = beta * (rejected - ref[num_pairs:])
        margin = torch.zeros_like(delta)
        z = rewards_chosen - rewards_rejected - margin
        per_pair, grad = sigmoid_loss(z, label_smoothing)
        r = (beta * (chosen - rejected)).detach()
        gamma = beta * (ref[:num_pairs] - ref[num_pairs:])
        return PairTerms(per_pair, None, rewards_chosen, rewards_rejected, margin, r, gamma, grad)
