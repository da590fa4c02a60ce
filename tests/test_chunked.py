"""The chunked path over several chunks: token chunks in pass 1, vocabulary chunks in pass 2.

Pass 1 holds chunk_bytes / (4 V) tokens per chunk and pass 2 at least 2048 vocabulary columns per chunk,
so at the small vocabularies the other tests use, one chunk holds everything and the code that moves
from chunk to chunk never runs. Real runs (V ~ 32k-128k, thousands of response tokens) always take
several chunks: these tests force that path, against the dense [N, V] computation in float64.
"""
import pytest
import torch

from amapo_fast import chunked, linear_preference_loss, sequence_logps, vocab_chunks
from test_loss import assert_matches, loss_kwargs, make_batch, reference_on, run


def dense_pass1(hidden, weight, bias, targets):
    """(logp, lse, mean logit, entropy, target-is-argmax) per token from the whole [N, V] logits."""
    logits = hidden @ weight.T + bias
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)
    entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    argmax_hit = (targets == logits.argmax(-1)).to(logits.dtype)
    return target_logit - lse, lse, logits.mean(-1), entropy, argmax_hit


def random_tokens(num_tokens, vocab, dim):
    hidden = torch.randn(num_tokens, dim, dtype=torch.float64)
    weight = torch.randn(vocab, dim, dtype=torch.float64) * dim**-0.5 * 3
    bias = torch.randn(vocab, dtype=torch.float64)
    targets = torch.randint(0, vocab, (num_tokens,))
    # Make some targets the argmax so that the accuracy input is not all zeros.
    weight[targets[::3]] += hidden[::3] * 5
    return hidden, weight, bias, targets


def check_against_dense(hidden, weight, bias, targets, chunk_bytes, chunk_columns=None):
    """Pass 1 outputs and pass 2's gradients of sum coef * logp against autograd on the dense logits."""
    pass1 = chunked.token_logprobs(hidden, weight, bias, targets, chunk_bytes=chunk_bytes)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    dense = dense_pass1(*leaves, targets)
    for name, value, expected in zip(pass1._fields, pass1, dense):
        torch.testing.assert_close(value, expected.detach(), rtol=1e-10, atol=1e-10, msg=name)

    coef = torch.randn(hidden.shape[0], dtype=torch.float64)
    grads = chunked.token_grads(
        hidden, weight, bias, targets, pass1.lse, coef, chunk_bytes=chunk_bytes, chunk_columns=chunk_columns
    )
    expected = torch.autograd.grad((coef * dense[0]).sum(), leaves)
    for name, grad, ref in zip(("d_hidden", "d_weight", "d_bias"), grads, expected):
        torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("tokens_per_chunk, columns_per_chunk", [(1, 1), (5, 64), (16, 300)])
def test_both_passes_over_forced_small_chunks(tokens_per_chunk, columns_per_chunk):
    num_tokens, vocab = 37, 300  # 37 tokens: the last token chunk is a short one for 5 and 16
    chunk_bytes = tokens_per_chunk * 4 * vocab
    assert chunked.chunk_tokens(vocab, chunk_bytes) == tokens_per_chunk
    check_against_dense(*random_tokens(num_tokens, vocab, 16), chunk_bytes, chunk_columns=columns_per_chunk)


def test_default_chunk_sizes_split_a_large_vocabulary():
    """With the default budget and V = 33000, 300 float64 tokens take 2 token chunks in pass 1 and 3
    vocabulary chunks in pass 2."""
    num_tokens, vocab = 300, 33000
    assert chunked.chunk_tokens(vocab) < num_tokens
    assert vocab_chunks.chunk_columns(num_tokens, vocab, 8, chunked.CHUNK_BYTES) < vocab // 2
    check_against_dense(*random_tokens(num_tokens, vocab, 8), chunked.CHUNK_BYTES)


@pytest.fixture
def small_chunks(monkeypatch):
    """Every chunked pass through the public API takes 3 tokens (pass 1) or 16 columns (pass 2) at a time.

    Patched where the sizes are computed: the byte budgets are bound as default arguments when the
    functions are defined, so patching the constants alone would not reach them.
    """
    monkeypatch.setattr(chunked, "chunk_tokens", lambda vocab_size, chunk_bytes=None: 3)
    monkeypatch.setattr(vocab_chunks, "chunk_columns", lambda num_tokens, vocab, element_size, scratch_bytes=None: 16)


@pytest.mark.parametrize("loss_type", ["amapo", "simpo", "dpo"])
def test_public_loss_over_several_chunks(small_chunks, loss_type):
    hidden, weight, labels, bias = make_batch(pairs=3, dim=24, vocab=97, bias=True)
    assert int((labels != -100).sum()) > 3 * 2  # more than two token chunks; 97 columns are 7 vocabulary chunks
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
