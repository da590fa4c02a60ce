"""Pass 1: each response token's log-sum-exp and target log-prob, streamed over vocabulary tiles.

One program takes one block of BLOCK_N tokens and one vocabulary split (an even share of the BLOCK_V
tiles), forms each [BLOCK_N, BLOCK_V] logit tile as a D-chunked `tl.dot` with fp32 accumulation, and
keeps an online (max, sum of exp, target logit) per token, plus two sums for the logged metrics (the
sum of the logits and the sum of exp-weighted logits, from which entropy follows). Per-split partials
[5, splits, N] are combined in torch. No [N, V] buffer exists at any time.

Splitting the vocabulary keeps the GPU busy when there are few token blocks; the number of splits is
chosen so that token blocks x splits fills whole waves of the GPU's multiprocessors.
"""
import functools

import torch
import triton
import triton.language as tl

from ..vocab_chunks import TokenLogprobs
from .autotune import (
    FORWARD_CONFIGS,
    FORWARD_MAX_TILE,
    needs_int64_offsets,
    prune_for_device,
    token_block_size,
    token_bucket,
)
from .inputs import check_inputs, dot_precision
from .tiles import INTERPRET, grouped_program, logit_tile
from .tuning import autotune

MIN_WAVES = 2  # programs for at least this many waves, so every multiprocessor gets work
MAX_EXTRA_SPLITS = 64  # how far above the minimum the search for full waves may go
GOOD_WAVE_FILL = 0.95  # the last wave at least this full (on average over waves) is good enough
PARTIALS = 5  # running max, sum of exp(logit - max), target logit, sum of logits, sum of exp(logit - max) * logit


