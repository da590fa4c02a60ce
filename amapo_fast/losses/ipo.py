"""IPO (TRL's form, token-averaged log-ratios): a squared distance of the log-ratio gap from 1 / (2 beta).

h = (a_w - rho_w/|y_w|) - (a_l - rho_l/|y_l|), loss = (h - 1/(2 beta))^2.
Dynamics: r = a_w - a_l, gamma = (rho_w/|y_w| - rho_l/|y_l|) + 1/(2 beta), z = r - gamma = h - 1/(2 beta);
|d loss / d z| = 2 |z| grows on both sides of the target, so IPO also pushes back pairs that overshoot it.
"""
import torch

from .base import PairTerms, PreferenceLoss


class IPO(PreferenceLoss):
    name = "ipo"
    needs_reference = True

    def terms(self, pairs, chosen, rejected, delta, group, *, beta, label_smoothing):
        ref_chosen, ref_rejected = pairs.split(pairs.ref_means())
        rewards_chosen, rewards_rejected = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
        h = (chosen - ref_chosen) - (rejected - ref_rejected)
        target = 1.0 / (2.0 * beta)
        z = h - target
        per_pair = z**2
        margin = torch.full_like(delta, target)
        return PairTerms(per_pair, None, rewards_chosen, rewards_rejected, margin, (chosen - rejected).detach(),
                         (ref_chosen - ref_rejected).detach() + target, 2.0 * z.detach().abs())
