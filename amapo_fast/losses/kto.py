"""KTO on paired data (chosen = desirable, rejected = undesirable), with a detached KL estimate.

L_w = 1 - sigmoid(beta (pi_w - rho_w - KL)), L_l = 1 - sigmoid(beta (KL - (pi_l - rho_l))), per pair
(desirable_weight L_w + undesirable_weight L_l) / 2, so the mean over pairs is TRL's mean over the 2B rows.
KL (`kto_kl`) is the caller's estimate: max(0, mean of pi(y'|x) - rho(y'|x)) over mismatched completions.
Dynamics: r = beta (pi_w - pi_l), gamma = beta (rho_w - rho_l) as for DPO. The pair's loss is not a function
of z = r - gamma alone; grad is its derivative along z when z moves by equal halves on both responses:
(desirable_weight s'(u_w) + undesirable_weight s'(u_l)) / 4, with s' the sigmoid's derivative and u_w, u_l
the two sigmoid arguments.
"""
import torch

from .base import PairTerms, PreferenceLoss


def _sigmoid_slope(u):
    return torch.sigmoid(u) * torch.sigmoid(-u)


class KTO(PreferenceLoss):
    name = "kto"
    params = {"desirable_weight": 1.0, "undesirable_weight": 1.0, "kto_kl": None}
    needs_reference = True
    needs_kl = True
    summed = True

    def terms(self, pairs, chosen, rejected, delta, group, *, beta, label_smoothing, desirable_weight,
              undesirable_weight, kto_kl):
        ref_chosen, ref_rejected = pairs.split(pairs.ref)
        kl = torch.as_tensor(kto_kl, dtype=chosen.dtype).detach().to(chosen.device)
        rewards_chosen, rewards_rejected = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
        u_chosen = beta * ((chosen - ref_chosen) - kl)
        u_rejected = beta * (kl - (rejected - ref_rejected))
        per_pair = (desirable_weight * (1 - torch.sigmoid(u_chosen))
                    + undesirable_weight * (1 - torch.sigmoid(u_rejected))) / 2
        grad = (desirable_weight * _sigmoid_slope(u_chosen.detach())
                + undesirable_weight * _sigmoid_slope(u_rejected.detach())) / 4
        margin = torch.zeros_like(delta)
        r = (beta * (chosen - rejected)).detach()
        return PairTerms(per_pair, None, rewards_chosen, rewards_rejected, margin, r, beta * (ref_chosen - ref_rejected), grad)


KL_PREFIX = "kl_"  # batch keys of the mismatched completions (the trainer takes them out before the loss)


class KLCompletions:
    """A collator wrapper that adds KTO's mismatched completions to each batch, as TRL builds its KL completions:
    prompt i with the chosen response of pair i + 1 (the last prompt with the first pair's), one sequence per
    pair, truncated to max_length. They go under `kl_`-prefixed keys in the unshared layout (padded, or packed
    when the collator packs), to be scored under no-grad by the policy and the reference model."""

    def __init__(self, collator, max_length: int):
        self.collator, self.max_length = collator, max_length

    def __call__(self, rows):
        batch = self.collator(rows)
        sequences = []
        for index, row in enumerate(rows):
            prompt = list(row["prompt_input_ids"])
            response = list(rows[(index + 1) % len(rows)]["chosen_input_ids"])[: self.max_length - len(prompt)]
            tokens = prompt + response
            labels = [-100] * len(prompt) + response
            sequences.append((tokens[:-1], labels[1:]))
        layout = self.collator._packed if self.collator.packed else self.collator._padded
        batch.update({KL_PREFIX + key: value for key, value in layout(sequences).items()})
        return batch
