"""The B-sized stage: per-sequence log-probs -> statistics, adaptive margin, loss and metrics.

Everything here works on a handful of numbers per pair, so it is plain PyTorch shared by every
implementation (reference, chunked, Triton). The fused paths get the per-token gradient coefficients
by differentiating this small stage with autograd, so there is exactly one definition of the loss.
"""
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

AMAPO_TYPES = ("amapo", "amapo_no_znorm", "amapo_no_exp", "amapo_no_adaptive", "amapo_no_zero")
LOSS_TYPES = AMAPO_TYPES + ("simpo", "dpo")
STATS_SCOPES = ("global", "local")

# exp() of the margin's exponent is capped here so that no finite input can give an infinite margin
# (e^80 ~ 5.5e34 is far beyond any margin that carries information; below the cap the math is exact).
MAX_MARGIN_EXPONENT = 80.0
# Recipes use beta of 0.01 to 10. Above 1000 the capped margin (beta * e^80) and the loss can overflow the
# fp32 loss and metrics, so no finite input could be promised a finite loss.
MAX_BETA = 1000.0

# Pair-level metrics (what preference_objective returns), with the keys TRL and the authors' trainer log.
SEQUENCE_METRIC_KEYS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "margin/accuracies",
    "rewards/batch_margin_mean",
    "loss/margin",
    "margin/zero_fraction",
)
# Token-level metrics over response tokens (token_metrics): the mean logit of chosen and rejected
# responses, the mean entropy of the predictive distribution, and the fraction of tokens whose target
# has the largest logit.
TOKEN_METRIC_KEYS = ("logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy")
METRIC_KEYS = SEQUENCE_METRIC_KEYS + TOKEN_METRIC_KEYS


def gather_statistics_group(delta: torch.Tensor, stats_scope: str) -> torch.Tensor:
    """The deltas of the statistics group G: this rank's pairs, or every rank's (all-gathered, detached).

    Ranks may hold different numbers of pairs, so sizes are exchanged first and the deltas padded.
    """
    delta = delta.detach()
    if stats_scope == "local" or not (dist.is_available() and dist.is_initialized()):
        return delta
    world = dist.get_world_size()
    if world == 1:
        return delta
    size = torch.tensor([delta.numel()], device=delta.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s.item()) for s in sizes]
    padded = delta.new_zeros(max(sizes))
    padded[: delta.numel()] = delta
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)])


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


def preference_objective(
    seq_logp_sums: torch.Tensor,
    seq_lengths: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "amapo",
    label_smoothing: float = 0.0,
    gamma_beta_ratio: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    stats_scope: str = "global",
):
    """Loss and metrics from per-sequence summed log-probs.

    seq_logp_sums [2B]: summed response log-probs, chosen rows first then rejected rows, same pair order.
    seq_lengths [2B]: number of response tokens of each row.
    Returns (loss, metrics): loss is the mean over this rank's pairs; metrics are detached 0-dim fp32
    tensors over this rank's pairs (the trainer averages them over ranks).
    Differentiable with respect to seq_logp_sums; the margin and the group statistics are detached.
    """
    num_pairs = seq_logp_sums.shape[0] // 2
    # Compute in float64: the stage is tiny and this keeps the fused paths' coefficients exact.
    sums = seq_logp_sums.double()
    if loss_type == "dpo":
        scores = sums  # DPO scores summed log-probs
    else:
        scores = sums / seq_lengths.to(sums)
    chosen, rejected = scores[:num_pairs], scores[num_pairs:]
    delta = chosen - rejected

    group = gather_statistics_group(delta, stats_scope)
    if loss_type in AMAPO_TYPES:
        margin, mu = adaptive_margin(delta, group, beta, loss_type)
        rewards_chosen, rewards_rejected = beta * chosen, beta * rejected
    else:
        mu = group.mean()
        if loss_type == "simpo":
            margin = torch.full_like(delta, beta * gamma_beta_ratio)
            rewards_chosen, rewards_rejected = beta * chosen, beta * rejected
        else:  # dpo: rewards are measured against the frozen reference model
            ref = ref_logps.double()
            rewards_chosen = beta * (chosen - ref[:num_pairs])
            rewards_rejected = beta * (rejected - ref[num_pairs:])
            margin = torch.zeros_like(delta)

    z = rewards_chosen - rewards_rejected - margin
    per_pair = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    loss = per_pair.mean().to(torch.promote_types(seq_logp_sums.dtype, torch.float32))

    with torch.no_grad():
        reward_margins = (rewards_chosen - rewards_rejected).detach()
        values = {
            "rewards/chosen": rewards_chosen.mean(),
            "rewards/rejected": rewards_rejected.mean(),
            "rewards/margins": reward_margins.mean(),
            "rewards/accuracies": (reward_margins > 0).double().mean(),
            "logps/chosen": chosen.mean(),
            "logps/rejected": rejected.mean(),
            "margin/accuracies": (delta > mu).double().mean(),
            "rewards/batch_margin_mean": beta * mu,
            "loss/margin": margin.mean(),
            "margin/zero_fraction": (margin == 0).double().mean(),
        }
        metrics = {key: values[key].detach().float() for key in SEQUENCE_METRIC_KEYS}
    return loss, metrics


