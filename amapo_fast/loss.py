"""The public entry point: hidden states + lm_head weight + labels -> preference loss and metrics.

The fused implementations (Triton kernels on GPU, the chunked PyTorch twin anywhere) run as one
`torch.autograd.Function`:
  pass 1  token log-probs of the response tokens only (prompt and padding never enter a matmul),
  stage   per-sequence sums -> statistics, margin, loss, metrics (`objective.py`, B-sized); autograd on
          this tiny stage gives dL/d(sequence sum), i.e. one gradient coefficient per token,
  pass 2  (backward) recompute each logit tile and form dH, dW, d bias from the coefficients.
The margin needs every sequence's log-prob, so no coefficient is known before pass 1 ends.
"""
import os
from types import SimpleNamespace

import torch
from torch import nn

from . import chunked, frozen_head
from .objective import METRIC_KEYS, SEQUENCE_METRIC_KEYS, preference_objective, token_metrics, validate_objective_args
from .reference import reference_preference_loss, reference_sequence_logps

IMPLS = ("auto", "triton", "chunked", "reference")


def _triton_backend():
    # Imported lazily: triton is only needed for impl="triton".
    from .kernels.dlogits_backward import token_grads
    from .kernels.forward import token_logprobs

    return SimpleNamespace(token_logprobs=token_logprobs, token_grads=token_grads)


def _resolve_impl(impl: str, device: torch.device) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {', '.join(IMPLS)}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "chunked"
    if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"impl='triton' got tensors on {device}: the Triton kernels need CUDA tensors, or CPU tensors with "
            "TRITON_INTERPRET=1 set before triton is imported"
        )
    return impl


def _backend(impl: str):
    return _triton_backend() if impl == "triton" else chunked


def _add_rows(target, index, values):
    """target[index[i]] += values[i], in an order fixed from run to run on every device, so the sequence
    sums (hence the loss and every gradient coefficient) are bit-identical across identical calls.
    index_add_ is serial on CPU but uses atomics on CUDA; index_put_ with accumulate sorts the indices on
    CUDA but adds in parallel on CPU."""
    if target.is_cuda:
        return target.index_put_((index,), values, accumulate=True)
    return target.index_add_(0, index, values)


class ResponseTokens:
    """The response tokens of a batch, flattened: which rows of hidden they are and which sequence owns them.

    Built from labels (one label per hidden row), or with `from_index` from an explicit token list, where one
    hidden row may predict tokens of several sequences (prefix sharing: the last prompt position predicts the
    first token of both responses).
    """

    def __init__(self, labels, ignore_index, cu_seqlens):
        flat_labels = labels.reshape(-1)
        if cu_seqlens is None:
            rows, seq_len = labels.shape
            owner = torch.arange(rows, device=labels.device).repeat_interleave(seq_len)
        else:
            rows = cu_seqlens.numel() - 1
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
            owner = torch.repeat_interleave(torch.arange(rows, device=labels.device), lengths)
        valid = flat_labels != ignore_index
        self.positions = valid.nonzero().squeeze(1)  # indices into hidden.reshape(-1, D)
        self.targets = flat_labels[self.positions].long()
        self.sequence = owner[self.positions]  # which row each response token belongs to
        self.num_rows = rows
        self.num_positions = labels.numel()  # one hidden row per label
        self.counts = torch.zeros(rows, dtype=torch.long, device=labels.device).index_add_(
            0, self.sequence, torch.ones_like(self.sequence)
        )

    @classmethod
    def from_index(cls, positions, targets, sequence, num_rows: int, num_positions: int):
        """Response tokens given as a list: hidden row (index into hidden.reshape(-1, D)), target token and
        owning sequence (0..num_rows-1: chosen rows, then rejected rows) of each; a row may appear twice."""
        for name, tensor in (("positions", positions), ("targets", targets), ("sequence", sequence)):
            if not isinstance(tensor, torch.Tensor) or tensor.dim() != 1 or tensor.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"token index: {name} must be a 1-D int32/int64 tensor")
            if tensor.shape != positions.shape or tensor.device != positions.device:
                raise ValueError(
                    f"token index: {name} has shape {tuple(tensor.shape)} on {tensor.device}, positions has "
                    f"{tuple(positions.shape)} on {positions.device}"
                )
        for name, tensor, bound in (("positions", positions, num_positions), ("sequence", sequence, num_rows)):
            if tensor.numel() and bool(((tensor < 0) | (tensor >= bound)).any()):
                raise ValueError(f"token index: {name} must lie in [0, {bound}), got values {tensor.aminmax()}")
        tokens = cls.__new__(cls)
        tokens.positions, tokens.targets, tokens.sequence = positions.long(), targets.long(), sequence.long()
        tokens.num_rows, tokens.num_positions = num_rows, num_positions
        tokens.counts = torch.zeros(num_rows, dtype=torch.long, device=positions.device).index_add_(
            0, tokens.sequence, torch.ones_like(tokens.sequence)
        )
        return tokens

    def gather(self, hidden):
        """The response tokens' hidden states [n_response, D] (a copy: prompt and padding are left behind)."""
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.positions)

    def sequence_sums(self, token_values):
        return _add_rows(token_values.new_zeros(self.num_rows), self.sequence, token_values)


