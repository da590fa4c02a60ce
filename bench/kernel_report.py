"""`python bench/kernel_report.py`: every autotune config of every Triton kernel, compiled ahead of time.

Triton compiles for a GPU target without a GPU. For each kernel, target architecture (sm_80: A100,
sm_90: H100/H200), dtype, specialisation and autotune config this compiles the kernel as the JIT would for
a real launch at the given head width D (the optional bias absent), and records what decides whether the
config can run and run fast:

  specialisation  which integer arguments the JIT is told are divisible by 16 (it specialises every
                  launch on that): `generic` marks the 16-byte aligned pointers, D and the row strides
                  only (any token count, any vocabulary); `runtime` also marks the token count N, the
                  vocabulary or chunk width V and the chunk offset, as a Llama-3 launch gets them
                  (N a multiple of 16, V = 128,256, chunks of multiples of 256 columns): the compiler
                  can then drop masks and vectorise loads and stores;

  shared_bytes    shared memory per program (Triton's metadata); `fits` compares it with the chip's
                  per-block limit (`SHARED_LIMIT`), beyond which the launch fails with OutOfResources;
  pruned          the config is removed for that chip before autotuning (`prune_configs`), i.e. the
                  autotuner never tries it;
  registers       registers per thread, from ptxas's verbose report;
  spill_bytes     ptxas's stack-frame bytes per thread (registers spilled to local memory);
  wgmma           the PTX has Hopper's warpgroup matrix instructions (sm_90 only);
  fenced_atomics  the PTX holds an atomic or reduction (atom / red) with acquire or release semantics
                  (.acquire, .release, .acq_rel), or an explicit memory barrier (membar, fence.sc,
                  fence.acq_rel). Triton's `tl.atomic_add` defaults to acq_rel, which ptxas wraps in a
                  GPU-wide barrier and cache invalidation per instruction; PTX atomics without a
                  semantics qualifier are relaxed and are not counted.

Writes <out>/<name>.md and .json (default bench/results/kernels-<date>). Compiles in at most --jobs
processes (default 2). Pruned configs are compiled too (to show where the pruning estimate stands against
the compiler) unless --survivors-only. fp32 kernels are compiled with the dot precision the kernels pick
for torch's default float32 matmul precision ("highest": true fp32, "ieee"), the slowest to compile.

  python bench/kernel_report.py
  python bench/kernel_report.py --archs sm_90 --dtypes bf16 --survivors-only --check   # the CI check
"""
import os

# Compile for real GPUs: TRITON_INTERPRET would make `@triton.jit` build interpreter functions, and it is
# read when the kernels are defined, so it goes before any kernel module is imported (workers inherit it).
os.environ.pop("TRITON_INTERPRET", None)
# Triton runs `ptxas -v` itself; this makes it print that report, so ptxas runs once per config.
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import io  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402

from amapo_fast.kernels.autotune import SHARED_LIMIT, aot_targets, prune_configs  # noqa: E402

RECORD_KEYS = (
    "kernel", "arch", "dtype", "specialisation", "config", "shared_bytes", "fits", "pruned", "registers", "spill_bytes", "wgmma",
    "fenced_atomics",
)
ARCHS = {"sm_80": 80, "sm_90": 90}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Integer arguments the runtime specialisation adds to each target's divisible ones (where the kernel has them).
RUNTIME_DIVISIBLE = ("N", "V", "dlogits_stride", "vocab_offset")
SPECIALISATIONS = ("generic", "runtime")

PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
PTXAS_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores")
# An atomic or reduction whose qualifiers include acquire/release semantics, e.g.
# `atom.global.gpu.acq_rel.add.f32` (what tl.atomic_add emits by default); or an explicit barrier.
FENCED_ATOMIC = re.compile(r"^\s*(?:@%\w+\s+)?(?:atom|red)(?:\.\w+)*\.(?:acq_rel|acquire|release)\b", re.MULTILINE)
MEMORY_BARRIER = re.compile(r"^\s*(?:@%\w+\s+)?(?:membar\.\w+|fence\.(?:sc|acq_rel))\b", re.MULTILINE)
WGMMA = re.compile(r"^\s*wgmma\.mma_async\b", re.MULTILINE)


def config_dict(config):
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def ptxas_tool(arch):
    """Triton's bundled ptxas for `arch` (80, 90); raises RuntimeError naming why when there is none."""
    from triton.backends.nvidia.compiler import get_ptxas

    tool = get_ptxas(arch)
    if tool is None or not Path(tool.path).is_file():
        raise RuntimeError(f"Triton found no ptxas for sm_{arch}")
    return tool


