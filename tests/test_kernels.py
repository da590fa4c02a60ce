"""The Triton log-prob kernels against float64 torch on the same inputs (CPU: through Triton's interpreter).

Gradient tolerances are error bounds, element by element: |kernel - exact| <= rel * (|exact| + magnitude),
where magnitude is the sum of the absolute values of the terms the element sums (|dlogits| @ |W| for dH,
and so on). Cancellation can make an element far smaller than its terms, so a plain relative tolerance
would be meaningless there, while this bound stays tight: a lost tile or a wrong sign moves an element by
a sizeable fraction of its magnitude.
- fp32 inputs: fp32 accumulation and fp32 exp/log give ~1e-6 of the magnitude; FP32_REL = 1e-5.
- 16-bit inputs: the dlogits are rounded to the input dtype for the tensor-core dots (relative error
  <= unit roundoff u of each term, so <= u * magnitude), and the outputs are rounded to the input dtype
  (<= u * |exact|), u = 2^-8 for bf16 and 2^-11 for fp16; on top come the fp32 effects, and the
  accumulation order, which changes the sum only at fp32 level. Below fp16's smallest normal value the
  spacing is absolute: outputs there round by <= u * smallest_normal, and dot operands (dlogits scaled
  to [-1, 1]) that flush to zero lose less than that again at these sizes; hence ATOL.
The forward is as exact for 16-bit inputs as for fp32 ones: products of 16-bit values are exact in fp32
and the accumulation is fp32, so log-probs are compared at fp32 tolerance for every dtype.
"""
import pytest
import torch

from amapo_fast import chunked
from amapo_fast.kernels import logprob

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_REL = 1e-5
ROUNDOFF = {torch.float32: 0.0, torch.bfloat16: 2**-8, torch.float16: 2**-11}  # u of the 16-bit roundings
REL = {dtype: FP32_REL + u for dtype, u in ROUNDOFF.items()}
ATOL = {dtype: 2 * u * torch.finfo(dtype).smallest_normal for dtype, u in ROUNDOFF.items()}
BLOCK_N = logprob.BACKWARD_CONFIGS[0].kwargs["BLOCK_N"]


def make_inputs(num_tokens, vocab, dim, dtype, with_bias, coef_scale=1.0, device=DEVICE):
    hidden = torch.randn(num_tokens, dim, device=device).to(dtype)
    # Logits of std ~3: a peaked softmax, as from a trained head, with probabilities over many decades.
    weight = (torch.randn(vocab, dim, device=device) * 3 / dim**0.5).to(dtype)
    bias = torch.randn(vocab, device=device).to(dtype) if with_bias else None
    targets = torch.randint(0, vocab, (num_tokens,), device=device)
    targets[0] = vocab - 1  # the last column lives in the partial last tile
    targets[1:2] = 0
    # Mixed signs (chosen vs rejected tokens) and zeros, including a whole token block of zeros when N
    # allows, whose tiles the backward skips.
    coef = torch.randn(num_tokens, device=device) * coef_scale
    coef[2::3] = 0
    coef[BLOCK_N : 2 * BLOCK_N] = 0
    return hidden, weight, bias, targets, coef


def exact(hidden, weight, bias, targets, coef):
    """float64 log-probs, lse, gradients and their term magnitudes from the (rounded) inputs."""
    h, w = hidden.double(), weight.double()
    logits = h @ w.T
    if bias is not None:
        logits += bias.double()
    lse = torch.logsumexp(logits, dim=1)
    logp = logits.gather(1, targets[:, None]).squeeze(1) - lse
    onehot = torch.nn.functional.one_hot(targets, weight.shape[0]).double()
    dlogits = coef.double()[:, None] * (onehot - torch.softmax(logits, dim=1))
    grads = (dlogits @ w, dlogits.T @ h, dlogits.sum(0))
    magnitudes = (dlogits.abs() @ w.abs(), dlogits.abs().T @ h.abs(), dlogits.abs().sum(0))
    return logp, lse, grads, magnitudes


def assert_within_bound(name, actual, expected, magnitude, dtype, extra_rel=0.0):
    error = (actual.double() - expected).abs()
    bound = (REL[dtype] + extra_rel) * (expected.abs() + magnitude) + ATOL[dtype]
    ratio = (error / bound.clamp_min(torch.finfo(torch.float64).tiny)).max().item()
    assert bool((error <= bound).all()), f"{name}: error reaches {ratio:.3g} x the bound"


