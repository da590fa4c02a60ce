"""One launch config per tuning key, chosen once, the same on every rank and after every restart.

A tuning key names everything the best config depends on and nothing that changes from step to step:
the kernel, the key arguments the kernel lists (a power-of-two bucket of the token count, the head's or the
scratch's shape: see the kernels), the dtypes of the tensor arguments, the launcher's constexprs (bias or
not, 64-bit offsets, BLOCK_N, ...) and the GPU model. The exact token count is never part of it, so a
training run whose response-token count changes every step tunes once per bucket, not once per step.

For a key seen for the first time the config is, in this order:
1. pinned by the environment variable AMAPO_KERNEL_CONFIG: `first` takes every kernel's first config that
   fits the device (nothing is benchmarked), or `KERNEL:NAME=VALUE,...;KERNEL:...` names one config per
   kernel, e.g. `dlogits_backward:BLOCK_V=128,BLOCK_D=64,GROUP_N=8,num_warps=8,num_stages=3`;
2. the only config that fits, if only one does (so the CPU interpreter, which has one config, never tunes);
3. the one found in the disk cache (AMAPO_KERNEL_CACHE, default ~/.cache/amapo_fast/kernel-configs.json,
   keyed also by the Triton version; `off` disables it);
4. the fastest fitting config, each benchmarked once on the launch's own arguments, then written to the
   disk cache.
Steps 3 and 4 run in a single process, or on rank 0 inside `tune_head`, only: ranks of a distributed run
would each pick their own config (timing noise, or disk caches that differ between nodes), and agreeing
inside a launch would need every rank to meet the same new key at the same moment. A rank of a multi-rank
run that meets a key `tune_head` did not cover takes the first fitting config, the same on every rank, and
says so once in the log. `tune_head`, called by every rank at start-up, has rank 0 choose for every
bucket up to the largest batch (from its disk cache, else by benchmarking) and broadcasts the table, so
that all ranks launch rank 0's choices.
Both kernels only write their outputs, so a config may run several times while being benchmarked.
"""
import contextlib
import json
import logging
import os
from pathlib import Path

import torch
import triton

from ..vocab_chunks import token_bucket

log = logging.getLogger(__name__)

PIN_ENV = "AMAPO_KERNEL_CONFIG"
CACHE_ENV = "AMAPO_KERNEL_CACHE"
DEFAULT_CACHE = Path.home() / ".cache" / "amapo_fast" / "kernel-configs.json"
BENCH_WARMUP_MS, BENCH_REP_MS = 5, 25  # per config: a few dozen runs of a kernel of ~1-10 ms

_chosen = {}  # tuning key -> (config, how it was chosen), for this process
_disk = {"path": None, "table": {}}  # the disk cache as last read
_state = {"may_tune": False, "warned": False}  # may_tune: inside rank 0's tune_head


def config_record(config: triton.Config) -> dict:
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def config_from_record(record: dict) -> triton.Config:
    record = dict(record)
    warps, stages = record.pop("num_warps"), record.pop("num_stages")
    return triton.Config(record, num_warps=warps, num_stages=stages)


def benchmark(call) -> float:
    """Milliseconds per run of call() (median of Triton's benchmark, L2 flushed between runs)."""
    return triton.testing.do_bench(call, warmup=BENCH_WARMUP_MS, rep=BENCH_REP_MS, return_mode="median")


def _pinned(kernel: str, fitting: list):
    """The config AMAPO_KERNEL_CONFIG pins for kernel, or None when it pins nothing for it."""
    text = os.environ.get(PIN_ENV, "").strip()
    if not text:
        return None
    if text == "first":
        return fitting[0]
    for entry in filter(None, (part.strip() for part in text.split(";"))):
        name, sep, fields = entry.partition(":")
        if not sep:
            raise ValueError(f"{PIN_ENV}={text!r}: expected `first` or KERNEL:NAME=VALUE,...; got {entry!r}")
        if name.strip() != kernel:
            continue
        record = {}
        for item in filter(None, (part.strip() for part in fields.split(","))):
            key, _, value = item.partition("=")
            if not value.strip().isdigit():
                raise ValueError(f"{PIN_ENV}: {kernel} field {item!r} is not NAME=INTEGER")
            record[key.strip()] = int(value)
        known = config_record(fitting[0]).keys()
        if set(record) != set(known):
            raise ValueError(f"{PIN_ENV}: {kernel} needs exactly the fields {', '.join(known)}, got {', '.join(record)}")
        return config_from_record(record)
    return None


def _disk_path():
    value = os.environ.get(CACHE_ENV, "").strip()
    if value == "off":
        return None
    return Path(value) if value else DEFAULT_CACHE


def _disk_table() -> dict:
    path = _disk_path()
    if path != _disk["path"]:
        table = {}
        if path is not None and path.is_file():
            try:
                table = json.loads(path.read_text())
            except (OSError, ValueError) as error:  # a damaged cache is ignored, never fatal
                log.warning("kernel config cache %s unreadable (%s): tuning again", path, error)
        _disk.update(path=path, table=table)
    return _disk["table"]


def _save_to_disk(key: str, record: dict):
    path = _disk_path()
    if path is None:
        return
    table = _disk_table()
    table[key] = record
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps(table, indent=1, sort_keys=True))
        os.replace(partial, path)  # atomic: a concurrent reader sees the old or the new table
    except OSError as error:
        log.warning("kernel config cache %s not written (%s)", path, error)


def _multi_rank() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def _device_name(tensor: torch.Tensor) -> str:
    return torch.cuda.get_device_name(tensor.device) if tensor.is_cuda else tensor.device.type