def _metric_keys(with_token_metrics: bool):
    """The metric keys a call returns: the token-level ones only when asked for."""
    return METRIC_KEYS if with_token_metrics else SEQUENCE_METRIC_KEYS


class _FusedPreferenceLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, objective_kwargs, backend, with_token_metrics, one_pass):
        response_hidden = tokens.gather(hidden)
        # A frozen head (no gradient for weight or bias): pass 1 also forms dH's basis and pass 2 is skipped.
        ctx.frozen = one_pass
        if one_pass:
            pass1, basis = frozen_head.token_logprobs_and_basis(response_hidden, weight, bias, tokens.targets)
        else:
            pass1 = backend.token_logprobs(response_hidden, weight, bias, tokens.targets, token_metrics=with_token_metrics)
            basis = None

        with torch.enable_grad():
            sums = tokens.sequence_sums(pass1.logp).detach().requires_grad_(True)
            loss, metrics = preference_objective(sums, tokens.counts, **objective_kwargs)
            (d_sums,) = torch.autograd.grad(loss, sums)
        if with_token_metrics:
            metrics.update(token_metrics(*(tokens.sequence_sums(v) for v in pass1[2:]), tokens.counts))
        # Each token's log-prob enters its sequence's sum with weight 1.
        coef = d_sums.to(pass1.logp.dtype)[tokens.sequence]
        # The matrix products only read response rows; a non-finite value elsewhere in hidden (prompt,
        # padding) still makes the reference NaN, so it poisons the loss, metrics and gradients here too.
        poison = torch.where(torch.isfinite(hidden).all(), 0.0, float("nan"))
        loss, coef = loss + poison, coef + poison
        metrics = {key: value + poison for key, value in metrics.items()}

        ctx.save_for_backward(response_hidden, weight, bias, pass1.lse, coef, basis)
        ctx.tokens, ctx.backend, ctx.hidden_shape = tokens, backend, hidden.shape
        metric_values = torch.stack([metrics[key] for key in _metric_keys(with_token_metrics)])
        ctx.mark_non_differentiable(metric_values)
        return loss.detach(), metric_values

    @staticmethod
    def backward(ctx, grad_loss, _grad_metrics):
        if torch.is_grad_enabled():  # autograd runs backward in grad mode only for create_graph=True
            raise RuntimeError(
                "linear_preference_loss: second-order gradients (create_graph=True) are not supported by the fused "
                "implementations; use impl='reference' for double backward"
            )
        response_hidden, weight, bias, lse, coef, basis = ctx.saved_tensors
        tokens = ctx.tokens
        coef = coef * grad_loss.to(coef.dtype)
        d_response, d_weight, d_bias = head_grads(
            ctx.backend, ctx.frozen, response_hidden, weight, bias, tokens.targets, lse, basis, coef
        )
        d_hidden = None
        if ctx.needs_input_grad[0]:
            d_hidden = d_response.new_zeros(tokens.num_positions, d_response.shape[1])
            # Accumulate: under prefix sharing one hidden row predicts a token of each of two sequences.
            _add_rows(d_hidden, tokens.positions, d_response)
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


def head_grads(backend, one_pass, response, weight, bias, targets, lse, basis, coef):
    """(dH of the response rows, dW, db) of sum_t coef_t * logp_t: from pass 1's basis for a frozen head
    (one_pass; no dW, db), else by pass 2."""
    if one_pass:
        return frozen_head.hidden_grad(weight, targets, basis, coef, response.dtype), None, None
    return backend.token_grads(response, weight, bias, targets, lse, coef)


