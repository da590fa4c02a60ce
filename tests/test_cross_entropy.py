"""linear_cross_entropy against torch.nn.functional.cross_entropy on the materialised logits.

Fresh random inputs every test. fp32 and float64 inputs: ~1e-5 relative to the float64 computation on the
same values (float64 runs the chunked twin exactly). bf16 inputs: the loss to ~1e-5 of the float64 result on
the upcast values (the logits come from exact bf16 products accumulated in fp32); the bf16 gradients within
2^-8 relative plus 2^-8 of the largest entry, as in test_loss.py.
"""
import math

import pytest
import torch
from torch.nn import functional as F

from amapo_fast import LinearCrossEntropyHead, linear_cross_entropy
from conftest import DEVICE
from test_chunked import small_chunks  # noqa: F401  (a fixture)

FUSED_IMPLS = ["chunked", "triton"]


def make_inputs(shape, dim, vocab, dtype=torch.float32, bias=False, ignored=0.3):
    labels = torch.randint(0, vocab, shape)
    labels[torch.rand(shape) < ignored] = -100
    hidden = torch.randn(*shape, dim, dtype=torch.float64)
    weight = torch.randn(vocab, dim, dtype=torch.float64) * (3.0 / math.sqrt(dim))  # peaked softmaxes
    bias_t = torch.randn(vocab, dtype=torch.float64) if bias else None
    cast = lambda t: None if t is None else t.to(dtype).to(DEVICE)  # noqa: E731
    return cast(hidden), cast(weight), labels.to(DEVICE), cast(bias_t)


def loss_and_grads(fn, hidden, weight, labels, bias, reduction, frozen=False, upcast=False):
    """(loss, grads) of one call on fresh leaves; reduction 'none' is reduced against a random upstream gradient."""
    prep = (lambda t: t.double()) if upcast else (lambda t: t)
    leaves = [prep(hidden).detach().clone().requires_grad_(True), prep(weight).detach().clone().requires_grad_(not frozen)]
    if bias is not None:
        leaves.append(prep(bias).detach().clone().requires_grad_(not frozen))
    loss = fn(leaves[0], leaves[1], labels, leaves[2] if bias is not None else None, reduction)
    return loss.detach(), torch.autograd.grad(loss, [t for t in leaves if t.requires_grad], loss_weights(loss))


_UPSTREAM = {}


def loss_weights(loss):
    """One random upstream gradient per shape, the same for the fused call and the reference."""
    key = tuple(loss.shape)
    if key not in _UPSTREAM:
        _UPSTREAM[key] = torch.rand(key, dtype=torch.float64, device=loss.device) + 0.5
    return _UPSTREAM[key].to(loss.dtype)


def fused(impl):
    return lambda h, w, y, b, r: linear_cross_entropy(h, w, y, bias=b, reduction=r, impl=impl)


def torch_cross_entropy(h, w, y, b, r):
    logits = h @ w.T + (0 if b is None else b)
    loss = F.cross_entropy(logits.reshape(-1, w.shape[0]), y.reshape(-1), reduction=r)
    return loss.reshape(y.shape) if r == "none" else loss


def check(hidden, weight, labels, bias, impl, reduction, frozen=False, grad_rtol=1e-5):
    _UPSTREAM.clear()
    loss, grads = loss_and_grads(fused(impl), hidden, weight, labels, bias, reduction, frozen)
    ref_loss, ref_grads = loss_and_grads(torch_cross_entropy, hidden, weight, labels, bias, reduction, frozen, upcast=True)
    assert loss.dtype == torch.promote_types(hidden.dtype, torch.float32) and loss.shape == ref_loss.shape
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    assert len(grads) == len(ref_grads) == (1 if frozen else 2 + (bias is not None))
    for grad, ref in zip(grads, ref_grads):
        assert grad.dtype == hidden.dtype
        torch.testing.assert_close(grad.double(), ref, rtol=grad_rtol, atol=grad_rtol * ref.abs().max().item())


