"""Pass 2: the gradients of sum_t coef_t * logp_t, by vocabulary chunks, without atomics.

For each vocabulary chunk, `_dlogits_kernel` recomputes every [BLOCK_N, BLOCK_V] logit tile of the chunk
from H and W (a D-chunked `tl.dot`, fp32 accumulation), forms dlogits = coef * (onehot(target) - p) with
p = exp(logit - lse) from pass 1's log-sum-exp, and stores it in the compute dtype into a bounded
scratch [N, chunk]. Library GEMMs then turn the scratch into dH, dW and d bias
(`amapo_fast/vocab_chunks.py`, shared with the chunked PyTorch twin). Every output element is written by
exactly one GEMM in a fixed order, so the gradients are bit-identical from run to run, and the 4·N·D·V
FLOPs of the two products run on cuBLAS's tensor-core kernels instead of as fenced atomic
read-modify-writes from every logit tile.

fp16 keeps the scratch near 1 by dividing the coefficients by their largest magnitude (the raw dlogits,
coef ~ beta/B/|y| times probabilities, would underflow fp16); bf16 has fp32's exponent range and needs no
such scaling.
"""
import torch
import triton
import triton.language as tl

from ..vocab_chunks import SCRATCH_BYTES, backward_by_vocab_chunks
from .autotune import (
    BACKWARD_CONFIGS,
    needs_int64_offsets,
    prune_for_device,
    token_block_size,
    token_bucket,
)
from .inputs import check_inputs, dot_precision, token_vector
from .tiles import INTERPRET, dot_operand, grouped_program, logit_tile, row_offsets
from .tuning import autotune


# Keyed on the scratch's row stride, the full chunk width (a function of the token bucket and the head, the
# same for a partial last chunk), not on V, the width of this chunk.
@autotune("dlogits_backward", BACKWARD_CONFIGS, ["n_bucket", "dlogits_stride", "D"], prune_for_device)
@triton.jit
def _dlogits_kernel(
    hidden_ptr,  # [N, D]
    weight_ptr,  # [V, D]: the chunk's rows
    bias_ptr,  # [V] or None: the chunk's entries
    targets_ptr,  # [N] int64, vocabulary ids of the whole head
    lse_ptr,  # [N] fp32
    coef_ptr,  # [N] fp32
    dlogits_ptr,  # [N, V] in dlogits_stride rows: the scratch
    N,
    V,
    D,
    dlogits_stride,
    vocab_offset,  # the chunk's first vocabulary id
    n_bucket,  # tuning key only
    HAS_BIAS: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
    INTERPRET: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    token_block, vocab_block = grouped_program(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(V, BLOCK_V), GROUP_N)
    rows = token_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = vocab_block * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    targets = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    logits = logit_tile(
        hidden_ptr, weight_ptr, bias_ptr, rows, row_ok, cols, col_ok, D,
        HAS_BIAS, INT64_OFFSETS, INTERPRET, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
    )  # fmt: skip
    # No tile is skipped, even where every coefficient is 0: a non-finite coefficient, log-sum-exp or
    # logit must reach the gradients as it would through the reference.
    probs = tl.exp(logits - lse[:, None])
    onehot = (cols[None, :] + vocab_offset) == targets[:, None]
    dlogits = coef[:, None] * (onehot.to(tl.float32) - probs)
    out = dlogits_ptr + row_offsets(rows, dlogits_stride, INT64_OFFSETS)[:, None] + cols[None, :]
    tl.store(out, dot_operand(dlogits, dlogits_ptr.dtype.element_ty, INTERPRET), mask=row_ok[:, None] & col_ok[None, :])


def dlogits_chunk_writer(hidden, bias, targets, lse, coef):
    """write(start, stop, weight_chunk, out): the dlogits of vocabulary columns [start, stop) into out
    [N, stop - start] (row stride out.stride(0)), for checked inputs and fp32 lse and coef; one kernel launch."""
    num_tokens, dim = hidden.shape
    block_n = token_block_size(num_tokens, hidden.dtype)
    launch = dict(
        HAS_BIAS=bias is not None, INTERPRET=INTERPRET, DOT_PRECISION=dot_precision(hidden.dtype), BLOCK_N=block_n
    )

    def write_dlogits(start, stop, weight_chunk, out):
        chunk_vocab = stop - start

        def grid(meta):
            return (triton.cdiv(num_tokens, block_n) * triton.cdiv(chunk_vocab, meta["BLOCK_V"]),)

        _dlogits_kernel[grid](
            hidden, weight_chunk, None if bias is None else bias[start:stop], targets, lse, coef, out,
            num_tokens, chunk_vocab, dim, out.stride(0), start, token_bucket(num_tokens),
            INT64_OFFSETS=needs_int64_offsets(num_tokens * dim, chunk_vocab * dim, num_tokens * out.stride(0)),
            **launch,
        )  # fmt: skip

    return write_dlogits


def token_grads(hidden, weight, bias, targets, lse, coef, scratch_bytes=SCRATCH_BYTES, chunk_columns=None):
    """(d_hidden [N, D], d_weight [V, D], d_bias [V] or None) of sum_t coef_t * logp_t, in the input dtypes.

    lse [N] comes from pass 1 (`token_logprobs`); coef [N] is dL/dlogp per token. scratch_bytes bounds the
    dlogits scratch (see `amapo_fast.vocab_chunks`); chunk_columns overrides the chunk width it gives
    (tests use it to force several chunks).
    """
    hidden, weight, bias, targets = check_inputs(hidden, weight, bias, targets)
    lse = token_vector("lse", lse, hidden)
    coef = token_vector("coef", coef, hidden)
    scale = None
    if hidden.dtype == torch.float16:
        scale = coef.abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
        coef = coef / scale
    write_dlogits = dlogits_chunk_writer(hidden, bias, targets, lse, coef)
    return backward_by_vocab_chunks(
        hidden, weight, bias, write_dlogits, hidden.dtype, scale, scratch_bytes, columns=chunk_columns
    )