def _validate_head(hidden, weight, bias):
    """hidden, weight and bias: types, shapes, dtypes and devices, naming the offending tensor."""
    for name, tensor in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if tensor is not None and not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, D], got shape {tuple(weight.shape)}")
    vocab, dim = weight.shape
    if hidden.shape[-1] != dim:
        raise ValueError(f"hidden's last dim is {hidden.shape[-1]} but weight is [V={vocab}, D={dim}]")
    if not hidden.dtype.is_floating_point or hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share one floating dtype")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device}, hidden is on {hidden.device}")
    if bias is not None and bias.shape != (vocab,):
        raise ValueError(f"bias must have shape ({vocab},), got {tuple(bias.shape)}")
    if bias is not None and bias.dtype != weight.dtype:
        raise ValueError(f"bias ({bias.dtype}) must have weight's dtype ({weight.dtype})")


def _validate_inputs(hidden, weight, labels, bias, ignore_index, cu_seqlens):
    """Shape, dtype and device checks that name the offending tensor (label values: _bad_labels). Returns the
    number of rows."""
    _validate_head(hidden, weight, bias)
    vocab = weight.shape[0]
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 or int32, got {labels.dtype}")
    if cu_seqlens is not None and (
        not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int64, torch.int32)
    ):
        kind = cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise TypeError(f"cu_seqlens must be an int64 or int32 tensor of sequence boundaries, got {kind}")
    for name, tensor in (("labels", labels), ("cu_seqlens", cu_seqlens)):
        if tensor is not None and tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device}, hidden is on {hidden.device}")

    if cu_seqlens is None:
        if hidden.dim() != 3:
            raise ValueError(
                f"hidden must be [2B, T, D] (or [N, D] with cu_seqlens for the packed layout), got {tuple(hidden.shape)}"
            )
        if labels.shape != hidden.shape[:2]:
            raise ValueError(f"labels has shape {tuple(labels.shape)}, expected hidden's {tuple(hidden.shape[:2])}")
        rows = hidden.shape[0]
    else:
        if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
            raise ValueError(
                f"packed layout needs hidden [N, D] and labels [N], got {tuple(hidden.shape)} and {tuple(labels.shape)}"
            )
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be [2B + 1] boundaries, got shape {tuple(cu_seqlens.shape)}")
        # One host sync for the three checks (the packed layout only).
        first, last, falls = torch.stack([cu_seqlens[0], cu_seqlens[-1], (cu_seqlens.diff() < 0).any()]).tolist()
        if first != 0 or last != hidden.shape[0] or falls:
            raise ValueError(f"cu_seqlens must rise from 0 to N={hidden.shape[0]}, got {cu_seqlens.tolist()}")
        rows = cu_seqlens.numel() - 1
    return rows


def _bad_labels(labels, vocab, ignore_index):
    """Where labels lie outside [0, V) and are not ignore_index (a tensor: no host sync here)."""
    return (labels != ignore_index) & ((labels < 0) | (labels >= vocab))


def _raise_bad_label(labels, bad, vocab, ignore_index):
    value = int(labels[bad][0])
    raise ValueError(f"labels contain {value}, outside [0, {vocab}) and not ignore_index={ignore_index}")


def check_labels(labels, vocab, ignore_index):
    """Every label is ignore_index or a vocabulary id, else an error naming the first bad value (one host sync)."""
    bad = _bad_labels(labels, vocab, ignore_index)
    if bool(bad.any()):
        _raise_bad_label(labels, bad, vocab, ignore_index)


def _check_pair_rows(rows):
    if rows % 2 or rows == 0:
        raise ValueError(
            f"hidden holds {rows} sequences: expected an even, non-zero number (B chosen rows, then B rejected rows)"
        )


def _validate_token_index(hidden, weight, bias, labels, cu_seqlens, tokens):
    """Checks of an explicit token list (`token_index`), in place of labels. Returns the number of rows."""
    _validate_head(hidden, weight, bias)
    if labels is not None or cu_seqlens is not None:
        raise ValueError("token_index replaces labels and cu_seqlens: pass labels=None and no cu_seqlens with it")
    if not isinstance(tokens, ResponseTokens):
        raise TypeError(f"token_index must be a ResponseTokens (see ResponseTokens.from_index), got {type(tokens).__name__}")
    if tokens.positions.device != hidden.device:
        raise ValueError(f"token_index is on {tokens.positions.device}, hidden is on {hidden.device}")
    rows_of_hidden = hidden.numel() // hidden.shape[-1]
    if tokens.num_positions != rows_of_hidden:
        raise ValueError(f"token_index indexes {tokens.num_positions} hidden rows, hidden has {rows_of_hidden}")
    vocab = weight.shape[0]
    if bool(((tokens.targets < 0) | (tokens.targets >= vocab)).any()):
        value = int(tokens.targets[(tokens.targets < 0) | (tokens.targets >= vocab)][0])
        raise ValueError(f"token_index targets contain {value}, outside [0, {vocab})")
    return tokens.num_rows