@torch.no_grad()
def token_metrics(mean_logit_sums, entropy_sums, argmax_hit_sums, seq_lengths) -> dict:
    """TOKEN_METRIC_KEYS from per-row sums over response tokens ([2B] each, chosen rows first).

    Each response token counts once, so longer responses weigh more, as in TRL's token-level metrics.
    The logits are averaged over the vocabulary per token, then over response tokens; the authors'
    trainer averages over every position of the batch, prompt and padding included.
    """
    num_pairs = seq_lengths.shape[0] // 2
    counts = seq_lengths.double()
    values = {
        "logits/chosen": mean_logit_sums[:num_pairs].double().sum() / counts[:num_pairs].sum(),
        "logits/rejected": mean_logit_sums[num_pairs:].double().sum() / counts[num_pairs:].sum(),
        "entropy": entropy_sums.double().sum() / counts.sum(),
        "mean_token_accuracy": argmax_hit_sums.double().sum() / counts.sum(),
    }
    return {key: value.float() for key, value in values.items()}


def validate_objective_args(
    beta, loss_type, label_smoothing, stats_scope, ref_logps, num_rows, device, gamma_beta_ratio=0.0
):
    """Clear errors for the stage's scalar arguments, before any heavy work is done."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
    if stats_scope not in STATS_SCOPES:
        raise ValueError(f"stats_scope={stats_scope!r}: expected 'global' or 'local'")
    if not math.isfinite(beta) or not 0 < beta <= MAX_BETA:
        raise ValueError(f"beta={beta}: must be positive and at most {MAX_BETA:g}")
    if not math.isfinite(gamma_beta_ratio):
        raise ValueError(f"gamma_beta_ratio={gamma_beta_ratio}: must be finite")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing={label_smoothing}: must lie in [0, 0.5]")
    if loss_type == "dpo":
        if ref_logps is None:
            raise ValueError("loss_type='dpo' needs ref_logps: the reference model's summed log-probs, shape [2B]")
        if not isinstance(ref_logps, torch.Tensor):
            raise TypeError(f"ref_logps must be a torch.Tensor of shape ({num_rows},), got {type(ref_logps).__name__}")
        if ref_logps.shape != (num_rows,):
            raise ValueError(f"ref_logps has shape {tuple(ref_logps.shape)}, expected ({num_rows},)")
        if ref_logps.device != device:
            raise ValueError(f"ref_logps is on {ref_logps.device}, hidden is on {device}")
        if not bool(torch.isfinite(ref_logps).all()):
            raise ValueError("ref_logps contains NaN or inf")
    elif ref_logps is not None:
        raise ValueError(f"ref_logps is only used by loss_type='dpo', got loss_type={loss_type!r}")
