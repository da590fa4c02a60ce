"""Launch parameters of the log-prob kernels: autotune configs, pruning by shared memory, token blocks.

Both kernels form [BLOCK_N, BLOCK_V] logit tiles as a loop of [BLOCK_N, BLOCK_D] x [BLOCK_D, BLOCK_V]
dots, so their configs share one shape and one shared-memory estimate:
  - BLOCK_N (token rows per tile) is chosen by the launcher from the number of response tokens and the
    dtype, not by the tuner, so the launcher knows the number of token blocks before launch and can
    size the forward's vocabulary splits to fill whole waves of the GPU;
  - BLOCK_V, BLOCK_D, GROUP_N, warps and stages are tuned once per tuning key (`tuning.py`): the head's
    or the scratch's shape, the dtype, the launch's constexprs and a power-of-two bucket of the token
    count (small and large batches want different tiles, while the exact count changes every step and
    must not trigger a new tuning run);
  - configs whose pipelined operand buffers exceed the device's shared memory per block are pruned
    before tuning, so a config that cannot launch is never tried.
Nothing here resets or restores kernel arguments between benchmark runs: both kernels only write
outputs (no accumulation), so running a config twice is harmless and no hook touches an absent (None)
argument such as the bias of a bias-free head.
"""
from typing import NamedTuple

import torch
import triton

from ..vocab_chunks import token_bucket
from .inputs import dot_precision
from .tiles import INTERPRET

# Shared memory per block (opt-in maximum) of the GPUs the kernels are checked for ahead of time.
SHARED_LIMIT = {"sm_80": 166_912, "sm_90": 232_448}


def _configs(shapes):
    return [
        triton.Config({"BLOCK_V": block_v, "BLOCK_D": block_d, "GROUP_N": group_n}, num_warps=warps, num_stages=stages)
        for block_v, block_d, group_n, warps, stages in shapes
    ]


if INTERPRET:
    # One small config (the tuner then benchmarks nothing): several tiles along every axis at test
    # sizes, so the masks, the vocabulary splits and the grouped order are exercised, and few tile-dots.
    FORWARD_CONFIGS = BACKWARD_CONFIGS = _configs([(128, 32, 2, 1, 1)])
    TOKEN_BLOCKS = {torch.float32: (16, 16), torch.bfloat16: (16, 16), torch.float16: (16, 16)}
else:
    # (BLOCK_V, BLOCK_D, GROUP_N, warps, stages): tensor-core matmul shapes. Left out because they spill
    # registers on sm_80 or sm_90 with Triton 3.6 or 3.9 (found by compiling ahead of time): in the
    # backward 256-wide vocabulary tiles; in the forward's metrics variant logit tiles above
    # FORWARD_METRICS_MAX_TILE (pruned for it). The forward's lean epilogue (max and sum of exp only) lets
    # 128 x 256 tiles run without spills: wide tiles need fewer operand bytes per FLOP from L2.
    FORWARD_CONFIGS = _configs(
        [
            (256, 64, 8, 8, 3),
            (128, 64, 8, 8, 3),
            (128, 64, 8, 8, 4),
            (128, 128, 8, 8, 3),
        ]
    )
    BACKWARD_CONFIGS = _configs(
        [
            (128, 64, 8, 8, 3),
            (128, 64, 8, 8, 4),
            (128, 128, 8, 8, 3),
            (64, 32, 8, 4, 3),
        ]
    )
    # BLOCK_N candidates per dtype: (small batches, large batches); see token_block_size.
    TOKEN_BLOCKS = {torch.float32: (32, 64), torch.bfloat16: (64, 128), torch.float16: (64, 128)}

# Logit-tile limits (elements per program) of the forward: the lean variant keeps two fp32 numbers per
# token besides the dot accumulator; the metrics variant (entropy, target-is-argmax) keeps two more and
# picks the target column out of every tile, and spills on sm_90 beyond 128 x 128 (found by compiling
# ahead of time), so its larger tiles are pruned.
FORWARD_MAX_TILE = 128 * 256
FORWARD_METRICS_MAX_TILE = 128 * 128

SMALL_BATCH_TOKENS = 2048  # up to this bucket the smaller BLOCK_N: less padding waste, more programs


def token_block_size(num_tokens: int, dtype: torch.dtype) -> int:
    """BLOCK_N for a launch over num_tokens response tokens: a function of the token bucket."""
    small, large = TOKEN_BLOCKS[dtype]
    return small if token_bucket(num_tokens) <= SMALL_BATCH_TOKENS else large


def needs_int64_offsets(*sizes: int) -> bool:
    """True if any element offset into hidden, weight or the scratch (given as element counts) can pass 2^31."""
    return max(sizes) >= 2**31


