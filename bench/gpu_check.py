"""`python bench/gpu_check.py`: the whole GPU story in one run of at most 8 minutes, on a bare CUDA machine.

Stages, each a separate process with its own time limit and its own output file; a stage that fails or
runs out of time is recorded and the next one runs. At its limit a stage first gets SIGINT (pytest then
still writes its JUnit file for the tests that ran), a few seconds later SIGKILL for its whole group:

  setup          install the wheels in --wheels (default .wheels/) into a side folder (no index, no deps,
                 nothing installed into the machine's environment) and check that amapo_fast.kernels imports
                 (an editable install of this checkout, without network, if it does not);
  versions       Python, torch, CUDA, Triton and the GPU, and which optional peers are installed;
  determinism    two forward+backward calls of the Triton loss on identical inputs at the Llama-3-8B head:
                 are dH and dW bit-identical? (the first call also compiles and tunes the kernels);
  kernel-profile bench/kernel_profile.py: every kernel timed on its own at the Llama-3-8B head (both
                 forwards, a dlogits chunk, the dH and dW GEMMs) beside a cuBLAS GEMM of the same shape,
                 the chosen configs' registers, spills and shared memory, a profiler table, clocks, power;
  loss-bench     bench/run.py at the Llama-3-8B head (D=4096, V=128256, bf16), dense and realistic, ours
                 against eager, torch.compile, Liger's fused SimPO and cut-cross-entropy: time and peak memory;
  gpu-tests      the kernels at the Llama-3-8B head on the GPU (tests/test_kernels.py -k gpu);
  kernel-tests   the kernel and loss test files, compiled, with one pinned kernel config (nothing tunes);
  trainer        bench/trainer_check.py: torchrun amapo_fast/train.py on the GPU (FSDP2, bf16, the fused
                 head, packed and prefix-shared batches, a random ~1.2B Llama), a save and a resume;
  train-step     skipped (see TRAIN_STEP_SKIPPED).

Results go to <out>/ (default bench/results/gpu-check-<date>/): <stage>.log per stage, the benchmarks'
own files, and summary.md / summary.json (every stage's status, seconds and exit code). When the
environment variable OUT names a folder, the summary, the benchmark tables and one .tar.gz of
everything are copied there as well.

`--rehearse` runs every stage on the CPU on tiny shapes (Triton through its interpreter), so that the
first run on a GPU is not the script's first run.

  python bench/gpu_check.py                       # on a CUDA machine, < 8 minutes
  python bench/gpu_check.py --rehearse            # anywhere, several minutes on 2 cores
  python bench/gpu_check.py --rehearse --stages versions,determinism
"""
import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
TOTAL_LIMIT_S = 460  # the stages' limits below add up to at most this: 8 minutes with room for the bundling
HEAD = dict(dim=4096, vocab=128256)  # Llama-3-8B's lm_head
TINY_HEAD = dict(dim=64, vocab=512)


GRACE_S = 5  # SIGINT this long before a stage's limit, then SIGKILL: pytest writes its JUnit file on SIGINT
PIN_CONFIG = {"AMAPO_KERNEL_CONFIG": "first"}  # kernels/tuning.py: the first fitting config, no tuning
# Whole train steps of several methods (bench/train_step.py: FlexAttention's compile, a recompile per
# micro-batch size, TRL's trainers) need minutes; the trainer stage already times real steps of ours.
TRAIN_STEP_SKIPPED = ("skipped: bench/train_step.py's methods do not fit in what the 8 minutes leave after the "
                      "trainer stage, which times real steps of the fused head; run it on its own: python "
                      "bench/train_step.py --device cuda --methods \"ours padded,authors' style\" --max-pairs 0")


@dataclass(frozen=True)
class Stage:
    name: str
    limit_s: float  # on a GPU; a rehearsal gets REHEARSAL_LIMIT_S per stage (the interpreter is slow)
    command: Callable  # command(args, out) -> argv of the stage's process, or None when it runs in the driver
    what: str
    env: dict = None  # extra environment of the stage's process
    skipped: str = None  # the reason the stage does not run


def _pytest(args, out, selection, rehearsal_selection, files=("tests/test_kernels.py", "tests/test_loss.py")):
    select = rehearsal_selection if args.rehearse else selection
    return [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-rs", "--durations=5",
            "--junitxml", str(out / f"{select[0]}.xml"), *files, "-k", select[1]]


def _gpu_tests(args, out):
    # Rehearsal: the GPU tests skip on CPU, so an interpreted fp32 test stands in to exercise the stage.
    return _pytest(args, out, ("gpu-tests", "gpu"), ("gpu-tests", "gpu or test_matches_chunked_twin"))