@autotune("lse_forward", FORWARD_CONFIGS, ["n_bucket", "V", "D"], functools.partial(prune_for_device, max_tile=FORWARD_MAX_TILE))
@triton.jit
def _lse_partials_kernel(
    hidden_ptr,  # [N, D]
    weight_ptr,  # [V, D]
    bias_ptr,  # [V] or None
    targets_ptr,  # [N] int64 in [0, V)
    partials_ptr,  # [PARTIALS, num_splits, N] fp32
    N,
    V,
    D,
    n_bucket,  # tuning key only
    num_splits,
    HAS_BIAS: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
    INTERPRET: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    token_block, split = grouped_program(tl.program_id(0), tl.cdiv(N, BLOCK_N), num_splits, GROUP_N)
    rows = token_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    targets = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    # An even share of the vocabulary tiles: splits differ by at most one tile.
    num_tiles = tl.cdiv(V, BLOCK_V)
    first_tile = split * num_tiles // num_splits
    stop_tile = (split + 1) * num_tiles // num_splits

    running_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    sum_exp = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_logits = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_exp_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for tile in range(first_tile, stop_tile):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        logits = logit_tile(
            hidden_ptr, weight_ptr, bias_ptr, rows, row_ok, cols, col_ok, D,
            HAS_BIAS, INT64_OFFSETS, INTERPRET, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
        )  # fmt: skip
        valid_logits = tl.where(col_ok[None, :], logits, 0.0)
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        # Every tile has at least one valid column, so new_max is finite and no inf - inf appears.
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        rescale = tl.exp(running_max - new_max)
        exp_logits = tl.exp(logits - new_max[:, None])  # 0 in masked columns
        sum_exp = sum_exp * rescale + tl.sum(exp_logits, axis=1)
        sum_exp_logit = sum_exp_logit * rescale + tl.sum(exp_logits * valid_logits, axis=1)
        running_max = new_max
        sum_logits += tl.sum(valid_logits, axis=1)
        target_logit += tl.sum(tl.where(cols[None, :] == targets[:, None], valid_logits, 0.0), axis=1)

    out = partials_ptr + split * N + rows
    stride = num_splits * N
    tl.store(out, running_max, mask=row_ok)
    tl.store(out + stride, sum_exp, mask=row_ok)
    tl.store(out + 2 * stride, target_logit, mask=row_ok)
    tl.store(out + 3 * stride, sum_logits, mask=row_ok)
    tl.store(out + 4 * stride, sum_exp_logit, mask=row_ok)


def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def vocab_splits(num_token_blocks: int, num_tiles: int, multiprocessors: int) -> int:
    """Splits s so that num_token_blocks * s programs fill whole waves of the multiprocessors.

    At least MIN_WAVES waves' worth of programs; from there, the fewest splits (each split re-reads its
    token block's hidden states) whose waves are GOOD_WAVE_FILL full, else the fullest within
    MAX_EXTRA_SPLITS more. Never more splits than vocabulary tiles.
    """
    least = max(1, triton.cdiv(MIN_WAVES * multiprocessors, num_token_blocks))
    candidates = range(min(least, num_tiles), min(least + MAX_EXTRA_SPLITS, num_tiles) + 1)

    def wave_fill(splits):
        programs = num_token_blocks * splits
        return programs / (triton.cdiv(programs, multiprocessors) * multiprocessors)

    for splits in candidates:
        if wave_fill(splits) >= GOOD_WAVE_FILL:
            return splits
    return max(candidates, key=lambda splits: (wave_fill(splits), -splits))


def token_logprobs(hidden, weight, bias, targets, num_splits=None) -> TokenLogprobs:
    """Pass 1 for hidden [N, D], weight [V, D], bias [V] or None (one dtype of bf16, fp16, fp32) and
    targets [N] in [0, V). num_splits overrides the number of vocabulary splits (tests use it)."""
    hidden, weight, bias, targets = check_inputs(hidden, weight, bias, targets)
    num_tokens, dim = hidden.shape
    vocab = weight.shape[0]
    block_n = token_block_size(num_tokens, hidden.dtype)
    num_token_blocks = triton.cdiv(num_tokens, block_n)
    # Splits are sized for the widest vocabulary tile, so every split holds at least one tile of any config.
    most_tiles = triton.cdiv(vocab, max(c.kwargs["BLOCK_V"] for c in FORWARD_CONFIGS))
    if num_splits is None:
        num_splits = vocab_splits(num_token_blocks, most_tiles, _multiprocessors(hidden.device))
    elif not 1 <= num_splits <= most_tiles:
        raise ValueError(f"num_splits must be in [1, {most_tiles}] for V={vocab}, got {num_splits}")
    partials = torch.empty(PARTIALS, num_splits, num_tokens, dtype=torch.float32, device=hidden.device)

    _lse_partials_kernel[(num_token_blocks * num_splits,)](
        hidden, weight, bias, targets, partials, num_tokens, vocab, dim, token_bucket(num_tokens), num_splits,
        HAS_BIAS=bias is not None, INT64_OFFSETS=needs_int64_offsets(num_tokens * dim, vocab * dim),
        INTERPRET=INTERPRET, DOT_PRECISION=dot_precision(hidden.dtype), BLOCK_N=block_n,
    )  # fmt: skip
    return combine_partials(partials, vocab)


def combine_partials(partials: torch.Tensor, vocab: int) -> TokenLogprobs:
    """Merge the per-split online-softmax partials [5, splits, N] into per-token results."""
    split_max, split_sum_exp, split_target, split_sum_logits, split_sum_exp_logit = partials.unbind(0)
    top = split_max.amax(0)
    weights = torch.exp(split_max - top)  # 0 for a split whose max is -inf
    sum_exp = (split_sum_exp * weights).sum(0)
    lse = top + torch.log(sum_exp)
    target_logit = split_target.sum(0)
    expected_logit = (split_sum_exp_logit * weights).sum(0) / sum_exp
    return TokenLogprobs(
        logp=target_logit - lse,
        lse=lse,
        mean_logit=split_sum_logits.sum(0) / vocab,
        entropy=lse - expected_logit,
        argmax_hit=(target_logit >= top).float(),
    )

