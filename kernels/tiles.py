"""Building blocks shared by the log-prob kernels: launch mode, program ordering, one logit tile, the
online-softmax update of a logit tile.

Under TRITON_INTERPRET=1 (CPU tensors) the kernels run through Triton's interpreter, which is slow and
multiplies bf16 x bf16 `tl.dot` operands wrongly (a known interpreter bug). `INTERPRET` is read once, at
import, because the interpreter itself is chosen when `@triton.jit` runs; it reaches the kernels as a
constexpr so the upcast below is compiled out on GPU.
"""
import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def grouped_program(pid, num_token_blocks, num_column_blocks, GROUP_N: tl.constexpr):
    """Map a 1-D program id to (token block, column block), GROUP_N token blocks at a time.

    The grouped ordering of Triton's matmul tutorial: consecutive programs share one column block (a
    W tile) and walk GROUP_N token blocks (H tiles), so the programs running at once reuse both
    through L2 instead of each streaming its own copy from HBM.
    """
    programs_per_group = GROUP_N * num_column_blocks
    group = pid // programs_per_group
    first_token_block = group * GROUP_N
    group_size = tl.minimum(num_token_blocks - first_token_block, GROUP_N)
    token_block = first_token_block + (pid % programs_per_group) % group_size
    column_block = (pid % programs_per_group) // group_size
    return token_block, column_block


@triton.jit
def row_offsets(rows, row_stride, INT64_OFFSETS: tl.constexpr):
    """Element offsets of rows of a row-major matrix: int32 where the launcher proved they fit (cheaper
    address arithmetic, fewer registers), int64 otherwise (V * D exceeds 2^31 for heads like 256k x 8192)."""
    if INT64_OFFSETS:
        return rows.to(tl.int64) * row_stride
    else:
        return rows * row_stride


@triton.jit
def dot(a, b, acc, INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation; the interpreter gets fp32 operands (exact for 16-bit inputs)."""
    if INTERPRET:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def dot_operand(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 x rounded to the dot operand dtype, to nearest even as `.to` does on GPU.

    The interpreter truncates fp32 -> bf16 casts (relative error up to 2^-7 instead of 2^-8), so there the
    bits are rounded here and kept in fp32, which is what its dots take anyway.
    """
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def logit_tile(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    rows,
    row_ok,
    cols,
    col_ok,
    D,
    HAS_BIAS: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
    INTERPRET: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """fp32 logits [BLOCK_N, BLOCK_V] = hidden[rows] @ weight[cols]^T + bias[cols], summed over D in chunks.

    Out-of-range rows and columns load zeros, so their logits are finite (bias or 0); callers mask them.
    """
    hidden_rows = hidden_ptr + row_offsets(rows, D, INT64_OFFSETS)[:, None]
    weight_rows = weight_ptr + row_offsets(cols, D, INT64_OFFSETS)[:, None]
    logits = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d_start in range(0, D, BLOCK_D):
        dims = d_start + tl.arange(0, BLOCK_D)
        dim_ok = dims < D
        h = tl.load(hidden_rows + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        w = tl.load(weight_rows + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        logits = dot(h, tl.trans(w), logits, INTERPRET, DOT_PRECISION)
    if HAS_BIAS:
        logits += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return logits


@triton.jit
def online_softmax_update(
    logits, cols, col_ok, targets, running_max, sum_exp, target_logit, sum_shifted, TOKEN_METRICS: tl.constexpr
):
    """Fold one fp32 logit tile [BLOCK_N, BLOCK_V] into the running per-token state.

    Always: running max and sum of exp(logit - max). With TOKEN_METRICS: the target's logit where it lies in
    this tile (0 elsewhere) and sum of exp(logit - max) * (logit - max), rescaled with the max, so entropy
    follows from small, shifted terms (no cancellation of two large numbers).
    """
    logits = tl.where(col_ok[None, :], logits, float("-inf"))
    # Every tile has at least one valid column, so new_max is finite for finite inputs.
    new_max = tl.maximum(running_max, tl.max(logits, axis=1))
    rescale = tl.exp(running_max - new_max)
    shifted = logits - new_max[:, None]  # -inf in masked columns
    exp_shifted = tl.exp(shifted)  # 0 in masked columns
    if TOKEN_METRICS:
        # The old terms (logit - old max) become (logit - new max) = (logit - old max) + (old max - new max).
        step = tl.where(sum_exp > 0, running_max - new_max, 0.0)
        sum_shifted = rescale * (sum_shifted + step * sum_exp) + tl.sum(
            tl.where(col_ok[None, :], exp_shifted * shifted, 0.0), axis=1
        )
        target_logit += tl.sum(tl.where(cols[None, :] == targets[:, None], logits, 0.0), axis=1)
    sum_exp = sum_exp * rescale + tl.sum(exp_shifted, axis=1)
    return new_max, sum_exp, target_logit, sum_shifted
