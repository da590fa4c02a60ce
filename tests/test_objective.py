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
    per_token = [1] * len(sums) if loss_type == "dpo" else lengths
    grad = [g / n for g, n in zip(d_delta, per_token[:pairs])] + [-g / n for g, n in zip(d_delta, per_token[pairs:])]

    if loss_type == "dpo":
        rs = [beta * (c - r) for c, r in zip(chosen, rejected)]
        gammas = [beta * (rc - rr) for rc, rr in zip(ref[:pairs], ref[pairs:])]
    else:
        rs = [rc - rr for rc, rr in zip(rewards_chosen, rewards_rejected)]
        gammas = margins
    grads = [abs((1 - eps) * sigmoid(-z) - eps * sigmoid(z)) for z in zs]
    metrics = hand_pair_metrics(sums, lengths, chosen, rejected, rewards_chosen, rewards_rejected, margins, beta)
    metrics.update(hand_dynamics(rs, gammas, grads))
    return loss, grad, metrics


def hand_dynamics(rs, gammas, grads):
    """The dynamics metrics: Table 1's cases (correct: r > 0; cases 1 and 3: r >= gamma) and gradient shares."""
    correct = [r > 0 for r in rs]
    above = [r >= g for r, g in zip(rs, gammas)]
    cases = [(c, a) for c, a in zip(correct, above)]
    values = {
        f"dynamics/case{k}": statistics.fmean([float(case == want) for case in cases])
        for k, want in enumerate([(True, True), (True, False), (False, True), (False, False)], 1)
    }
    total = sum(grads)
    misranked = [d for d, c in zip(grads, correct) if not c]
    right = [d for d, c in zip(grads, correct) if c]
    values["dynamics/misranked_grad_share"] = sum(misranked) / total if total > 0 else 0.0
    values["dynamics/grad_correct_mean"] = statistics.fmean(right) if right else 0.0
    values["dynamics/grad_misranked_mean"] = statistics.fmean(misranked) if misranked else 0.0
    return values


def hand_pair_metrics(sums, lengths, chosen, rejected, rewards_chosen, rewards_rejected, margins, beta):
    pairs = len(sums) // 2
    deltas = [c - r for c, r in zip(chosen, rejected)]
    mu = statistics.fmean(deltas)
    reward_margins = [rc - rr for rc, rr in zip(rewards_chosen, rewards_rejected)]
    return {
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
        "nll_loss": -sum(sums[:pairs]) / sum(lengths[:pairs]),
    }


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


