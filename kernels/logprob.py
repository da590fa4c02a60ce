"""Fused token log-probs and their gradients from hidden states and the lm_head, without [N, V] logits.

Only response tokens come in. Two passes (SPEC §2):
  forward   `token_logprobs`: each program streams one vocabulary split in BLOCK_V tiles for one block of
            tokens, forming every logit tile as a D-chunked `tl.dot` with fp32 accumulation, and keeps
            an online (max, sum-exp, target logit) per token. The per-split partials ([splits, N]) are
            combined in torch. Splitting the vocabulary keeps the GPU busy when N is small.
  backward  `token_grads`: each program recomputes one [BLOCK_N, BLOCK_V] logit tile, forms
            dlogits = coef * (onehot - softmax) in registers, and atomically adds dlogits @ W into dH and
            dlogits^T @ H into dW, D chunk by D chunk (Cut Cross-Entropy's scheme, 6·N·D·V FLOPs).
Both use the grouped program order of Triton's matmul tutorial so concurrent programs share H and W
tiles in L2. `amapo_fast/chunked.py` is the PyTorch twin with the same signatures.

Atomics make the backward's fp32 sums order-dependent (run-to-run differences at fp32 rounding, far below
the 16-bit output rounding). A deterministic dH needs every vocabulary tile of a token block in one
program, whose [BLOCK_N, D] fp32 accumulator does not fit on chip at D=4096, or a recompute of the logits
per D chunk: no deterministic scheme of equal cost, so we keep the atomics.
"""
import torch
import triton
import triton.language as tl