def _kernel_tests(args, out):
    files = ("tests/test_kernels.py", "tests/test_forward_variants.py", "tests/test_loss.py")
    return _pytest(args, out, ("kernel-tests", "not gpu"), ("kernel-tests", "test_matches_float64 and 37-997-100"),
                   files)


def _kernel_profile(args, out):
    return [sys.executable, "bench/kernel_profile.py", "--out", str(out)] + (["--rehearse"] if args.rehearse else [])


def _trainer(args, out):
    return [sys.executable, "bench/trainer_check.py", "--out", str(out), "--timeout-s", "200" if args.rehearse else "48"] + (
        ["--rehearse"] if args.rehearse else [])


def _determinism(args, out):
    head = TINY_HEAD if args.rehearse else HEAD
    tokens = 64 if args.rehearse else 4096
    return [sys.executable, str(Path(__file__).resolve()), "--determinism-worker", str(out / "determinism.json"),
            "--tokens", str(tokens), "--dim", str(head["dim"]), "--vocab", str(head["vocab"])]


def _loss_bench(args, out):
    if args.rehearse:
        shapes, paths, reps, per_path = "N=256,T=64,D=64,V=512", "triton,liger,reference,cce,chunked", "2", "60"
    else:
        # N=4096 dense is the headline shape (4096 response tokens); realistic rows are ~28 % response,
        # so N=16384 positions carry about as many response tokens. torch.compile last: it compiles longest.
        # torch.compile is left out here: its compile takes most of a path's time limit (bench/run.py measures it).
        shapes, paths, reps, per_path = "N=4096,T=1024;N=16384,T=1024", "triton,liger,reference,cce", "3", "30"
    return [sys.executable, "bench/run.py", "--device", args.device, "--shapes", shapes,
            "--workloads", "dense,realistic", "--paths", paths, "--reps", reps, "--budget-s", "1",
            "--group-timeout", per_path, "--out", str(out), "--name", "loss-bench"]


def _train_step(args, out):
    sizes = ["--pairs", "1", "--seq-len", "64", "--steps", "1"] if args.rehearse else ["--steps", "2", "--max-pairs", "16"]
    # Fused head against full logits (the authors' style) first, then our fastest layout; the report is
    # rewritten after every method, so a stage cut short by its limit keeps what finished.
    methods = "ours padded,authors' style,ours packed+prefix"
    return [sys.executable, "bench/train_step.py", "--device", args.device, "--workloads", "ultrafeedback",
            "--methods", methods, *sizes, "--out", str(out), "--name", "train-step"]


def _versions(args, out):
    code = (
        "import json, platform, importlib.metadata as m, torch, triton\n"
        "def version(p):\n"
        "    try: return m.version(p)\n"
        "    except m.PackageNotFoundError: return None\n"
        "gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None\n"
        "print(json.dumps({'python': platform.python_version(), 'torch': torch.__version__, 'cuda': torch.version.cuda,"
        " 'triton': triton.__version__, 'gpu': gpu, 'TRITON_INTERPRET': __import__('os').environ.get('TRITON_INTERPRET'),"
        " **{p: version(p) for p in ('transformers', 'numpy', 'datasets', 'liger-kernel', 'cut-cross-entropy',"
        " 'deepspeed', 'accelerate', 'amapo-fast')}}, indent=1))\n"
    )
    return [sys.executable, "-c", code]


STAGES = [
    Stage("setup", 20, None, "carried wheels into a side folder; amapo_fast.kernels importable"),
    Stage("versions", 10, _versions, "versions of Python, torch, CUDA, Triton, the GPU and the peers"),
    # The first call at N=4096 compiles and autotunes every config for that token block size (Triton caches
    # the compiled kernels on disk, so the later stages start warm).
    Stage("determinism", 35, _determinism, "two backward calls at the Llama-3-8B head: bit-identical dH, dW?"),
    Stage("kernel-profile", 60, _kernel_profile, "bench/kernel_profile.py: each kernel beside a same-shape cuBLAS GEMM"),
    Stage("loss-bench", 125, _loss_bench, "bench/run.py at the Llama-3-8B head, dense and realistic"),
    Stage("gpu-tests", 45, _gpu_tests, "tests/test_kernels.py -k gpu: the kernels at the Llama-3-8B head"),
    Stage("kernel-tests", 60, _kernel_tests, "the kernel and loss tests, compiled, one pinned config",
          env=PIN_CONFIG),
    Stage("trainer", 105, _trainer, "bench/trainer_check.py: torchrun train.py on the GPU, save, resume"),
    Stage("train-step", 0, _train_step, "bench/train_step.py: ~1.2B Llama, fused vs reference loss",
          skipped=TRAIN_STEP_SKIPPED),
]
STAGE_NAMES = [stage.name for stage in STAGES]
REHEARSAL_LIMIT_S = 240
REHEARSAL_LIMITS_S = {"trainer": 600}  # two CPU training runs with their start-up, on a possibly busy machine
assert sum(stage.limit_s for stage in STAGES) <= TOTAL_LIMIT_S