class Tuned:
    """A @triton.jit kernel launched as `kernel[grid](*args, **constexprs)` with a config chosen per tuning key.

    key: names of the kernel's arguments that enter the tuning key (besides dtypes, constexprs and device).
    prune(configs, named_args, **constexprs): the configs that fit the launching device.
    """

    def __init__(self, kernel: str, fn, configs: list, key: list, prune=None):
        self.kernel, self.fn, self.configs, self.key, self.prune = kernel, fn, list(configs), list(key), prune
        self.arg_names = fn.arg_names

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(grid, args, kwargs)

    def tuning_key(self, named: dict, constexprs: dict) -> str:
        tensors = {name: value for name, value in named.items() if isinstance(value, torch.Tensor)}
        device = _device_name(named["hidden_ptr"])
        dtypes = {name: str(value.dtype).removeprefix("torch.") for name, value in tensors.items()}
        fields = {name: named[name] for name in self.key}
        specialisation = {name: value if isinstance(value, (bool, int, float)) else str(value) for name, value in sorted(constexprs.items())}
        return json.dumps([self.kernel, device, triton.__version__, fields, dtypes, specialisation], sort_keys=True)

    def run(self, grid, args, kwargs):
        named = dict(zip(self.arg_names, args))
        key = self.tuning_key(named, kwargs)
        # Triton launches on the current CUDA device, not on the tensors' one: make them the same.
        device = named["hidden_ptr"].device
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            if key not in _chosen:
                _chosen[key] = self.choose(key, grid, args, kwargs, named)
                log.info("%s: %s for %s (%s)", self.kernel, config_record(_chosen[key][0]), key, _chosen[key][1])
            self.launch(_chosen[key][0], grid, args, kwargs)

    def choose(self, key, grid, args, kwargs, named):
        fitting = self.prune(self.configs, named, **kwargs) if self.prune else list(self.configs)
        pinned = _pinned(self.kernel, fitting)
        if pinned is not None:
            return pinned, f"pinned by {PIN_ENV}"
        if len(fitting) == 1:
            return fitting[0], "the only fitting config"
        if _multi_rank() and not _state["may_tune"]:  # not even the disk: another node's cache may differ
            if not _state["warned"]:
                log.warning(
                    "%s: no tuned config for %s on this multi-rank run; every rank takes the first fitting config "
                    "(call amapo_fast.kernels.tuning.tune_head on every rank at start-up to tune once on rank 0)",
                    self.kernel, key,
                )  # fmt: skip
                _state["warned"] = True
            return fitting[0], "first fitting config (untuned, multi-rank)"
        cached = _disk_table().get(key)
        records = [config_record(c) for c in fitting]
        if cached in records:
            return fitting[records.index(cached)], "disk cache"
        times = [benchmark(lambda config=config: self.launch(config, grid, args, kwargs)) for config in fitting]
        best = fitting[min(range(len(fitting)), key=times.__getitem__)]
        _save_to_disk(key, config_record(best))
        return best, "tuned: " + ", ".join(f"{t:.3f} ms" for t in times)

    def launch(self, config, grid, args, kwargs):
        if callable(grid):
            grid = grid({**dict(zip(self.arg_names, args)), **kwargs, **config.kwargs})
        self.fn[grid](*args, **kwargs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def autotune(kernel: str, configs: list, key: list, prune=None):
    """Decorator: the @triton.jit function below it becomes a `Tuned` kernel (see the module docstring)."""
    return lambda fn: Tuned(kernel, fn, configs, key, prune)


def chosen_configs() -> dict:
    """Every config chosen in this process: tuning key -> {"config": ..., "how": ...} (for benchmark reports)."""
    return {key: {"config": config_record(config), "how": how} for key, (config, how) in _chosen.items()}


@contextlib.contextmanager
def _tuning_allowed():
    _state["may_tune"] = True
    try:
        yield
    finally:
        _state["may_tune"] = False


def tune_head(vocab: int, dim: int, dtype: torch.dtype, device, max_tokens: int, with_bias: bool = False) -> dict:
    """Collective (every rank calls it, or one process): tune both kernels for a [vocab, dim] head at every
    power-of-two token bucket up to max_tokens, on rank 0 with random inputs, and launch rank 0's choices
    on every rank from then on. Returns chosen_configs()."""
    from .dlogits_backward import _dlogits_kernel, token_grads
    from .lse_forward import _lse_partials_kernel, token_logprobs

    if all(len(kernel.configs) == 1 for kernel in (_lse_partials_kernel, _dlogits_kernel)):
        return chosen_configs()  # nothing to choose (the CPU interpreter's single config)
    if not _multi_rank() or torch.distributed.get_rank() == 0:
        weight = torch.randn(vocab, dim, device=device, dtype=dtype) * dim**-0.5
        bias = torch.zeros(vocab, device=device, dtype=dtype) if with_bias else None
        with _tuning_allowed():
            for exponent in range(token_bucket(max_tokens).bit_length()):
                tokens = 2**exponent
                hidden = torch.randn(tokens, dim, device=device, dtype=dtype)
                targets = torch.randint(0, vocab, (tokens,), device=device)
                for token_metrics in (False, True):  # the lean forward and its metrics variant are tuned apart
                    pass1 = token_logprobs(hidden, weight, bias, targets, token_metrics=token_metrics)
                token_grads(hidden, weight, bias, targets, pass1.lse, torch.full_like(pass1.lse, 1e-3))
        del weight, bias
    if _multi_rank():
        table = [{key: (config_record(config), how) for key, (config, how) in _chosen.items()}]
        torch.distributed.broadcast_object_list(table, src=0)
        for key, (record, how) in table[0].items():
            _chosen[key] = (config_from_record(record), how + " on rank 0")
    return chosen_configs()
