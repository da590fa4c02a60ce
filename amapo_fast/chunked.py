"""The chunked PyTorch twin of the Triton kernels: same algorithm, same signatures, any device.

Only response tokens come in. Logits exist one token chunk at a time ([chunk, V] fp32), never for the
whole batch: pass 1 keeps two floats per token (log-sum-exp and log-prob); pass 2 recomputes each
chunk's logits to form dH, dW and d bias. `impl="auto"` uses it for CPU tensors.

All matmuls run in the accumulation dtype (fp32): a 16-bit weight is upcast once per pass (V*D*4
bytes). CPUs have no 16-bit matmul that returns fp32, and rounding logits to bf16 would cost ~1e-2
in the log-probs; the Triton kernels get the same exactness from fp32 accumulation in registers.
"""
import torch

# Size of one chunk's fp32 logits. Small enough to stay far below the full [N, V] buffer, large enough
# that each matmul still runs at full speed.
CHUNK_BYTES = 32 * 2**20


def chunk_tokens(vocab_size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Tokens per chunk so that one chunk of fp32 logits takes about chunk_bytes."""
    return max(1, chunk_bytes // (4 * vocab_size))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16- and 32-bit inputs; float64 inputs stay float64 (used by the gradient checks)."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_logits(hidden_chunk, weight_acc, bias):
    logits = hidden_chunk.to(weight_acc.dtype) @ weight_acc.T
    if bias is not None:
        logits += bias.to(weight_acc.dtype)
    return logits


def token_logprobs(hidden, weight, bias, targets, chunk_bytes: int = CHUNK_BYTES):
    """(logp [N], lse [N]) in fp32 (float64 for float64 inputs) of the targets under softmax(hidden @ weight.T + bias)."""
    num_tokens = hidden.shape[0]
    logp = torch.empty(num_tokens, dtype=accumulation_dtype(hidden.dtype), device=hidden.device)
    lse = torch.empty_like(logp)
    weight_acc = weight.to(lse.dtype)
    step = chunk_tokens(weight.shape[0], chunk_bytes)
    for start in range(0, num_tokens, step):
        stop = min(start + step, num_tokens)
        logits = _chunk_logits(hidden[start:stop], weight_acc, bias)
        lse[start:stop] = torch.logsumexp(logits, dim=-1)
        logp[start:stop] = logits.gather(1, targets[start:stop, None]).squeeze(1) - lse[start:stop]
    return logp, lse


def token_grads(hidden, weight, bias, targets, lse, coef, chunk_bytes: int = CHUNK_BYTES):
    """Gradients of sum_t coef_t * logp_t: (d_hidden [N, D], d_weight [V, D], d_bias [V] or None).

    dlogits = coef * (onehot(target) - softmax), accumulated in fp32, returned in the input dtypes.
    """
    num_tokens = hidden.shape[0]
    d_hidden = torch.empty_like(hidden)
    acc = accumulation_dtype(weight.dtype)
    d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    d_bias = None if bias is None else torch.zeros(bias.shape, dtype=acc, device=bias.device)
    weight_acc = weight.to(acc)
    step = chunk_tokens(weight.shape[0], chunk_bytes)
    for start in range(0, num_tokens, step):
        stop = min(start + step, num_tokens)
        chunk_coef = coef[start:stop, None].to(acc)
        logits = _chunk_logits(hidden[start:stop], weight_acc, bias)
        # In place: logits -> probabilities -> dlogits, so one [chunk, V] buffer serves all three.
        dlogits = logits.sub_(lse[start:stop, None]).exp_().mul_(-chunk_coef)
        dlogits.scatter_add_(1, targets[start:stop, None], chunk_coef)
        d_hidden[start:stop] = (dlogits @ weight_acc).to(hidden.dtype)
        d_weight.addmm_(dlogits.T, hidden[start:stop].to(acc))
        if d_bias is not None:
            d_bias += dlogits.sum(0)
    return d_hidden, d_weight.to(weight.dtype), None if d_bias is None else d_bias.to(bias.dtype)
