"""The per-pair stage (`preference_objective`) against the loss family's formulas, written out by hand.

Every fused path and the reference call `preference_objective`, so comparing them cannot see a mistake in
it. Here each loss type, its gradient and every metric are recomputed in plain Python floats (float64)
from the definitions, on fresh random log-probs:

  s = summed response log-prob / response tokens (DPO: the sum itself); delta_i = s(c_i) - s(r_i)
  mu, sd = mean and unbiased (n - 1) standard deviation of the deltas of the group
  margin m_i (AMaPO family, zero for every pair when the group has < 2 pairs or sd is 0 or not finite):
    amapo              beta * exp(mu * (mu - delta_i) / sd)   where delta_i < mu, else 0
    amapo_no_znorm     beta * exp(mu * (mu - delta_i))        where delta_i < mu, else 0
    amapo_no_exp       beta * mu * (mu - delta_i) / sd        where delta_i < mu, else 0
    amapo_no_adaptive  beta * mu * (mu - delta_i)             where delta_i < mu, else 0
    amapo_no_zero      beta * exp(mu * (mu - delta_i) / sd)   for every pair
  z_i = beta * delta_i - m_i; simpo: z_i = beta * (delta_i - gamma_beta_ratio);
  dpo: z_i = beta * ((S_c - S_r) - (S_c_ref - S_r_ref)) with S the summed log-probs
  loss = mean_i [ -(1 - eps) * log sigmoid(z_i) - eps * log sigmoid(-z_i) ]
  The margin is a constant for the gradient: dL/d delta_i = -beta * ((1 - eps) sigmoid(-z_i) - eps sigmoid(z_i)) / B.
"""
import math
import random
import statistics

import pytest
import torch

from amapo_fast import METRIC_KEYS, preference_objective
from amapo_fast.objective import SEQUENCE_METRIC_KEYS, TOKEN_METRIC_KEYS, token_metrics

AMAPO_TYPES = ["amapo", "amapo_no_znorm", "amapo_no_exp", "amapo_no_adaptive", "amapo_no_zero"]


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return math.exp(log_sigmoid(x))


def hand_margins(deltas: list[float], beta: float, loss_type: str) -> list[float]:
    if len(deltas) < 2:
        return [0.0] * len(deltas)
    mu = statistics.fmean(deltas)
    sd = math.sqrt(sum((d - mu) ** 2 for d in deltas) / (len(deltas) - 1))
    if sd == 0 or not math.isfinite(sd):
        return [0.0] * len(deltas)
    formulas = {
        "amapo": lambda d: beta * math.exp(mu * (mu - d) / sd),
        "amapo_no_znorm": lambda d: beta * math.exp(mu * (mu - d)),
        "amapo_no_exp": lambda d: beta * mu * (mu - d) / sd,
        "amapo_no_adaptive": lambda d: beta * mu * (mu - d),
        "amapo_no_zero": lambda d: beta * math.exp(mu * (mu - d) / sd),
    }
    below_only = loss_type != "amapo_no_zero"
    return [formulas[loss_type](d) if (d < mu or not below_only) else 0.0 for d in deltas]


def hand_objective(sums, lengths, *, beta, loss_type, label_smoothing=0.0, gamma_beta_ratio=0.0, ref=None):
    """(loss, d loss / d sums, metrics) from the formulas above, in Python floats."""
    pairs = len(sums) // 2
    scores = list(sums) if loss_type == "dpo" else [s / n for s, n in zip(sums, lengths)]
    chosen, rejected = scores[:pairs], scores[pairs:]
    deltas = [c - r for c, r in zip(chosen, rejected)]
    mu = statistics.fmean(deltas)
    if loss_type == "dpo":
        rewards_chosen = [beta * (c - rc) for c, rc in zip(chosen, ref[:pairs])]
        rewards_rejected = [beta * (r - rr) for r, rr in zip(rejected, ref[pairs:])]
        margins = [0.0] * pairs
    else:
        rewards_chosen = [beta * c for c in chosen]
        rewards_rejected = [beta * r for r in rejected]
        if loss_type == "simpo":
            margins = [beta * gamma_beta_ratio] * pairs
        else:
            margins = hand_margins(deltas, beta, loss_type)
    zs = [rc - rr - m for rc, rr, m in zip(rewards_chosen, rewards_rejected, margins)]
    eps = label_smoothing
    loss = statistics.fmean([-(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z) for z in zs])

    d_delta = [-beta * ((1 - eps) * sigmoid(-z) - eps * sigmoid(z)) / pairs for z in zs]
    lengths = [1] * len(sums) if loss_type == "dpo" else lengths
    grad = [g / n for g, n in zip(d_delta, lengths[:pairs])] + [-g / n for g, n in zip(d_delta, lengths[pairs:])]

    reward_margins = [rc - rr for rc, rr in zip(rewards_chosen, rewards_rejected)]
    metrics = {
        "rewards/chosen": statistics.fmean(rewards_chosen),
        "rewards/rejected": statistics.fmean(rewards_rejected),
        "rewards/margins": statistics.fmean(reward_margins),
        "rewards/accuracies": statistics.fmean([float(m > 0) for m in reward_margins]),
        "logps/chosen": statistics.fmean(chosen),
        "logps/rejected": statistics.fmean(rejected),
        "margin/accuracies": statistics.fmean([float(d > mu) for d in deltas]),
        "rewards/batch_margin_mean": beta * mu,
        "loss/margin": statistics.fmean(margins),
        "margin/zero_fraction": statistics.fmean([float(m == 0) for m in margins]),
    }
    return loss, grad, metrics


