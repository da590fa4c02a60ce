"""The chunked path over several token chunks.

A chunk holds chunk_bytes / (4 V) tokens, so at the small vocabularies the other tests use one chunk
holds every token and the code that moves from chunk to chunk never runs. Real runs (V ~ 32k-128k, a
few thousand response tokens) always take several chunks: these tests force that path.
"""
import pytest
import torch

from amapo_fast import chunked, linear_preference_loss, sequence_logps
from test_loss import assert_matches, loss_kwargs, make_batch, reference_on, run


def dense_token_logprobs(hidden, weight, bias, targets):
    """The whole [N, V] logits at once, in float64."""
    logits = hidden.double() @ weight.double().T + bias.double()
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


def random_tokens(num_tokens, vocab, dim, dtype):
    hidden = torch.randn(num_tokens, dim, dtype=dtype)
    weight = (torch.randn(vocab, dim) * dim**-0.5 * 3).to(dtype)
    bias = torch.randn(vocab, dtype=dtype)
    targets = torch.randint(0, vocab, (num_tokens,))
    return hidden, weight, bias, targets


def check_against_dense(hidden, weight, bias, targets, chunk_bytes, rtol):
    """token_logprobs and token_grads (gradients of sum coef * logp) against autograd on the dense logits."""
    logp, lse = chunked.token_logprobs(hidden, weight, bias, targets, chunk_bytes=chunk_bytes)
    leaves = [t.double().requires_grad_(True) for t in (hidden, weight, bias)]
    dense = dense_token_logprobs(*leaves, targets)
    torch.testing.assert_close(logp.double(), dense.detach(), rtol=rtol, atol=rtol)

    coef = torch.randn(hidden.shape[0], dtype=logp.dtype)
    grads = chunked.token_grads(hidden, weight, bias, targets, lse, coef, chunk_bytes=chunk_bytes)
    expected = torch.autograd.grad((coef.double() * dense).sum(), leaves)
    for name, grad, ref in zip(("d_hidden", "d_weight", "d_bias"), grads, expected):
        assert grad.dtype == hidden.dtype, name
        torch.testing.assert_close(grad.double(), ref, rtol=rtol, atol=rtol * ref.abs().max().item(), msg=name)


@pytest.mark.parametrize("tokens_per_chunk", [1, 5, 16])
def test_token_passes_over_forced_small_chunks(tokens_per_chunk):
    num_tokens, vocab = 37, 300  # 37 tokens: the last chunk is a short one for 5 and 16
    chunk_bytes = tokens_per_chunk * 4 * vocab
    assert chunked.chunk_tokens(vocab, chunk_bytes) == tokens_per_chunk
    check_against_dense(*random_tokens(num_tokens, vocab, 16, torch.float64), chunk_bytes, rtol=1e-12)


def test_default_chunk_size_splits_a_large_vocabulary():
    """With the default chunk size and V = 33000, 300 tokens take two chunks (254 + 46)."""
    num_tokens, vocab = 300, 33000
    assert chunked.chunk_tokens(vocab) < num_tokens
    check_against_dense(*random_tokens(num_tokens, vocab, 8, torch.float64), chunked.CHUNK_BYTES, rtol=1e-10)


@pytest.fixture
def three_tokens_per_chunk(monkeypatch):
    """Every chunked pass through the public API takes 3 tokens at a time.

    The chunk size is patched where it is computed: `CHUNK_BYTES` is bound as a default argument when
    the functions are defined, so patching the constant alone would not reach them.
    """
    monkeypatch.setattr(chunked, "chunk_tokens", lambda vocab_size, chunk_bytes=None: 3)


@pytest.mark.parametrize("loss_type", ["amapo", "simpo", "dpo"])
def test_public_loss_over_several_chunks(three_tokens_per_chunk, loss_type):
    hidden, weight, labels, bias = make_batch(pairs=3, dim=24, vocab=97, bias=True)
    assert int((labels != -100).sum()) > 3 * 2  # more than two chunks of response tokens
    kwargs = loss_kwargs(loss_type, 6)
    assert_matches(
        run(hidden, weight, labels, bias, impl="chunked", **kwargs),
        reference_on(hidden, weight, labels, bias, **kwargs),
        grad_rtol=1e-5,
    )
    sums, counts = sequence_logps(hidden, weight, labels, bias=bias, impl="chunked")
    ref_sums, ref_counts = sequence_logps(hidden.double(), weight.double(), labels, bias=bias.double(), impl="reference")
    torch.testing.assert_close(sums.double(), ref_sums, rtol=1e-5, atol=1e-5)
    assert torch.equal(counts, ref_counts)


@pytest.mark.parametrize("impl", ["chunked", "reference"])
def test_backward_scales_with_the_incoming_gradient(impl):
    """The trainer back-propagates loss / accumulation_steps: the fused backward must honour that factor."""
    hidden, weight, labels, bias = make_batch(pairs=2, dim=12, vocab=50, bias=True, dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss, _ = linear_preference_loss(leaves[0], leaves[1], labels, bias=leaves[2], beta=2.0, impl=impl)
    unit = torch.autograd.grad(loss, leaves, retain_graph=True)
    scaled = torch.autograd.grad(loss * 0.25, leaves)
    for one, quarter in zip(unit, scaled):
        torch.testing.assert_close(quarter, one * 0.25)