def install_wheels(wheels, site, log):
    """pip-install every wheel in `wheels` into `site` without index or dependencies; True when it worked."""
    found = sorted(Path(wheels).glob("*.whl"))
    if not found:
        print(f"no wheels in {wheels}/: peers that are not installed are reported as not run", file=log)
        return True
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, found)]
    print("$ " + " ".join(command), file=log, flush=True)
    return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=20).returncode == 0


def kernels_importable(env):
    probe = [sys.executable, "-c", "import amapo_fast.kernels"]
    return subprocess.run(probe, env=env, cwd=REPO, capture_output=True).returncode == 0


def prepend_path(env, folder):
    parts = env.get("PYTHONPATH", "").split(os.pathsep)
    env["PYTHONPATH"] = os.pathsep.join([str(folder)] + [p for p in parts if p and p != str(folder)])


def setup(args, out, env, log):
    """Wheels into a side folder on PYTHONPATH (for every later stage); this checkout importable with its kernels."""
    ok = True
    if args.wheels.is_dir():
        site = out / "site-packages"
        ok = install_wheels(args.wheels, site, log)
        prepend_path(env, site)
    else:
        print(f"{args.wheels}/ does not exist: no wheels to install", file=log)
    prepend_path(env, REPO)
    if not kernels_importable(env):
        # The kernels live in kernels/ and are installed as amapo_fast.kernels (setup.py maps the folder).
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation",
                   "-e", str(REPO)]
        print("$ " + " ".join(command), file=log, flush=True)
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=20)
        ok = kernels_importable(env) and ok
    print(f"amapo_fast.kernels importable: {kernels_importable(env)}", file=log)
    print(f"PYTHONPATH={env['PYTHONPATH']}", file=log)
    return 0 if ok else 1


def run_stage(argv, env, log, limit_s):
    """Run argv in its own process group; SIGINT GRACE_S before the limit, then kill the whole group.
    (exit code, timed out)."""
    process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return process.wait(timeout=max(limit_s - GRACE_S, 0.1)), False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGINT)  # pytest writes its JUnit file and summary on the way out
        try:
            process.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the benchmark's workers too: they hold the GPU
        except ProcessLookupError:
            pass
        process.wait()
        return process.returncode, True


def stage_limits(args):
    limits = {
        stage.name: (REHEARSAL_LIMITS_S.get(stage.name, REHEARSAL_LIMIT_S) if args.rehearse else stage.limit_s)
        for stage in STAGES
    }
    for item in args.limit or []:
        name, _, seconds = item.partition("=")
        if name not in limits or not seconds.replace(".", "", 1).isdigit():
            raise SystemExit(f"--limit {item!r}: expected STAGE=SECONDS with STAGE one of {', '.join(limits)}")
        limits[name] = float(seconds)
    return limits


def write_summary(out, header, results):
    (out / "summary.json").write_text(json.dumps({**header, "stages": results}, indent=1))
    lines = ["# GPU check\n\n"] + [f"- {key}: {value}\n" for key, value in header.items()]
    lines += ["\n| stage | status | seconds | limit s | exit code | what | output |\n|---|---|---|---|---|---|---|\n"]
    for r in results:
        lines.append(f"| {r['stage']} | {r['status']} | {r['seconds']:.0f} | {r['limit_s']:.0f} | {r['exit_code']} "
                     f"| {r['what']} | {r['log']} |\n")
    versions = out / "versions.log"
    if versions.exists():
        lines.append("\n## Versions\n\n```\n" + versions.read_text().strip() + "\n```\n")
    for title, name in (("Determinism", "determinism.json"), ("Trainer", "trainer.json")):
        if (out / name).exists():
            lines.append(f"\n## {title}\n\n```\n" + (out / name).read_text().strip() + "\n```\n")
    if (out / "kernel-profile.md").exists():
        lines.append("\nKernels one by one: kernel-profile.md\n")
    (out / "summary.md").write_text("".join(lines))


def bundle(out, destination):
    """Copy the summary and the benchmark tables, and one archive of everything, into `destination`."""
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    for name in ("summary.md", "kernel-profile.md", "loss-bench.md", "train-step.md", "trainer.json"):
        if (out / name).exists():
            shutil.copy(out / name, destination / name)
    with tarfile.open(destination / f"{out.name}.tar.gz", "w:gz") as archive:
        archive.add(out, arcname=out.name, filter=lambda info: None if "site-packages" in info.name else info)


