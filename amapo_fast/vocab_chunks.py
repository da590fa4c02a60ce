"""What the two backends (Triton kernels, chunked PyTorch twin) share: pass 1's per-token result and the
vocabulary-chunk loop of pass 2 with its GEMM half.

Pass 2 walks the vocabulary in chunks of columns. For each chunk a backend-specific producer writes
dlogits = coef * (onehot(target) - softmax) for every response token into a bounded scratch
[n_tokens, chunk]; then library GEMMs (cuBLAS on GPU) form
    d_hidden      += dlogits @ W[chunk]      (an fp32 accumulator across chunks)
    d_weight[chunk] = dlogits^T @ H          (written once, fp32 accumulation inside the GEMM)
    d_bias[chunk]   = dlogits.sum(0)
No atomics and a fixed order of operations: two identical calls give bit-identical gradients, and the
matrix products run at tensor-core speed instead of as read-modify-writes from every logit tile.
"""
import logging
from typing import Callable, NamedTuple

import torch

log = logging.getLogger(__name__)

# The scratch holds [n_tokens, chunk] dlogits in the compute dtype. It is bounded twice:
# - by SCRATCH_FRACTION of the [n_tokens, V] fp32 logits it replaces, so that it stays small next to what
#   the eager computation would hold at every batch size (at V=128256 in bf16 a chunk is at most 15,872
#   columns; at the CPU goal's V=32000 in fp32, the 2,048-column floor);
# - by SCRATCH_BYTES, which caps it for large batches (at 16k bf16 tokens, 8,192 columns).
# The chunk never drops below MIN_CHUNK_COLUMNS: the GEMMs' inner dimension (dH += dlogits @ W[chunk]) and
# the number of read-modify-write passes over the fp32 dH accumulator (one per chunk) are set by it; on an
# H100 the dH GEMM of a 2,048-column chunk at 4,096 tokens, D=4096, is ~87 us of bf16 tensor-core time
# against ~56 us of traffic: still compute-bound (an estimate; see docs/kernels.md).
# Both bounds use the power-of-two bucket of the token count, not the count itself, so the chunk width,
# and with it the kernel's tuning key, is the same for every batch of a bucket.
SCRATCH_FRACTION = 1 / 16
SCRATCH_BYTES = 256 * 2**20
MIN_CHUNK_COLUMNS = 2048
CHUNK_ALIGN = 256  # a multiple of every BLOCK_V, so only a chunk's last vocabulary tile can be partial


class TokenLogprobs(NamedTuple):
    """Pass 1, per response token (all fp32, [N]); the last three feed the logged metrics only."""

    logp: torch.Tensor  # log-prob of the target
    lse: torch.Tensor  # log-sum-exp of the logits (pass 2 recomputes softmax from it)
    mean_logit: torch.Tensor  # mean of the token's V logits
    entropy: torch.Tensor  # entropy of softmax(logits)
    argmax_hit: torch.Tensor  # 1.0 where the target has the largest logit, else 0.0


def token_bucket(num_tokens: int) -> int:
    """The next power of two of the token count: the unit in which launches are sized and tuned."""
    return 1 << (max(1, num_tokens) - 1).bit_length()


def chunk_columns(num_tokens: int, vocab: int, element_size: int, scratch_bytes: int = SCRATCH_BYTES) -> int:
    """Vocabulary columns per backward chunk: within both scratch bounds, aligned, within [MIN_CHUNK_COLUMNS, V]."""
    by_bytes = scratch_bytes // (token_bucket(num_tokens) * element_size)
    by_fraction = int(SCRATCH_FRACTION * vocab * 4) // element_size
    columns = min(by_bytes, by_fraction) // CHUNK_ALIGN * CHUNK_ALIGN
    return min(vocab, max(MIN_CHUNK_COLUMNS, columns))


# How acc += a @ b runs for 16-bit a, b and an fp32 acc, per device type (probed once, see _accumulate).
ADDMM_OUT_DTYPE = "addmm(out_dtype=float32) into the accumulator"
MM_OUT_DTYPE = "mm(out_dtype=float32) then add_"
UPCAST = "fp32 matmul of upcast operands (CPU only)"
_ACCUMULATE_WAY = {}


def _mixed_gemm_works(gemm, device, dtype) -> bool:
    x = torch.randn(32, 48, device=device).to(dtype)
    y = torch.randn(48, 16, device=device).to(dtype)
    try:
        result = gemm(torch.ones(32, 16, device=device), x, y)
    except (RuntimeError, TypeError):  # the op or its out_dtype argument is missing in this build
        return False
    return result.dtype == torch.float32 and torch.allclose(result, 1 + x.float() @ y.float(), rtol=1e-4, atol=1e-4)


