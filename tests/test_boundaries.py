"""The edges that random inputs never hit: a pair exactly at its group's mean (where AMaPO's margin switches
off), infinite rather than NaN losses and gradient norms (where a check for NaN alone would let a step
through), and gradient accumulation's division of the loss (which only a comparison of gradients, not of
losses, sees at once)."""
import functools
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from amapo_fast import preference_objective
from amapo_fast.errors import NonFiniteError
from amapo_fast.guard import NonFiniteSteps
from amapo_fast.losses.amapo import adaptive_margin

BETA = 2.0
INFINITIES = [float("inf"), float("-inf")]


# --- the margin at the group mean -------------------------------------------------------------------------


@pytest.mark.parametrize("deltas", [(1.0, 2.0, 3.0), (-3.0, -2.0, -1.0), (0.0, 2.0, 2.0, 4.0)],
                         ids=["mean-positive", "mean-negative", "two-at-the-mean"])
def test_a_pair_exactly_at_the_group_mean_gets_no_margin(deltas):
    """delta_i == mu is not below the mean: m_i = 0 (the rule is delta_i < mu, strictly). The deltas are exact
    in binary, so the middle pair sits at the mean to the last bit."""
    delta = torch.tensor(deltas, dtype=torch.float64)
    mu, sd = delta.mean(), delta.std(unbiased=True)
    at_mean = delta == mu
    assert at_mean.any()  # the case under test really occurs
    expected = torch.where(delta < mu, BETA * torch.exp(mu * (mu - delta) / sd), torch.zeros_like(delta))
    for loss_type in ("amapo", "amapo_no_znorm", "amapo_no_exp", "amapo_no_adaptive"):
        margin, _ = adaptive_margin(delta, delta, BETA, loss_type)
        assert (margin[at_mean] == 0).all(), loss_type
    margin, _ = adaptive_margin(delta, delta, BETA, "amapo")
    assert torch.allclose(margin, expected, rtol=1e-12, atol=0)
    # The ablation without the zero branch is the one that does give the pair at the mean a margin: beta e^0.
    no_zero, _ = adaptive_margin(delta, delta, BETA, "amapo_no_zero")
    assert torch.allclose(no_zero[at_mean], torch.full_like(no_zero[at_mean], BETA), rtol=1e-12)

    # Through the loss: chosen log-probs delta, rejected 0, one token each.
    sums = torch.cat([delta, torch.zeros_like(delta)]).requires_grad_(True)
    loss, metrics = preference_objective(sums, torch.ones_like(sums), beta=BETA, loss_type="amapo")
    assert loss.item() == pytest.approx((-F.logsigmoid(BETA * delta - expected)).mean().item(), rel=1e-12)
    assert metrics["margin/zero_fraction"].item() == pytest.approx((delta >= mu).double().mean().item())
    assert metrics["margin/accuracies"].item() == pytest.approx((delta > mu).double().mean().item())


# --- infinite losses and gradient norms ---------------------------------------------------------------------


@pytest.mark.parametrize("norm", INFINITIES + [float("nan")], ids=["inf", "-inf", "nan"])
def test_an_infinite_gradient_norm_is_not_finite(norm):
    """Under 'stop' every non-finite norm, infinite as well as NaN, ends the run; under 'skip' it is counted."""
    stop = NonFiniteSteps("stop", "/nonexistent", is_main=True)
    with pytest.raises(NonFiniteError, match=rf"step 3: the gradient norm is not finite \(gradient norm {norm}\)"):
        stop.after_step(3, norm)
    skip = NonFiniteSteps("skip", "/nonexistent", is_main=True)
    skip.after_step(3, norm)
    skip.after_step(4, 1.0)
    assert skip.skipped == 1


@pytest.mark.parametrize("value", INFINITIES + [float("nan")], ids=["inf", "-inf", "nan"])
def test_an_infinite_loss_gets_a_nan_gradient_and_is_named(value):
    """An infinite loss can have a finite gradient (softplus saturates): scaled by NaN, its step cannot be
    applied, and the guard names the loss, not the gradient norm."""
    guard = NonFiniteSteps("stop", "/nonexistent", is_main=True)
    weight = torch.tensor(1.0, requires_grad=True)
    guard.observe(weight * value).backward()
    assert math.isnan(weight.grad.item())
    with pytest.raises(NonFiniteError, match=r"step 1: the loss is not finite"):
        guard.after_step(1, float("nan"))
    # A finite loss passes unchanged, and so does its gradient.
    weight.grad = None
    scaled = guard.observe(weight * 1.5)
    scaled.backward()
    assert scaled.item() == 1.5 and weight.grad.item() == 1.5


@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_the_fsdp2_engine_never_applies_a_step_with_an_infinite_gradient_norm(one_process_group):
    from amapo_fast.distributed import DistEnv, Fsdp2Engine, OptimConfig
    from amapo_fast.model import load_policy, load_tokenizer

    optim = OptimConfig(learning_rate=1e-2, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, warmup_steps=0,
                        total_steps=4, max_grad_norm=1.0, gradient_accumulation_steps=1, micro_batch_size=2,
                        bf16=False, cpu_offload=False)
    load = functools.partial(load_policy, "toy", tokenizer=load_tokenizer("toy"))
    engine = Fsdp2Engine(load, DistEnv(0, 1, 0, torch.device("cpu")), optim)
    before = {name: parameter.full_tensor().clone() for name, parameter in engine.model.named_parameters()}
    for parameter in engine.model.parameters():
        parameter.grad = torch.full_like(parameter, 1.0)
    next(engine.model.parameters()).grad.fill_(float("inf"))  # one infinite tensor, no NaN anywhere
    assert engine.step() == float("inf")
    for name, parameter in engine.model.named_parameters():
        assert torch.equal(parameter.full_tensor(), before[name]), f"{name} moved"
    assert engine.scheduler.last_epoch == 0  # the schedule stood still as well


# --- gradient accumulation ----------------------------------------------------------------------------------


def test_accumulated_micro_batches_give_the_gradient_of_their_union(tmp_path):
    """SimPO's loss is a mean over pairs, so 2 accumulated micro-batches of 8 pairs have the gradient of one
    batch of the same 16 pairs: the logged loss and gradient norm of the first step agree (an engine that does
    not divide by the accumulation steps logs twice the norm)."""
    from amapo_fast.train import main
    from test_train import _records

    common = ["--toy_num_train", "32", "--max_steps", "1", "--logging_steps", "1", "--loss_type", "simpo",
              "--eval_split", "none", "--save_final", "false"]
    main(common + ["--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2",
                   "--output_dir", str(tmp_path / "accumulated")])
    main(common + ["--per_device_train_batch_size", "16", "--output_dir", str(tmp_path / "whole")])
    accumulated, whole = (_records(tmp_path / name)[-1] for name in ("accumulated", "whole"))
    assert accumulated["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    assert accumulated["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-5)
