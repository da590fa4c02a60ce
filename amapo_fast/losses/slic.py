"""SLiC-HF as the SimPO paper's comparison states it: a hinge on the gap of summed log-probs, plus the chosen NLL.

loss = max(0, slic_delta - (pi_w - pi_l)) + nll_weight * NLL_w; reference-free.
Dynamics: r = pi_w - pi_l, gamma = slic_delta, z = r - gamma; the hinge's gradient is 1 below the margin, 0 above.
"""
import torch

from .base import PairTerms, PreferenceLoss


class SLiC(PreferenceLoss):
    name = "slic"
    params = {"slic_delta": 1.0, "nll_weight": 0.1}
    summed = True

    def terms(self, pairs, chosen, rejected, delta, group, *, beta, label_smoothing, slic_delta, nll_weight):
        r = chosen - rejected
        margin = torch.full_like(delta, slic_delta)
        z = r - margin
        per_pair = torch.relu(-z)
        grad = (z.detach() < 0).to(z.dtype)
        # No beta in the loss; the rewards are beta x summed log-prob, as TRL's CPO logs them.
        return PairTerms(per_pair, nll_weight * pairs.chosen_nll(), beta * chosen, beta * rejected, margin,
                         r.detach(), margin, grad)