def _addmm_out_dtype(acc, a, b):
    return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)


def _mm_out_dtype(acc, a, b):
    return acc.add_(torch.mm(a, b, out_dtype=torch.float32))


WAYS = {ADDMM_OUT_DTYPE: _addmm_out_dtype, MM_OUT_DTYPE: _mm_out_dtype}


def accumulate_way(device, dtype: torch.dtype = torch.bfloat16) -> str:
    """How pass 2 adds a product of 16-bit operands into an fp32 accumulator on device (probed on first use,
    logged once): a GEMM with an fp32 output into the accumulator, else one into a temporary and an add.
    A GEMM of upcast operands (an fp32 SGEMM, ~10x slower on a GPU, with upcast copies of both operands) is
    taken on CPU only; on CUDA the absence of both 16-bit-input GEMMs is an error."""
    device = torch.device(device)
    if device.type not in _ACCUMULATE_WAY:
        way = next((name for name, gemm in WAYS.items() if _mixed_gemm_works(gemm, device, dtype)), UPCAST)
        if way == UPCAST and device.type == "cuda":
            raise RuntimeError(
                f"torch {torch.__version__} has no {dtype} GEMM with an fp32 output on CUDA (mm/addmm out_dtype): "
                "upgrade torch"
            )
        log.info("pass 2 accumulates 16-bit GEMMs into fp32 on %s by %s", device.type, way)
        _ACCUMULATE_WAY[device.type] = way
    return _ACCUMULATE_WAY[device.type]


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """acc += a @ b. For 16-bit a, b into an fp32 acc the product is not rounded to 16 bits first."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    way = accumulate_way(acc.device, a.dtype)
    if way == UPCAST:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))
    else:
        WAYS[way](acc, a, b)


def backward_by_vocab_chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    write_dlogits: Callable[[int, int, torch.Tensor, torch.Tensor], None],
    scratch_dtype: torch.dtype,
    scale: torch.Tensor | None = None,
    scratch_bytes: int = SCRATCH_BYTES,
    columns: int | None = None,
):
    """(d_hidden [N, D], d_weight [V, D], d_bias [V] or None), in the input dtypes.

    write_dlogits(start, stop, weight_chunk, out) fills out [N, stop - start] with the dlogits of vocabulary
    columns [start, stop) (weight_chunk: those rows of the weight in the scratch dtype, the GEMMs' operand), divided by scale when scale (a 0-dim fp32 tensor) is given: fp16 scratch values are
    kept near 1 that way instead of underflowing, and the GEMM results are multiplied back in fp32.
    columns overrides the chunk width that scratch_bytes would give (tests force several chunks with it).
    """
    num_tokens, dim = hidden.shape
    vocab = weight.shape[0]
    if columns is not None and columns < 1:
        raise ValueError(f"chunk columns must be >= 1, got {columns}")
    if columns is None:
        columns = chunk_columns(num_tokens, vocab, torch.empty((), dtype=scratch_dtype).element_size(), scratch_bytes)
    columns = min(columns, vocab)
    accumulation = torch.promote_types(scratch_dtype, torch.float32)
    scratch = torch.empty(num_tokens, columns, dtype=scratch_dtype, device=hidden.device)
    gemm_hidden = hidden.to(scratch_dtype)  # no copy when the dtypes match (the Triton path)
    gemm_weight = weight.to(scratch_dtype)
    d_hidden = torch.zeros(num_tokens, dim, dtype=accumulation, device=hidden.device)
    d_weight = torch.empty_like(weight)
    d_bias = None if bias is None else torch.empty_like(bias)
    for start in range(0, vocab, columns):
        stop = min(start + columns, vocab)
        dlogits = scratch[:, : stop - start]
        write_dlogits(start, stop, gemm_weight[start:stop], dlogits)
        _accumulate(d_hidden, dlogits, gemm_weight[start:stop])
        if scale is None and d_weight.dtype == scratch_dtype:
            torch.mm(dlogits.T, gemm_hidden, out=d_weight[start:stop])  # 16-bit out, fp32 accumulation inside
        else:
            chunk_grad = torch.zeros(stop - start, dim, dtype=accumulation, device=hidden.device)
            _accumulate(chunk_grad, dlogits.T, gemm_hidden)
            d_weight[start:stop] = chunk_grad if scale is None else chunk_grad * scale
        if d_bias is not None:
            chunk_bias = dlogits.sum(0, dtype=accumulation)
            d_bias[start:stop] = chunk_bias if scale is None else chunk_bias * scale
    if scale is not None:
        d_hidden *= scale
    return d_hidden.to(hidden.dtype), d_weight, d_bias
