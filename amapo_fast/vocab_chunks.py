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
from typing import Callable, NamedTuple

import torch

# The scratch holds [n_tokens, chunk] dlogits in the compute dtype. 256 MiB keeps it a small fraction of
# the [N, V] fp32 logits it replaces (8.4 GB at N=16k, V=128k) while each chunk stays wide enough for
# the GEMMs to be compute-bound: at N=16k bf16 a chunk is 8192 columns. The chunk never drops below
# MIN_CHUNK_COLUMNS (GEMMs with a shorter inner dimension lose efficiency), so for very large N the
# scratch grows past the budget instead.
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


def chunk_columns(num_tokens: int, vocab: int, element_size: int, scratch_bytes: int = SCRATCH_BYTES) -> int:
    """Vocabulary columns per backward chunk: the scratch budget, aligned, within [MIN_CHUNK_COLUMNS, V]."""
    columns = scratch_bytes // max(1, num_tokens * element_size)
    columns = max(MIN_CHUNK_COLUMNS, columns // CHUNK_ALIGN * CHUNK_ALIGN)
    return min(vocab, columns)


_FP32_ACCUMULATE = {}  # device type -> the way that works there (probed once)


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """acc += a @ b. For 16-bit a, b into an fp32 acc the product is not rounded to 16 bits first.

    CUDA (torch >= 2.8) has GEMMs with 16-bit inputs and an fp32 output; the first such call probes it on
    a small problem and falls back to a product of upcast operands where it is missing (CPU).
    """
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    way = _FP32_ACCUMULATE.get(acc.device.type)
    if way is None:
        way = "upcast"
        if acc.is_cuda:
            try:
                x = torch.randn(32, 48, device=acc.device).to(a.dtype)
                y = torch.randn(48, 16, device=acc.device).to(a.dtype)
                probe = torch.ones(32, 16, device=acc.device)
                torch.addmm(probe, x, y, out_dtype=torch.float32, out=probe)
                if torch.allclose(probe, 1 + x.float() @ y.float(), rtol=1e-4, atol=1e-4):
                    way = "out_dtype"
            except (RuntimeError, TypeError):
                pass
        _FP32_ACCUMULATE[acc.device.type] = way
    if way == "out_dtype":
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


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
