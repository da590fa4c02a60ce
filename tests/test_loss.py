"""The fused paths (Triton through the interpreter on CPU, the chunked twin) against the reference.

Every test draws fresh random inputs. Tolerances:
- fp32 inputs: ~1e-5 relative to the float64 reference on the same values.
- bf16 inputs: both fused paths form the logits from exact bf16 x bf16 products with fp32
  accumulation, so the loss and metrics still agree to ~1e-5 with the float64 reference on the
  upcast values. dH and dW are returned in bf16: rounding to bf16 costs up to 2^-9 relative
  (half an ulp of an 8-bit mantissa); we allow 2^-8 relative plus 2^-8 of the tensor's largest
  entry for elements near zero, where fp32 accumulation-order differences can flip a rounding.
"""
import math

import pytest
import torch

from amapo_fast import (
    LOSS_TYPES,
    METRIC_KEYS,
    LinearPreferenceHead,
    linear_preference_loss,
    preference_objective,
    sequence_logps,
)
from amapo_fast.losses import LOSSES
from conftest import DEVICE

FUSED_IMPLS = ["chunked", "triton"]


def make_batch(pairs, dim, vocab, prompt_lens=None, response_lens=None, dtype=torch.float32, bias=False, seq_len=None):
    """Random hidden states, lm_head and labels for `pairs` pairs (2*pairs rows: chosen, then rejected).

    prompt_lens / response_lens give, per row, how many leading positions are prompt (-100) and how many
    are response; the rest of the row is padding (-100).
    """
    rows = 2 * pairs
    if prompt_lens is None:
        prompt_lens = torch.randint(0, 4, (rows,)).tolist()
    if response_lens is None:
        response_lens = torch.randint(1, 6, (rows,)).tolist()
    seq_len = seq_len or max(p + r for p, r in zip(prompt_lens, response_lens)) + 1
    labels = torch.full((rows, seq_len), -100, dtype=torch.long)
    for row, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        labels[row, p : p + r] = torch.randint(0, vocab, (r,))
    # Scales give peaked, realistic softmaxes (logit std ~3) rather than near-uniform ones.
    hidden = torch.randn(rows, seq_len, dim, dtype=torch.float64)
    weight = torch.randn(vocab, dim, dtype=torch.float64) * (3.0 / math.sqrt(dim))
    bias_t = torch.randn(vocab, dtype=torch.float64) if bias else None
    cast = lambda t: None if t is None else t.to(dtype).to(DEVICE)  # noqa: E731
    return cast(hidden), cast(weight), labels.to(DEVICE), cast(bias_t)