def ptxas_resources(log, ptx, arch):
    """(registers, stack-frame bytes) from ptxas -v; runs ptxas on the PTX when Triton printed no report."""
    if not PTXAS_REGISTERS.search(log):
        gpu_name = re.search(r"^\.target\s+(\w+)", ptx, re.MULTILINE).group(1)
        with tempfile.TemporaryDirectory() as scratch:
            source = Path(scratch) / "kernel.ptx"
            source.write_text(ptx)
            log = subprocess.run(
                [ptxas_tool(arch).path, "-v", f"--gpu-name={gpu_name}", str(source), "-o", str(source) + ".o"],
                capture_output=True, text=True, check=True,
            ).stderr
    return int(PTXAS_REGISTERS.search(log).group(1)), int(PTXAS_STACK.search(log).group(1))


@functools.lru_cache(maxsize=None)
def _targets(dtype_name, dim):
    return {target.kernel: target for target in aot_targets(DTYPES[dtype_name], dim)}


def divisible_arguments(target, specialisation):
    """The arguments marked divisible by 16 under a specialisation (see the module docstring)."""
    extra = RUNTIME_DIVISIBLE if specialisation == "runtime" else ()
    return tuple(target.divisible) + tuple(name for name in extra if name in target.signature)


def compile_config(kernel, arch_name, dtype_name, dim, config_index, specialisation="generic"):
    """Compile one config for one chip; the measured fields of its record."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = _targets(dtype_name, dim)[kernel]
    config = target.configs[config_index]
    constexprs = {**target.constexprs, **config.kwargs}
    attrs = {(target.fn.arg_names.index(name),): [["tt.divisibility", 16]]
             for name in divisible_arguments(target, specialisation)}
    source = ASTSource(fn=target.fn, signature=target.signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    with contextlib.redirect_stdout(log), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # version notices about defaults, printed once per process
        compiled = triton.compiler.compile(
            source, target=GPUTarget("cuda", ARCHS[arch_name], 32),
            options={"num_warps": config.num_warps, "num_stages": config.num_stages},
        )
    ptx = compiled.asm["ptx"]
    registers, stack_bytes = ptxas_resources(log.getvalue(), ptx, ARCHS[arch_name])
    shared = compiled.metadata.shared
    return {
        "shared_bytes": shared,
        "fits": shared <= SHARED_LIMIT[arch_name],
        "registers": registers,
        "spill_bytes": stack_bytes,
        "wgmma": bool(WGMMA.search(ptx)),
        "fenced_atomics": bool(FENCED_ATOMIC.search(ptx) or MEMORY_BARRIER.search(ptx)),
    }


def plan(archs, dtype_names, dim, survivors_only, specialisations=SPECIALISATIONS):
    """(records, tasks): one record per (kernel, arch, dtype, specialisation, config); a task per record to
    compile."""
    records, tasks = [], []
    for dtype_name in dtype_names:
        for target in _targets(dtype_name, dim).values():
            for arch_name, specialisation, (index, config) in itertools.product(
                archs, specialisations, enumerate(target.configs)
            ):
                block_n = config.kwargs["BLOCK_N"]  # chosen by the launcher; the pruning hook gets it too
                pruned = not prune_configs(
                    [config], DTYPES[dtype_name], block_n, SHARED_LIMIT[arch_name], target.max_tile
                )
                record = dict.fromkeys(RECORD_KEYS)
                record.update(kernel=target.kernel, arch=arch_name, dtype=dtype_name, specialisation=specialisation,
                              config=config_dict(config), pruned=pruned)
                records.append(record)
                if not (pruned and survivors_only):
                    tasks.append((len(records) - 1,
                                  (target.kernel, arch_name, dtype_name, dim, index, specialisation)))
    return records, tasks


def compile_all(records, tasks, jobs, progress=print):
    """Fill in each task's record; a config that fails to compile keeps None fields and an error line."""
    errors = []
    # spawn: each worker imports triton afresh (no state forked from the parent's threads).
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(compile_config, *arguments): (index, arguments) for index, arguments in tasks}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            index, (kernel, arch_name, dtype_name, _, _, specialisation) = futures[future]
            record = records[index]
            try:
                record.update(future.result())
            except Exception as error:  # one config failing to compile must not hide the others
                errors.append(f"{kernel} {arch_name} {dtype_name} {specialisation} {config_text_of(record)}: "
                              f"{type(error).__name__}: {str(error)[:300]}")
            progress(f"[{done}/{len(tasks)}] {kernel} {arch_name} {dtype_name} {specialisation} {config_text_of(record)}")
    return errors


def config_text_of(record):
    return ",".join(f"{key}={value}" for key, value in record["config"].items())