def estimated_shared_bytes(config: triton.Config, block_n: int, element_size: int) -> int:
    """Upper estimate of a config's shared memory: the software pipeline keeps num_stages copies of one
    [BLOCK_N, BLOCK_D] hidden tile and one [BLOCK_V, BLOCK_D] weight tile in flight. The epilogues reuse
    that space. Checked against the compiler's figure by the ahead-of-time compile test."""
    kwargs = config.kwargs
    return config.num_stages * (block_n + kwargs["BLOCK_V"]) * kwargs["BLOCK_D"] * element_size


def prune_configs(configs, dtype: torch.dtype, block_n: int, shared_limit: int, max_tile: int | None = None):
    """The configs whose shared memory fits a device with shared_limit bytes per block and whose logit
    tile has at most max_tile elements (None: no limit)."""
    element_size = torch.empty((), dtype=dtype).element_size()
    return [
        c
        for c in configs
        if estimated_shared_bytes(c, block_n, element_size) <= shared_limit
        and (max_tile is None or block_n * c.kwargs["BLOCK_V"] <= max_tile)
    ]


def device_shared_limit(device: torch.device) -> int:
    properties = torch.cuda.get_device_properties(device)
    limit = getattr(properties, "shared_memory_per_block_optin", None)
    if limit is None:  # older torch: ask Triton's driver
        limit = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)["max_shared_mem"]
    return int(limit)


def prune_for_device(configs, named_args, max_tile=None, **kwargs):
    """The pruning hook of both kernels (see tuning.Tuned): drop configs that do not fit the launching device."""
    hidden = named_args["hidden_ptr"]
    if not hidden.is_cuda:  # the interpreter: nothing to fit
        return configs
    fitting = prune_configs(configs, hidden.dtype, kwargs["BLOCK_N"], device_shared_limit(hidden.device), max_tile)
    if not fitting:
        raise RuntimeError(f"no kernel config fits this GPU's shared memory for {hidden.dtype} inputs")
    return fitting


class AotTarget(NamedTuple):
    """One kernel as the ahead-of-time compile check sees it (see bench/kernel_report.py)."""

    kernel: str
    fn: object  # the @triton.jit function
    signature: dict  # argument name -> Triton type string ("*bf16", "i32", "fp32", "constexpr")
    constexprs: dict  # non-config constexprs, as a GPU launch sets them
    divisible: tuple  # arguments the JIT specialises as divisible by 16 at real launches
    configs: list  # every config the launcher and tuner can pick, BLOCK_N included
    max_tile: int | None  # the kernel's logit-tile limit in prune_configs


def launch_configs(configs, dtype: torch.dtype):
    """The autotune configs crossed with every BLOCK_N the launcher can choose for dtype."""
    return [
        triton.Config({"BLOCK_N": block_n, **c.kwargs}, num_warps=c.num_warps, num_stages=c.num_stages)
        for block_n in sorted(set(TOKEN_BLOCKS[dtype]))
        for c in configs
    ]


POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
INPUT_DTYPE_POINTERS = ("hidden_ptr", "weight_ptr", "dlogits_ptr")  # in the inputs' dtype; other pointers fp32


def aot_target(kernel: str, autotuned, dtype: torch.dtype, max_tile: int | None = None, **extra) -> AotTarget:
    """A log-prob kernel typed as a real launch types it: hidden, weight and the dlogits scratch in dtype,
    targets int64, other pointers fp32, integer arguments int32 (offsets that fit), no bias; every pointer
    and integer except the token and vocabulary counts specialised as divisible by 16 (aligned tensors,
    D and row strides that are multiples of 16)."""
    fn = autotuned.fn
    signature, divisible = {}, []
    for param in fn.params:
        name = param.name
        if param.is_constexpr or name == "bias_ptr":
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = POINTER_TYPES[dtype] if name in INPUT_DTYPE_POINTERS else (
                "*i64" if name == "targets_ptr" else "*fp32"
            )
            divisible.append(name)
        else:
            signature[name] = "i32"
            if name == "D" or name.endswith("_stride"):
                divisible.append(name)
    constexprs = {
        "bias_ptr": None, "HAS_BIAS": False, "INT64_OFFSETS": False, "INTERPRET": False,
        "DOT_PRECISION": dot_precision(dtype), **extra,
    }  # fmt: skip
    configs = launch_configs(autotuned.configs, dtype)
    return AotTarget(kernel, fn, signature, constexprs, tuple(divisible), configs, max_tile)


def aot_targets(dtype: torch.dtype, dim: int) -> list:
    """Both kernels, the forward in its lean and its metrics variant, typed as a real launch at hidden size
    dim would type them (no bias, int32 offsets)."""
    from .dlogits_backward import _dlogits_kernel
    from .lse_forward import _lse_partials_kernel

    return [
        aot_target("lse_forward", _lse_partials_kernel, dtype, FORWARD_MAX_TILE, TOKEN_METRICS=False),
        aot_target("lse_forward_metrics", _lse_partials_kernel, dtype, FORWARD_METRICS_MAX_TILE, TOKEN_METRICS=True),
        aot_target("dlogits_backward", _dlogits_kernel, dtype),
    ]
