"""The B-sized stage: per-sequence log-probs -> statistics, the loss type's per-pair terms, loss and metrics.

Everything here works on a handful of numbers per pair, so it is plain PyTorch shared by every
implementation (reference, chunked, Triton). The fused paths get the per-token gradient coefficients
by differentiating this small stage with autograd, so there is exactly one definition of the loss.
"""
import math

import torch
import torch.distributed as dist

from .losses import LOSS_PARAMS, LOSSES, PairLogps

LOSS_TYPES = tuple(LOSSES)
STATS_SCOPES = ("global", "local")

# Recipes use beta of 0.01 to 10. Above 1000 the capped margin (beta * e^80) and the loss can overflow the
# fp32 loss and metrics, so no finite input could be promised a finite loss.
MAX_BETA = 1000.0

# The paper's Table 1, per micro-batch: the fraction of pairs in each case (correctly ranked means r > 0; cases 1
# and 3 have r >= gamma), the share of the gradient magnitude that goes to misranked pairs, and the mean
# gradient magnitude of correctly ranked and of misranked pairs (0 when the micro-batch has none of them).
DYNAMICS_KEYS = (
    "dynamics/case1",
    "dynamics/case2",
    "dynamics/case3",
    "dynamics/case4",
    "dynamics/misranked_grad_share",
    "dynamics/grad_correct_mean",
    "dynamics/grad_misranked_mean",
)
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
    "nll_loss",
) + DYNAMICS_KEYS
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
    **loss_params,
):
    """Loss and metrics from per-sequence summed log-probs.

    seq_logp_sums [2B]: summed response log-probs, chosen rows first then rejected rows, same pair order.
    seq_lengths [2B]: number of response tokens of each row.
    loss_params: the loss type's own keywords (slic_delta, nll_weight, desirable_weight, undesirable_weight,
    kto_kl; see amapo_fast/losses); None or absent means the loss type's default.
    Returns (loss, metrics): loss is the mean over this rank's pairs; metrics are detached 0-dim fp32
    tensors over this rank's pairs (the trainer averages them over ranks).
    Differentiable with respect to seq_logp_sums; the margin and the group statistics are detached.
    """
    loss_def = LOSSES[loss_type]
    params = resolve_loss_params(loss_type, label_smoothing, gamma_beta_ratio, loss_params)
    # Compute in float64: the stage is tiny and this keeps the fused paths' coefficients exact.
    sums = seq_logp_sums.double()
    pairs = PairLogps(sums, seq_lengths.to(sums), None if ref_logps is None else ref_logps.double())
    chosen, rejected = loss_def.scores(pairs)
    delta = chosen - rejected

    group = gather_statistics_group(delta, stats_scope)
    mu = group.mean()
    terms = loss_def.terms(pairs, chosen, rejected, delta, group, beta=beta, label_smoothing=label_smoothing, **params)
    loss = terms.per_pair.mean()
    if terms.extra is not None:
        loss = loss + terms.extra
    loss = loss.to(torch.promote_types(seq_logp_sums.dtype, torch.float32))

    with torch.no_grad():
        rewards_chosen, rewards_rejected, margin = terms.rewards_chosen, terms.rewards_rejected, terms.margin
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
            "nll_loss": pairs.chosen_nll(),
            **dynamics_metrics(terms.r, terms.gamma, terms.grad),
        }
        metrics = {key: values[key].detach().float() for key in SEQUENCE_METRIC_KEYS}
    return loss, metrics