def _tokens_by_sequence(hidden, tokens):
    """The listed tokens' hidden rows and targets grouped by sequence, with their boundaries: the packed layout
    that the reference implementation takes (a row listed twice is read twice, so autograd sums its gradient)."""
    order = torch.argsort(tokens.sequence, stable=True)
    cu_seqlens = torch.zeros(tokens.num_rows + 1, dtype=torch.long, device=hidden.device)
    cu_seqlens[1:] = tokens.counts.cumsum(0)
    rows = tokens.positions[order]
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows), tokens.targets[order], cu_seqlens


def _check_labels_and_rows(labels, bad, counts, vocab, ignore_index):
    """Bad labels (bad: from _bad_labels, or None for a token list) and sequences without a response token
    are user errors, named before any kernel reads a target: one host sync for both checks."""
    any_bad, any_empty = torch.stack([bad.any() if bad is not None else counts.new_zeros((), dtype=torch.bool),
                                      (counts == 0).any()]).tolist()  # fmt: skip
    if any_bad:
        _raise_bad_label(labels, bad, vocab, ignore_index)
    if any_empty:
        rows = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(
            f"sequence row(s) {rows[:8]} have no response token (every label is ignore_index): "
            "their length-normalised log-prob is undefined; drop such pairs from the batch"
        )


def linear_preference_loss(
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
    impl="auto",
    cu_seqlens=None,
    token_index=None,
    token_metrics=True,
    **loss_params,
):
    """AMaPO (or an ablation, SimPO, DPO, SLiC, IPO, CPO, ORPO, KTO) loss straight from the last hidden states.

    hidden [2B, T, D]: rows 0..B-1 chosen, rows B..2B-1 rejected, same pair order; labels [2B, T] already
    shifted (labels[:, t] is predicted from hidden[:, t]), ignore_index on prompt and padding. Packed
    layout: hidden [N, D], labels [N], cu_seqlens [2B + 1]. weight [V, D] is the lm_head weight.
    Explicit token list: `token_index=ResponseTokens.from_index(...)` with labels=None names every response
    token's hidden row, target and sequence, for layouts where one hidden row predicts tokens of two
    sequences (prefix sharing: chosen and rejected continue one shared prompt).
    Returns (loss, metrics): the mean loss over this rank's pairs and a dict of detached 0-dim fp32
    metrics over this rank's pairs and response tokens, keyed by METRIC_KEYS (the keys TRL and the
    AMaPO authors log). README.md states the loss exactly. token_metrics=False leaves out the token-level
    metrics (mean logit, entropy, token accuracy; only SEQUENCE_METRIC_KEYS are returned): the forward
    then runs its lean variant, which only forms each token's log-sum-exp. The loss and gradients are the
    same either way.
    loss_params: the loss type's own keywords (slic_delta, nll_weight, desirable_weight, undesirable_weight,
    kto_kl; amapo_fast/losses declares them with their defaults); None means the default.
    """
    bad = None
    if token_index is None:
        rows = _validate_inputs(hidden, weight, labels, bias, ignore_index, cu_seqlens)
        bad = _bad_labels(labels, weight.shape[0], ignore_index)
    else:
        rows = _validate_token_index(hidden, weight, bias, labels, cu_seqlens, token_index)
    _check_pair_rows(rows)
    validate_objective_args(
        beta, loss_type, label_smoothing, stats_scope, ref_logps, rows, hidden.device, gamma_beta_ratio, **loss_params
    )
    objective_kwargs = dict(
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        gamma_beta_ratio=gamma_beta_ratio,
        ref_logps=ref_logps,
        stats_scope=stats_scope,
        **loss_params,
    )
    impl = _resolve_impl(impl, hidden.device)
    # Host syncs of a call: the response tokens' positions (a data-dependent shape), the label and row
    # checks, and, inside the objective, the margin's branch on a degenerate group (docs/kernels.md).
    tokens = token_index if token_index is not None else ResponseTokens(labels, ignore_index, cu_seqlens)
    _check_labels_and_rows(labels, bad, tokens.counts, weight.shape[0], ignore_index)
    if impl == "reference":
        if token_index is not None:
            token_hidden, targets, token_cu_seqlens = _tokens_by_sequence(hidden, tokens)
            loss, metrics = reference_preference_loss(
                token_hidden, weight, targets, bias=bias, cu_seqlens=token_cu_seqlens, **objective_kwargs
            )
        else:
            loss, metrics = reference_preference_loss(
                hidden, weight, labels, bias=bias, ignore_index=ignore_index, cu_seqlens=cu_seqlens, **objective_kwargs
            )
        return loss, {key: metrics[key] for key in _metric_keys(token_metrics)}
    loss, metric_values = _FusedPreferenceLoss.apply(
        hidden, weight, bias, tokens, objective_kwargs, _backend(impl), bool(token_metrics),
        frozen_head.applies(hidden, weight, bias),
    )
    return loss, dict(zip(_metric_keys(token_metrics), metric_values.unbind()))