def survivor_problems(records):
    """Configs the autotuner can pick that would fail or run badly, and kernels left with no config to
    pick on a chip: one line each."""
    problems = [
        f"{kernel} {arch}: every config is pruned, the autotuner has nothing to pick"
        for kernel, arch in sorted({(r["kernel"], r["arch"]) for r in records})
        if all(r["pruned"] for r in records if (r["kernel"], r["arch"]) == (kernel, arch))
    ]
    for record in records:
        if record["pruned"]:
            continue
        where = f"{record['kernel']} {record['arch']} {record['dtype']} {record['specialisation']} {config_text_of(record)}"
        if record["registers"] is None:
            problems.append(f"{where}: not compiled")
            continue
        if not record["fits"]:
            problems.append(f"{where}: {record['shared_bytes']} B shared > {SHARED_LIMIT[record['arch']]} B")
        if record["spill_bytes"]:
            problems.append(f"{where}: {record['spill_bytes']} B stack frame (spills)")
        if record["fenced_atomics"]:
            problems.append(f"{where}: fenced atomics")
    return problems


def _cell(value):
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def render(header, records, errors):
    lines = [f"# Triton kernels compiled ahead of time\n\n"]
    lines += [f"- {key}: {value}\n" for key, value in header.items()]
    problems = survivor_problems(records)
    lines.append("\n## Configs the autotuner can pick that would fail or run badly\n\n")
    lines += [f"- {line}\n" for line in problems] or ["- none: every surviving config fits, has no spills and "
                                                       "no fenced atomics\n"]
    if errors:
        lines.append("\n## Compile errors\n\n")
        lines += [f"- {line}\n" for line in errors]
    lines.append("\n## Every config\n\n| kernel | arch | dtype | specialisation | config | shared B | fits | pruned "
                 "| registers | spill B | wgmma | fenced atomics |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    for record in records:
        lines.append("| " + " | ".join([record["kernel"], record["arch"], record["dtype"], record["specialisation"],
                                        config_text_of(record)]
                                       + [_cell(record[key]) for key in RECORD_KEYS[5:]]) + " |\n")
    return "".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="sm_80,sm_90", help=f"comma-separated subset of {', '.join(ARCHS)}")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32", help=f"comma-separated subset of {', '.join(DTYPES)}")
    parser.add_argument("--dim", type=int, default=4096, help="head width D (default 4096: Llama-3-8B)")
    parser.add_argument("--survivors-only", action="store_true", help="compile only configs that survive pruning")
    parser.add_argument("--jobs", type=int, default=2, help="compiler processes (default 2)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a surviving config does not fit, spills, uses fenced atomics or fails")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--name", help="file stem (default kernels-<date>)")
    args = parser.parse_args(argv)
    for option, chosen, known in (("--archs", args.archs, ARCHS), ("--dtypes", args.dtypes, DTYPES)):
        unknown = [item for item in chosen.split(",") if item not in known]
        if unknown:
            parser.error(f"{option}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    archs, dtype_names = args.archs.split(","), args.dtypes.split(",")
    try:
        ptxas = {arch: ptxas_tool(ARCHS[arch]) for arch in archs}
    except RuntimeError as error:
        raise SystemExit(f"kernel_report: {error}; cannot compile ahead of time")
    begin = time.perf_counter()
    records, tasks = plan(archs, dtype_names, args.dim, args.survivors_only)
    # A fresh cache: a cached kernel skips ptxas, and its report with it.
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        errors = compile_all(records, tasks, args.jobs, progress=lambda line: print(line, file=sys.stderr))
    header = {
        "date (UTC)": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "`" + shlex.join(["python", "bench/kernel_report.py"] + list(argv)) + "`",
        "git commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     cwd=Path(__file__).resolve().parent).stdout.strip() or None,
        "triton": triton.__version__,
        "ptxas": ", ".join(f"{arch} {tool.version} ({Path(tool.path).name})" for arch, tool in ptxas.items()),
        "head width D": args.dim,
        "shared-memory limit per block (bytes)": ", ".join(f"{arch} {SHARED_LIMIT[arch]}" for arch in archs),
        "compiled": ("configs that survive pruning" if args.survivors_only else "every config, pruned ones too")
        + "; fp32 with the dot precision the kernels use under torch's default float32 matmul precision "
        "(true fp32, 'ieee': no tensor cores, most of the compile time)",
        "specialisations": "generic: 16-byte aligned pointers, D and row strides marked divisible by 16; runtime: "
        "also N, V and the chunk width and offset (a Llama-3 launch); no bias in either (a bias-free head)",
        "compile time (s)": f"{time.perf_counter() - begin:.0f} with {args.jobs} processes",
    }
    stem = args.name or f"kernels-{datetime.date.today().isoformat()}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps({"header": header, "records": records, "errors": errors},
                                                      indent=1))
    text = render(header, records, errors)
    (args.out / f"{stem}.md").write_text(text)
    print(text)
    print(f"wrote {args.out / stem}.md and .json")
    if args.check and (survivor_problems(records) or errors):
        print("kernel_report --check: " + "; ".join(survivor_problems(records) + errors), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