# The paper's other baselines, written out the same way (S summed log-probs, n response tokens, a = S / n,
# R the reference's summed log-probs, NLL_w = -sum of the chosen S / sum of the chosen n):
#   slic  max(0, slic_delta - (S_c - S_r)) + nll_weight * NLL_w
#   ipo   (h - 1/(2 beta))^2, h = (a_c - R_c/n_c) - (a_r - R_r/n_r)
#   cpo   -(1 - eps) log sigmoid(beta (S_c - S_r)) - eps log sigmoid(-beta (S_c - S_r)) + nll_weight * NLL_w
#   orpo  NLL_w - beta log sigmoid(lo), lo = (a_c - a_r) - (log(1 - e^a_c) - log(1 - e^a_r))
#   kto   (w_d (1 - sigmoid(u_c)) + w_u (1 - sigmoid(u_r))) / 2, u_c = beta (S_c - R_c - KL), u_r = beta (KL - (S_r - R_r))
# with (r, gamma, |d loss_i / d z_i|) per pair as docs/train.md's table gives them.
def hand_baseline(loss_type, sums, lengths, ref, beta, params, eps=0.0):
    """(loss, d loss / d sums, metrics) of a baseline from the formulas above, in Python floats."""
    pairs = len(sums) // 2
    s_c, s_r, n_c, n_r = sums[:pairs], sums[pairs:], lengths[:pairs], lengths[pairs:]
    a_c, a_r = [s / n for s, n in zip(s_c, n_c)], [s / n for s, n in zip(s_r, n_r)]
    ref_c, ref_r = (ref[:pairs], ref[pairs:]) if ref is not None else (None, None)
    nll = -sum(s_c) / sum(n_c)
    d_nll_c = -1.0 / sum(n_c)  # d NLL_w / d S_c (every chosen row alike)
    per, g_c, g_r, rewards_c, rewards_r, margins, rs, gammas, ds = ([] for _ in range(9))
    nll_weight = {"slic": params.get("nll_weight", 0.1), "cpo": params.get("nll_weight", 1.0), "orpo": 1.0}.get(loss_type, 0.0)
    for i in range(pairs):
        if loss_type == "slic":
            delta = params.get("slic_delta", 1.0)
            z = (s_c[i] - s_r[i]) - delta
            per.append(max(0.0, -z))
            slope = -1.0 if z < 0 else 0.0  # d per / d z
            g_c.append(slope / pairs)
            g_r.append(-slope / pairs)
            rewards_c.append(beta * s_c[i]), rewards_r.append(beta * s_r[i]), margins.append(delta)
            rs.append(s_c[i] - s_r[i]), gammas.append(delta), ds.append(abs(slope))
            scores = (s_c, s_r)
        elif loss_type == "ipo":
            h = (a_c[i] - ref_c[i] / n_c[i]) - (a_r[i] - ref_r[i] / n_r[i])
            z = h - 1 / (2 * beta)
            per.append(z * z)
            g_c.append(2 * z / n_c[i] / pairs)
            g_r.append(-2 * z / n_r[i] / pairs)
            rewards_c.append(beta * (a_c[i] - ref_c[i] / n_c[i])), rewards_r.append(beta * (a_r[i] - ref_r[i] / n_r[i]))
            margins.append(1 / (2 * beta))
            rs.append(a_c[i] - a_r[i]), gammas.append(ref_c[i] / n_c[i] - ref_r[i] / n_r[i] + 1 / (2 * beta))
            ds.append(2 * abs(z))
            scores = (a_c, a_r)
        elif loss_type == "cpo":
            z = beta * (s_c[i] - s_r[i])
            per.append(-(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z))
            slope = -((1 - eps) * sigmoid(-z) - eps * sigmoid(z))
            g_c.append(beta * slope / pairs)
            g_r.append(-beta * slope / pairs)
            rewards_c.append(beta * s_c[i]), rewards_r.append(beta * s_r[i]), margins.append(0.0)
            rs.append(z), gammas.append(0.0), ds.append(abs(slope))
            scores = (s_c, s_r)
        elif loss_type == "orpo":
            lo = (a_c[i] - a_r[i]) - (math.log(1 - math.exp(a_c[i])) - math.log(1 - math.exp(a_r[i])))
            per.append(-beta * log_sigmoid(lo))
            slope = -beta * sigmoid(-lo)  # d per / d lo; d lo / d a_c = 1 / (1 - e^a_c)
            g_c.append(slope / (1 - math.exp(a_c[i])) / n_c[i] / pairs)
            g_r.append(-slope / (1 - math.exp(a_r[i])) / n_r[i] / pairs)
            rewards_c.append(beta * a_c[i]), rewards_r.append(beta * a_r[i]), margins.append(0.0)
            rs.append(lo), gammas.append(0.0), ds.append(-slope)
            scores = (a_c, a_r)
        elif loss_type == "kto":
            kl, w_d, w_u = params["kto_kl"], params.get("desirable_weight", 1.0), params.get("undesirable_weight", 1.0)
            u_c = beta * (s_c[i] - ref_c[i] - kl)
            u_r = beta * (kl - (s_r[i] - ref_r[i]))
            per.append((w_d * (1 - sigmoid(u_c)) + w_u * (1 - sigmoid(u_r))) / 2)
            slope_c, slope_r = sigmoid(u_c) * sigmoid(-u_c), sigmoid(u_r) * sigmoid(-u_r)
            g_c.append(-w_d * slope_c * beta / 2 / pairs)
            g_r.append(w_u * slope_r * beta / 2 / pairs)
            rewards_c.append(beta * (s_c[i] - ref_c[i])), rewards_r.append(beta * (s_r[i] - ref_r[i]))
            margins.append(0.0)
            rs.append(beta * (s_c[i] - s_r[i])), gammas.append(beta * (ref_c[i] - ref_r[i]))
            ds.append((w_d * slope_c + w_u * slope_r) / 4)
            scores = (s_c, s_r)
    loss = statistics.fmean(per) + nll_weight * nll
    grad = [g + nll_weight * d_nll_c for g in g_c] + g_r
    metrics = hand_pair_metrics(sums, lengths, *scores, rewards_c, rewards_r, margins, beta)
    metrics.update(hand_dynamics(rs, gammas, ds))
    return loss, grad, metrics


