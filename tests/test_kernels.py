"""The Triton log-prob kernels against float64 torch on the same inputs (CPU: through Triton's interpreter).

Pass 1 (`lse_forward`) is checked with several vocabulary splits, pass 2 (`dlogits_backward`) with several
vocabulary chunks, so the split-combining and chunk-offset code that every real launch runs is exercised
at test sizes.

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

from amapo_fast import chunked, vocab_chunks
from amapo_fast.kernels import autotune, dlogits_backward, inputs, lse_forward

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_REL = 1e-5
ROUNDOFF = {torch.float32: 0.0, torch.bfloat16: 2**-8, torch.float16: 2**-11}  # u of the 16-bit roundings
REL = {dtype: FP32_REL + u for dtype, u in ROUNDOFF.items()}
ATOL = {dtype: 2 * u * torch.finfo(dtype).smallest_normal for dtype, u in ROUNDOFF.items()}
BLOCK_N = autotune.token_block_size(37, torch.float32)


def make_inputs(num_tokens, vocab, dim, dtype, with_bias, coef_scale=1.0, device=DEVICE):
    hidden = torch.randn(num_tokens, dim, device=device).to(dtype)
    # Logits of std ~3: a peaked softmax, as from a trained head, with probabilities over many decades.
    weight = (torch.randn(vocab, dim, device=device) * 3 / dim**0.5).to(dtype)
    bias = torch.randn(vocab, device=device).to(dtype) if with_bias else None
    targets = torch.randint(0, vocab, (num_tokens,), device=device)
    targets[0] = vocab - 1  # the last column lives in the partial last tile
    targets[1:2] = 0
    # Mixed signs (chosen vs rejected tokens) and zeros, including a whole token block of zeros when N allows.
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
    stats = {
        "mean_logit": logits.mean(1),
        "entropy": lse - (torch.softmax(logits, dim=1) * logits).sum(1),
        "argmax_hit": (logits.argmax(1) == targets).double(),
    }
    return logp, lse, grads, magnitudes, stats


def assert_within_bound(name, actual, expected, magnitude, dtype, extra_rel=0.0):
    error = (actual.double() - expected).abs()
    bound = (REL[dtype] + extra_rel) * (expected.abs() + magnitude) + ATOL[dtype]
    ratio = (error / bound.clamp_min(torch.finfo(torch.float64).tiny)).max().item()
    assert bool((error <= bound).all()), f"{name}: error reaches {ratio:.3g} x the bound"


def check_against_exact(num_tokens, vocab, dim, dtype, with_bias, num_splits=None, chunk_columns=None, coef_scale=1.0):
    hidden, weight, bias, targets, coef = make_inputs(num_tokens, vocab, dim, dtype, with_bias, coef_scale)
    logp_ref, lse_ref, grads_ref, magnitudes, stats_ref = exact(hidden, weight, bias, targets, coef)

    pass1 = lse_forward.token_logprobs(hidden, weight, bias, targets, num_splits=num_splits)
    for name, value in pass1._asdict().items():
        assert value.dtype == torch.float32 and value.shape == (num_tokens,), name
    torch.testing.assert_close(pass1.lse.double(), lse_ref, rtol=FP32_REL, atol=FP32_REL)
    torch.testing.assert_close(pass1.logp.double(), logp_ref, rtol=FP32_REL, atol=FP32_REL)
    for name, expected in stats_ref.items():
        torch.testing.assert_close(getattr(pass1, name).double(), expected, rtol=FP32_REL, atol=FP32_REL, msg=name)
    lse = pass1.lse

    grads = dlogits_backward.token_grads(hidden, weight, bias, targets, lse, coef, chunk_columns=chunk_columns)
    if bias is None:
        assert grads[2] is None
        grads, grads_ref, magnitudes = grads[:2], grads_ref[:2], magnitudes[:2]
    for name, grad, like, grad_ref, magnitude in zip(
        ("d_hidden", "d_weight", "d_bias"), grads, (hidden, weight, bias), grads_ref, magnitudes
    ):
        assert grad.dtype == like.dtype and grad.shape == like.shape, name
        assert_within_bound(name, grad, grad_ref, magnitude, dtype)
    # Tokens with coef 0 get exact zeros.
    assert bool((grads[0][coef == 0] == 0).all())


# Chunk widths: a whole number of BLOCK_V tiles (256) and one that is not (300), several chunks each.
@pytest.mark.parametrize(
    "num_tokens, vocab, dim, dtype, with_bias, num_splits, chunk_columns",
    [
        (37, 1000, 72, torch.float32, True, None, None),
        (37, 997, 100, torch.float32, False, 4, 256),
        (1, 1000, 100, torch.float32, False, 3, 300),
        (1, 997, 72, torch.bfloat16, True, 1, None),
        (37, 1000, 100, torch.bfloat16, True, 4, 256),
        (37, 997, 72, torch.bfloat16, False, None, 300),
    ],
)
def test_matches_float64(num_tokens, vocab, dim, dtype, with_bias, num_splits, chunk_columns):
    check_against_exact(num_tokens, vocab, dim, dtype, with_bias, num_splits, chunk_columns)


def test_fp16_small_coefficients_do_not_underflow():
    # Realistic coefficients (beta / B / |y| ~ 1e-3) times probabilities down to ~1e-7 give dlogits below
    # fp16's smallest subnormal (6e-8); the backward divides them by the largest |coef| before storing.
    check_against_exact(37, 997, 72, torch.float16, True, chunk_columns=256, coef_scale=1e-3)


def test_backward_is_deterministic():
    """Two identical calls give bit-identical gradients: no atomics, a fixed order of every sum."""
    hidden, weight, bias, targets, coef = make_inputs(37, 1000, 72, torch.bfloat16, True)
    lse = lse_forward.token_logprobs(hidden, weight, bias, targets).lse
    first = dlogits_backward.token_grads(hidden, weight, bias, targets, lse, coef, chunk_columns=256)
    second = dlogits_backward.token_grads(hidden, weight, bias, targets, lse, coef, chunk_columns=256)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("where", ["coef", "lse", "hidden", "weight"])
def test_non_finite_values_reach_the_gradients(where):
    """A NaN coefficient, log-sum-exp, hidden or weight entry must not be hidden by skipped work."""
    hidden, weight, bias, targets, coef = make_inputs(37, 1000, 72, torch.float32, False)
    lse = lse_forward.token_logprobs(hidden, weight, bias, targets).lse
    {"coef": coef, "lse": lse, "hidden": hidden, "weight": weight}[where][3] = float("nan")
    if where in ("hidden", "weight"):
        lse = lse_forward.token_logprobs(hidden, weight, bias, targets).lse
        assert not bool(lse.isfinite().all())
    d_hidden, d_weight, _ = dlogits_backward.token_grads(hidden, weight, bias, targets, lse, coef)
    assert not bool(d_hidden.isfinite().all()) and not bool(d_weight.isfinite().all())


def test_matches_chunked_twin():
    """Same signatures and results as the PyTorch twin, both with several vocabulary chunks."""
    hidden, weight, bias, targets, coef = make_inputs(37, 997, 72, torch.float32, True)
    pass1 = lse_forward.token_logprobs(hidden, weight, bias, targets)
    twin = chunked.token_logprobs(hidden, weight, bias, targets, chunk_bytes=10 * 997 * 4)
    for value, twin_value in zip(pass1, twin):
        torch.testing.assert_close(value, twin_value, rtol=FP32_REL, atol=FP32_REL)
    for grad, twin_grad in zip(
        dlogits_backward.token_grads(hidden, weight, bias, targets, pass1.lse, coef, chunk_columns=256),
        chunked.token_grads(hidden, weight, bias, targets, twin.lse, coef, chunk_columns=300),
    ):
        torch.testing.assert_close(grad, twin_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "token_blocks, tiles, processors, expected",
    [
        (32, 501, 132, 12),  # N=4096 at BLOCK_N=128 on an H100: 384 programs fill 97% of 3 waves (not 9: 73%)
        (1, 501, 132, 264),  # one token block: two full waves of splits
        (256, 501, 132, 2),  # many token blocks: 512 programs fill 97% of 4 waves
        (7, 501, 108, 44),  # A100 (108 SMs): 308 programs fill 95% of 3 waves
        (1, 4, 132, 4),  # never more splits than vocabulary tiles
    ],
)
def test_vocab_splits_fill_whole_waves(token_blocks, tiles, processors, expected):
    splits = lse_forward.vocab_splits(token_blocks, tiles, processors)
    assert splits == expected
    assert 1 <= splits <= tiles


def test_configs_are_pruned_by_shared_memory():
    configs = autotune.launch_configs(autotune.FORWARD_CONFIGS, torch.bfloat16)
    block_n = configs[0].kwargs["BLOCK_N"]
    generous = autotune.prune_configs(autotune.FORWARD_CONFIGS, torch.bfloat16, block_n, 10**9)
    assert generous == autotune.FORWARD_CONFIGS
    sizes = sorted(autotune.estimated_shared_bytes(c, block_n, 2) for c in autotune.FORWARD_CONFIGS)
    tight = autotune.prune_configs(autotune.FORWARD_CONFIGS, torch.bfloat16, block_n, sizes[0])
    assert tight and all(autotune.estimated_shared_bytes(c, block_n, 2) <= sizes[0] for c in tight)
    assert autotune.prune_configs(autotune.FORWARD_CONFIGS, torch.bfloat16, block_n, sizes[0] - 1) == []


def _bad_calls():
    hidden, weight, bias, targets, coef = make_inputs(4, 300, 32, torch.float32, True)
    lse = torch.zeros(4, device=DEVICE)
    forward, backward = lse_forward.token_logprobs, dlogits_backward.token_grads
    return [
        ("weight", lambda: forward(hidden, weight[:, :16], bias, targets)),
        ("weight", lambda: forward(hidden, weight.bfloat16(), bias, targets)),
        ("hidden", lambda: forward(hidden.double(), weight.double(), None, targets)),
        ("bias", lambda: forward(hidden, weight, bias[:-1], targets)),
        ("targets", lambda: forward(hidden, weight, bias, targets[:3])),
        ("targets", lambda: forward(hidden, weight, bias, targets.float())),
        ("num_splits", lambda: forward(hidden, weight, bias, targets, num_splits=0)),
        ("lse", lambda: backward(hidden, weight, bias, targets, lse[:2], coef)),
        ("coef", lambda: backward(hidden, weight, bias, targets, lse, coef.long())),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_inputs_name_the_tensor(case):
    name, call = _bad_calls()[case]
    with pytest.raises(ValueError, match=name):
        call()


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(inputs, "INTERPRET", False)
    hidden, weight, bias, targets, _ = make_inputs(4, 300, 32, torch.float32, True, device="cpu")
    with pytest.raises(ValueError, match="hidden is on cpu.*TRITON_INTERPRET"):
        lse_forward.token_logprobs(hidden, weight, bias, targets)


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
    """Both passes at the Llama-3-8B head in bf16: accuracy against fp32, bit-identical reruns, and memory
    beyond the outputs within what the design promises (checked in that order, so a resource surprise
    never hides an accuracy result)."""
    num_tokens, dim, vocab = 2048, 4096, 128256
    hidden, weight, _, targets, coef = make_inputs(num_tokens, vocab, dim, torch.bfloat16, False, coef_scale=1e-3)

    def both_passes():
        pass1 = lse_forward.token_logprobs(hidden, weight, None, targets)
        d_hidden, d_weight, _ = dlogits_backward.token_grads(hidden, weight, None, targets, pass1.lse, coef)
        return pass1.logp, pass1.lse, d_hidden, d_weight

    # The first call compiles (and tunes, unless a config is pinned): not the steady state.
    logp, lse, d_hidden, d_weight = first = both_passes()
    ref_logp, ref_lse, (ref_dh, dh_mag), (ref_dw, dw_mag) = _chunked_fp32_reference(hidden, weight, targets, coef)
    # fp32 accumulation over D=4096 in two different orders: ~1e-5 of logits of size ~10.
    torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logp, ref_logp, rtol=1e-4, atol=1e-4)
    # extra_rel: the reference itself is fp32 (sums over V=128256 and N=2048 terms, ~1e-5 of the magnitude).
    assert_within_bound("d_hidden", d_hidden, ref_dh.double(), dh_mag.double(), torch.bfloat16, extra_rel=1e-4)
    assert_within_bound("d_weight", d_weight, ref_dw.double(), dw_mag.double(), torch.bfloat16, extra_rel=1e-4)
    del ref_logp, ref_lse, ref_dh, dh_mag, ref_dw, dw_mag

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    results = both_passes()
    torch.cuda.synchronize()
    for a, b in zip(first, results):  # deterministic: bit-identical to the first call
        assert torch.equal(a, b)

    outputs = sum(t.numel() * t.element_size() for t in results)
    extra = torch.cuda.max_memory_allocated() - baseline - outputs
    # The design's promise: the dlogits scratch (bounded by vocab_chunks.chunk_columns), the fp32 dH
    # accumulator (and its temporary, where the fp32-output GEMM cannot add in place), and per-token vectors.
    columns = vocab_chunks.chunk_columns(num_tokens, vocab, hidden.element_size())
    scratch = num_tokens * columns * hidden.element_size()
    accumulators = 2 if vocab_chunks.accumulate_way(hidden.device) == vocab_chunks.MM_OUT_DTYPE else 1
    promised = scratch + accumulators * num_tokens * dim * 4 + 2**20
    full_logits = num_tokens * vocab * 4
    assert promised < full_logits / 8
    assert extra <= promised, f"extra {extra / 2**20:.1f} MiB, promised {promised / 2**20:.1f} MiB (scratch {scratch / 2**20:.1f})"


def test_int64_offsets_path(monkeypatch):
    """Heads whose offsets pass 2^31 elements take 64-bit address arithmetic: same results."""
    for module in (lse_forward, dlogits_backward):
        monkeypatch.setattr(module, "needs_int64_offsets", lambda *sizes: True)
    check_against_exact(37, 997, 33, torch.float32, True, num_splits=3, chunk_columns=300)
