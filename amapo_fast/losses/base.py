"""What every loss type is made of: the pair's log-probs it reads, the per-pair terms it returns, its declaration.

A loss type is one small class (one file per family in this package): its parameters and their defaults,
whether it needs a reference model (`needs_reference`) or a KL estimate from mismatched completions
(`needs_kl`), whether it scores a response by its summed or its mean log-prob, and `terms`, which turns one
micro-batch's per-sequence log-probs into per-pair losses plus the quantities the metrics read. The shared
stage (`objective.preference_objective`) does the rest: group statistics, the mean over pairs, metrics.

Dynamics (the paper's unified framework): each loss type also names, per pair, its implicit ranking score
`r`, its margin `gamma` and `grad`, the magnitude of the pair's loss gradient with respect to its argument
`z = r - gamma`; the shared stage turns them into the `dynamics/*` metrics.
"""
import dataclasses

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class PairLogps:
    """One micro-batch's per-sequence log-probs in float64: rows 0..B-1 chosen, B..2B-1 rejected.

    `sums` carries the gradient; `ref` is the reference model's summed log-probs (or None)."""

    sums: torch.Tensor
    counts: torch.Tensor
    ref: torch.Tensor | None

    @property
    def num_pairs(self) -> int:
        return self.sums.shape[0] // 2

    def split(self, values):
        return values[: self.num_pairs], values[self.num_pairs :]

    def means(self):
        return self.sums / self.counts

    def ref_means(self):
        return self.ref / self.counts

    def chosen_nll(self):
        """NLL_w: the token-mean negative log-likelihood of this micro-batch's chosen responses (their summed
        negative log-prob over their token count, as TRL's cross-entropy over chosen tokens computes it)."""
        chosen_sums, _ = self.split(self.sums)
        chosen_counts, _ = self.split(self.counts)
        return -chosen_sums.sum() / chosen_counts.sum()


@dataclasses.dataclass
class PairTerms:
    """What `terms` returns; every tensor is [B] unless said otherwise.

    per_pair    the pair's loss (differentiable); the loss is per_pair.mean() + extra
    extra       a 0-dim term added once (the NLL of the chosen responses), or None
    chosen, rejected            the scores logged as logps/* (mean log-prob, or summed for sum-scored losses)
    rewards_chosen, rewards_rejected    the implicit rewards logged as rewards/*
    margin      the margin subtracted inside the loss (loss/margin, margin/zero_fraction)
    r, gamma, grad              the dynamics split (detached)
    """

    per_pair: torch.Tensor
    extra: torch.Tensor | None
    rewards_chosen: torch.Tensor
    rewards_rejected: torch.Tensor
    margin: torch.Tensor
    r: torch.Tensor
    gamma: torch.Tensor
    grad: torch.Tensor


class PreferenceLoss:
    """A loss type. Subclasses set the class attributes and implement `terms`."""

    name: str = ""
    params: dict = {}  # keyword -> default; None as a default means the caller must supply it
    label_smoothing: bool = False  # whether the loss takes label_smoothing (a sigmoid loss does)
    needs_reference: bool = False  # reads the reference model's summed log-probs (ref_logps)
    needs_kl: bool = False  # reads kto_kl, a KL estimate from mismatched completions
    summed: bool = False  # scores responses by summed log-probs (else by mean log-prob)

    def scores(self, pairs: PairLogps):
        """(chosen, rejected) scores [B]: the quantities delta and the logps/* metrics are built from."""
        return pairs.split(pairs.sums if self.summed else pairs.means())

    def terms(self, pairs: PairLogps, chosen, rejected, delta, group, *, beta, label_smoothing, **params) -> PairTerms:
        raise NotImplementedError


def sigmoid_loss(z, label_smoothing):
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z), and |d/dz| of it."""
    per_pair = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    z = z.detach()
    grad = ((1.0 - label_smoothing) * torch.sigmoid(-z) - label_smoothing * torch.sigmoid(z)).abs()
    return per_pair, grad
