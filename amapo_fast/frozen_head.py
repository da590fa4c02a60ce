"""One pass for a frozen head: when the lm_head needs no gradient, pass 2's walk over the vocabulary goes away.

The hidden-state gradient of sum_t coef_t * logp_t is dH_t = coef_t * (W[y_t] - g_t) with
g_t = sum_v p_tv W_v, the softmax-weighted mean of the weight rows. g does not depend on the coefficients,
so pass 1 forms it next to the log-sum-exp, vocabulary chunk by vocabulary chunk with an online rescaling
(as flash attention forms P @ V):
    logits = H @ W_chunk^T (+ bias)                  one GEMM, fp32 out
    m_new  = max(m, rowmax(logits)),  r = exp(m - m_new)
    s      = s * r + rowsum(exp(logits - m_new))
    acc    = acc * r + exp(logits - m_new) @ W_chunk  one GEMM into the fp32 [n, D] accumulator
and at the end g = acc / s, lse = m + log(s). Once the loss stage has the coefficients, dH is one gather
of W's target rows and an elementwise product: 4·n·D·V FLOPs in all instead of 2·n·D·V + 6·n·D·V, no dW.
Memory beyond the two-pass path: the fp32 accumulator [n, D], kept for the backward, plus a second
chunk-sized fp32 buffer during pass 1. Plain PyTorch on any device (cuBLAS GEMMs on GPU, which bound its
time); the logit GEMM accumulates in fp32 and 16-bit inputs stay 16-bit GEMM operands on GPU.
"""
import torch

from .chunked import CHUNK_BYTES
from . import vocab_chunks
from .vocab_chunks import SCRATCH_BYTES, TokenLogprobs, _accumulate


def applies(hidden, weight, bias) -> bool:
    """Whether a loss call takes the one-pass path: gradients are being recorded, hidden needs one and the
    head (weight and bias) does not. Without any gradient to form, plain pass 1 is cheaper."""
    head_grad = weight.requires_grad or (bias is not None and bias.requires_grad)
    return torch.is_grad_enabled() and hidden.requires_grad and not head_grad


def token_logprobs_and_basis(hidden, weight, bias, targets, columns=None):
    """(pass 1's TokenLogprobs, the gradient basis g [n, D]), all fp32 (float64 for float64 inputs).

    columns overrides the vocabulary chunk width (tests force several chunks with it)."""
    num_tokens, dim = hidden.shape
    vocab = weight.shape[0]
    acc = torch.promote_types(hidden.dtype, torch.float32)
    # CPUs have no 16-bit GEMM with an fp32 result: the operands are upcast there, as the chunked twin does.
    operand = hidden.dtype if hidden.is_cuda else acc
    if columns is None:
        columns = vocab_chunks.chunk_columns(num_tokens, vocab, 4, SCRATCH_BYTES if hidden.is_cuda else CHUNK_BYTES)
    columns = min(columns, vocab)
    gemm_hidden, gemm_weight = hidden.to(operand), weight.to(operand)
    top = torch.full((num_tokens,), float("-inf"), dtype=acc, device=hidden.device)
    sum_exp, sum_logits, sum_exp_logit, target_logit = torch.zeros(4, num_tokens, dtype=acc, device=hidden.device)
    basis = torch.zeros(num_tokens, dim, dtype=acc, device=hidden.device)
    scratch = torch.empty(num_tokens, columns, dtype=acc, device=hidden.device)
    for start in range(0, vocab, columns):
        stop = min(start + columns, vocab)
        logits = scratch[:, : stop - start].zero_()
        _accumulate(logits, gemm_hidden, gemm_weight[start:stop].T)
        if bias is not None:
            logits += bias[start:stop].to(acc)
        rows = ((targets >= start) & (targets < stop)).nonzero().squeeze(1)
        target_logit[rows] = logits[rows, targets[rows] - start]
        sum_logits += logits.sum(1)
        new_top = torch.maximum(top, logits.amax(1))
        rescale = torch.exp(top - new_top)  # 0 on the first chunk (top = -inf)
        weights = torch.exp(logits - new_top[:, None])
        sum_exp.mul_(rescale).add_(weights.sum(1))
        sum_exp_logit.mul_(rescale).add_(torch.einsum("tv,tv->t", weights, logits))
        basis.mul_(rescale[:, None])
        _accumulate(basis, weights.to(operand), gemm_weight[start:stop])
        top = new_top
    lse = top + torch.log(sum_exp)
    basis /= sum_exp[:, None]
    pass1 = TokenLogprobs(
        logp=target_logit - lse,
        lse=lse,
        mean_logit=sum_logits / vocab,
        entropy=lse - sum_exp_logit / sum_exp,
        argmax_hit=(target_logit >= top).to(acc),
    )
    return pass1, basis


def hidden_grad(weight, targets, basis, coef, dtype):
    """dH [n, D] of sum_t coef_t * logp_t from pass 1's basis: coef_t * (W[y_t] - g_t), in dtype."""
    return (coef[:, None].to(basis.dtype) * (weight.index_select(0, targets).to(basis.dtype) - basis)).to(dtype)