@torch.no_grad()
def sequence_logps(
    hidden, weight, labels, *, bias=None, ignore_index=-100, impl="auto", cu_seqlens=None, token_index=None
):
    """Per-row summed response log-probs [S] (fp32) and response-token counts [S], without grad.

    For evaluation (ranking accuracy uses sum / count) and for precomputing DPO reference log-probs.
    Rows with no response token get a sum of 0 and a count of 0. Inputs are checked as the loss checks them.
    `token_index`: as in linear_preference_loss.
    """
    impl = _resolve_impl(impl, hidden.device)
    if token_index is not None:
        _validate_token_index(hidden, weight, bias, labels, cu_seqlens, token_index)
        if impl == "reference":
            token_hidden, targets, token_cu_seqlens = _tokens_by_sequence(hidden, token_index)
            return reference_sequence_logps(token_hidden, weight, targets, bias=bias, cu_seqlens=token_cu_seqlens)
    else:
        _validate_inputs(hidden, weight, labels, bias, ignore_index, cu_seqlens)
        bad = _bad_labels(labels, weight.shape[0], ignore_index)
        if bool(bad.any()):
            _raise_bad_label(labels, bad, weight.shape[0], ignore_index)
    if impl == "reference":
        return reference_sequence_logps(
            hidden, weight, labels, bias=bias, ignore_index=ignore_index, cu_seqlens=cu_seqlens
        )
    tokens = token_index if token_index is not None else ResponseTokens(labels, ignore_index, cu_seqlens)
    pass1 = _backend(impl).token_logprobs(tokens.gather(hidden), weight, bias, tokens.targets, token_metrics=False)
    return tokens.sequence_sums(pass1.logp), tokens.counts


_sequence_logps = sequence_logps  # reachable inside LinearPreferenceHead.forward, whose flag shadows the name


class LinearPreferenceHead(nn.Module):
    """The lm_head as a loss module: owns (shares) the lm_head weight and computes the fused loss.

    Calling it as a module is what lets FSDP2 and DeepSpeed ZeRO-3 gather the (sharded) weight before
    the kernels read it. Pass the model's `lm_head` (an nn.Linear) to share its parameters, which also
    covers tied input/output embeddings.
    """

    def __init__(self, weight, bias=None, **loss_kwargs):
        super().__init__()
        if isinstance(weight, nn.Linear):
            weight, bias = weight.weight, weight.bias
        if not isinstance(weight, nn.Parameter):
            raise TypeError(f"weight must be an nn.Parameter or an nn.Linear, got {type(weight).__name__}")
        self.weight = weight
        self.bias = bias
        self.loss_kwargs = loss_kwargs

    def forward(
        self, hidden, labels, ref_logps=None, cu_seqlens=None, sequence_logps=False, token_index=None, kto_kl=None
    ):
        """(loss, metrics); or, with sequence_logps=True, per-row (summed log-probs, token counts) without
        grad for evaluation. Both go through forward so that ZeRO-3 gathers the weight for either.
        `kto_kl`: KTO's KL estimate for this batch (a per-batch input, unlike the loss keywords given at init).
        `token_index`: an explicit token list in place of labels (see linear_preference_loss)."""
        if sequence_logps:
            return _sequence_logps(
                hidden,
                self.weight,
                labels,
                bias=self.bias,
                ignore_index=self.loss_kwargs.get("ignore_index", -100),
                impl=self.loss_kwargs.get("impl", "auto"),
                cu_seqlens=cu_seqlens,
                token_index=token_index,
            )
        return linear_preference_loss(
            hidden, self.weight, labels, bias=self.bias, ref_logps=ref_logps, cu_seqlens=cu_seqlens,
            token_index=token_index, **self.loss_kwargs, **({} if kto_kl is None else {"kto_kl": kto_kl})
        )
