"""The chunked PyTorch twin of the Triton kernels: same two passes, same signatures, any device.

Only response tokens come in, and no [N, V] buffer is made. Pass 1 walks the tokens in chunks of
~CHUNK_BYTES of fp32 logits and keeps a few floats per token. Pass 2 walks the vocabulary in chunks:
it recomputes the chunk's logits for every token, forms dlogits in the scratch, and hands it to the GEMM
half shared with the Triton path (`vocab_chunks.backward_by_vocab_chunks`). `impl="auto"` uses this
path for CPU tensors.

All matmuls run in the accumulation dtype (fp32): CPUs have no 16-bit matmul that returns fp32, and
rounding logits to bf16 would cost ~1e-2 in the log-probs; the Triton kernels get the same exactness
from fp32 accumulation in registers.
"""
import torch

from .vocab_chunks import TokenLogprobs, backward_by_vocab_chunks

# Size of one chunk of fp32 logits: pass 1's token chunks and pass 2's scratch. Small enough to stay far
# below the full [N, V] buffer, large enough that each CPU matmul still runs at full speed.
CHUNK_BYTES = 32 * 2**20


def chunk_tokens(vocab_size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Tokens per pass-1 chunk so that one chunk of fp32 logits takes about chunk_bytes."""
    return max(1, chunk_bytes // (4 * vocab_size))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16- and 32-bit inputs; float64 inputs stay float64 (used by the gradient checks)."""
    return torch.promote_types(dtype, torch.float32)


def _logits(hidden, weight_acc, bias):
    logits = hidden.to(weight_acc.dtype) @ weight_acc.T
    if bias is not None:
        logits += bias.to(weight_acc.dtype)
    return logits


def token_logprobs(hidden, weight, bias, targets, chunk_bytes: int = CHUNK_BYTES, token_metrics=True) -> TokenLogprobs:
    """Pass 1: per-token log-prob, log-sum-exp and metric inputs (fp32; float64 for float64 inputs).
    token_metrics=False skips the metric inputs (mean_logit, entropy, argmax_hit are None)."""
    num_tokens, vocab = hidden.shape[0], weight.shape[0]
    acc = accumulation_dtype(hidden.dtype)
    result = TokenLogprobs(*torch.empty(5, num_tokens, dtype=acc, device=hidden.device))
    weight_acc = weight.to(acc)
    # A token's mean logit is its hidden state against the mean weight row: one matrix-vector product
    # instead of a pass over its V logits.
    mean_row = weight_acc.mean(0)
    mean_bias = 0.0 if bias is None else bias.to(acc).mean()
    step = chunk_tokens(vocab, chunk_bytes)
    for start in range(0, num_tokens, step):
        stop = min(start + step, num_tokens)
        logits = _logits(hidden[start:stop], weight_acc, bias)
        top = logits.amax(1, keepdim=True)
        target_logit = logits.gather(1, targets[start:stop, None])
        shifted = logits.sub_(top)  # in place: logits - max, all <= 0
        exp_shifted = shifted.exp()
        sum_exp = exp_shifted.sum(1)
        log_sum_exp = torch.log(sum_exp)
        lse = top.squeeze(1) + log_sum_exp
        result.lse[start:stop] = lse
        result.logp[start:stop] = target_logit.squeeze(1) - lse
        if not token_metrics:
            continue
        # entropy = lse - E_p[logit] = log(sum_exp) - E_p[logit - max]: on the shifted logits the two terms are
        # small and their difference keeps fp32 precision. The row-wise dot products go through einsum
        # (a batched matmul), several times faster on CPU than multiply-and-sum.
        result.entropy[start:stop] = log_sum_exp - torch.einsum("tv,tv->t", exp_shifted, shifted) / sum_exp
        result.argmax_hit[start:stop] = (target_logit >= top).squeeze(1).to(acc)
        result.mean_logit[start:stop] = hidden[start:stop].to(acc) @ mean_row + mean_bias
    return result if token_metrics else result._replace(mean_logit=None, entropy=None, argmax_hit=None)


def token_grads(hidden, weight, bias, targets, lse, coef, chunk_bytes: int = CHUNK_BYTES, chunk_columns=None):
    """Pass 2: (d_hidden [N, D], d_weight [V, D], d_bias [V] or None) of sum_t coef_t * logp_t.

    dlogits = coef * (onehot(target) - softmax), formed in the accumulation dtype, outputs in the input
    dtypes. chunk_columns overrides the vocabulary chunk width that chunk_bytes gives.
    """
    acc = accumulation_dtype(weight.dtype)
    hidden_acc = hidden.to(acc)
    coef = coef[:, None].to(acc)
    lse = lse[:, None].to(acc)

    def write_dlogits(start, stop, weight_chunk, out):
        torch.mm(hidden_acc, weight_chunk.T, out=out)
        if bias is not None:
            out += bias[start:stop].to(acc)
        out.sub_(lse).exp_().mul_(-coef)  # in place: logits -> probabilities -> dlogits
        rows = ((targets >= start) & (targets < stop)).nonzero().squeeze(1)
        out[rows, targets[rows] - start] += coef[rows, 0]

    return backward_by_vocab_chunks(
        hidden, weight, bias, write_dlogits, acc, scratch_bytes=chunk_bytes, columns=chunk_columns
    )