def run(hidden, weight, labels, bias=None, **kwargs):
    """Loss, metrics and gradients (dH, dW, db) of one call, on fresh leaf copies of the inputs."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight)]
    bias_leaf = None if bias is None else bias.detach().clone().requires_grad_(True)
    loss, metrics = linear_preference_loss(leaves[0], leaves[1], labels, bias=bias_leaf, **kwargs)
    grads = torch.autograd.grad(loss, leaves + ([bias_leaf] if bias_leaf is not None else []))
    return loss.detach(), metrics, grads


def reference_on(hidden, weight, labels, bias=None, **kwargs):
    """The float64 reference on the same (upcast) values."""
    up = lambda t: None if t is None else t.double()  # noqa: E731
    return run(up(hidden), up(weight), labels, up(bias), impl="reference", **kwargs)


def assert_matches(actual, expected, *, grad_rtol, value_rtol=1e-5, grad_dtype=torch.float32):
    """`actual` against the float64 `expected`. grad_dtype is the inputs' dtype: the gradients must come in it,
    the loss in fp32 (float64 for float64 inputs), the metrics in fp32."""
    loss, metrics, grads = actual
    ref_loss, ref_metrics, ref_grads = expected
    assert loss.dtype == torch.promote_types(grad_dtype, torch.float32), f"loss is {loss.dtype}"
    assert all(value.dtype == torch.float32 for value in metrics.values()), {k: v.dtype for k, v in metrics.items()}
    torch.testing.assert_close(loss.double(), ref_loss.double(), rtol=value_rtol, atol=value_rtol)
    for key in METRIC_KEYS:
        torch.testing.assert_close(
            metrics[key].double(), ref_metrics[key].double(), rtol=value_rtol, atol=value_rtol, msg=key
        )
    assert len(grads) == len(ref_grads)
    for name, grad, ref in zip(("d_hidden", "d_weight", "d_bias"), grads, ref_grads):
        assert grad.dtype == grad_dtype, f"{name} is {grad.dtype}, expected {grad_dtype}"
        assert torch.isfinite(grad).all(), name
        scale = ref.abs().max().item()
        torch.testing.assert_close(grad.double(), ref, rtol=grad_rtol, atol=grad_rtol * scale, msg=name)


def loss_kwargs(loss_type, rows):
    kwargs = dict(beta=2.0, loss_type=loss_type)
    if LOSSES[loss_type].needs_reference:
        kwargs["ref_logps"] = (torch.randn(rows, dtype=torch.float64) * 5 - 20).to(DEVICE)
    if loss_type == "simpo":
        kwargs["gamma_beta_ratio"] = 0.4
    if loss_type == "kto":
        kwargs["kto_kl"] = 0.3
    return kwargs


@pytest.mark.parametrize("impl", FUSED_IMPLS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_fp32(impl, loss_type):
    hidden, weight, labels, bias = make_batch(pairs=3, dim=24, vocab=97, bias=True)
    kwargs = loss_kwargs(loss_type, 6)
    kwargs["label_smoothing"] = 0.1 if loss_type != "dpo" and LOSSES[loss_type].label_smoothing else 0.0
    assert_matches(
        run(hidden, weight, labels, bias, impl=impl, **kwargs),
        reference_on(hidden, weight, labels, bias, **kwargs),
        grad_rtol=1e-5,
    )


@pytest.mark.parametrize("impl", FUSED_IMPLS)
@pytest.mark.parametrize(
    "case",
    [
        dict(pairs=2, dim=72, vocab=1000),  # V not a multiple of any block, D not a multiple of 16
        dict(pairs=1, dim=40, vocab=997),  # a single pair (degenerate group) and a prime vocabulary
        dict(pairs=3, dim=33, vocab=131, bias=True),
        # A long prompt with a single response token next to a long response.
        dict(pairs=2, dim=16, vocab=211, prompt_lens=[40, 1, 2, 30], response_lens=[1, 25, 3, 1]),
    ],
    ids=["V1000-D72", "one-pair-V997", "three-pairs-bias", "long-prompt-one-token"],
)
def test_awkward_shapes_fp32(impl, case):
    hidden, weight, labels, bias = make_batch(**case)
    assert_matches(
        run(hidden, weight, labels, bias, impl=impl, beta=2.5),
        reference_on(hidden, weight, labels, bias, beta=2.5),
        grad_rtol=1e-5,
    )


@pytest.mark.parametrize("impl", FUSED_IMPLS)
@pytest.mark.parametrize("loss_type", ["amapo", "simpo"])
def test_bf16_against_fp32_reference(impl, loss_type):
    hidden, weight, labels, bias = make_batch(pairs=3, dim=48, vocab=300, dtype=torch.bfloat16, bias=True)
    kwargs = loss_kwargs(loss_type, 6)
    actual = run(hidden, weight, labels, bias, impl=impl, **kwargs)
    assert_matches(actual, reference_on(hidden, weight, labels, bias, **kwargs), grad_rtol=2**-8, grad_dtype=torch.bfloat16)


@pytest.mark.parametrize("impl", FUSED_IMPLS)
def test_packed_layout_equals_padded(impl):
    hidden, weight, labels, _ = make_batch(pairs=2, dim=16, vocab=89)
    # Pack the same rows back to back, with their own lengths (no padding at all).
    lengths = [int((row != -100).nonzero().max()) + 1 for row in labels]
    packed_hidden = torch.cat([h[:n] for h, n in zip(hidden, lengths)])
    packed_labels = torch.cat([lab[:n] for lab, n in zip(labels, lengths)])
    cu_seqlens = torch.tensor([0] + lengths, device=DEVICE).cumsum(0)
    padded = run(hidden, weight, labels, impl=impl, beta=2.0)
    packed = run(packed_hidden, weight, packed_labels, impl=impl, beta=2.0, cu_seqlens=cu_seqlens)
    torch.testing.assert_close(packed[0], padded[0])
    torch.testing.assert_close(packed[2][1], padded[2][1])  # d_weight
    d_hidden_unpacked = torch.cat([g[:n] for g, n in zip(padded[2][0], lengths)])
    torch.testing.assert_close(packed[2][0], d_hidden_unpacked)
    reference = reference_on(packed_hidden, weight, packed_labels, beta=2.0, cu_seqlens=cu_seqlens)
    assert_matches(packed, reference, grad_rtol=1e-5)


@pytest.mark.parametrize("impl", FUSED_IMPLS + ["reference"])
def test_single_pair_has_zero_margin(impl):
    """|G| = 1: no statistics, so no margin; AMaPO is then SimPO with gamma = 0."""
    hidden, weight, labels, _ = make_batch(pairs=1, dim=16, vocab=50)
    loss, metrics, grads = run(hidden, weight, labels, impl=impl, beta=2.0)
    assert metrics["loss/margin"] == 0 and metrics["margin/zero_fraction"] == 1
    assert all(torch.isfinite(g).all() for g in grads) and torch.isfinite(loss)
    torch.testing.assert_close(loss, run(hidden, weight, labels, impl=impl, beta=2.0, loss_type="simpo")[0])


@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t.startswith("amapo")])
def test_equal_deltas_have_zero_margin(loss_type):
    """sd = 0 (every delta equal) is degenerate: margin 0 for every pair, finite loss and gradient.

    Tested on the stage itself: through a matmul, identical rows need not give bit-identical log-probs
    (BLAS rounds rows differently by position), so only the stage can pin sd to exactly 0.
    """
    pairs = 4
    chosen = torch.full((pairs,), -7.0 * 3)
    rejected = torch.full((pairs,), -9.0 * 2)
    sums = torch.cat([chosen, rejected]).requires_grad_(True)
    lengths = torch.tensor([3] * pairs + [2] * pairs)
    loss, metrics = preference_objective(sums, lengths, beta=2.0, loss_type=loss_type)
    (grad,) = torch.autograd.grad(loss, sums)
    assert metrics["loss/margin"] == 0 and metrics["margin/zero_fraction"] == 1
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, -torch.nn.functional.logsigmoid(torch.tensor(2.0 * (-7.0 + 9.0))))


@pytest.mark.parametrize("impl", FUSED_IMPLS)
def test_extreme_finite_inputs_stay_finite(impl):
    """Huge hidden states give near-one-hot softmaxes and huge margins: nothing may overflow."""
    hidden, weight, labels, bias = make_batch(pairs=4, dim=16, vocab=64, bias=True)
    hidden = hidden * 1e3
    loss, metrics, grads = run(hidden, weight, labels, bias, impl=impl, beta=10.0)
    assert torch.isfinite(loss)
    assert all(torch.isfinite(v) for v in metrics.values())
    assert all(torch.isfinite(g).all() for g in grads)


def test_margin_follows_spec_formula():
    """The AMaPO margin, recomputed by hand from the per-sequence mean log-probs."""
    hidden, weight, labels, _ = make_batch(pairs=5, dim=16, vocab=60)
    beta = 1.5
    sums, counts = sequence_logps(hidden.double(), weight.double(), labels, impl="reference")
    scores = sums / counts
    delta = scores[:5] - scores[5:]
    mu, sd = delta.mean(), delta.std()
    margin = torch.where(delta < mu, beta * torch.exp(mu * (mu - delta) / sd), torch.zeros_like(delta))
    z = beta * delta - margin
    expected = -torch.nn.functional.logsigmoid(z).mean()
    loss, metrics, _ = run(hidden.double(), weight.double(), labels, impl="chunked", beta=beta)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(metrics["loss/margin"], margin.mean().float())
    torch.testing.assert_close(metrics["rewards/batch_margin_mean"], (beta * mu).float())
    torch.testing.assert_close(metrics["margin/accuracies"], (delta > mu).float().mean())


def test_simpo_matches_liger():
    """SimPO against liger-kernel's fused SimPO: an independent implementation nobody here wrote."""
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    hidden, weight, labels, bias = make_batch(pairs=3, dim=32, vocab=128, bias=True)
    beta, ratio, smoothing = 2.0, 0.5, 0.1
    ours = run(
        hidden, weight, labels, bias, impl="chunked", beta=beta, loss_type="simpo",
        gamma_beta_ratio=ratio, label_smoothing=smoothing,
    )
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    liger_loss_fn = liger.LigerFusedLinearSimPOLoss(
        beta=beta, gamma=beta * ratio, label_smoothing=smoothing, compute_nll_loss=False, compiled=False
    )
    output = liger_loss_fn(leaves[1], leaves[0], labels, leaves[2])
    liger_loss = output[0] if isinstance(output, tuple) else output
    liger_grads = torch.autograd.grad(liger_loss, leaves)
    torch.testing.assert_close(ours[0], liger_loss.detach(), rtol=1e-5, atol=1e-6)
    for grad, liger_grad in zip(ours[2], liger_grads):
        torch.testing.assert_close(grad, liger_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["simpo", "dpo"])