def random_pairs(rng: random.Random, pairs: int, mu_shift: float):
    """Summed log-probs and lengths whose mean log-probs lie in [-3, -0.2]; chosen shifted by mu_shift so
    that the group mean takes the wanted sign (both signs matter: mu multiplies the margin's exponent)."""
    lengths = [rng.randint(1, 12) for _ in range(2 * pairs)]
    means = [-rng.uniform(0.2, 3.0) for _ in range(2 * pairs)]
    means[:pairs] = [m + mu_shift for m in means[:pairs]]
    return [m * n for m, n in zip(means, lengths)], lengths


def run_objective(sums, lengths, **kwargs):
    sums_t = torch.tensor(sums, dtype=torch.float64, requires_grad=True)
    loss, metrics = preference_objective(sums_t, torch.tensor(lengths), **kwargs)
    (grad,) = torch.autograd.grad(loss, sums_t)
    return loss, grad, metrics


def assert_objective_matches(sums, lengths, ref=None, **kwargs):
    loss, grad, metrics = run_objective(
        sums, lengths, ref_logps=None if ref is None else torch.tensor(ref, dtype=torch.float64), **kwargs
    )
    hand_loss, hand_grad, hand_metrics = hand_objective(sums, lengths, ref=ref, **kwargs)
    context = f"{kwargs}, sums={sums}, lengths={lengths}, ref={ref}"
    assert loss.item() == pytest.approx(hand_loss, rel=1e-12, abs=1e-12), context
    torch.testing.assert_close(grad, torch.tensor(hand_grad, dtype=torch.float64), rtol=1e-10, atol=1e-14, msg=context)
    assert list(metrics) == list(SEQUENCE_METRIC_KEYS) and sorted(metrics) == sorted(hand_metrics)
    for key, value in metrics.items():
        assert value.dtype == torch.float32 and value.dim() == 0, key
        # Metrics are returned in fp32: compare at fp32 precision.
        assert value.item() == pytest.approx(hand_metrics[key], rel=1e-6, abs=1e-6), f"{key}: {context}"
    return metrics


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("mu_shift", [0.8, -0.8], ids=["mu>0", "mu<0"])
@pytest.mark.parametrize("loss_type", AMAPO_TYPES)
def test_amapo_family_matches_hand_formulas(loss_type, mu_shift, label_smoothing):
    rng = random.Random()
    sums, lengths = random_pairs(rng, pairs=7, mu_shift=mu_shift)
    beta = rng.uniform(0.5, 3.0)
    metrics = assert_objective_matches(sums, lengths, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    if loss_type == "amapo_no_zero":
        assert metrics["margin/zero_fraction"] == 0
    else:  # some pairs sit below the mean and get a margin, the others none
        assert 0 < metrics["margin/zero_fraction"] < 1


@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_simpo_matches_hand_formula(label_smoothing):
    rng = random.Random()
    sums, lengths = random_pairs(rng, pairs=5, mu_shift=0.3)
    assert_objective_matches(
        sums, lengths, beta=rng.uniform(1.0, 3.0), loss_type="simpo", gamma_beta_ratio=rng.uniform(0.2, 1.0),
        label_smoothing=label_smoothing,
    )


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_dpo_uses_summed_log_probs_minus_the_reference(label_smoothing):
    rng = random.Random()
    sums, lengths = random_pairs(rng, pairs=5, mu_shift=0.3)
    # Reference log-probs far from the policy's: adding instead of subtracting them changes everything.
    ref = [s + rng.uniform(-6.0, 6.0) for s in sums]
    assert_objective_matches(
        sums, lengths, ref=ref, beta=rng.uniform(0.05, 0.5), loss_type="dpo", label_smoothing=label_smoothing
    )


def test_dpo_with_the_policy_as_reference_is_log_2():
    """The first step of every DPO run: the reference equals the policy, so z = 0 and the loss is ln 2."""
    sums, lengths = random_pairs(random.Random(), pairs=4, mu_shift=0.5)
    loss, grad, metrics = run_objective(
        sums, lengths, beta=0.1, loss_type="dpo", ref_logps=torch.tensor(sums, dtype=torch.float64)
    )
    assert loss.item() == pytest.approx(math.log(2), abs=1e-15)
    torch.testing.assert_close(grad, torch.tensor([-0.1 * 0.5 / 4] * 4 + [0.1 * 0.5 / 4] * 4, dtype=torch.float64))
    assert metrics["rewards/margins"] == 0 and metrics["rewards/accuracies"] == 0


@pytest.mark.parametrize("loss_type", AMAPO_TYPES)
def test_degenerate_groups_get_no_margin(loss_type):
    """|G| = 1, sd = 0 and an sd that overflows to inf: no margin for any pair, finite loss and gradient."""
    beta = 2.0
    # One pair.
    metrics = assert_objective_matches([-4.0, -9.0], [2, 3], beta=beta, loss_type=loss_type)
    assert metrics["loss/margin"] == 0 and metrics["margin/zero_fraction"] == 1
    # Every delta equal (exactly representable, so mu equals each delta and sd is exactly 0).
    metrics = assert_objective_matches([-6.0, -3.0, -9.0, -8.0, -6.0, -10.0], [3, 3, 3, 2, 2, 2], beta=beta,
                                       loss_type=loss_type)
    assert metrics["loss/margin"] == 0 and metrics["margin/zero_fraction"] == 1
    # Finite deltas whose squared deviations overflow: sd = inf. mu = 0 here, so without the rule the
    # exponent would be 0 and the pairs below the mean would get a margin of beta.
    sums = torch.tensor([1e300, -1e300, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64, requires_grad=True)
    loss, metrics = preference_objective(sums, torch.ones(6, dtype=torch.long), beta=beta, loss_type=loss_type)
    (grad,) = torch.autograd.grad(loss, sums)
    assert metrics["loss/margin"] == 0 and metrics["margin/zero_fraction"] == 1
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # Pair 0 has z = 2e300 (loss 0), pair 1 z = -2e300 (loss 2e300), pair 2 z = 0 (loss ln 2).
    assert loss.item() == pytest.approx((2e300 + math.log(2)) / 3, rel=1e-12)


@pytest.mark.parametrize("loss_type", AMAPO_TYPES + ["simpo"])
def test_huge_finite_deltas_stay_finite(loss_type):
    """Margins whose exponent would overflow exp() still give a finite loss and gradient."""
    sums = torch.tensor([-1.0, -2.0, -900.0, -800.0, -3.0, -400.0], dtype=torch.float64, requires_grad=True)
    loss, metrics = preference_objective(sums, torch.ones(6, dtype=torch.long), beta=5.0, loss_type=loss_type)
    (grad,) = torch.autograd.grad(loss, sums)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert all(torch.isfinite(value) for value in metrics.values())


def test_token_metrics_average_over_response_tokens():
    """Per-row sums over response tokens -> means over every chosen (rejected, all) response token."""
    rng = random.Random()
    pairs = 3
    counts = [rng.randint(1, 9) for _ in range(2 * pairs)]
    logit_sums, entropy_sums = ([rng.uniform(-5, 5) * n for n in counts] for _ in range(2))
    hit_sums = [rng.randint(0, n) for n in counts]
    as_tensor = lambda values: torch.tensor(values, dtype=torch.float64)  # noqa: E731
    metrics = token_metrics(as_tensor(logit_sums), as_tensor(entropy_sums), as_tensor(hit_sums), torch.tensor(counts))
    expected = {
        "logits/chosen": sum(logit_sums[:pairs]) / sum(counts[:pairs]),
        "logits/rejected": sum(logit_sums[pairs:]) / sum(counts[pairs:]),
        "entropy": sum(entropy_sums) / sum(counts),
        "mean_token_accuracy": sum(hit_sums) / sum(counts),
    }
    assert list(metrics) == list(TOKEN_METRIC_KEYS) and list(METRIC_KEYS) == list(SEQUENCE_METRIC_KEYS + TOKEN_METRIC_KEYS)
    for key, value in metrics.items():
        assert value.dtype == torch.float32 and value.item() == pytest.approx(expected[key], rel=1e-6), key
