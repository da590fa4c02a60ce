"""Pass 1's variants against float64 torch on the same inputs (CPU: through Triton's interpreter).

Both forwards (`triton`: logit tiles reduced in one kernel; `cublas`: a GEMM per vocabulary chunk into a
bounded fp32 scratch, then a row reduction), each lean (log-sum-exp only) and with the token metrics.
The log-prob never depends on the metrics switch: its target logit is a gather-dot outside the sweep.
Tolerances are fp32's for every dtype: 16-bit products are exact in fp32 and every sum is fp32.
"""
import pytest
import torch

from amapo_fast import linear_preference_loss
from amapo_fast.kernels import forward, lse_forward, row_reduce

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_REL = 1e-5


def make_inputs(num_tokens, vocab, dim, dtype, with_bias):
    hidden = torch.randn(num_tokens, dim, device=DEVICE).to(dtype)
    weight = (torch.randn(vocab, dim, device=DEVICE) * 3 / dim**0.5).to(dtype)  # logits of std ~3
    bias = torch.randn(vocab, device=DEVICE).to(dtype) if with_bias else None
    targets = torch.randint(0, vocab, (num_tokens,), device=DEVICE)
    targets[0] = vocab - 1  # in the partial last tile / chunk
    # A token whose target lies just past a chunk boundary, where an earlier chunk's masked tail columns carry
    # its id (the cuBLAS variant's 300-column chunks are swept in blocks that overrun them), made its argmax.
    if vocab > 700 and num_tokens > 2:
        targets[-2] = 650
        weight[650] = (hidden[-2].float() * 15 / hidden[-2].float().square().sum()).to(dtype)  # logit ~15, others ~3
    # A token whose target is its argmax, so the target-is-argmax flag is exercised both ways.
    logits = hidden.double() @ weight.double().T + (0 if bias is None else bias.double())
    targets[-1] = logits[-1].argmax()
    return hidden, weight, bias, targets


def exact(hidden, weight, bias, targets):
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits += bias.double()
    lse = torch.logsumexp(logits, dim=1)
    return {
        "logp": logits.gather(1, targets[:, None]).squeeze(1) - lse,
        "lse": lse,
        "mean_logit": logits.mean(1),
        "entropy": lse - (torch.softmax(logits, dim=1) * logits).sum(1),
        "argmax_hit": (logits.argmax(1) == targets).double(),
    }


def run_variant(variant, hidden, weight, bias, targets, token_metrics):
    if variant == "triton":
        # Several vocabulary splits: the partials of more than one split are merged.
        return lse_forward.token_logprobs(hidden, weight, bias, targets, num_splits=3, token_metrics=token_metrics)
    # Chunks of 300 columns: not a whole number of reduction blocks, several chunks.
    return row_reduce.token_logprobs(hidden, weight, bias, targets, token_metrics=token_metrics, columns=300)


def test_variants_are_listed_and_selected(monkeypatch):
    assert forward.forward_variants() == ("triton", "cublas")
    monkeypatch.delenv(forward.ENVIRONMENT_VARIABLE, raising=False)
    assert forward.selected_variant() == "triton"
    monkeypatch.setenv(forward.ENVIRONMENT_VARIABLE, "cublas")
    assert forward.selected_variant() == "cublas"
    monkeypatch.setenv(forward.ENVIRONMENT_VARIABLE, "cutlass")
    with pytest.raises(ValueError, match="AMAPO_FORWARD='cutlass'"):
        forward.selected_variant()


# V=997: not a multiple of any block; N=1: one token; N=37 with D=100: partial token and D blocks.
@pytest.mark.parametrize("variant", ["triton", "cublas"])
@pytest.mark.parametrize(
    "num_tokens, vocab, dim, dtype, with_bias",
    [(37, 997, 100, torch.float32, True), (1, 997, 72, torch.bfloat16, False), (37, 1000, 72, torch.bfloat16, True)],
)
def test_matches_float64_with_and_without_metrics(variant, num_tokens, vocab, dim, dtype, with_bias):
    hidden, weight, bias, targets = make_inputs(num_tokens, vocab, dim, dtype, with_bias)
    expected = exact(hidden, weight, bias, targets)
    full = run_variant(variant, hidden, weight, bias, targets, token_metrics=True)
    for name, value in expected.items():
        actual = getattr(full, name)
        assert actual.dtype == torch.float32 and actual.shape == (num_tokens,), name
        torch.testing.assert_close(actual.double(), value, rtol=FP32_REL, atol=FP32_REL, msg=name)
    lean = run_variant(variant, hidden, weight, bias, targets, token_metrics=False)
    assert lean.mean_logit is None and lean.entropy is None and lean.argmax_hit is None
    # Same target logit (the gather-dot) and the same sweep: the log-prob does not depend on the switch.
    torch.testing.assert_close(lean.logp, full.logp, rtol=0, atol=0)
    torch.testing.assert_close(lean.lse, full.lse, rtol=0, atol=0)


def test_dispatch_runs_the_named_variant(monkeypatch):
    hidden, weight, bias, targets = make_inputs(5, 300, 40, torch.float32, False)
    expected = exact(hidden, weight, bias, targets)
    for variant in forward.forward_variants():
        monkeypatch.setenv(forward.ENVIRONMENT_VARIABLE, variant)
        result = forward.token_logprobs(hidden, weight, bias, targets, token_metrics=False)
        torch.testing.assert_close(result.logp.double(), expected["logp"], rtol=FP32_REL, atol=FP32_REL)


@pytest.mark.parametrize("variant", ["triton", "cublas"])
def test_loss_metrics_unchanged_and_switchable(monkeypatch, variant):
    """One pair whose rows have a single response token each: the loss, its gradients and every metric
    against the reference; with token_metrics=False the same loss without the token-level metrics."""
    monkeypatch.setenv(forward.ENVIRONMENT_VARIABLE, variant)
    vocab, dim = 300, 40
    hidden = torch.randn(2, 3, dim, device=DEVICE)
    weight = (torch.randn(vocab, dim, device=DEVICE) * 3 / dim**0.5).requires_grad_()
    labels = torch.full((2, 3), -100, device=DEVICE)
    labels[0, 1], labels[1, 2] = 7, vocab - 1

    def call(impl, token_metrics=True):
        h = hidden.clone().requires_grad_()
        w = weight.detach().clone().requires_grad_()
        loss, metrics = linear_preference_loss(h, w, labels, beta=2.0, impl=impl, token_metrics=token_metrics)
        loss.backward()
        return loss, metrics, h.grad, w.grad

    ref_loss, ref_metrics, ref_dh, ref_dw = call("reference")
    loss, metrics, dh, dw = call("triton")
    torch.testing.assert_close(loss, ref_loss, rtol=FP32_REL, atol=FP32_REL)
    assert list(metrics) == list(ref_metrics)
    for key, value in ref_metrics.items():
        torch.testing.assert_close(metrics[key].double(), value.double(), rtol=FP32_REL, atol=FP32_REL, msg=key)
    torch.testing.assert_close(dh, ref_dh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dw, ref_dw, rtol=1e-4, atol=1e-6)

    lean_loss, lean_metrics, lean_dh, lean_dw = call("triton", token_metrics=False)
    ref_lean = call("reference", token_metrics=False)[1]
    assert list(lean_metrics) == list(ref_lean) and "entropy" not in lean_metrics
    assert torch.equal(lean_loss, loss) and torch.equal(lean_dh, dh) and torch.equal(lean_dw, dw)
    for key in lean_metrics:
        assert torch.equal(lean_metrics[key], metrics[key]), key