def test_float64_gradcheck_chunked(loss_type):
    """Finite differences of the chunked path (the AMaPO margin is detached by design, so gradcheck
    runs on the loss types without a stop-gradient; AMaPO's gradient is checked against autograd
    through the reference above)."""
    hidden, weight, labels, bias = make_batch(pairs=2, dim=6, vocab=11, dtype=torch.float64, bias=True)
    kwargs = loss_kwargs(loss_type, 4)
    kwargs["label_smoothing"] = 0.2

    def loss_of(h, w, b):
        return linear_preference_loss(h, w, labels, bias=b, impl="chunked", **kwargs)[0]

    inputs = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    assert torch.autograd.gradcheck(loss_of, inputs)


@pytest.mark.parametrize("impl", FUSED_IMPLS + ["reference"])
def test_sequence_logps_matches_reference(impl):
    hidden, weight, labels, bias = make_batch(pairs=2, dim=20, vocab=77, bias=True)
    sums, counts = sequence_logps(hidden, weight, labels, bias=bias, impl=impl)
    ref_sums, ref_counts = sequence_logps(hidden.double(), weight.double(), labels, bias=bias.double(), impl="reference")
    torch.testing.assert_close(sums.double(), ref_sums, rtol=1e-5, atol=1e-5)
    assert torch.equal(counts, ref_counts)


