"""What both forwards (Triton tiles, cuBLAS chunks) share after their vocabulary sweep.

- `token_dots`: the target logit h_t . W[y_t] (+ b[y_t]) of every token as a gather-dot, one pass over H
  and the N target rows of W (2·N·D FLOPs, against the sweep's 2·N·D·V), so the sweep's hot epilogue need
  not pick the target column out of every tile; with metrics also the mean logit h_t . mean_v(W_v)
  (+ mean(b)), which needs no sweep at all.
- `finish_token_logprobs`: merge the sweep's per-split partials [PARTIALS, splits, N] (running max, sum of
  exp(logit - max), and with metrics the in-tile target logit and sum of exp(logit - max) * (logit - max))
  into a `TokenLogprobs`.

The target logit of the log-prob comes from the gather-dot whether or not metrics are computed, so the
loss does not depend on the metrics switch. The target-is-argmax flag compares the sweep's own target
logit with the sweep's max (one rounding of the same numbers), never the gather-dot's.
"""
import torch
import triton
import triton.language as tl

from ..vocab_chunks import TokenLogprobs
from .tiles import INTERPRET

# Rows of the sweep's partials: running max, sum of exp(logit - max), in-tile target logit,
# sum of exp(logit - max) * (logit - max); the last two only with metrics.
PARTIALS = 4
LEAN_PARTIALS = 2
BLOCK_N, BLOCK_D = (16, 64) if INTERPRET else (16, 256)


@triton.jit
def _token_dots_kernel(
    hidden_ptr,  # [N, D]
    weight_ptr,  # [V, D]
    bias_ptr,  # [V] or None
    targets_ptr,  # [N] int64
    mean_row_ptr,  # [D] fp32 or None
    out_ptr,  # [2, N] fp32: target logit, mean logit (the second row only with MEAN)
    N,
    D,
    HAS_BIAS: tl.constexpr,
    MEAN: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    targets = tl.load(targets_ptr + rows, mask=row_ok, other=0)
    hidden_rows = hidden_ptr + rows.to(tl.int64)[:, None] * D
    weight_rows = weight_ptr + targets.to(tl.int64)[:, None] * D
    target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    mean_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d_start in range(0, D, BLOCK_D):
        dims = d_start + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (dims < D)[None, :]
        h = tl.load(hidden_rows + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        w = tl.load(weight_rows + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        target_logit += tl.sum(h * w, axis=1)
        if MEAN:
            mean_row = tl.load(mean_row_ptr + dims, mask=dims < D, other=0.0)
            mean_logit += tl.sum(h * mean_row[None, :], axis=1)
    if HAS_BIAS:
        target_logit += tl.load(bias_ptr + targets, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, target_logit, mask=row_ok)
    if MEAN:
        tl.store(out_ptr + N + rows, mean_logit, mask=row_ok)


def token_dots(hidden, weight, bias, targets, mean: bool):
    """(target logit [N], mean logit [N] or None), fp32, for checked contiguous inputs."""
    num_tokens, dim = hidden.shape
    out = torch.empty(2 if mean else 1, num_tokens, dtype=torch.float32, device=hidden.device)
    # fp32 sums straight from the 16-bit weight (the reduction upcasts as it reads: no fp32 copy of W).
    mean_row = weight.sum(0, dtype=torch.float32) / weight.shape[0] if mean else None
    _token_dots_kernel[(triton.cdiv(num_tokens, BLOCK_N),)](
        hidden, weight, bias, targets, mean_row, out, num_tokens, dim,
        HAS_BIAS=bias is not None, MEAN=mean, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
    )  # fmt: skip
    if mean and bias is not None:
        out[1] += bias.sum(dtype=torch.float32) / weight.shape[0]
    return out[0], (out[1] if mean else None)


def finish_token_logprobs(partials, hidden, weight, bias, targets, token_metrics: bool) -> TokenLogprobs:
    """Merge the sweep's partials [PARTIALS or LEAN_PARTIALS, splits, N] into per-token results."""
    split_max, split_sum_exp = partials[0], partials[1]
    top = split_max.amax(0)
    weights = torch.exp(split_max - top)  # 0 for a split whose max is -inf
    sum_exp = (split_sum_exp * weights).sum(0)
    log_sum_exp = torch.log(sum_exp)
    lse = top + log_sum_exp
    target_logit, mean_logit = token_dots(hidden, weight, bias, targets, mean=token_metrics)
    if not token_metrics:
        return TokenLogprobs(logp=target_logit - lse, lse=lse, mean_logit=None, entropy=None, argmax_hit=None)
    split_target, split_shifted = partials[2], partials[3]
    # Each split's sum of exp(logit - its max) * (logit - its max), re-based on the common max `top`.
    shifted = ((split_shifted + (split_max - top) * split_sum_exp) * weights).sum(0)
    return TokenLogprobs(
        logp=target_logit - lse,
        lse=lse,
        mean_logit=mean_logit,
        entropy=log_sum_exp - shifted / sum_exp,
        argmax_hit=(split_target.sum(0) >= top).float(),
    )