@torch.no_grad()
def dynamics_metrics(r: torch.Tensor, gamma: torch.Tensor, grad: torch.Tensor) -> dict:
    """DYNAMICS_KEYS from each pair's ranking score r, margin gamma and gradient magnitude |d loss_i / d z_i|."""
    correct, above = r > 0, r >= gamma
    cases = (correct & above, correct & ~above, ~correct & above, ~correct & ~above)
    values = {f"dynamics/case{k}": case.double().mean() for k, case in enumerate(cases, 1)}
    grad = grad.double()
    total = grad.sum()
    misranked = torch.where(correct, 0.0, grad).sum()
    # No gradient at all (every hinge inactive, say): no share goes to misranked pairs.
    share = misranked / total.clamp(min=torch.finfo(total.dtype).tiny)
    values["dynamics/misranked_grad_share"] = torch.where(total > 0, share, 0.0)
    for name, mask in (("correct", correct), ("misranked", ~correct)):
        count = mask.sum()
        values[f"dynamics/grad_{name}_mean"] = torch.where(mask, grad, 0.0).sum() / count.clamp(min=1)
    return values


def resolve_loss_params(loss_type, label_smoothing, gamma_beta_ratio, loss_params) -> dict:
    """The loss type's own keywords, its defaults filled in; a keyword of another loss type (not None) is refused."""
    loss_def = LOSSES[loss_type]
    for name, value in loss_params.items():
        if name not in LOSS_PARAMS:
            raise TypeError(f"unknown loss keyword {name!r}: the loss types take {', '.join(LOSS_PARAMS)}")
        if value is not None and name not in loss_def.params:
            owners = [t for t, loss in LOSSES.items() if name in loss.params]
            raise ValueError(f"{name} is a parameter of loss_type {' / '.join(owners)}, not of loss_type={loss_type!r}")
    if label_smoothing and not loss_def.label_smoothing:
        raise ValueError(f"label_smoothing={label_smoothing}: loss_type={loss_type!r} takes no label smoothing")
    given = {name: value for name, value in loss_params.items() if value is not None}
    if "gamma_beta_ratio" in loss_def.params:
        given["gamma_beta_ratio"] = gamma_beta_ratio
    params = {**loss_def.params, **given}
    missing = [name for name, value in params.items() if value is None]
    if missing == ["kto_kl"]:
        raise ValueError(
            "loss_type='kto' needs kto_kl: the batch's KL estimate, max(0, mean policy minus reference log-prob of "
            "mismatched prompt/completion pairs), a float or a 0-dim tensor"
        )
    for name, value in params.items():
        if isinstance(value, torch.Tensor) and value.numel() != 1:
            raise ValueError(f"{name} must be a float or a 0-dim tensor, got shape {tuple(value.shape)}")
        if not math.isfinite(float(value)):
            raise ValueError(f"{name}={float(value)}: must be finite")
        if name.endswith("_weight") and float(value) < 0:
            raise ValueError(f"{name}={float(value)}: must be >= 0")
    return params


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
    beta, loss_type, label_smoothing, stats_scope, ref_logps, num_rows, device, gamma_beta_ratio=0.0, **loss_params
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
    resolve_loss_params(loss_type, label_smoothing, gamma_beta_ratio, loss_params)
    if LOSSES[loss_type].needs_reference:
        if ref_logps is None:
            raise ValueError(
                f"loss_type={loss_type!r} needs ref_logps: the reference model's summed log-probs, shape [2B]"
            )
        if not isinstance(ref_logps, torch.Tensor):
            raise TypeError(f"ref_logps must be a torch.Tensor of shape ({num_rows},), got {type(ref_logps).__name__}")
        if ref_logps.shape != (num_rows,):
            raise ValueError(f"ref_logps has shape {tuple(ref_logps.shape)}, expected ({num_rows},)")
        if ref_logps.device != device:
            raise ValueError(f"ref_logps is on {ref_logps.device}, hidden is on {device}")
        if not bool(torch.isfinite(ref_logps).all()):
            raise ValueError("ref_logps contains NaN or inf")
    elif ref_logps is not None:
        users = " / ".join(repr(t) for t, loss in LOSSES.items() if loss.needs_reference)
        raise ValueError(f"ref_logps is only used by loss_type {users}, got loss_type={loss_type!r}")
