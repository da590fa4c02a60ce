"""The loss layers being compared: lm_head + preference loss, forward and backward, on the same inputs.

Each path is a function (hidden, weight, labels) -> scalar loss. Ours run AMaPO (the loss whose exact
gradients need two passes over the logits); Liger runs SimPO, the closest existing fused preference loss, with
the same cost profile apart from AMaPO's second pass. `*-frozen` paths train hidden only (a frozen lm_head, as
with adapters): ours then takes its one-pass path. The `ce-*` paths are the token-mean next-token
cross-entropy of SFT (every label that is not ignore_index), compared with their own peers: eager
`F.cross_entropy` on materialised logits and Liger's fused linear cross-entropy.

`flops_per_token_dv` is the convention for achieved TFLOP/s: 8·N·D·V for our two-pass design,
6·N·D·V for the peers, where N is the number of tokens the path feeds its matmuls (`skips_prompt`:
ours and cut-cross-entropy skip prompt and padding; the reference and Liger compute every position).
"""
import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch

from amapo_fast import linear_cross_entropy, linear_preference_loss
from amapo_fast.objective import preference_objective
from amapo_fast.reference import reference_sequence_logps

BETA = 2.0  # the paper's beta for the Mistral-7B setups; it does not change the cost
SIMPO_GAMMA = 0.5


@dataclass(frozen=True)
class Path:
    name: str
    description: str
    flops_per_token_dv: int
    skips_prompt: bool
    build: Callable  # build(device) -> loss_fn(hidden, weight, labels); called once per worker process
    available: Callable  # available(device) -> None, or the reason it cannot run there
    frozen_head: bool = False  # the weight gets no gradient (only hidden does)
    peers: tuple = ("reference", "liger")  # the paths its "vs reference" and "vs Liger" ratios divide by


def _always(device):
    return None


def _ours(impl):
    def build(device):
        def loss_fn(hidden, weight, labels):
            return linear_preference_loss(hidden, weight, labels, beta=BETA, loss_type="amapo", impl=impl)[0]

        return loss_fn

    return build


def _reference(compiled):
    """The loss the obvious way: full logits, log-softmax, gather, then the B-sized stage. Only the loss:
    the token-level metrics, which `impl="reference"` also derives from the full logits (one more
    softmax over [N, V]), are left out so the baseline is what a plain trainer pays."""

    def build(device):
        # Compiled, only the [N, V] part: the B-sized AMaPO stage branches on data (degenerate groups) and
        # is negligible, so it runs eagerly instead of breaking the graph.
        logps = torch.compile(reference_sequence_logps) if compiled else reference_sequence_logps

        def loss_fn(hidden, weight, labels):
            sums, counts = logps(hidden, weight, labels)
            return preference_objective(sums, counts, beta=BETA, loss_type="amapo")[0]

        return loss_fn

    return build


def _triton_available(device):
    if device.type != "cuda":
        return "Triton kernels are timed on CUDA only (the CPU interpreter is a test tool)"
    if importlib.util.find_spec("amapo_fast.kernels.lse_forward") is None:
        return "amapo_fast.kernels.lse_forward is not in this checkout"
    return None


def _liger_available(device):
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed"
    return None


def _build_liger(device):
    from liger_kernel.chunked_loss import LigerFusedLinearSimPOLoss

    # compiled=True is Liger's default on GPU; on CPU its torch.compile path is not what it is built for.
    # compute_nll_loss=False: the preference loss alone, like ours.
    liger = LigerFusedLinearSimPOLoss(
        beta=BETA, gamma=SIMPO_GAMMA, compute_nll_loss=False, compiled=device.type == "cuda"
    )

    def loss_fn(hidden, weight, labels):
        return liger(weight, hidden, labels)[0]

    return loss_fn


def _cce_available(device):
    if importlib.util.find_spec("cut_cross_entropy") is None:
        return "cut-cross-entropy is not installed"
    if device.type != "cuda":
        return "cut-cross-entropy's kernels need CUDA"
    return None