def check_against_exact(
    num_tokens, vocab, dim, dtype, with_bias, vocab_splits=None, dw_chunk_rows=None, coef_scale=1.0
):
    hidden, weight, bias, targets, coef = make_inputs(num_tokens, vocab, dim, dtype, with_bias, coef_scale)
    logp_ref, lse_ref, grads_ref, magnitudes = exact(hidden, weight, bias, targets, coef)

    logp, lse = logprob.token_logprobs(hidden, weight, bias, targets, vocab_splits=vocab_splits)
    assert logp.dtype == lse.dtype == torch.float32 and logp.shape == lse.shape == (num_tokens,)
    torch.testing.assert_close(lse.double(), lse_ref, rtol=FP32_REL, atol=FP32_REL)
    torch.testing.assert_close(logp.double(), logp_ref, rtol=FP32_REL, atol=FP32_REL)

    chunk_bytes = logprob.DW_CHUNK_BYTES if dw_chunk_rows is None else dw_chunk_rows * 4 * dim
    grads = logprob.token_grads(hidden, weight, bias, targets, lse, coef, dw_chunk_bytes=chunk_bytes)
    if bias is None:
        assert grads[2] is None
        grads, grads_ref, magnitudes = grads[:2], grads_ref[:2], magnitudes[:2]
    for name, grad, like, grad_ref, magnitude in zip(
        ("d_hidden", "d_weight", "d_bias"), grads, (hidden, weight, bias), grads_ref, magnitudes
    ):
        assert grad.dtype == like.dtype and grad.shape == like.shape, name
        assert_within_bound(name, grad, grad_ref, magnitude, dtype)
    # Tokens with coef 0 (among them the whole block whose tiles are skipped) get exact zeros.
    assert bool((grads[0][coef == 0] == 0).all())


@pytest.mark.parametrize(
    "num_tokens, vocab, dim, dtype, with_bias, vocab_splits, dw_chunk_rows",
    [
        (37, 1000, 72, torch.float32, True, None, None),
        (37, 997, 100, torch.float32, False, 4, 256),
        (1, 1000, 100, torch.float32, False, 4, None),
        (1, 997, 72, torch.bfloat16, True, 1, None),
        (37, 1000, 100, torch.bfloat16, True, 4, 256),
        (37, 997, 72, torch.bfloat16, False, None, 512),
    ],
)
def test_matches_float64(num_tokens, vocab, dim, dtype, with_bias, vocab_splits, dw_chunk_rows):
    check_against_exact(num_tokens, vocab, dim, dtype, with_bias, vocab_splits, dw_chunk_rows)


def test_fp16_small_coefficients_do_not_underflow():
    # Realistic coefficients (beta / B / |y| ~ 1e-3) times probabilities down to ~1e-7 give dlogits below
    # fp16's smallest subnormal (6e-8); the kernel scales them by the block's max |coef| before the dot.
    check_against_exact(37, 997, 72, torch.float16, True, dw_chunk_rows=256, coef_scale=1e-3)


def test_matches_chunked_twin():
    """Same signatures and results as the PyTorch twin the lead's autograd glue can swap in."""
    hidden, weight, bias, targets, coef = make_inputs(37, 997, 72, torch.float32, True)
    logp, lse = logprob.token_logprobs(hidden, weight, bias, targets)
    twin_logp, twin_lse = chunked.token_logprobs(hidden, weight, bias, targets)
    torch.testing.assert_close(logp, twin_logp, rtol=FP32_REL, atol=FP32_REL)
    torch.testing.assert_close(lse, twin_lse, rtol=FP32_REL, atol=FP32_REL)
    for grad, twin_grad in zip(
        logprob.token_grads(hidden, weight, bias, targets, lse, coef),
        chunked.token_grads(hidden, weight, bias, targets, twin_lse, coef),
    ):
        torch.testing.assert_close(grad, twin_grad, rtol=1e-4, atol=1e-6)


