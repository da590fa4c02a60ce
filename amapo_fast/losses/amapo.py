"""AMaPO and its four ablations: a sigmoid loss whose detached margin adapts to each pair's rank in the group.

The ablations are named by the paper's Table 5, which gives no formulas; theirs here are ours.

r = beta * delta (delta: the gap of mean log-probs), gamma = the adaptive margin m_i, z = r - gamma.
"""
import torch

from .base import PairTerms, PreferenceLoss, sigmoid_loss

# exp() of the margin's exponent is capped here so that no finite input can give an infinite margin
# (e^80 ~ 5.5e34 is far beyond any margin that carries information; below the cap the math is exact).
MAX_MARGIN_EXPONENT = 80.0


def adaptive_margin(delta: torch.Tensor, group: torch.Tensor, beta: float, loss_type: str):
    """AMaPO's detached margin m_i and the group mean mu, for an AMaPO loss type."""
    delta = delta.detach()
    mu = group.mean()
    if group.numel() < 2:
        return torch.zeros_like(delta), mu
    sd = group.std(unbiased=True)
    if not bool(torch.isfinite(sd) & (sd != 0)):  # one host sync: the branch depends on the data
        # Degenerate group: our documented rule is no margin at all (the authors' code has no guard).
        return torch.zeros_like(delta), mu
    gap = mu - delta  # > 0 exactly for the pairs ranked below the batch mean
    if loss_type == "amapo":
        margin = beta * torch.exp(torch.clamp(mu * gap / sd, max=MAX_MARGIN_EXPONENT))
    elif loss_type == "amapo_no_znorm":
        margin = beta * torch.exp(torch.clamp(mu * gap, max=MAX_MARGIN_EXPONENT))
    elif loss_type == "amapo_no_exp":
        margin = beta * mu * gap / sd
    elif loss_type == "amapo_no_adaptive":
        margin = beta * mu * gap
    elif loss_type == "amapo_no_zero":
        return beta * torch.exp(torch.clamp(mu * gap / sd, max=MAX_MARGIN_EXPONENT)), mu
    else:
        raise ValueError(f"loss_type={loss_type!r} has no adaptive margin")
    return torch.where(delta < mu, margin, torch.zeros_like(margin)), mu


class AMaPO(PreferenceLoss):
    label_smoothing = True

    def __init__(self, name: str):
        self.name = name

    def terms(self, pairs, chosen, rejected, delta, group, *, beta, label_smoothing):
        margin, _ = adaptive_margin(delta, group, beta, self.name)
        rewards_chosen, rewards_rejected = beta * chosen, beta * rejected
        z = rewards_chosen - rewards_rejected - margin
        per_pair, grad = sigmoid_loss(z, label_smoothing)
        r = (rewards_chosen - rewards_rejected).detach()
        return PairTerms(per_pair, None, rewards_chosen, rewards_rejected, margin, r, margin, grad)


AMAPO_LOSSES = (
    AMaPO("amapo"),
    AMaPO("amapo_no_znorm"),
    AMaPO("amapo_no_exp"),
    AMaPO("amapo_no_adaptive"),
    AMaPO("amapo_no_zero"),
)