def _build_cce(device):
    from cut_cross_entropy import linear_cross_entropy

    def loss_fn(hidden, weight, labels):
        # Per-token -log p from CCE's fused kernels (ignored positions give 0), then the AMaPO stage.
        # filter_eps=None: exact gradients, like ours (CCE's default skips small gradient blocks).
        token_nll = linear_cross_entropy(hidden, weight, labels, reduction="none", shift=False, filter_eps=None)
        sums = -token_nll.float().sum(-1)
        counts = (labels != -100).sum(-1)
        return preference_objective(sums, counts, beta=BETA, loss_type="amapo")[0]

    return loss_fn


def _ce_ours(impl):
    def build(device):
        return lambda hidden, weight, labels: linear_cross_entropy(hidden, weight, labels, impl=impl)

    return build


def _build_ce_eager(device):
    def loss_fn(hidden, weight, labels):
        logits = (hidden @ weight.T).float()  # materialised [N, V], upcast as trainers do
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

    return loss_fn


def _ce_liger_available(device):
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed"
    if device.type != "cuda":
        return "Liger's fused linear cross-entropy is a Triton kernel: CUDA only"
    return None


def _build_ce_liger(device):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    liger = LigerFusedLinearCrossEntropyLoss()

    def loss_fn(hidden, weight, labels):
        return liger(weight, hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1))

    return loss_fn


def _build_ce_cce(device):
    from cut_cross_entropy import linear_cross_entropy as cce_linear_cross_entropy

    def loss_fn(hidden, weight, labels):
        return cce_linear_cross_entropy(hidden, weight, labels, shift=False, filter_eps=None)

    return loss_fn


CE_PEERS = ("ce-eager", "ce-liger")

PATHS = {
    path.name: path
    for path in (
        Path("reference", "eager PyTorch reference, materialised fp32 logits (AMaPO)", 6, False,
             _reference(compiled=False), _always),
        Path("compile", "the reference's logits part under torch.compile (AMaPO)", 6, False,
             _reference(compiled=True), _always),
        Path("chunked", "ours: chunked PyTorch twin of the kernels (AMaPO)", 8, True, _ours("chunked"), _always),
        Path("triton", "ours: fused Triton kernels (AMaPO)", 8, True, _ours("triton"), _triton_available),
        Path("liger", "liger-kernel LigerFusedLinearSimPOLoss (SimPO)", 6, False, _build_liger, _liger_available),
        Path("cce", "cut-cross-entropy per-token loss + AMaPO stage", 6, True, _build_cce, _cce_available),
        Path("reference-frozen", "the eager reference with a frozen lm_head (no dW)", 4, False,
             _reference(compiled=False), _always, frozen_head=True),
        Path("chunked-frozen", "ours, chunked, frozen lm_head: one pass (AMaPO)", 4, True, _ours("chunked"), _always,
             frozen_head=True),
        Path("ce-eager", "cross-entropy: eager F.cross_entropy on materialised fp32 logits", 6, False,
             _build_ce_eager, _always, peers=CE_PEERS),
        Path("ce-chunked", "cross-entropy: ours, chunked twin", 8, True, _ce_ours("chunked"), _always, peers=CE_PEERS),
        Path("ce-triton", "cross-entropy: ours, Triton kernels", 8, True, _ce_ours("triton"), _triton_available,
             peers=CE_PEERS),
        Path("ce-liger", "cross-entropy: liger-kernel LigerFusedLinearCrossEntropyLoss", 6, False, _build_ce_liger,
             _ce_liger_available, peers=CE_PEERS),
        Path("ce-cce", "cross-entropy: cut-cross-entropy linear_cross_entropy", 6, True, _build_ce_cce,
             _cce_available, peers=CE_PEERS),
    )
}


def parse_paths(text: str) -> list:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PATHS]
    if unknown or not names:
        raise ValueError(f"--paths {text!r}: unknown {unknown}; choose from {', '.join(PATHS)}")
    return names