def _bad_calls():
    hidden, weight, bias, targets, coef = make_inputs(4, 300, 32, torch.float32, True)
    lse = torch.zeros(4, device=DEVICE)
    return [
        ("weight", lambda: logprob.token_logprobs(hidden, weight[:, :16], bias, targets)),
        ("weight", lambda: logprob.token_logprobs(hidden, weight.bfloat16(), bias, targets)),
        ("hidden", lambda: logprob.token_logprobs(hidden.double(), weight.double(), None, targets)),
        ("bias", lambda: logprob.token_logprobs(hidden, weight, bias[:-1], targets)),
        ("targets", lambda: logprob.token_logprobs(hidden, weight, bias, targets[:3])),
        ("targets", lambda: logprob.token_logprobs(hidden, weight, bias, targets.float())),
        ("vocab_splits", lambda: logprob.token_logprobs(hidden, weight, bias, targets, vocab_splits=0)),
        ("lse", lambda: logprob.token_grads(hidden, weight, bias, targets, lse[:2], coef)),
        ("coef", lambda: logprob.token_grads(hidden, weight, bias, targets, lse, coef.long())),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_inputs_name_the_tensor(case):
    name, call = _bad_calls()[case]
    with pytest.raises(ValueError, match=name):
        call()


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(logprob, "INTERPRET", False)
    hidden, weight, bias, targets, _ = make_inputs(4, 300, 32, torch.float32, True, device="cpu")
    with pytest.raises(ValueError, match="hidden is on cpu.*TRITON_INTERPRET"):
        logprob.token_logprobs(hidden, weight, bias, targets)


def _chunked_fp32_reference(hidden, weight, targets, coef, chunk=256):
    """fp32 torch at a large shape, token chunk by token chunk: log-probs, lse, gradients, magnitudes."""
    h, w = hidden.float(), weight.float()
    logp, lse = torch.empty(len(h), device=h.device), torch.empty(len(h), device=h.device)
    d_hidden, d_hidden_mag = torch.empty_like(h), torch.empty_like(h)
    d_weight, d_weight_mag = torch.zeros_like(w), torch.zeros_like(w)
    for start in range(0, len(h), chunk):
        rows = slice(start, start + chunk)
        logits = h[rows] @ w.T
        lse[rows] = torch.logsumexp(logits, dim=1)
        logp[rows] = logits.gather(1, targets[rows, None]).squeeze(1) - lse[rows]
        dlogits = -torch.softmax(logits, dim=1)
        dlogits.scatter_add_(1, targets[rows, None], torch.ones_like(dlogits[:, :1]))
        dlogits *= coef[rows, None]
        d_hidden[rows], d_hidden_mag[rows] = dlogits @ w, dlogits.abs() @ w.abs()
        d_weight += dlogits.T @ h[rows]
        d_weight_mag += dlogits.abs().T @ h[rows].abs()
    return logp, lse, (d_hidden, d_hidden_mag), (d_weight, d_weight_mag)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_llama3_head_on_gpu():
    num_tokens, dim, vocab = 2048, 4096, 128256
    hidden, weight, _, targets, coef = make_inputs(num_tokens, vocab, dim, torch.bfloat16, False, coef_scale=1e-3)

    def both_passes():
        logp, lse = logprob.token_logprobs(hidden, weight, None, targets)
        d_hidden, d_weight, _ = logprob.token_grads(hidden, weight, None, targets, lse, coef)
        return logp, lse, d_hidden, d_weight

    # The first call autotunes, which holds copies of the outputs and an L2-flush buffer: not the steady state.
    both_passes()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    logp, lse, d_hidden, d_weight = results = both_passes()
    torch.cuda.synchronize()
    outputs = sum(t.numel() * t.element_size() for t in results)
    scratch = torch.cuda.max_memory_allocated() - baseline - outputs
    full_logits = num_tokens * vocab * 4
    assert scratch < full_logits / 4, f"scratch {scratch / 2**20:.0f} MiB vs [N, V] fp32 {full_logits / 2**20:.0f} MiB"

    ref_logp, ref_lse, (ref_dh, dh_mag), (ref_dw, dw_mag) = _chunked_fp32_reference(hidden, weight, targets, coef)
    # fp32 accumulation over D=4096 in two different orders: ~1e-5 of logits of size ~10.
    torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logp, ref_logp, rtol=1e-4, atol=1e-4)
    # extra_rel: the reference itself is fp32 (sums over V=128256 and N=2048 terms, ~1e-5 of the magnitude).
    assert_within_bound("d_hidden", d_hidden, ref_dh.double(), dh_mag.double(), torch.bfloat16, extra_rel=1e-4)
    assert_within_bound("d_weight", d_weight, ref_dw.double(), dw_mag.double(), torch.bfloat16, extra_rel=1e-4)
