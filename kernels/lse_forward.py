"""Pass 1: each response token's log-sum-exp, streamed over vocabulary tiles (the Triton-tile forward).

One program takes one block of BLOCK_N tokens and one vocabulary split (an even share of the BLOCK_V
tiles), forms each [BLOCK_N, BLOCK_V] logit tile as a D-chunked `tl.dot` with fp32 accumulation, and
keeps an online (max, sum of exp) per token. Tiles and D chunks run as one flat loop, so the compiler's
software pipeline keeps loading the next operands across vocabulary-tile boundaries instead of draining
and refilling for every tile. Per-split partials [PARTIALS, splits, N] are combined in torch
(`kernels/token_dots.py`); no [N, V] buffer exists at any time.

The hot epilogue does only the max and the sum of exp. The target logit is a gather-dot outside the tile
loop (`token_dots`), and so is the mean logit (against the mean weight row). Entropy and the
target-is-argmax flag need every logit; they are computed only when metrics are asked for
(TOKEN_METRICS, a compile-time switch): then the epilogue also keeps each token's in-tile target logit
and the sum of exp(logit - max) * (logit - max).

Splitting the vocabulary keeps the GPU busy when there are few token blocks; the number of splits is
chosen so that token blocks x splits fills whole waves of the GPU's multiprocessors.
"""
import torch
import triton
import triton.language as tl

from .autotune import (
    FORWARD_CONFIGS,
    FORWARD_MAX_TILE,
    FORWARD_METRICS_MAX_TILE,
    needs_int64_offsets,
    prune_for_device,
    token_block_size,
    token_bucket,
)
from .inputs import check_inputs, dot_precision
from .tiles import INTERPRET, dot, grouped_program, online_softmax_update, row_offsets
from .token_dots import LEAN_PARTIALS, PARTIALS, finish_token_logprobs
from .tuning import autotune

MIN_WAVES = 2  # programs for at least this many waves, so every multiprocessor gets work
MAX_EXTRA_SPLITS = 64  # how far above the minimum the search for full waves may go
GOOD_WAVE_FILL = 0.95  # the last wave at least this full (on average over waves) is good enough


def _prune_forward(configs, named_args, **kwargs):
    """Device pruning with the logit-tile limit of the variant being launched."""
    max_tile = FORWARD_METRICS_MAX_TILE if kwargs.get("TOKEN_METRICS") else FORWARD_MAX_TILE
    return prune_for_device(configs, named_args, max_tile=max_tile, **kwargs)


# The two variants are tuned apart: TOKEN_METRICS, a constexpr of the launch, is part of the tuning key.
@autotune("lse_forward", FORWARD_CONFIGS, ["n_bucket", "V", "D"], _prune_forward)
@triton.jit
def _lse_partials_kernel(
    hidden_ptr,  # [N, D]
    weight_ptr,  # [V, D]
    bias_ptr,  # [V] or None
    targets_ptr,  # [N] int64 in [0, V)
    partials_ptr,  # [PARTIALS, num_splits, N] fp32 (the first 2 rows without TOKEN_METRICS)
    N,
    V,
    D,
    n_bucket,  # tuning key only
    num_splits,
    HAS_BIAS: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
    INTERPRET: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    TOKEN_METRICS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    token_block, split = grouped_program(tl.program_id(0), tl.cdiv(N, BLOCK_N), num_splits, GROUP_N)
    rows = token_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    targets = tl.load(targets_ptr + rows, mask=row_ok, other=-1) if TOKEN_METRICS else rows
    # An even share of the vocabulary tiles: splits differ by at most one tile.
    num_tiles = tl.cdiv(V, BLOCK_V)
    first_tile = split * num_tiles // num_splits
    stop_tile = (split + 1) * num_tiles // num_splits
    d_chunks = tl.cdiv(D, BLOCK_D)
    hidden_rows = hidden_ptr + row_offsets(rows, D, INT64_OFFSETS)[:, None]

    running_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    sum_exp = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_shifted = tl.zeros((BLOCK_N,), dtype=tl.float32)
    logits = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    # One flat loop over (vocabulary tile, D chunk): the epilogue runs after a tile's last D chunk.
    for step in range(0, (stop_tile - first_tile) * d_chunks):
        tile = first_tile + step // d_chunks
        d_chunk = step % d_chunks
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        dims = d_chunk * BLOCK_D + tl.arange(0, BLOCK_D)
        dim_ok = dims < D
        h = tl.load(hidden_rows + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        w = tl.load(
            weight_ptr + row_offsets(cols, D, INT64_OFFSETS)[:, None] + dims[None, :],
            mask=col_ok[:, None] & dim_ok[None, :], other=0.0,
        )  # fmt: skip
        logits = dot(h, tl.trans(w), logits, INTERPRET, DOT_PRECISION)
        if d_chunk == d_chunks - 1:
            if HAS_BIAS:
                logits += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            running_max, sum_exp, target_logit, sum_shifted = online_softmax_update(
                logits, cols, col_ok, targets, running_max, sum_exp, target_logit, sum_shifted, TOKEN_METRICS
            )
            logits = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)

    out = partials_ptr + split * N + rows
    stride = num_splits * N
    tl.store(out, running_max, mask=row_ok)
    tl.store(out + stride, sum_exp, mask=row_ok)
    if TOKEN_METRICS:
        tl.store(out + 2 * stride, target_logit, mask=row_ok)
        tl.store(out + 3 * stride, sum_shifted, mask=row_ok)


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


def token_logprobs(hidden, weight, bias, targets, num_splits=None, token_metrics=True):
    """Pass 1 for hidden [N, D], weight [V, D], bias [V] or None (one dtype of bf16, fp16, fp32) and
    targets [N] in [0, V): a `TokenLogprobs` (fp32). token_metrics=False leaves its mean_logit, entropy
    and argmax_hit None and runs the lean kernel. num_splits overrides the number of vocabulary splits
    (tests use it)."""
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
    rows = PARTIALS if token_metrics else LEAN_PARTIALS
    partials = torch.empty(rows, num_splits, num_tokens, dtype=torch.float32, device=hidden.device)

    _lse_partials_kernel[(num_token_blocks * num_splits,)](
        hidden, weight, bias, targets, partials, num_tokens, vocab, dim, token_bucket(num_tokens), num_splits,
        HAS_BIAS=bias is not None, INT64_OFFSETS=needs_int64_offsets(num_tokens * dim, vocab * dim),
        INTERPRET=INTERPRET, DOT_PRECISION=dot_precision(hidden.dtype), TOKEN_METRICS=token_metrics,
        BLOCK_N=block_n,
    )  # fmt: skip
    return finish_token_logprobs(partials, hidden, weight, bias, targets, token_metrics)
