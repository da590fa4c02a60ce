"""`python bench/run.py`: the loss layer (lm_head + preference loss) of every path, side by side.

Times forward+backward and forward alone, measures peak memory, and writes <name>.md / .json / .png
under the results folder (default bench/results/<device>-<date>.*). See docs/bench.md.

  python bench/run.py                      # CPU: small fp32 shapes (D=256, V=8192, N = 512..2048)
  python bench/run.py --device cuda        # GPU: Llama-3-8B head (D=4096, V=128256, bf16), N = 2k..32k
  python bench/run.py --quick              # a tiny shape, to check that everything runs
  python bench/run.py --shapes "N=4096,T=512,D=256,V=32000" --workloads prompt25 --paths reference,chunked
"""
import argparse
import datetime
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench import report  # noqa: E402
from bench.paths import PATHS, parse_paths  # noqa: E402
from bench.worker import RESULT_PREFIX  # noqa: E402
from bench.workloads import Shape, check_workload, parse_shapes  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
PHASES = ("time", "memory")  # the two passes of a worker over its cases (see worker.py)
LLAMA3_8B_HEAD = Shape(tokens=16384, seq_len=1024, hidden=4096, vocab=128256)
GPU_TOKENS = (2048, 4096, 8192, 16384, 32768)
CPU_SHAPE = Shape(tokens=2048, seq_len=256, hidden=256, vocab=8192)
CPU_TOKENS = (512, 1024, 2048)
QUICK_SHAPE = Shape(tokens=256, seq_len=64, hidden=64, vocab=512)


def default_shapes(device, quick):
    if quick:
        return [QUICK_SHAPE]
    base, tokens = (LLAMA3_8B_HEAD, GPU_TOKENS) if device.type == "cuda" else (CPU_SHAPE, CPU_TOKENS)
    return [Shape(n, base.seq_len, base.hidden, base.vocab) for n in tokens]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--shapes", help='";"-separated shapes of N,T,D,V, e.g. "N=4096,T=512,D=256,V=32000"; '
                        "keys left out take the device default")
    parser.add_argument("--workloads", default="dense,realistic", help="dense, realistic, promptXX (comma-separated)")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {', '.join(PATHS)}")
    parser.add_argument("--quick", action="store_true", help="one tiny shape and few repeats: checks that it all runs")
    parser.add_argument("--reps", type=int, help="timed repeats per measurement (default 10 on cuda, 3 on cpu, 2 quick)")
    parser.add_argument("--budget-s", type=float, default=5.0,
                        help="stop repeating a measurement after this many seconds once 3 runs are in")
    parser.add_argument("--isolate", choices=("case", "path"), default="path",
                        help="one worker process per path (default: compile caches stay warm across shapes) or per case")
    parser.add_argument("--group-timeout", type=float, default=0.0, help="kill a worker after this many seconds (0: never)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="results folder")
    parser.add_argument("--name", help="file stem of the results (default <device>-<date>, with -quick for --quick)")
    return parser.parse_args(argv)


def plan(args):
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    default = default_shapes(device, args.quick)
    shapes = parse_shapes(args.shapes, default[0]) if args.shapes else default
    workloads = [check_workload(w.strip()) for w in args.workloads.split(",") if w.strip()]
    skipped, paths = {}, []
    for name in parse_paths(args.paths):
        reason = PATHS[name].available(device)
        if reason:
            skipped[name] = reason
        else:
            paths.append(name)
    cases = [
        {"path": path, "workload": workload, "shape": shape.to_dict(), "seed": 1000 + index}
        for index, shape in enumerate(shapes)
        for workload, path in itertools.product(workloads, paths)
    ]
    return device, cases, skipped


def run_group(cases, spec, log, timeout_s, progress):
    """Run cases in one worker process (a timing phase, then a memory phase); merge its two results per case.

    A case the worker did not finish (it crashed or was killed) gets an error naming why.
    """
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as spec_file:
        json.dump({**spec, "cases": cases}, spec_file)
    merged = [dict(case) for case in cases]
    phases_done = [set() for _ in cases]
    try:
        process = subprocess.Popen(
            [sys.executable, str(BENCH_DIR / "worker.py"), spec_file.name], stdout=subprocess.PIPE, stderr=log, text=True
        )
        timer = threading.Timer(timeout_s, process.kill) if timeout_s > 0 else None
        if timer:
            timer.start()
        for line in process.stdout:
            if not line.startswith(RESULT_PREFIX):
                continue
            result = json.loads(line[len(RESULT_PREFIX):])
            index, phase = result.pop("index"), result.pop("phase")
            if "error" in result:  # keep both phases' errors, each named
                earlier = merged[index].get("error")
                result["error"] = f"{earlier + '; ' if earlier else ''}{phase}: {result['error']}"
            merged[index].update(result)
            phases_done[index].add(phase)
            progress.set_postfix_str(f"{phase} {cases[index]['path']} {cases[index]['workload']}")
            progress.update()
        returncode = process.wait()
        if timer:
            timer.cancel()
    finally:
        os.unlink(spec_file.name)
    for case, done in zip(merged, phases_done):
        if len(done) < len(PHASES):
            why = "killed after --group-timeout" if returncode == -9 else f"worker exited with code {returncode}"
            case.setdefault("error", f"{why} before its {', '.join(sorted(set(PHASES) - done))} phase; see the .log file")
            progress.update(len(PHASES) - len(done))
    return merged


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device, cases, skipped = plan(args)
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    spec = {
        "device": str(device),
        "dtype": dtype,
        "reps": args.reps or (2 if args.quick else 10 if device.type == "cuda" else 3),
        "warmup": 1,
        "budget_s": args.budget_s,
    }
    groups = [[case] for case in cases] if args.isolate == "case" else [
        [case for case in cases if case["path"] == name] for name in dict.fromkeys(c["path"] for c in cases)
    ]
    # A --quick smoke run gets its own stem, so it never overwrites a real run's results of the same day.
    stem = args.name or f"{device.type}-{datetime.date.today().isoformat()}" + ("-quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / f"{stem}.log"
    environment = report.environment(device, dtype, ["bench/run.py"] + list(argv))
    results = []
    with open(log_path, "w") as log, tqdm(total=len(PHASES) * len(cases), desc="bench", unit="run") as progress:
        for group in groups:
            results += run_group(group, spec, log, args.group_timeout, progress)
            # Written after every group, so a run stopped from outside still leaves what it measured.
            files = report.write(args.out, stem, {**environment, **report.machine_load()}, results, skipped)
    if log_path.stat().st_size:
        files["log"] = log_path  # the workers' stderr: warnings, tracebacks of failed cases
    else:
        log_path.unlink()
    print(files["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in files.values()))
    if args.quick:
        print("note: --quick times one tiny shape with 2 repeats to check that every path runs; its times and "
              "ratios are dominated by noise and launch overhead: run without --quick for figures to compare")
    return files


if __name__ == "__main__":
    main()