from .tiles import INTERPRET, dot, dot_operand, grouped_program, logit_tile

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Forward vocabulary splits: at least MIN_SPLITS so that the programs running at once (GROUP_N token
# blocks x several splits) share each H tile as well as each W tile; more when N is small, up to
# ~4 programs per SM; never narrower than MIN_SPLIT_WIDTH columns. Split widths are multiples of
# SPLIT_ALIGN, a multiple of every BLOCK_V, so only the last tile of the vocabulary is partial.
MIN_SPLITS = 16
MIN_SPLIT_WIDTH = 512
SPLIT_ALIGN = 256
PROGRAMS_PER_SM = 4
NOMINAL_BLOCK_N = 128  # for sizing the splits before autotune has picked BLOCK_N

# Backward: dW is accumulated in fp32 (atomics into 16-bit would round every partial sum). For 16-bit
# weights the fp32 accumulator covers one vocabulary chunk of about DW_CHUNK_BYTES at a time, so the
# scratch stays far below the N*V*4 bytes of full logits (a whole fp32 dW at Llama-3's head is 2.1 GB).
# At D=4096 a chunk is 8192 vocabulary rows: >= 64 vocabulary blocks per launch, enough programs even
# for small N.
DW_CHUNK_BYTES = 128 * 2**20


def _configs(shapes):
    return [
        triton.Config(
            {"BLOCK_N": block_n, "BLOCK_V": block_v, "BLOCK_D": block_d, "GROUP_N": group_n},
            num_warps=warps,
            num_stages=stages,
        )
        for block_n, block_v, block_d, group_n, warps, stages in shapes
    ]


if INTERPRET:
    # One small config (the autotuner then skips benchmarking): several tiles along every axis at
    # test sizes, so the masks and the grouped order are exercised, and few enough tile-dots to be quick.
    FORWARD_CONFIGS = BACKWARD_CONFIGS = _configs([(16, 128, 32, 2, 1, 1)])
else:
    FORWARD_CONFIGS = _configs(
        [
            (128, 128, 64, 8, 8, 3),
            (64, 128, 64, 8, 4, 4),
            (128, 256, 64, 8, 8, 3),
            (64, 256, 64, 8, 8, 3),
            (128, 128, 128, 8, 8, 3),
        ]
    )
    BACKWARD_CONFIGS = _configs(
        [
            (64, 128, 64, 8, 8, 3),
            (128, 128, 64, 8, 8, 3),
            (128, 64, 64, 8, 4, 3),
            (64, 64, 128, 8, 4, 3),
        ]
    )


# Autotune keys on the shape of the head, not N: N (response tokens) changes every step.
@triton.autotune(configs=FORWARD_CONFIGS, key=["V", "D"])
@triton.jit
def _logprob_partials_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    targets_ptr,
    partials_ptr,  # [3, num_splits, N] fp32: running max, sum of exp(logit - max), target logit
    N,
    V,
    D,
    split_width,
    num_splits,
    HAS_BIAS: tl.constexpr,
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
    split_start = split * split_width
    split_stop = tl.minimum(split_start + split_width, V)

    running_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    sum_exp = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for tile_start in range(split_start, split_stop, BLOCK_V):
        cols = tile_start + tl.arange(0, BLOCK_V)
        col_ok = cols < split_stop
        logits = logit_tile(
            hidden_ptr, weight_ptr, bias_ptr, rows, row_ok, cols, col_ok, D,
            HAS_BIAS, INTERPRET, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
        )  # fmt: skip
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        # Every tile has at least one valid column, so new_max is finite and no inf - inf appears.
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        sum_exp = sum_exp * tl.exp(running_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        running_max = new_max
        target_logit += tl.sum(tl.where(cols[None, :] == targets[:, None], logits, 0.0), axis=1)

    out = partials_ptr + split * N + rows
    tl.store(out, running_max, mask=row_ok)
    tl.store(out + num_splits * N, sum_exp, mask=row_ok)
    tl.store(out + 2 * num_splits * N, target_logit, mask=row_ok)


# restore_value: benchmarking a config runs the kernel, whose atomics would add into the real outputs.
@triton.autotune(configs=BACKWARD_CONFIGS, key=["V", "D"], restore_value=["d_hidden_ptr", "d_weight_ptr", "d_bias_ptr"])
@triton.jit
def _token_grads_kernel(
    hidden_ptr,
    weight_ptr,  # rows [vocab_offset, vocab_offset + V) of the weight
    bias_ptr,  # the same rows of the bias
    targets_ptr,
    lse_ptr,
    coef_ptr,
    d_hidden_ptr,  # [N, D] fp32, accumulated over vocabulary chunks
    d_weight_ptr,  # [V, D] fp32, this chunk's rows
    d_bias_ptr,  # [V] fp32, this chunk's entries
    N,
    V,
    D,
    vocab_offset,
    HAS_BIAS: tl.constexpr,
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
    coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    # The dot operands are dlogits / scale, which lie in [-1, 1]: in fp16 the raw dlogits (coef ~ beta/B/|y|
    # times probabilities) would underflow. Tiles whose coefficients are all zero contribute nothing.
    scale = tl.max(tl.abs(coef), axis=0)
    if scale > 0:
        targets = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf"))
        logits = logit_tile(
            hidden_ptr, weight_ptr, bias_ptr, rows, row_ok, cols, col_ok, D,
            HAS_BIAS, INTERPRET, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
        )  # fmt: skip
        probs = tl.where(col_ok[None, :], tl.exp(logits - lse[:, None]), 0.0)
        onehot = ((cols[None, :] + vocab_offset) == targets[:, None]) & col_ok[None, :]
        scaled_dlogits = (coef / scale)[:, None] * (onehot.to(tl.float32) - probs)
        if HAS_BIAS:
            tl.atomic_add(d_bias_ptr + cols, tl.sum(scaled_dlogits, axis=0) * scale, mask=col_ok)
        # Tensor-core operands in the input dtype (fp32 accumulation), as in the forward.
        scaled_dlogits = dot_operand(scaled_dlogits, hidden_ptr.dtype.element_ty, INTERPRET)

        hidden_rows = rows.to(tl.int64)[:, None] * D
        weight_rows = cols.to(tl.int64)[:, None] * D
        for d_start in range(0, D, BLOCK_D):
            dims = d_start + tl.arange(0, BLOCK_D)
            dim_ok = dims < D
            hidden_mask = row_ok[:, None] & dim_ok[None, :]
            weight_mask = col_ok[:, None] & dim_ok[None, :]
            h = tl.load(hidden_ptr + hidden_rows + dims[None, :], mask=hidden_mask, other=0.0)
            w = tl.load(weight_ptr + weight_rows + dims[None, :], mask=weight_mask, other=0.0)
            zeros_h = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
            zeros_w = tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32)
            d_h = dot(scaled_dlogits, w, zeros_h, INTERPRET, DOT_PRECISION) * scale
            d_w = dot(tl.trans(scaled_dlogits), h, zeros_w, INTERPRET, DOT_PRECISION) * scale
            tl.atomic_add(d_hidden_ptr + hidden_rows + dims[None, :], d_h, mask=hidden_mask)
            tl.atomic_add(d_weight_ptr + weight_rows + dims[None, :], d_w, mask=weight_mask)


def _check_inputs(hidden, weight, bias, targets):
    """Shape, dtype and device checks that name the offending tensor; returns contiguous inputs."""
    for name, tensor in (("hidden", hidden), ("weight", weight), ("targets", targets), ("bias", bias)):
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device}, hidden is on {hidden.device}")
    if hidden.device.type != "cuda" and not INTERPRET:
        raise ValueError(
            f"hidden is on {hidden.device}: the Triton kernels need CUDA tensors, or CPU tensors with "
            "TRITON_INTERPRET=1 set before triton kernels are defined"
        )
    if hidden.dim() != 2 or hidden.shape[0] == 0:
        raise ValueError(f"hidden must be [N, D] with N >= 1, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [V, D={hidden.shape[1]}], got shape {tuple(weight.shape)}")
    if hidden.dtype not in FLOAT_DTYPES or weight.dtype != hidden.dtype:
        raise ValueError(
            f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share one dtype of bf16, fp16, fp32"
        )
    if bias is not None and (bias.shape != weight.shape[:1] or bias.dtype != weight.dtype):
        raise ValueError(
            f"bias must be [V={weight.shape[0]}] in {weight.dtype}, got {tuple(bias.shape)} {bias.dtype}"
        )
    if targets.shape != hidden.shape[:1] or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be [N={hidden.shape[0]}] integers, got {tuple(targets.shape)} {targets.dtype}")
    return (
        hidden.contiguous(),
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
        targets.contiguous(),
    )


def _token_vector(name, tensor, hidden):
    """lse or coef: [N] floats on hidden's device, returned as contiguous fp32."""
    if not isinstance(tensor, torch.Tensor) or tensor.shape != hidden.shape[:1] or not tensor.dtype.is_floating_point:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{name} must be a float tensor of shape [N={hidden.shape[0]}], got {shape}")
    if tensor.device != hidden.device:
        raise ValueError(f"{name} is on {tensor.device}, hidden is on {hidden.device}")
    return tensor.to(torch.float32).contiguous()


def _dot_precision(dtype):
    """fp32 inputs follow torch's matmul precision (default "highest": true fp32, like the chunked twin)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"  # only consulted for fp32 operands


def _vocab_split_width(num_tokens, vocab, device, vocab_splits):
    if vocab_splits is not None and vocab_splits < 1:
        raise ValueError(f"vocab_splits must be >= 1, got {vocab_splits}")
    if vocab_splits is None:
        processors = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        wanted = max(MIN_SPLITS, triton.cdiv(PROGRAMS_PER_SM * processors, triton.cdiv(num_tokens, NOMINAL_BLOCK_N)))
        vocab_splits = min(wanted, triton.cdiv(vocab, MIN_SPLIT_WIDTH))
    return triton.cdiv(triton.cdiv(vocab, vocab_splits), SPLIT_ALIGN) * SPLIT_ALIGN


def token_logprobs(hidden, weight, bias, targets, vocab_splits=None):
    """(logp [N] fp32, lse [N] fp32) of the targets under softmax(hidden @ weight.T + bias).

    hidden [N, D], weight [V, D], bias [V] or None (all bf16, fp16 or fp32, one dtype), targets [N] in [0, V).
    vocab_splits overrides how many vocabulary ranges are streamed in parallel (rounded so every range is
    a multiple of SPLIT_ALIGN columns).
    """
    hidden, weight, bias, targets = _check_inputs(hidden, weight, bias, targets)
    num_tokens, dim = hidden.shape
    vocab = weight.shape[0]
    split_width = _vocab_split_width(num_tokens, vocab, hidden.device, vocab_splits)
    num_splits = triton.cdiv(vocab, split_width)
    partials = torch.empty(3, num_splits, num_tokens, dtype=torch.float32, device=hidden.device)

    def grid(meta):
        return (triton.cdiv(num_tokens, meta["BLOCK_N"]) * num_splits,)

    _logprob_partials_kernel[grid](
        hidden, weight, bias, targets, partials, num_tokens, vocab, dim, split_width, num_splits,
        HAS_BIAS=bias is not None, INTERPRET=INTERPRET, DOT_PRECISION=_dot_precision(hidden.dtype),
    )  # fmt: skip
    split_max, split_sum_exp, split_target_logit = partials.unbind(0)
    top = split_max.amax(0)
    lse = top + torch.log((split_sum_exp * torch.exp(split_max - top)).sum(0))
    return split_target_logit.sum(0) - lse, lse


def _dw_chunk_rows(vocab, dim, chunk_bytes):
    rows = triton.cdiv(max(1, chunk_bytes // (4 * dim)), SPLIT_ALIGN) * SPLIT_ALIGN
    return min(vocab, rows)


def token_grads(hidden, weight, bias, targets, lse, coef, dw_chunk_bytes=DW_CHUNK_BYTES):
    """Gradients of sum_t coef_t * logp_t: (d_hidden [N, D], d_weight [V, D], d_bias [V] or None).

    lse [N] comes from `token_logprobs`; coef [N] is dL/dlogp per token. dlogits = coef * (onehot - p)
    with p recomputed from lse; fp32 accumulation, outputs in the input dtypes. dw_chunk_bytes bounds
    the fp32 scratch of d_weight for 16-bit weights (see DW_CHUNK_BYTES).
    """
    hidden, weight, bias, targets = _check_inputs(hidden, weight, bias, targets)
    lse = _token_vector("lse", lse, hidden)
    coef = _token_vector("coef", coef, hidden)
    num_tokens, dim = hidden.shape
    vocab = weight.shape[0]
    fp32 = dict(dtype=torch.float32, device=hidden.device)

    d_hidden = torch.zeros(num_tokens, dim, **fp32)
    d_bias = None if bias is None else torch.zeros(vocab, **fp32)
    chunk_rows = _dw_chunk_rows(vocab, dim, dw_chunk_bytes)
    # fp32 weights accumulate straight into d_weight; 16-bit ones into a reused fp32 chunk, copied out.
    if weight.dtype == torch.float32:
        scratch, d_weight = None, torch.zeros_like(weight)
    else:
        scratch, d_weight = torch.empty(chunk_rows, dim, **fp32), torch.empty_like(weight)
    dot_precision = _dot_precision(hidden.dtype)
    for start in range(0, vocab, chunk_rows):
        stop = min(start + chunk_rows, vocab)
        d_weight_chunk = d_weight[start:stop] if scratch is None else scratch[: stop - start].zero_()

        def grid(meta, chunk_vocab=stop - start):
            return (triton.cdiv(num_tokens, meta["BLOCK_N"]) * triton.cdiv(chunk_vocab, meta["BLOCK_V"]),)

        _token_grads_kernel[grid](
            hidden, weight[start:stop], None if bias is None else bias[start:stop], targets, lse, coef,
            d_hidden, d_weight_chunk, None if d_bias is None else d_bias[start:stop],
            num_tokens, stop - start, dim, start,
            HAS_BIAS=bias is not None, INTERPRET=INTERPRET, DOT_PRECISION=dot_precision,
        )  # fmt: skip
        if scratch is not None:
            d_weight[start:stop] = d_weight_chunk
    return (
        d_hidden.to(hidden.dtype),
        d_weight,
        None if d_bias is None else d_bias.to(bias.dtype),
    )