def run_check(args):
    out = args.out or REPO / "bench" / "results" / (
        f"gpu-check-{datetime.date.today().isoformat()}" + ("-rehearsal" if args.rehearse else ""))
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.rehearse:
        env["TRITON_INTERPRET"] = "1"  # read when the kernels are defined: every stage's process gets it
    else:
        env.pop("TRITON_INTERPRET", None)
    limits = stage_limits(args)
    selected = args.stages.split(",") if args.stages else STAGE_NAMES
    unknown = [name for name in selected if name not in STAGE_NAMES]
    if unknown:
        raise SystemExit(f"--stages: unknown {', '.join(unknown)}; choose from {', '.join(STAGE_NAMES)}")
    header = {
        "date (UTC)": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/gpu_check.py " + " ".join(args.argv),
        "mode": "rehearsal on the CPU (tiny shapes, Triton interpreted)" if args.rehearse else f"device {args.device}",
        "results": str(out),
    }
    results = []
    for stage in STAGES:
        if stage.name not in selected:
            continue
        log_path = out / f"{stage.name}.log"
        begin = time.monotonic()
        print(f"== {stage.name} (limit {limits[stage.name]:.0f} s): {stage.what}", flush=True)
        with open(log_path, "w") as log:
            try:
                if stage.skipped:
                    print(stage.skipped, file=log)
                    code, timed_out = None, False
                elif stage.command is None:
                    code, timed_out = setup(args, out, env, log), False
                else:
                    argv = stage.command(args, out)
                    print("$ " + " ".join(argv), file=log, flush=True)
                    code, timed_out = run_stage(argv, {**env, **(stage.env or {})}, log, limits[stage.name])
            except Exception as error:  # the driver itself must reach the next stage
                print(f"{type(error).__name__}: {error}", file=log)
                code, timed_out = None, False
        status = "skipped" if stage.skipped else "timed out" if timed_out else "passed" if code == 0 else "failed"
        results.append({"stage": stage.name, "status": status, "seconds": time.monotonic() - begin,
                        "limit_s": limits[stage.name], "exit_code": code, "what": stage.what, "log": log_path.name})
        print(f"   {status} in {results[-1]['seconds']:.0f} s (exit {code}); log {log_path}", flush=True)
        write_summary(out, header, results)  # after every stage: a check stopped from outside keeps the rest
    if os.environ.get("OUT"):
        bundle(out, os.environ["OUT"])
    print((out / "summary.md").read_text())
    return results


def determinism_worker(path, tokens, dim, vocab):
    """Two identical forward+backward calls of the Triton loss; writes whether dH and dW agree bit for bit."""
    import torch

    sys.path.insert(0, str(REPO))
    from amapo_fast import linear_preference_loss

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    generator = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(tokens, dim, device=device, dtype=dtype, generator=generator)
    weight = (torch.randn(vocab, dim, device=device, generator=generator) * dim**-0.5).to(dtype)
    labels = torch.randint(0, vocab, (tokens,), device=device, generator=generator).view(2, -1)
    hidden = hidden.view(2, tokens // 2, dim)

    def gradients():
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, _ = linear_preference_loss(h, w, labels, beta=2.0, impl="triton")
        loss.backward()
        return h.grad, w.grad

    first, second = gradients(), gradients()
    result = {"device": device, "dtype": str(dtype), "tokens": tokens, "dim": dim, "vocab": vocab}
    for name, a, b in zip(("d_hidden", "d_weight"), first, second):
        result[f"{name}_bit_identical"] = bool(torch.equal(a, b))
        result[f"{name}_max_abs_difference"] = float((a.float() - b.float()).abs().max())
    Path(path).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0 if result["d_hidden_bit_identical"] and result["d_weight_bit_identical"] else 1


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rehearse", action="store_true", help="every stage on the CPU, tiny shapes")
    parser.add_argument("--stages", help=f"comma-separated subset of {','.join(STAGE_NAMES)} (default all)")
    parser.add_argument("--limit", action="append", metavar="STAGE=SECONDS", help="override a stage's time limit")
    parser.add_argument("--wheels", type=Path, default=REPO / ".wheels", help="folder of wheels to install (no index)")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results/gpu-check-<date>)")
    parser.add_argument("--determinism-worker", metavar="JSON", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dim", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(argv)
    args.device = "cpu" if args.rehearse else "cuda"
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.determinism_worker:
        sys.exit(determinism_worker(args.determinism_worker, args.tokens, args.dim, args.vocab))
    if not args.rehearse and not _cuda_visible():
        raise SystemExit("gpu_check: no CUDA device is visible to torch; --rehearse runs the stages on the CPU")
    results = run_check(args)
    sys.exit(0 if all(r["status"] in ("passed", "skipped") for r in results) else 1)


def _cuda_visible():
    probe = [sys.executable, "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"]
    return subprocess.run(probe, capture_output=True).returncode == 0


if __name__ == "__main__":
    main()
