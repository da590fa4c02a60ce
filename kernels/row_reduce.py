"""Pass 1 with cuBLAS doing the FLOPs: per vocabulary chunk, a library GEMM writes the chunk's fp32
logits into a bounded scratch, then a Triton row reduction folds them into each token's running
(max, sum of exp) and, with metrics, in-tile target logit and shifted exp-weighted sum.

Same exactness as the Triton-tile forward: 16-bit products are exact in fp32 and the GEMM accumulates
in fp32 (`torch.mm(..., out_dtype=torch.float32)` on CUDA; upcast operands on the CPU, where Triton runs
through its interpreter), and the reduction is the same online-softmax update. It moves more bytes
(the fp32 chunk is written and read once: 8·N·V bytes) but runs its 2·N·D·V FLOPs at cuBLAS's rate;
which forward is faster on a given GPU is a measurement (`bench/gpu_check.py`, kernel-profile).
"""
import torch
import triton
import triton.language as tl

from ..vocab_chunks import SCRATCH_BYTES, chunk_columns
from .inputs import check_inputs
from .tiles import INTERPRET, online_softmax_update, row_offsets
from .token_dots import LEAN_PARTIALS, PARTIALS, finish_token_logprobs

# Rows per program and columns per step of the reduction; a memory-bound sweep, not tuned.
BLOCK_N, BLOCK_V, NUM_WARPS = (16, 128, 1) if INTERPRET else (16, 512, 4)


@triton.jit
def _row_reduce_kernel(
    logits_ptr,  # [N, V] fp32: one vocabulary chunk's logits, row stride V
    bias_ptr,  # [V] or None: the chunk's entries
    targets_ptr,  # [N] int64, vocabulary ids of the whole head
    state_ptr,  # [PARTIALS, 1, N] fp32, read and updated (the first 2 rows without TOKEN_METRICS)
    N,
    V,
    vocab_offset,  # the chunk's first vocabulary id
    HAS_BIAS: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
    TOKEN_METRICS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    targets = tl.load(targets_ptr + rows, mask=row_ok, other=-1) - vocab_offset if TOKEN_METRICS else rows
    if TOKEN_METRICS:
        # A target of a later chunk must not match a masked column past this chunk's end (its -inf would stick).
        targets = tl.where((targets >= 0) & (targets < V), targets, -1)
    running_max = tl.load(state_ptr + rows, mask=row_ok, other=0.0)
    sum_exp = tl.load(state_ptr + N + rows, mask=row_ok, other=0.0)
    target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_shifted = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if TOKEN_METRICS:
        target_logit = tl.load(state_ptr + 2 * N + rows, mask=row_ok, other=0.0)
        sum_shifted = tl.load(state_ptr + 3 * N + rows, mask=row_ok, other=0.0)
    logit_rows = logits_ptr + row_offsets(rows, V, INT64_OFFSETS)[:, None]
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        logits = tl.load(logit_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if HAS_BIAS:
            logits += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        running_max, sum_exp, target_logit, sum_shifted = online_softmax_update(
            logits, cols, col_ok, targets, running_max, sum_exp, target_logit, sum_shifted, TOKEN_METRICS
        )
    tl.store(state_ptr + rows, running_max, mask=row_ok)
    tl.store(state_ptr + N + rows, sum_exp, mask=row_ok)
    if TOKEN_METRICS:
        tl.store(state_ptr + 2 * N + rows, target_logit, mask=row_ok)
        tl.store(state_ptr + 3 * N + rows, sum_shifted, mask=row_ok)


def chunk_logits(hidden, weight_chunk, out):
    """out [N, chunk] fp32 = hidden @ weight_chunk^T, accumulated in fp32 and never rounded to 16 bits."""
    if hidden.dtype == torch.float32:
        torch.mm(hidden, weight_chunk.T, out=out)  # torch's float32 matmul precision, as the tile kernels
    elif hidden.is_cuda:
        torch.mm(hidden, weight_chunk.T, out_dtype=torch.float32, out=out)
    else:  # CPU (the interpreter): products of 16-bit values are exact in fp32
        torch.mm(hidden.float(), weight_chunk.float().T, out=out)


def token_logprobs(hidden, weight, bias, targets, token_metrics=True, scratch_bytes=SCRATCH_BYTES, columns=None):
    """Pass 1 (same contract as `lse_forward.token_logprobs`) by cuBLAS chunks and a row reduction.

    The fp32 scratch [N, chunk] is bounded by scratch_bytes (`vocab_chunks.chunk_columns`); columns
    overrides the chunk width (tests force several chunks with it)."""
    hidden, weight, bias, targets = check_inputs(hidden, weight, bias, targets)
    num_tokens = hidden.shape[0]
    vocab = weight.shape[0]
    if columns is None:
        columns = chunk_columns(num_tokens, vocab, 4, scratch_bytes)
    if columns < 1:
        raise ValueError(f"chunk columns must be >= 1, got {columns}")
    columns = min(columns, vocab)
    scratch = torch.empty(num_tokens * columns, dtype=torch.float32, device=hidden.device)
    state = torch.zeros(PARTIALS if token_metrics else LEAN_PARTIALS, 1, num_tokens, device=hidden.device)
    state[0] = float("-inf")
    for start in range(0, vocab, columns):
        stop = min(start + columns, vocab)
        logits = scratch[: num_tokens * (stop - start)].view(num_tokens, stop - start)  # contiguous
        chunk_logits(hidden, weight[start:stop], logits)
        _row_reduce_kernel[(triton.cdiv(num_tokens, BLOCK_N),)](
            logits, None if bias is None else bias[start:stop], targets, state, num_tokens, stop - start, start,
            HAS_BIAS=bias is not None, INT64_OFFSETS=num_tokens * (stop - start) >= 2**31,
            TOKEN_METRICS=token_metrics, BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, num_warps=NUM_WARPS,
        )  # fmt: skip
    return finish_token_logprobs(state, hidden, weight, bias, targets, token_metrics)
