"""Turn measured cases into the results folder: a Markdown table, a JSON file and a PNG plot.

Every file records the device, the library versions, the date and the exact command, so a number is
never separated from where it came from.
"""
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import torch

from amapo_fast import vocab_chunks
from bench.paths import PATHS
from bench.workloads import Shape

MIB = 2**20
VERSIONED_PACKAGES = ("torch", "triton", "liger-kernel", "transformers", "cut-cross-entropy", "numpy")


def environment(device: torch.device, dtype: str, argv) -> dict:
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    if device.type == "cuda":
        name, detail = _gpu_description()
    else:
        name = platform.processor() or platform.machine()
        detail = f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        commit = None
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name] + list(argv)),
        "device": device.type,
        "device_name": name,
        "device_detail": detail,
        "dtype": dtype,
        "python": platform.python_version(),
        "versions": versions,
        "git_commit": commit,
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        # How pass 2 adds 16-bit GEMMs into fp32 on this device (the workers run the same torch).
        "accumulate_way": vocab_chunks.accumulate_way(device),
        **machine_load(),
    }


def _gpu_description():
    """(name, detail) from nvidia-smi: asking torch would open a CUDA context in the driver process,
    which would hold GPU memory while the workers measure."""
    query = "name,memory.total,driver_version"
    try:
        line = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader", "--id=0"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown GPU (nvidia-smi unavailable)", f"CUDA {torch.version.cuda}"
    name, memory, driver = (field.strip() for field in line.split(","))
    return name, f"{memory}, driver {driver}, CUDA {torch.version.cuda}"


def machine_load() -> dict:
    """Other work on the machine skews CPU timings: the 1, 5 and 15 minute load averages, read now."""
    return {"load_average": [round(load, 2) for load in os.getloadavg()]}


def _case_key(case):
    return (case["workload"], Shape(**case["shape"]))


def derived_metrics(cases):
    """Add tokens/s, TFLOP/s and the ratios to the reference and to Liger of the same shape and workload."""
    by_key = defaultdict(dict)
    for case in cases:
        by_key[_case_key(case)][case["path"]] = case
    for (workload, shape), paths in by_key.items():
        for name, case in paths.items():
            if "error" in case:
                continue
            seconds = case["fwd_bwd_ms"] / 1e3
            path = PATHS[name]
            reference, liger = (paths.get(peer, {}) for peer in path.peers)
            fed = case["response_tokens"] if path.skips_prompt else shape.tokens
            case["tokens_per_s"] = shape.tokens / seconds
            case["tflops"] = path.flops_per_token_dv * fed * shape.hidden * shape.vocab / seconds / 1e12
            for peer_name, peer in (("reference", reference), ("liger", liger)):
                if "fwd_bwd_ms" in peer:
                    case[f"speedup_vs_{peer_name}"] = peer["fwd_bwd_ms"] / case["fwd_bwd_ms"]
                    case[f"memory_vs_{peer_name}"] = case["peak_bytes"] / peer["peak_bytes"]
    return cases


def _fmt(value, spec):
    return "—" if value is None else format(value, spec)