@pytest.mark.parametrize("impl", FUSED_IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_fp32(impl, reduction):
    check(*make_inputs((3, 7), dim=24, vocab=300, bias=True), impl, reduction)  # V=300: a partial vocabulary tile


@pytest.mark.parametrize("impl", FUSED_IMPLS)
def test_bf16_against_float64(impl):
    check(*make_inputs((2, 9), dim=48, vocab=257, dtype=torch.bfloat16, bias=True), impl, "mean", grad_rtol=2**-8)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("frozen", [False, True], ids=["trained-head", "frozen-head"])
def test_float64_exact(reduction, frozen):
    check(*make_inputs((4, 5), dim=16, vocab=131, dtype=torch.float64), "chunked", reduction, frozen=frozen, grad_rtol=1e-10)


@pytest.mark.parametrize(
    "shape, dim, vocab, ignored",
    [((1,), 8, 5, 0.0), ((1, 1), 72, 997, 0.0), ((37,), 33, 1000, 0.9)],
    ids=["one-token-V5", "one-token-D72-V997", "mostly-ignored-V1000"],
)
def test_awkward_shapes(shape, dim, vocab, ignored):
    hidden, weight, labels, bias = make_inputs(shape, dim, vocab, ignored=ignored)
    labels.view(-1)[0] = 1  # at least one labelled token
    check(hidden, weight, labels, bias, "chunked", "mean")


def test_every_label_ignored():
    hidden, weight, labels, _ = make_inputs((2, 3), dim=8, vocab=11, ignored=1.0)
    with pytest.raises(ValueError, match="every label is ignore_index=-100"):
        linear_cross_entropy(hidden, weight, labels)
    hidden.requires_grad_(True)
    total = linear_cross_entropy(hidden, weight, labels, reduction="sum")
    assert total.item() == 0.0
    (grad,) = torch.autograd.grad(total, hidden)
    assert torch.equal(grad, torch.zeros_like(hidden))
    assert torch.equal(linear_cross_entropy(hidden, weight, labels, reduction="none"), torch.zeros(2, 3))


def test_custom_ignore_index():
    hidden, weight, labels, _ = make_inputs((3, 4), dim=8, vocab=20, ignored=0.0)
    labels[0, :2] = 7
    expected = F.cross_entropy(hidden.double().reshape(-1, 8) @ weight.double().T, labels.reshape(-1), ignore_index=7)
    torch.testing.assert_close(linear_cross_entropy(hidden, weight, labels, ignore_index=7).double(), expected)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda h, w, y: (h, w, y[:, :-1]), "labels has shape"),
        (lambda h, w, y: (h, w, y.float()), "labels must be int64 or int32"),
        (lambda h, w, y: (h, w, y.masked_fill(y == y.view(-1)[0], 99)), "labels contain 99"),
        (lambda h, w, y: (h, w[:, :-1], y), "hidden's last dim"),
    ],
    ids=["label-shape", "label-dtype", "label-range", "weight-shape"],
)
def test_bad_inputs_are_named(mutate, message):
    hidden, weight, labels, _ = make_inputs((2, 3), dim=8, vocab=11, ignored=0.0)
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(*mutate(hidden, weight, labels))


def test_head_metrics_match_the_logits():
    hidden, weight, labels, _ = make_inputs((3, 6), dim=16, vocab=40, dtype=torch.float64)
    lm_head = torch.nn.Linear(16, 40, bias=False, dtype=torch.float64)
    lm_head.weight.data.copy_(weight)
    loss, metrics = LinearCrossEntropyHead(lm_head)(hidden, labels)
    ref_loss, ref_metrics = LinearCrossEntropyHead(lm_head, impl="reference")(hidden, labels)
    torch.testing.assert_close(loss, ref_loss)
    logits = (hidden @ weight.T)[labels != -100]
    targets = labels[labels != -100]
    accuracy = (logits.argmax(1) == targets).double().mean()
    entropy = torch.distributions.Categorical(logits=logits).entropy().mean()
    for values in (metrics, ref_metrics):
        torch.testing.assert_close(values["mean_token_accuracy"].double(), accuracy, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(values["entropy"].double(), entropy, rtol=1e-6, atol=1e-6)


def test_second_backward_says_unsupported():
    hidden, weight, labels, _ = make_inputs((2, 3), dim=8, vocab=11, ignored=0.0)
    hidden.requires_grad_(True)
    loss = linear_cross_entropy(hidden, weight, labels)
    with pytest.raises(RuntimeError, match="second-order gradients"):
        torch.autograd.grad(loss, hidden, create_graph=True)


@pytest.mark.parametrize("frozen", [False, True], ids=["trained-head", "frozen-head"])
def test_several_chunks(small_chunks, frozen):
    """3 tokens per pass-1 chunk and 16 vocabulary columns per pass-2 (or frozen-head) chunk: 97 columns are 7."""
    check(*make_inputs((4, 6), dim=12, vocab=97, bias=True), "chunked", "mean", frozen=frozen)
