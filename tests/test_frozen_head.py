"""The one-pass frozen-head path: pass 1 with the online-rescaled gradient basis g = softmax @ W, then
dH = coef * (W[y] - g). Against dense float64 computations and the reference loss, on every fused path."""
import math

import pytest
import torch

from amapo_fast import chunked, frozen_head, linear_preference_loss
from conftest import DEVICE
from test_loss import METRIC_KEYS, loss_kwargs, make_batch


def random_tokens(num_tokens, vocab, dim, dtype=torch.float64, bias=True):
    hidden = torch.randn(num_tokens, dim, dtype=dtype)
    weight = (torch.randn(vocab, dim, dtype=torch.float64) * (3.0 / math.sqrt(dim))).to(dtype)
    return hidden, weight, torch.randn(vocab, dtype=dtype) if bias else None, torch.randint(0, vocab, (num_tokens,))


@pytest.mark.parametrize("columns", [None, 7, 64], ids=["one-chunk", "7-columns", "64-columns"])
def test_pass1_and_basis_match_the_dense_softmax(columns):
    hidden, weight, bias, targets = random_tokens(23, 211, 12)
    pass1, basis = frozen_head.token_logprobs_and_basis(hidden, weight, bias, targets, columns=columns)
    logits = hidden @ weight.T + bias
    probs = logits.softmax(1)
    lse = logits.logsumexp(1)
    torch.testing.assert_close(pass1.lse, lse, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pass1.logp, logits.gather(1, targets[:, None]).squeeze(1) - lse, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pass1.mean_logit, logits.mean(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pass1.entropy, -(probs * probs.log()).sum(1), rtol=1e-10, atol=1e-10)
    assert torch.equal(pass1.argmax_hit, (logits.argmax(1) == targets).double())
    torch.testing.assert_close(basis, probs @ weight, rtol=1e-12, atol=1e-12)


def test_the_basis_gives_the_exact_hidden_gradient():
    hidden, weight, bias, targets = random_tokens(9, 50, 8)
    coef = torch.randn(9, dtype=torch.float64)
    hidden.requires_grad_(True)
    logp = torch.log_softmax(hidden @ weight.T + bias, 1).gather(1, targets[:, None]).squeeze(1)
    (expected,) = torch.autograd.grad((coef * logp).sum(), hidden)
    _, basis = frozen_head.token_logprobs_and_basis(hidden.detach(), weight, bias, targets, columns=16)
    torch.testing.assert_close(frozen_head.hidden_grad(weight, targets, basis, coef, torch.float64), expected)


def _frozen_run(hidden, weight, labels, bias, **kwargs):
    leaf = hidden.detach().clone().requires_grad_(True)
    loss, metrics = linear_preference_loss(leaf, weight.detach(), labels, bias=None if bias is None else bias.detach(), **kwargs)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), metrics, grad


@pytest.fixture
def no_pass2(monkeypatch):
    """The frozen head must never walk the vocabulary a second time: pass 2 of either backend fails if called."""
    from amapo_fast.kernels import dlogits_backward

    def refuse(*args, **kwargs):
        raise AssertionError("pass 2 ran for a frozen head")

    monkeypatch.setattr(chunked, "token_grads", refuse)
    monkeypatch.setattr(dlogits_backward, "token_grads", refuse)


@pytest.mark.parametrize("impl", ["chunked", "triton"])
@pytest.mark.parametrize("loss_type", ["amapo", "dpo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_frozen_head_loss_matches_the_reference(no_pass2, impl, loss_type, dtype):
    hidden, weight, labels, bias = make_batch(pairs=3, dim=24, vocab=300, bias=True, dtype=dtype)
    kwargs = loss_kwargs(loss_type, 6)
    loss, metrics, grad = _frozen_run(hidden, weight, labels, bias, impl=impl, **kwargs)
    up = lambda t: t.double()  # noqa: E731
    ref_loss, ref_metrics, ref_grad = _frozen_run(up(hidden), up(weight), labels, up(bias), impl="reference", **kwargs)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    for key in METRIC_KEYS:
        torch.testing.assert_close(metrics[key].double(), ref_metrics[key].double(), rtol=1e-5, atol=1e-5, msg=key)
    assert grad.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2**-8
    torch.testing.assert_close(grad.double(), ref_grad, rtol=tolerance, atol=tolerance * ref_grad.abs().max().item())


def test_float64_frozen_head_gradcheck():
    """Finite differences in hidden with the head frozen (SimPO: no detached margin, unlike AMaPO)."""
    hidden, weight, labels, bias = make_batch(pairs=2, dim=6, vocab=11, dtype=torch.float64, bias=True)
    kwargs = loss_kwargs("simpo", 4)
    leaf = hidden.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda h: linear_preference_loss(h, weight, labels, bias=bias, impl="chunked", **kwargs)[0], (leaf,)
    )


def test_default_chunks_split_a_large_vocabulary():
    """At the CPU budget, 300 tokens over V = 33000 take two vocabulary chunks of the online rescaling."""
    hidden, weight, bias, targets = random_tokens(300, 33000, 8, bias=False)
    assert frozen_head.vocab_chunks.chunk_columns(300, 33000, 4, chunked.CHUNK_BYTES) < 33000
    pass1, basis = frozen_head.token_logprobs_and_basis(hidden, weight, None, targets)
    probs = (hidden @ weight.T).softmax(1)
    torch.testing.assert_close(basis, probs @ weight, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(pass1.lse, (hidden @ weight.T).logsumexp(1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ["no-grad-mode", "head-trained", "hidden-without-grad"])
def test_the_one_pass_path_runs_only_for_a_frozen_head_with_a_hidden_gradient(monkeypatch, case):
    hidden, weight, labels, _ = make_batch(pairs=2, dim=8, vocab=40)

    def refuse(*args, **kwargs):
        raise AssertionError("the one-pass path ran although no hidden-only gradient is asked for")

    monkeypatch.setattr(frozen_head, "token_logprobs_and_basis", refuse)
    hidden.requires_grad_(case != "hidden-without-grad")
    weight.requires_grad_(case == "head-trained")
    with torch.set_grad_enabled(case != "no-grad-mode"):
        loss, _ = linear_preference_loss(hidden, weight, labels, beta=2.0, impl="chunked")
    assert torch.isfinite(loss)
