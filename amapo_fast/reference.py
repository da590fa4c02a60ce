"""The reference: the loss computed the obvious way, materialising the [tokens x vocab] logits.

This is the oracle every fused path is tested against and the code to read to learn the method. It
mirrors what TRL-style trainers do: the lm_head runs on every position (prompt and padding included),
the logits are upcast to fp32, log_softmax, gather the label, mask, sum per sequence.
"""
import torch

from .objective import preference_objective, token_metrics


def _logits(hidden, weight, bias):
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    # Upcast like TRL does (fp32; float64 inputs stay float64).
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def token_logprobs_reference(hidden, weight, labels, bias=None, ignore_index=-100):
    """Per-position log-prob of the label, 0 where the label is ignore_index; and the response mask."""
    logprobs = torch.log_softmax(_logits(hidden, weight, bias), dim=-1)
    mask = labels != ignore_index
    safe_labels = torch.where(mask, labels, torch.zeros_like(labels))
    token_logps = torch.gather(logprobs, -1, safe_labels.unsqueeze(-1)).squeeze(-1)
    return token_logps * mask, mask


def _row_sums(values, mask, cu_seqlens):
    """Per-row sums of values over response positions: [S, T] rows, or packed [N] with boundaries."""
    values = values * mask
    if cu_seqlens is None:  # padded layout [S, T]
        return values.sum(-1)
    # Packed layout [N]: segment sums over the sequence boundaries.
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq_ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=values.device), lengths)
    return values.new_zeros(lengths.numel()).index_add(0, seq_ids, values)


def reference_sequence_logps(hidden, weight, labels, *, bias=None, ignore_index=-100, cu_seqlens=None):
    """Per-row summed response log-probs [S] (fp32) and response-token counts [S]."""
    token_logps, mask = token_logprobs_reference(hidden, weight, labels, bias, ignore_index)
    return _row_sums(token_logps, mask, cu_seqlens), _row_sums(mask.long(), mask, cu_seqlens)


@torch.no_grad()
def reference_token_metrics(hidden, weight, labels, *, bias=None, ignore_index=-100, cu_seqlens=None):
    """The token-level metrics (mean logit, entropy, target-is-argmax) from the full logits."""
    logits = _logits(hidden, weight, bias)
    mask = labels != ignore_index
    safe_labels = torch.where(mask, labels, torch.zeros_like(labels))
    entropy = torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    target_logit = torch.gather(logits, -1, safe_labels.unsqueeze(-1)).squeeze(-1)
    argmax_hit = (target_logit >= logits.amax(-1)).to(logits.dtype)
    sums = [_row_sums(value, mask, cu_seqlens) for value in (logits.mean(-1), entropy, argmax_hit)]
    return token_metrics(*sums, _row_sums(mask.long(), mask, cu_seqlens))


def reference_preference_loss(
    hidden,
    weight,
    labels,
    *,
    beta,
    loss_type="amapo",
    bias=None,
    label_smoothing=0.0,
    gamma_beta_ratio=0.0,
    ref_logps=None,
    ignore_index=-100,
    stats_scope="global",
    cu_seqlens=None,
    **loss_params,
):
    """Same contract as `linear_preference_loss`, by plain autograd through the full logits."""
    sums, counts = reference_sequence_logps(
        hidden, weight, labels, bias=bias, ignore_index=ignore_index, cu_seqlens=cu_seqlens
    )
    loss, metrics = preference_objective(
        sums,
        counts,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        gamma_beta_ratio=gamma_beta_ratio,
        ref_logps=ref_logps,
        stats_scope=stats_scope,
        **loss_params,
    )
    metrics.update(
        reference_token_metrics(hidden, weight, labels, bias=bias, ignore_index=ignore_index, cu_seqlens=cu_seqlens)
    )
    return loss, metrics