def markdown_table(cases) -> str:
    header = (
        "| workload | shape | response % | path | fwd+bwd ms | fwd ms | peak MiB | beyond grads MiB "
        "| tokens/s | TFLOP/s | speedup vs ref | mem vs ref | speedup vs Liger |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for case in sorted(cases, key=lambda c: (c["workload"], Shape(**c["shape"]).tokens, list(PATHS).index(c["path"]))):
        shape = Shape(**case["shape"])
        if "error" in case:
            cells = [case["workload"], shape.label(), "", case["path"], case["error"]] + [""] * 8
            lines.append("| " + " | ".join(cells) + " |")
            continue
        lines.append(
            f"| {case['workload']} | {shape.label()} | {100 * case['response_fraction']:.0f} | {case['path']} "
            f"| {case['fwd_bwd_ms']:.1f} | {case['fwd_ms']:.1f} | {case['peak_bytes'] / MIB:.1f} "
            f"| {case['extra_bytes'] / MIB:.1f} | {case['tokens_per_s']:.3g} | {case['tflops']:.3g} "
            f"| {_fmt(case.get('speedup_vs_reference'), '.2f')} | {_fmt(case.get('memory_vs_reference'), '.3f')} "
            f"| {_fmt(case.get('speedup_vs_liger'), '.2f')} |"
        )
    return header + "\n".join(lines) + "\n"


def _find(cases, path, workload, **shape_fields):
    for case in cases:
        shape = case["shape"]
        if case["path"] == path and case["workload"] == workload and all(shape[k] == v for k, v in shape_fields.items()):
            return case
    return None


def _verdict(ok):
    return "met" if ok else "NOT met"


def goals(cases, env) -> list:
    """Where this run stands against the project's speed and memory goals; a goal whose cases were not run says so."""
    results = []
    if env["device"] == "cpu" and env["dtype"] == "fp32":
        where = dict(tokens=4096, seq_len=512, hidden=256, vocab=32000)
        ours, ref = _find(cases, "chunked", "prompt25", **where), _find(cases, "reference", "prompt25", **where)
        if ours and ref and "error" not in ours and "error" not in ref:
            memory = ours["peak_bytes"] / ref["peak_bytes"]
            time_ratio = ours["fwd_bwd_ms"] / ref["fwd_bwd_ms"]
            results.append({
                "goal": "CPU fp32 D=256 V=32000, 8x512 tokens, 1/4 prompt: chunked peak <= 10% of reference",
                "measured": f"{100 * memory:.1f}% ({ours['peak_bytes'] / MIB:.0f} vs {ref['peak_bytes'] / MIB:.0f} MiB)",
                "status": _verdict(memory <= 0.10),
            })
            results.append({
                "goal": "same shape: chunked time <= reference time",
                "measured": f"{time_ratio:.2f}x the reference ({ours['fwd_bwd_ms']:.0f} vs {ref['fwd_bwd_ms']:.0f} ms)",
                "status": _verdict(time_ratio <= 1.0),
            })
    if env["device"] == "cuda" and env["dtype"] == "bf16":
        where = dict(tokens=16384, hidden=4096, vocab=128256)
        for workload in ("dense", "realistic"):
            ours, ref = _find(cases, "triton", workload, **where), _find(cases, "reference", workload, **where)
            if ours and ref and "error" not in ours and "error" not in ref:
                share = ours["extra_bytes"] / ref["extra_bytes"]
                results.append({
                    "goal": f"GPU bf16 Llama-3-8B head N=16k ({workload}): memory beyond inputs+grads < 1% of reference",
                    "measured": f"{100 * share:.2f}% ({ours['extra_bytes'] / MIB:.0f} vs {ref['extra_bytes'] / MIB:.0f} MiB)",
                    "status": _verdict(share < 0.01),
                })
        ours, liger, ref = (_find(cases, p, "realistic", **where) for p in ("triton", "liger", "reference"))
        for peer, name, target in ((liger, "Liger SimPO", 1.5), (ref, "eager reference", 2.0)):
            if ours and peer and "error" not in ours and "error" not in peer:
                speedup = peer["fwd_bwd_ms"] / ours["fwd_bwd_ms"]
                results.append({
                    "goal": f"GPU N=16k realistic: >= {target}x faster than {name}",
                    "measured": f"{speedup:.2f}x",
                    "status": _verdict(speedup >= target),
                })
        ours, liger = _find(cases, "triton", "dense", **where), _find(cases, "liger", "dense", **where)
        if ours and liger and "error" not in ours and "error" not in liger:
            ratio = ours["fwd_bwd_ms"] / liger["fwd_bwd_ms"]
            results.append({
                "goal": "GPU N=16k dense: within 10% of Liger's time",
                "measured": f"{ratio:.2f}x Liger's time",
                "status": _verdict(ratio <= 1.10),
            })
    return results


def _plain_number(value, _position=None) -> str:
    """Tick labels as plain numbers (4096, 0.5, 2e+05), never matplotlib's log-axis '2x10^0'."""
    return f"{value:g}"


def figure(cases, env: dict):
    """Time and peak memory per path, one row per workload and head shape (D, V): against N on log-log axes
    when several N were measured, as labelled bars when one was. The title names the device, the dtype and
    what was measured, so the image reads without the Markdown beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    groups = sorted({(case["workload"], case["shape"]["hidden"], case["shape"]["vocab"]) for case in cases})
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 4 * len(groups) + 0.6), squeeze=False)
    measures = (("fwd_bwd_ms", 1, "forward+backward time (ms, median)"), ("peak_bytes", MIB, "peak memory above inputs (MiB)"))
    for row, (workload, hidden, vocab) in enumerate(groups):
        members = [c for c in cases if "error" not in c
                   and (c["workload"], c["shape"]["hidden"], c["shape"]["vocab"]) == (workload, hidden, vocab)]
        token_counts = sorted({c["shape"]["tokens"] for c in members})
        names = [name for name in PATHS if any(c["path"] == name for c in members)]
        for column, (key, scale, label) in enumerate(measures):
            axis = axes[row][column]
            if len(token_counts) == 1:
                values = [next(c[key] for c in members if c["path"] == name) / scale for name in names]
                bars = axis.barh(names, values)
                axis.bar_label(bars, labels=[f"{value:.3g}" for value in values], padding=3)
                axis.invert_yaxis()
                axis.set_xlabel(label)
                axis.set_title(f"{workload}, N={token_counts[0]} tokens, D={hidden}, V={vocab}")
                axis.margins(x=0.15)
                continue
            for name in names:
                points = sorted((c["shape"]["tokens"], c[key] / scale) for c in members if c["path"] == name)
                axis.plot(*zip(*points), marker="o", label=name)
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xticks(token_counts)
            axis.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            for ticks in (axis.xaxis, axis.yaxis):
                ticks.set_major_formatter(FuncFormatter(_plain_number))
                ticks.set_minor_locator(NullLocator())
            axis.set_xlabel("tokens N (positions of the batch)")
            axis.set_ylabel(label)
            axis.set_title(f"{workload}, D={hidden}, V={vocab}")
            axis.grid(True, alpha=0.3)
            axis.legend(fontsize=8)
    fig.suptitle(
        f"Loss layer forward+backward: {env['device_name']} ({env['device']}), {env['dtype']}; "
        f"ours and the reference run AMaPO, Liger SimPO",
        fontsize=11,
    )
    fig.tight_layout()
    return fig


def plot(cases, path: Path, env: dict):
    """The figure of `figure` as a PNG."""
    import matplotlib.pyplot as plt

    fig = figure(cases, env)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out_dir: Path, stem: str, env: dict, cases: list, skipped: dict) -> dict:
    """Write <stem>.json, <stem>.md and <stem>.png under out_dir; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = derived_metrics(cases)
    goal_rows = goals(cases, env)
    files = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    files["json"].write_text(json.dumps({"environment": env, "skipped_paths": skipped, "goals": goal_rows,
                                         "cases": cases}, indent=1))
    text = render_markdown(env, cases, skipped, goal_rows, files["png"].name)
    files["md"].write_text(text)
    plot(cases, files["png"], env)
    return files


def render_markdown(env, cases, skipped, goal_rows, png_name) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    parts = [
        f"# Loss-layer benchmark: {env['device_name']} ({env['device']}), {env['dtype']}\n",
        f"- date (UTC): {env['date_utc']}\n- command: `{env['command']}`\n- device: {env['device_detail']}\n"
        f"- versions: Python {env['python']}, {versions}\n- load average (1/5/15 min, when written): "
        f"{' / '.join(map(str, env['load_average']))}\n- git commit: {env['git_commit'] or 'none (uncommitted tree)'}\n",
        "\nTimes are medians; memory is the peak above the inputs (hidden, weight, labels), including the "
        "gradients dH and dW; \"beyond grads\" subtracts them. tokens/s counts every position N; TFLOP/s counts "
        "8·N·D·V (ours) or 6·N·D·V (peers) over the tokens each path feeds its matmuls. Ours and the reference "
        "run AMaPO, Liger runs SimPO; `*-frozen` paths train hidden only. The `ce-*` paths run the token-mean "
        "cross-entropy and take their ratios against `ce-eager` and `ce-liger`. See docs/bench.md.\n\n",
        markdown_table(cases),
    ]
    if skipped:
        parts.append("\nNot run here: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()) + "\n")
    if goal_rows:
        parts.append("\n## Goals\n\n| goal | measured | status |\n|---|---|---|\n")
        parts.extend(f"| {g['goal']} | {g['measured']} | {g['status']} |\n" for g in goal_rows)
    parts.append(f"\n![time and memory against N]({png_name})\n")
    return "".join(parts)
