"""Measure a group of benchmark cases in this process; the driver (`run.py`) starts one per group.

Two phases over the group's cases: first the timings, with the allocator as users get it; then peak
memory. On CPU the memory phase first switches glibc malloc to one mapping per buffer of 64 KiB or
more and returns freed memory to the kernel, so the resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs) follows torch's allocations; doing that before timing would slow the paths that
allocate many temporaries. On GPU the caching allocator's peak is reset per case.
A fresh process per group also means a kernel fault or an OOM stops one group, not the run.

Usage: python bench/worker.py PLAN.json   (PLAN = {"device", "dtype", "reps", "warmup", "budget_s", "cases"})
Prints `@@result {json}` per case and phase on stdout (the driver merges them); logs go to stderr.
"""
import ctypes
import gc
import json
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.paths import PATHS  # noqa: E402
from bench.workloads import Shape, make_hidden_and_weight, make_labels, token_mix  # noqa: E402

RESULT_PREFIX = "@@result "
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _proc_status_kib(field):
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1))


class CpuPeakMemory:
    """Peak resident memory above the level at `start()`: VmHWM after resetting it to VmRSS."""

    method = "VmHWM above VmRSS at start (/proc/self/clear_refs reset; glibc mmap threshold 64 KiB, trimmed)"

    def __init__(self):
        # From here on every buffer >= 64 KiB is its own mapping, unmapped when freed; free heap pages go back.
        libc = ctypes.CDLL("libc.so.6")
        if not libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024):
            raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed: cannot measure CPU peak memory")
        self.libc = libc

    def start(self):
        gc.collect()
        self.libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        self.base_kib = _proc_status_kib("VmRSS")

    def peak_bytes(self):
        return (_proc_status_kib("VmHWM") - self.base_kib) * 1024


class CudaPeakMemory:
    method = "torch.cuda.max_memory_allocated() above memory_allocated() once the inputs exist"

    def start(self):
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()

    def peak_bytes(self):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - self.base


def timed_ms(run, reset, device, reps, warmup, budget_s):
    """Milliseconds of each of up to `reps` runs after `warmup` untimed ones; at least 3 once over budget."""
    for _ in range(warmup):
        reset()
        run()
    samples = []
    while len(samples) < reps and not (len(samples) >= min(3, reps) and sum(samples) / 1e3 > budget_s):
        reset()
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            run()
            stop.record()
            stop.synchronize()
            samples.append(start.elapsed_time(stop))
        else:
            begin = time.perf_counter()
            run()
            samples.append((time.perf_counter() - begin) * 1e3)
    return samples


class Case:
    """One case's inputs (identical for every path: seeded) and its runs."""

    def __init__(self, loss_fn, case, device, dtype, frozen_head=False):
        shape = Shape(**case["shape"])
        self.labels = make_labels(case["workload"], shape, case["seed"]).to(device)
        self.hidden, self.weight = make_hidden_and_weight(shape, dtype, device, case["seed"])
        self.hidden.requires_grad_(True)
        self.weight.requires_grad_(not frozen_head)
        self.loss_fn = loss_fn
        self.losses = []

    def reset(self):
        self.hidden.grad = None
        self.weight.grad = None

    def forward_backward(self):
        loss = self.loss_fn(self.hidden, self.weight, self.labels)
        loss.backward()
        self.losses.append(loss.detach())  # read after timing: float() would sync inside it

    def forward_only(self):
        # Inputs that need no grad: Liger computes its gradients inside forward when they do.
        with torch.no_grad():
            self.loss_fn(self.hidden.detach(), self.weight.detach(), self.labels)

    def grad_bytes(self):
        weight = 0 if not self.weight.requires_grad else self.weight.numel()
        return (self.hidden.numel() + weight) * self.hidden.element_size()


def time_case(case, device, spec):
    timing = dict(device=device, reps=spec["reps"], warmup=spec["warmup"], budget_s=spec["budget_s"])
    fwd_bwd = timed_ms(case.forward_backward, case.reset, **timing)
    fwd = timed_ms(case.forward_only, case.reset, **timing)
    return {
        **token_mix(case.labels),
        "fwd_bwd_ms": statistics.median(fwd_bwd),
        "fwd_ms": statistics.median(fwd),
        "fwd_bwd_samples_ms": fwd_bwd,
        "fwd_samples_ms": fwd,
        "loss": float(case.losses[-1]),
    }


def memory_case(case, memory, spec):
    for _ in range(spec["warmup"]):  # lazy allocations (compilation, autotuning, workspaces) stay out
        case.reset()
        case.forward_backward()
    case.reset()
    memory.start()
    case.forward_backward()
    peak = memory.peak_bytes()
    return {
        "peak_bytes": peak,
        "grad_bytes": case.grad_bytes(),
        "extra_bytes": peak - case.grad_bytes(),  # beyond the inputs and the gradients dH, dW themselves
        "memory_method": memory.method,
    }


def run_phase(phase, spec, device, dtype, builds, measure):
    for index, case_spec in enumerate(spec["cases"]):
        result = {"index": index, "phase": phase}
        try:
            name = case_spec["path"]
            if name not in builds:
                builds[name] = PATHS[name].build(device)
            result.update(measure(Case(builds[name], case_spec, device, dtype, PATHS[name].frozen_head)))
        except torch.OutOfMemoryError:
            result["error"] = "out of memory"
        except Exception as error:  # one failing path must not stop the others; the report shows why
            traceback.print_exc(file=sys.stderr)
            result["error"] = f"{type(error).__name__}: {error}"[:500]
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(RESULT_PREFIX + json.dumps(result), flush=True)


def main(spec_file):
    spec = json.loads(Path(spec_file).read_text())
    device = torch.device(spec["device"])
    dtype = DTYPES[spec["dtype"]]
    builds = {}
    run_phase("time", spec, device, dtype, builds, lambda case: time_case(case, device, spec))
    memory = CudaPeakMemory() if device.type == "cuda" else CpuPeakMemory()
    run_phase("memory", spec, device, dtype, builds, lambda case: memory_case(case, memory, spec))


if __name__ == "__main__":
    main(sys.argv[1])
