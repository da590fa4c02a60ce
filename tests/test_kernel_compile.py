"""The Triton kernels as a GPU would get them, checked on a machine without one.

1. Every config the autotuner can pick on an A100 (sm_80) or H100 (sm_90), in bf16 at the Llama-3-8B head
   (D=4096), compiles ahead of time (`bench/kernel_report.py`) to a kernel that fits the chip's shared
   memory, spills no registers and has no fenced atomics, in both specialisations the JIT can give it
   (any shape; token count, vocabulary and chunk widths divisible by 16); and on sm_90 the forward keeps
   a logit tile of at least 128 x 128 (smaller tiles cannot be fed from L2 at tensor-core speed).
2. The autotuners' hooks never touch an absent argument. A bias-free head (Llama, Mistral) passes None for
   the bias pointers; Triton 3.6's default hooks call `.clone()` / `.zero_()` on every `restore_value` /
   `reset_to_zero` argument, so naming an optional one there crashes the first GPU launch. Triton's
   interpreter runs one config and never calls these hooks, so they are called here directly.
"""
import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
from triton.runtime.autotuner import Autotuner

import amapo_fast.kernels

REPO = Path(__file__).resolve().parent.parent


def ptxas_missing():
    """The reason ahead-of-time compilation cannot run here, or None."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        for arch in (80, 90):
            tool = get_ptxas(arch)
            if tool is None or not Path(tool.path).is_file():
                return f"Triton {triton.__version__} has no ptxas for sm_{arch}"
    except Exception as error:  # no NVIDIA backend in this Triton build
        return f"Triton {triton.__version__} cannot provide ptxas: {error}"
    return None


def test_surviving_bf16_configs_fit_and_do_not_spill_or_fence(tmp_path):
    reason = ptxas_missing()
    if reason:
        pytest.skip(reason)
    # The report compiles for real GPUs: it must not inherit the interpreter switch that conftest sets.
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    command = [sys.executable, str(REPO / "bench" / "kernel_report.py"), "--archs", "sm_80,sm_90", "--dtypes", "bf16",
               "--dim", "4096", "--survivors-only", "--check", "--out", str(tmp_path), "--name", "kernels"]
    # ~90 compiles (3 kernels x 2 chips x 2 specialisations): minutes on 2 cores, far longer on a loaded machine.
    finished = subprocess.run(command, capture_output=True, text=True, timeout=1800, cwd=REPO, env=env)
    # --check fails on a compile error, a survivor that does not fit, spills or fences, or a chip on which a
    # kernel has no config left.
    assert finished.returncode == 0, finished.stderr[-3000:]
    records = json.loads((tmp_path / "kernels.json").read_text())["records"]
    survivors = [r for r in records if not r["pruned"]]
    assert {(r["arch"], r["specialisation"]) for r in survivors} == {
        (arch, specialisation) for arch in ("sm_80", "sm_90") for specialisation in ("generic", "runtime")
    }
    for specialisation in ("generic", "runtime"):
        large = [
            r for r in survivors
            if r["kernel"] == "lse_forward" and r["arch"] == "sm_90" and r["specialisation"] == specialisation
            and r["config"]["BLOCK_N"] >= 128 and r["config"]["BLOCK_V"] >= 128
        ]
        assert large, f"no forward config with a logit tile of at least 128 x 128 survives on sm_90 ({specialisation})"


def autotuners():
    """Every autotuned kernel in the kernels package, by name."""
    found = {}
    for module_info in pkgutil.iter_modules(amapo_fast.kernels.__path__):
        module = importlib.import_module(f"amapo_fast.kernels.{module_info.name}")
        found.update({name: value for name, value in vars(module).items() if isinstance(value, Autotuner)})
    return found


def is_optional_pointer(name):
    """Pointer arguments that a bias-free head passes as None."""
    return name.endswith("_ptr") and "bias" in name


def arguments_without_bias(autotuner):
    """What a launch for a bias-free head gives the hooks: (named arguments with None for every optional
    pointer, the keyword constexprs the launcher passes besides the autotuned ones)."""
    tuned = set(autotuner.configs[0].all_kwargs())
    args, keywords = {}, {}
    for name in autotuner.arg_names:
        if is_optional_pointer(name):
            args[name] = None
        elif name.endswith("_ptr"):
            args[name] = torch.ones(8)
        elif name.isupper() and name not in tuned:  # constexprs such as HAS_BIAS, BLOCK_N
            keywords[name] = False if name.startswith(("HAS_", "INT64_")) else 16
        elif not name.isupper():
            args[name] = 16
    return args, keywords


@pytest.mark.parametrize("name", sorted(autotuners()))
def test_autotuner_hooks_never_touch_an_absent_argument(name):
    autotuner = autotuners()[name]
    optional = {arg for arg in autotuner.arg_names if is_optional_pointer(arg)}
    # Triton 3.9 skips None here but 3.6 does not: an optional argument must not be named at all.
    named = (set(autotuner.restore_value) | set(autotuner.reset_to_zero)) & optional
    assert not named, f"{name}: restore_value / reset_to_zero name optional arguments {sorted(named)}"

    args, keywords = arguments_without_bias(autotuner)
    before = {key: value.clone() for key, value in args.items() if isinstance(value, torch.Tensor)}
    autotuner.pre_hook(args)  # what a benchmarked config runs first, then last:
    autotuner.post_hook(args, None)
    for config in autotuner.configs:
        if config.pre_hook:
            config.pre_hook(args)
    for key in autotuner.restore_value:  # restore_value puts back what the benchmark run overwrote
        assert torch.equal(args[key], before[key]), key
    if autotuner.early_config_prune:
        kept = autotuner.early_config_prune(autotuner.configs, args, **keywords)
        assert kept, f"{name}: pruning left no config"
    if autotuner.perf_model:
        for config in autotuner.configs:
            autotuner.perf_model(**args, **keywords, **config.all_kwargs())
