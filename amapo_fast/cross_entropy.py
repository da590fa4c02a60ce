"""Cross-entropy straight from hidden states: the fused head of supervised fine-tuning (SFT).

The preference loss's two passes serve cross-entropy unchanged, so no [N, V] logits are made here either:
  pass 1  each labelled token's log-sum-exp and target log-prob (its loss is -logp);
  pass 2  (backward) dH, dW and d bias of sum_t coef_t * logp_t, i.e. dlogits = coef * (onehot - softmax),
          with coef_t = -dL/dloss_t: -g/n for the mean over n tokens, -g for the sum, each token's own
          incoming gradient for reduction="none".
With a frozen head (neither weight nor bias needs a gradient) pass 1 also forms the hidden-state gradient
basis and pass 2 needs no second walk over the vocabulary (see frozen_head.py).
"""
import torch
from torch import nn
from torch.nn import functional as F

from . import frozen_head
from .loss import _backend, _resolve_impl, _validate_head, check_labels, head_grads
from .reference import _logits as reference_logits

REDUCTIONS = ("mean", "sum", "none")
SFT_METRIC_KEYS = ("mean_token_accuracy", "entropy")  # TRL's SFTTrainer logs these names


class _FusedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, positions, targets, reduction, backend, frozen):
        flat = hidden.reshape(-1, hidden.shape[-1])
        response = flat.index_select(0, positions)
        if frozen:
            pass1, basis = frozen_head.token_logprobs_and_basis(response, weight, bias, targets)
        else:
            pass1, basis = backend.token_logprobs(response, weight, bias, targets), None
        token_loss = -pass1.logp
        # As through the materialised logits, a non-finite value anywhere in hidden makes the loss NaN.
        poison = torch.where(torch.isfinite(hidden).all(), 0.0, float("nan"))
        if reduction == "none":
            loss = token_loss.new_zeros(flat.shape[0]).index_copy_(0, positions, token_loss + poison)
            loss = loss.reshape(hidden.shape[:-1])
        else:
            loss = token_loss.sum() + poison
            if reduction == "mean":
                loss = loss / positions.numel()
        stats = torch.stack([pass1.argmax_hit.sum(), pass1.entropy.sum()]).float() + poison
        ctx.mark_non_differentiable(stats)
        ctx.save_for_backward(response, weight, bias, targets, positions, pass1.lse, basis)
        ctx.reduction, ctx.backend, ctx.frozen, ctx.hidden_shape = reduction, backend, frozen, hidden.shape
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        if torch.is_grad_enabled():  # autograd runs backward in grad mode only for create_graph=True
            raise RuntimeError(
                "linear_cross_entropy: second-order gradients (create_graph=True) are not supported by the fused "
                "implementations; use impl='reference' for double backward"
            )
        response, weight, bias, targets, positions, lse, basis = ctx.saved_tensors
        acc = lse.dtype
        if ctx.reduction == "none":
            coef = -grad_loss.reshape(-1).index_select(0, positions).to(acc)
        else:
            scale = 1.0 / positions.numel() if ctx.reduction == "mean" else 1.0
            coef = (-scale * grad_loss.to(acc)).expand(positions.numel())
        d_response, d_weight, d_bias = head_grads(
            ctx.backend, ctx.frozen, response, weight, bias, targets, lse, basis, coef.contiguous()
        )
        d_hidden = None
        if ctx.needs_input_grad[0]:
            d_hidden = d_response.new_zeros(ctx.hidden_shape.numel() // ctx.hidden_shape[-1], d_response.shape[1])
            d_hidden.index_copy_(0, positions, d_response)
            d_hidden = d_hidden.reshape(ctx.hidden_shape)
        return (
            d_hidden,
            d_weight if ctx.needs_input_grad[1] else None,
            d_bias if ctx.needs_input_grad[2] else None,
            None,
            None,
            None,
            None,
            None,
        )


def _validate(hidden, weight, labels, bias, ignore_index, reduction):
    _validate_head(hidden, weight, bias)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: expected one of {', '.join(REDUCTIONS)}")
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be [..., D] with at least one token dimension, got {tuple(hidden.shape)}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 or int32, got {labels.dtype}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels has shape {tuple(labels.shape)}, expected hidden's {tuple(hidden.shape[:-1])}")
    if labels.device != hidden.device:
        raise ValueError(f"labels is on {labels.device}, hidden is on {hidden.device}")
    check_labels(labels, weight.shape[0], ignore_index)


def _cross_entropy(hidden, weight, labels, bias, ignore_index, reduction, impl):
    """(loss, stats [correct-token count, entropy sum] or None for the reference, number of labelled tokens)."""
    _validate(hidden, weight, labels, bias, ignore_index, reduction)
    flat_labels = labels.reshape(-1)
    positions = (flat_labels != ignore_index).nonzero().squeeze(1)
    if positions.numel() == 0 and reduction == "mean":
        raise ValueError(
            f"labels: every label is ignore_index={ignore_index}, so the mean over labelled tokens is undefined "
            "(reduction='sum' gives 0 for such a batch)"
        )
    impl = _resolve_impl(impl, hidden.device)
    if impl == "reference":
        logits = reference_logits(hidden.reshape(-1, hidden.shape[-1]), weight, bias)
        loss = F.cross_entropy(logits, flat_labels.long(), ignore_index=ignore_index, reduction=reduction)
        return (loss.reshape(labels.shape) if reduction == "none" else loss), None, positions.numel()
    if positions.numel() == 0:  # nothing to compute: a zero that still carries gradients (of zeros)
        zero = (hidden.sum() + weight.sum()) * 0.0
        loss = zero.expand(labels.shape).to(torch.promote_types(hidden.dtype, torch.float32))
        return (loss if reduction == "none" else loss.sum()), torch.zeros(2, device=hidden.device), 0
    targets = flat_labels[positions].long()
    loss, stats = _FusedCrossEntropy.apply(
        hidden, weight, bias, positions, targets, reduction, _backend(impl), frozen_head.applies(hidden, weight, bias)
    )
    return loss, stats, positions.numel()


def linear_cross_entropy(hidden, weight, labels, bias=None, ignore_index=-100, reduction="mean", impl="auto"):
    """Cross-entropy of softmax(hidden @ weight.T + bias) against labels, without materialising the logits.

    hidden [..., D], labels [...] (already shifted: labels[i] is predicted from hidden[i]), weight [V, D],
    bias [V] or None. Equal to `F.cross_entropy(hidden @ weight.T + bias, labels, ignore_index=...,
    reduction=...)` on logits upcast to fp32, gradients included. reduction "mean" averages over the labelled
    tokens (an error when every label is ignore_index), "sum" adds them, "none" returns labels' shape with 0
    at ignored positions. The loss is fp32 (float64 for float64 inputs); gradients come in the inputs' dtype.
    impl: as in `linear_preference_loss` (auto, triton, chunked, reference).
    """
    loss, _, _ = _cross_entropy(hidden, weight, labels, bias, ignore_index, reduction, impl)
    return loss


class LinearCrossEntropyHead(nn.Module):
    """The lm_head as a token-mean cross-entropy module (SFT's counterpart of `LinearPreferenceHead`).

    `head(hidden, labels) -> (loss, metrics)`: the mean loss over labelled tokens and, detached in fp32,
    `mean_token_accuracy` (the share of labelled tokens whose target has the largest logit) and `entropy`
    (the mean entropy of the predicted distribution). Called as a module, so FSDP2 and ZeRO-3 gather the weight.
    """

    def __init__(self, lm_head: nn.Linear, ignore_index=-100, impl="auto"):
        super().__init__()
        self.weight, self.bias = lm_head.weight, lm_head.bias
        self.ignore_index, self.impl = ignore_index, impl

    def forward(self, hidden, labels):
        loss, stats, count = _cross_entropy(hidden, self.weight, labels, self.bias, self.ignore_index, "mean", self.impl)
        if stats is None:  # the reference: metrics from the logits it has anyway
            with torch.no_grad():
                logits = reference_logits(hidden.reshape(-1, hidden.shape[-1]), self.weight, self.bias)
                mask = labels.reshape(-1) != self.ignore_index
                logits, targets = logits[mask], labels.reshape(-1)[mask].long()
                hit = logits.gather(1, targets[:, None]).squeeze(1) >= logits.amax(1)
                entropy = -(logits.log_softmax(1).exp() * logits.log_softmax(1)).sum(1)
                stats = torch.stack([hit.sum().to(entropy.dtype), entropy.sum()])
        stats = stats.float() / max(count, 1)
        return loss, dict(zip(SFT_METRIC_KEYS, stats.unbind()))
