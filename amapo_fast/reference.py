"""The reference: the loss computed the obvious way, materialising the [tokens x vocab] logits.

This is the oracle every fused path is tested against and the code to read to learn the method. It
mirrors what TRL-style trainers do: the lm_head runs on every position (prompt and padding included),
the logits are upcast to fp32, log_softmax, gather the label, mask, sum per sequence.
"""
import torch

from .objective import preference_objective


def token_logprobs_reference(hidden, weight, labels, bias=None, ignore_index=-100):
    """Per-position log-prob of the label, 0 where the label is ignore_index; and the response mask."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    # Upcast like TRL does (fp32; float64 inputs stay float64).
    logprobs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    mask = labels != ignore_index
    safe_labels = torch.where(mask, labels, torch.zeros_like(labels))
    token_logps = torch.gather(logprobs, -1, safe_labels.unsqueeze(-1)).squeeze(-1)
    return token_logps * mask, mask


def reference_sequence_logps(hidden, weight, labels, *, bias=None, ignore_index=-100, cu_seqlens=None):
    """Per-row summed response log-probs [S] (fp32) and response-token counts [S]."""
    token_logps, mask = token_logprobs_reference(hidden, weight, labels, bias, ignore_index)
    if cu_seqlens is None:  # padded layout [S, T, D]
        return token_logps.sum(-1), mask.sum(-1)
    # Packed layout [N, D]: segment sums over the sequence boundaries.
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq_ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=labels.device), lengths)
    sums = token_logps.new_zeros(lengths.numel()).index_add(0, seq_ids, token_logps)
    counts = torch.zeros_like(lengths).index_add(0, seq_ids, mask.long())
    return sums, counts


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
):
    """Same contract as `linear_preference_loss`, by plain autograd through the full logits."""
    sums, counts = reference_sequence_logps(
        hidden, weight, labels, bias=bias, ignore_index=ignore_index, cu_seqlens=cu_seqlens
    )
    return preference_objective(
        sums,
        counts,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        gamma_beta_ratio=gamma_beta_ratio,
        ref_logps=ref_logps,
        stats_scope=stats_scope,
    )