def assert_baseline_matches(loss_type, sums, lengths, ref, beta, params, eps=0.0):
    loss, grad, metrics = run_objective(
        sums, lengths, beta=beta, loss_type=loss_type, label_smoothing=eps,
        ref_logps=None if ref is None else torch.tensor(ref, dtype=torch.float64), **params,
    )
    hand_loss, hand_grad, hand_metrics = hand_baseline(loss_type, sums, lengths, ref, beta, params, eps)
    context = f"{loss_type} beta={beta} {params}, sums={sums}, lengths={lengths}, ref={ref}"
    assert loss.item() == pytest.approx(hand_loss, rel=1e-12, abs=1e-12), context
    torch.testing.assert_close(grad, torch.tensor(hand_grad, dtype=torch.float64), rtol=1e-10, atol=1e-14, msg=context)
    assert list(metrics) == list(SEQUENCE_METRIC_KEYS) and sorted(metrics) == sorted(hand_metrics)
    for key, value in metrics.items():
        assert value.item() == pytest.approx(hand_metrics[key], rel=1e-6, abs=1e-6), f"{key}: {context}"
    return metrics


BASELINE_CASES = {
    "slic-default": ("slic", {}),
    "slic": ("slic", {"slic_delta": 2.5, "nll_weight": 0.3}),
    "ipo": ("ipo", {}),
    "cpo-default": ("cpo", {}),
    "cpo": ("cpo", {"nll_weight": 0.4}),
    "orpo": ("orpo", {}),
    "kto": ("kto", {"kto_kl": 0.7}),
    "kto-weighted": ("kto", {"kto_kl": 0.0, "desirable_weight": 1.5, "undesirable_weight": 0.6}),
}


@pytest.mark.parametrize("case", BASELINE_CASES)
def test_baselines_match_hand_formulas(case):
    loss_type, params = BASELINE_CASES[case]
    rng = random.Random()
    # A shift below 0.2 keeps every mean log-prob negative, as a log-prob is (ORPO takes log(1 - e^a)).
    sums, lengths = random_pairs(rng, pairs=6, mu_shift=0.15)
    ref = [s + rng.uniform(-4.0, 4.0) for s in sums] if loss_type in ("ipo", "kto") else None
    # SLiC's hinge: a slic_delta inside the spread of the gaps, so that some pairs are past it and some are not.
    if loss_type == "slic":
        gaps = sorted(c - r for c, r in zip(sums[:6], sums[6:]))
        params = {**params, "slic_delta": (gaps[2] + gaps[3]) / 2}
    assert_baseline_matches(loss_type, sums, lengths, ref, rng.uniform(0.1, 2.0), params)


def test_cpo_label_smoothing_matches_hand_formula():
    rng = random.Random()
    sums, lengths = random_pairs(rng, pairs=5, mu_shift=0.15)
    assert_baseline_matches("cpo", sums, lengths, None, rng.uniform(0.05, 0.5), {}, eps=0.2)