def test_head_module_shares_lm_head():
    hidden, weight, labels, _ = make_batch(pairs=2, dim=12, vocab=40)
    lm_head = torch.nn.Linear(12, 40, bias=False)
    with torch.no_grad():
        lm_head.weight.copy_(weight)
    head = LinearPreferenceHead(lm_head, beta=2.0, impl="chunked")
    assert head.weight is lm_head.weight
    loss, _ = head(hidden, labels)
    loss.backward()
    expected = run(hidden, weight, labels, impl="reference", beta=2.0)[2][1]
    torch.testing.assert_close(lm_head.weight.grad, expected)
    sums, counts = head(hidden, labels, sequence_logps=True)
    ref_sums, ref_counts = sequence_logps(hidden, weight, labels, impl="reference")
    torch.testing.assert_close(sums, ref_sums)
    assert torch.equal(counts, ref_counts)


def test_second_backward_says_unsupported():
    hidden, weight, labels, _ = make_batch(pairs=2, dim=8, vocab=30)
    hidden.requires_grad_(True)
    loss, _ = linear_preference_loss(hidden, weight, labels, beta=2.0, impl="chunked")
    with pytest.raises(RuntimeError, match="second-order gradients"):
        torch.autograd.grad(loss, hidden, create_graph=True)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda h, w, y, kw: (h[:3], w, y[:3], kw), "even"),
        (lambda h, w, y, kw: (h, w[:, :-1], y, kw), "last dim"),
        (lambda h, w, y, kw: (h.double(), w, y, kw), "dtype"),
        (lambda h, w, y, kw: (h, w, y.float(), kw), "labels must be int"),
        (lambda h, w, y, kw: (h, w, y[:, :-1], kw), "labels has shape"),
        (lambda h, w, y, kw: (h, w, y.masked_fill(y >= 0, 30), kw), "outside \\[0, 30\\)"),
        (lambda h, w, y, kw: (h, w, y.to("meta"), kw), "labels is on meta"),
        (lambda h, w, y, kw: (h, w, y, {**kw, "loss_type": "dpo"}), "ref_logps"),
        (lambda h, w, y, kw: (h, w, y, {**kw, "loss_type": "rpo"}), "loss_type='rpo'"),
        (lambda h, w, y, kw: (h, w, y, {**kw, "impl": "cuda"}), "impl='cuda'"),
        (lambda h, w, y, kw: (h, w, y, {**kw, "beta": -1.0}), "beta"),
        (lambda h, w, y, kw: (h, w, y, {**kw, "stats_scope": "world"}), "stats_scope"),
    ],
    ids=["odd-rows", "hidden-dim", "dtype", "label-dtype", "label-shape", "label-range", "device",
         "dpo-without-ref", "loss-type", "impl", "beta", "scope"],
)
def test_bad_input_errors_name_the_tensor(mutate, message):
    hidden, weight, labels, _ = make_batch(pairs=2, dim=8, vocab=30)
    hidden, weight, labels, kwargs = mutate(hidden, weight, labels, dict(beta=2.0))
    with pytest.raises(ValueError, match=message):
        linear_preference_loss(hidden, weight, labels, **kwargs)


def test_row_without_response_is_named():
    hidden, weight, labels, _ = make_batch(pairs=2, dim=8, vocab=30)
    labels[2] = -100
    with pytest.raises(ValueError, match=r"row\(s\) \[2\]"):
        linear_preference_loss(hidden, weight, labels, beta=2.0)


@pytest.mark.parametrize("impl", FUSED_IMPLS)
def test_two_identical_calls_are_bit_identical(impl):
    """No atomics anywhere on the fused paths (kernels, GEMMs, sequence sums, the hidden-gradient scatter):
    on a GPU, where atomics would reorder fp32 sums between runs, this is the reproducibility check."""
    hidden, weight, labels, bias = make_batch(pairs=3, dim=40, vocab=300, dtype=torch.bfloat16, bias=True)
    first = run(hidden, weight, labels, bias, impl=impl, beta=2.0)
    second = run(hidden, weight, labels, bias, impl=impl, beta=2.0)
    assert torch.equal(first[0], second[0])
    for key in METRIC_KEYS:
        assert torch.equal(first[1][key], second[1][key]), key
    for a, b in zip(first[2], second[2]):
        assert torch.equal(a, b)
