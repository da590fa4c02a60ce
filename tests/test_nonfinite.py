"""Non-finite inputs propagate through every implementation as they do through the reference.

The fused paths only multiply response rows, so a NaN at a prompt or padding position never reaches
their matrix products; the reference, which runs the head on every position, turns it into a NaN loss.
Both must agree: a broken forward pass must never look like a finite loss. `sequence_logps` checks its
labels exactly as the loss does.
"""
import pytest
import torch

from amapo_fast import linear_preference_loss, sequence_logps

from conftest import DEVICE

IMPLS = ("reference", "chunked", "triton")


def _batch(pairs=2, seq_len=9, dim=24, vocab=300, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * pairs, seq_len, dim, generator=generator)
    weight = torch.randn(vocab, dim, generator=generator) / dim**0.5
    labels = torch.randint(0, vocab, (2 * pairs, seq_len), generator=generator)
    labels[:, :4] = -100  # prompt
    labels[1, -2:] = -100  # padding
    return hidden.to(DEVICE), weight.to(DEVICE), labels.to(DEVICE)


def _run(hidden, weight, labels, impl, loss_type):
    hidden = hidden.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    loss, metrics = linear_preference_loss(hidden, weight, labels, beta=2.0, loss_type=loss_type, impl=impl)
    loss.backward()
    return loss.detach(), metrics, hidden.grad, weight.grad


@pytest.mark.parametrize("loss_type", ["amapo", "simpo"])
@pytest.mark.parametrize(
    "where",
    [
        "hidden_prompt_nan",  # a prompt position: only the reference's matmul reads it
        "hidden_padding_inf",
        "hidden_response_nan",
        "weight_nan",
        "weight_inf",
    ],
)
def test_non_finite_inputs_propagate_like_the_reference(where, loss_type):
    hidden, weight, labels = _batch()
    value = float("inf") if where.endswith("inf") else float("nan")
    if where == "hidden_prompt_nan":
        hidden[0, 1, 3] = value
    elif where == "hidden_padding_inf":
        hidden[1, -1, 0] = value
    elif where == "hidden_response_nan":
        hidden[2, 6, 5] = value
    else:
        weight[7, 2] = value
    reference = _run(hidden, weight, labels, "reference", loss_type)
    assert not bool(reference[0].isfinite()), "the reference is expected to be non-finite here"
    for impl in IMPLS[1:]:
        loss, metrics, d_hidden, d_weight = _run(hidden, weight, labels, impl, loss_type)
        assert not bool(loss.isfinite()), f"{impl}: finite loss {loss.item()} from a non-finite input"
        assert not bool(d_weight.isfinite().all()), f"{impl}: the weight gradient hides the non-finite input"
        assert not bool(reference[3].isfinite().all())
        assert not all(bool(v.isfinite()) for v in metrics.values()), f"{impl}: every metric finite"


def test_finite_inputs_stay_finite():
    hidden, weight, labels = _batch(seed=1)
    for impl in IMPLS:
        loss, metrics, d_hidden, d_weight = _run(hidden, weight, labels, impl, "amapo")
        assert bool(loss.isfinite()) and bool(d_hidden.isfinite().all()) and bool(d_weight.isfinite().all()), impl
        assert all(bool(v.isfinite()) for v in metrics.values()), impl


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad_label", [300, -3])
def test_sequence_logps_validates_labels(impl, bad_label):
    hidden, weight, labels = _batch()
    labels[0, 5] = bad_label
    with pytest.raises(ValueError, match=f"labels contain {bad_label}"):
        sequence_logps(hidden, weight, labels, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_sequence_logps_names_a_mismatched_tensor(impl):
    hidden, weight, labels = _batch()
    with pytest.raises(ValueError, match="labels has shape"):
        sequence_logps(hidden, weight, labels[:, :-1], impl=impl)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(beta=1e38), "beta=1e\\+38: must be positive and at most 1000"),
        (dict(beta=2.0, gamma_beta_ratio=float("inf"), loss_type="simpo"), "gamma_beta_ratio=inf"),
        (dict(beta=2.0, loss_type="dpo", ref_logps=[0.0] * 4), "ref_logps must be a torch.Tensor"),
        (dict(beta=2.0, bias=[0.0] * 300), "bias must be a torch.Tensor"),
    ],
)
def test_arguments_that_would_overflow_or_crash_are_named(kwargs, match):
    hidden, weight, labels = _batch()
    with pytest.raises((ValueError, TypeError), match=match):
        linear_preference_loss(hidden, weight, labels, **kwargs)


@pytest.mark.parametrize("cu_seqlens", [[0, 9, 18, 27, 36], torch.tensor([0.0, 9.5, 18.0, 27.0, 36.0])])
def test_cu_seqlens_must_be_an_integer_tensor(cu_seqlens):
    hidden, weight, labels = _batch()
    with pytest.raises(TypeError, match="cu_seqlens must be an int64 or int32 tensor"):
        linear_preference_loss(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), beta=2.0,
                               cu_seqlens=cu_seqlens)