def test_orpo_is_finite_where_every_token_is_certain():
    """A mean log-prob of exactly 0 would make log(1 - e^a) infinite; the cap keeps loss and gradient finite."""
    sums = torch.tensor([0.0, -3.0, -1e-30, 0.0], dtype=torch.float64, requires_grad=True)
    loss, metrics = preference_objective(sums, torch.tensor([2, 3, 1, 4]), beta=0.1, loss_type="orpo")
    (grad,) = torch.autograd.grad(loss, sums)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert all(torch.isfinite(value) for value in metrics.values())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(loss_type="kto", ref_logps=torch.zeros(4)), "needs kto_kl"),
        (dict(loss_type="dpo", ref_logps=torch.zeros(4), slic_delta=1.0), "slic_delta is a parameter of loss_type slic"),
        (dict(loss_type="slic", label_smoothing=0.1), "takes no label smoothing"),
        (dict(loss_type="cpo", nll_weight=float("nan")), "nll_weight=nan: must be finite"),
        (dict(loss_type="kto", ref_logps=torch.zeros(4), kto_kl=torch.zeros(2)), "kto_kl must be a float or a 0-dim"),
    ],
    ids=["kto-without-kl", "foreign-keyword", "smoothing", "nan-weight", "kl-shape"],
)
def test_bad_loss_keywords_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        preference_objective(torch.randn(4, dtype=torch.float64), torch.ones(4), beta=0.5, **kwargs)


@pytest.mark.parametrize("loss_type", ["amapo", "amapo_no_zero", "simpo", "dpo", "slic", "ipo", "cpo", "orpo", "kto"])
def test_dynamics_metrics_sum_and_bound(loss_type):
    """On random inputs: the four cases are fractions summing to 1, consistent with the pairs' ranking; the
    misranked share lies in [0, 1] and equals its definition from the two means."""
    rng = random.Random()
    pairs = rng.randint(2, 12)
    sums, lengths = random_pairs(rng, pairs=pairs, mu_shift=rng.uniform(-0.5, 0.15))
    ref = torch.tensor([s + rng.uniform(-3.0, 3.0) for s in sums], dtype=torch.float64)
    params = {"kto_kl": rng.uniform(0, 1)} if loss_type == "kto" else {}
    _, _, metrics = run_objective(
        sums, lengths, beta=rng.uniform(0.1, 3.0), loss_type=loss_type,
        ref_logps=ref if loss_type in ("dpo", "ipo", "kto") else None, **params,
    )
    cases = [metrics[f"dynamics/case{k}"].item() for k in range(1, 5)]
    assert all(0 <= c <= 1 for c in cases) and sum(cases) == pytest.approx(1.0, abs=1e-6)
    # Correctly ranked (cases 1 and 2) is r > 0; for every loss type here r > 0 exactly when the chosen response
    # has the higher score (ORPO's log odds are increasing in the mean log-prob).
    correct = cases[0] + cases[1]
    scores_summed = loss_type in ("dpo", "slic", "cpo", "kto")
    chosen = [s if scores_summed else s / n for s, n in zip(sums[:pairs], lengths[:pairs])]
    rejected = [s if scores_summed else s / n for s, n in zip(sums[pairs:], lengths[pairs:])]
    assert correct == pytest.approx(statistics.fmean([float(c > r) for c, r in zip(chosen, rejected)]), abs=1e-6)
    share = metrics["dynamics/misranked_grad_share"].item()
    assert 0 <= share <= 1
    right, wrong = metrics["dynamics/grad_correct_mean"].item(), metrics["dynamics/grad_misranked_mean"].item()
    assert right >= 0 and wrong >= 0
    total = correct * pairs * right + (1 - correct) * pairs * wrong
    if total > 0:
        assert share == pytest.approx((1 - correct) * pairs * wrong / total, rel=1e-5, abs=1e-7)
