"""The Triton kernels as a GPU would get them, checked on a machine without one.

1. Every config the autotuner can pick on an A100 (sm_80) or H100 (sm_90), in bf16 at the Llama-3-8B head
   (D=4096), compiles ahead of time (`bench/kernel_report.py`) to a kernel that fits the chip's shared
   memory, spills no registers and has no fenced atomics, in both specialisations the JIT can give it
   (any shape; token count, vocabulary and chunk widths divisible by 16); and on sm_90 the forward keeps
   a logit tile of at least 128 x 128 (smaller tiles cannot be fed from L2 at tensor-core speed).
2. Every kernel is launched by our tuner (one config per stable key), not Triton's autotuner, and its
   pruning takes a bias-free head (Llama, Mistral pass None for the bias pointers). Triton's interpreter
   runs one config and never prunes, so the pruning is called here directly.
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

from amapo_fast.kernels.tuning import Tuned

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


def tuned_kernels():
    """Every tuned kernel in the kernels package, by name."""
    found = {}
    for module_info in pkgutil.iter_modules(amapo_fast.kernels.__path__):
        module = importlib.import_module(f"amapo_fast.kernels.{module_info.name}")
        found.update({name: value for name, value in vars(module).items() if isinstance(value, Tuned)})
    return found


def is_optional_pointer(name):
    """Pointer arguments that a bias-free head passes as None."""
    return name.endswith("_ptr") and "bias" in name


def arguments_without_bias(kernel):
    """What a launch for a bias-free head gives the pruning: (named arguments with None for every optional
    pointer, the keyword constexprs the launcher passes besides the tuned ones)."""
    tuned = set(kernel.configs[0].all_kwargs())
    args, keywords = {}, {}
    for name in kernel.arg_names:
        if is_optional_pointer(name):
            args[name] = None
        elif name.endswith("_ptr"):
            args[name] = torch.ones(8)
        elif name.isupper() and name not in tuned:  # constexprs such as HAS_BIAS, BLOCK_N
            keywords[name] = False if name.startswith(("HAS_", "INT64_", "TOKEN_")) else 16
        elif not name.isupper():
            args[name] = 16
    return args, keywords


def test_every_kernel_is_tuned_by_our_tuner():
    """Triton's own autotuner re-tunes per exact shape and runs hooks on absent (None) arguments; none is left."""
    names = set()
    for module_info in pkgutil.iter_modules(amapo_fast.kernels.__path__):
        module = importlib.import_module(f"amapo_fast.kernels.{module_info.name}")
        names |= {name for name, value in vars(module).items() if isinstance(value, Autotuner)}
    assert not names, f"kernels still under triton.autotune: {sorted(names)}"
    assert {"_lse_partials_kernel", "_dlogits_kernel"} <= set(tuned_kernels())


@pytest.mark.parametrize("name", sorted(tuned_kernels()))
def test_pruning_takes_a_bias_free_head(name):
    kernel = tuned_kernels()[name]
    args, keywords = arguments_without_bias(kernel)
    if kernel.prune:
        assert kernel.prune(kernel.configs, args, **keywords), f"{name}: pruning left no config"
