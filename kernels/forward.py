"""Pass 1's two implementations and the switch between them.

- `triton`: `lse_forward`, logit tiles formed and reduced in one Triton kernel (no logits in memory);
- `cublas`: `row_reduce`, a cuBLAS GEMM per vocabulary chunk into a bounded fp32 scratch, then a Triton
  row reduction.

Both give the same `TokenLogprobs` to fp32 rounding. The environment variable AMAPO_FORWARD picks one
(default `triton`); `bench/gpu_check.py` times both side by side on the GPU it runs on.
"""
import os

from . import lse_forward, row_reduce

ENVIRONMENT_VARIABLE = "AMAPO_FORWARD"
DEFAULT = "triton"
_VARIANTS = {"triton": lse_forward.token_logprobs, "cublas": row_reduce.token_logprobs}


def forward_variants() -> tuple:
    """The names of the pass-1 implementations."""
    return tuple(_VARIANTS)


def selected_variant() -> str:
    """The variant AMAPO_FORWARD names (default `triton`); an unknown name is an error naming the variable."""
    name = os.environ.get(ENVIRONMENT_VARIABLE, DEFAULT)
    if name not in _VARIANTS:
        raise ValueError(f"{ENVIRONMENT_VARIABLE}={name!r}: expected one of {', '.join(_VARIANTS)}")
    return name


def token_logprobs(hidden, weight, bias, targets, token_metrics=True, variant=None):
    """Pass 1 by `variant` (default: `selected_variant()`); see `lse_forward.token_logprobs`."""
    if variant is None:
        variant = selected_variant()
    elif variant not in _VARIANTS:
        raise ValueError(f"forward variant {variant!r}: expected one of {', '.join(_VARIANTS)}")
    return _VARIANTS[variant](hidden, weight, bias, targets, token_metrics=token_metrics)
