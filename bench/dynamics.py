"""`python bench/dynamics.py`: the paper's overfitting-underfitting argument, measured on the embedded default.

Trains the toy model (amapo_fast/toy.py) once per loss type, on the same generated pairs with the same seed
and schedule, through the trainer itself, and records per logged step the dynamics metrics (which of the
paper's Table 1 cases the pairs fall in, and the share of the gradient magnitude that goes to misranked
pairs) and every --eval_every steps the held-out ranking accuracy. Writes under bench/results/:
  dynamics-<date>.md    a table per loss type: final held-out ranking accuracy, misranked gradient share,
                        the four cases' fractions, seconds
  dynamics-<date>.json  every logged record of every run
  dynamics-<date>.png   misranked gradient share and held-out ranking accuracy against steps, a line per loss

  python bench/dynamics.py                                      # DPO, SimPO, AMaPO and its ablations
  python bench/dynamics.py --loss_types amapo,simpo --steps 50  # fewer

A small model on toy data: what it shows is about these runs, not the paper's setting.
"""
import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from amapo_fast.train import main as train  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_LOSSES = ("dpo", "simpo", "amapo", "amapo_no_znorm", "amapo_no_exp", "amapo_no_adaptive", "amapo_no_zero")
# Per-loss settings (our choices for the toy): beta 2 as the trainer's default for the length-normalised losses,
# SimPO's target margin gamma = 1 (gamma_beta_ratio 0.5), DPO's beta 0.1 on summed log-probs.
SETTINGS = {"dpo": ["--beta", "0.1"], "simpo": ["--beta", "2.0", "--gamma_beta_ratio", "0.5"]}


def run(loss_type: str, steps: int, eval_every: int, seed: int, folder: Path) -> tuple[list[dict], float]:
    """One training run; returns its log records and its wall time."""
    output_dir = folder / loss_type
    args = ["--loss_type", loss_type, *SETTINGS.get(loss_type, ["--beta", "2.0"]), "--max_steps", str(steps),
            "--logging_steps", "1", "--eval_steps", str(eval_every), "--seed", str(seed), "--save_final", "false",
            "--output_dir", str(output_dir)]
    started = time.perf_counter()
    output = io.StringIO()  # the trainer's own lines and progress bars; the log file has everything
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            train(args)
    except BaseException:
        print(output.getvalue()[-4000:], file=sys.stderr)
        raise
    seconds = time.perf_counter() - started
    records = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    return records, seconds


def summary_row(loss_type: str, records: list[dict], seconds: float) -> str:
    steps = [r for r in records if "dynamics/misranked_grad_share" in r]
    evals = [r for r in records if "eval/ranking_accuracy" in r]
    mean = lambda key: sum(r[key] for r in steps) / len(steps)  # noqa: E731
    half = steps[len(steps) // 2:]
    late_share = sum(r["dynamics/misranked_grad_share"] for r in half) / len(half)
    cases = " / ".join(f"{mean(f'dynamics/case{k}'):.2f}" for k in range(1, 5))
    return (f"| {loss_type} | {evals[0]['eval/ranking_accuracy']:.3f} | {evals[-1]['eval/ranking_accuracy']:.3f} | "
            f"{mean('dynamics/misranked_grad_share'):.3f} | {late_share:.3f} | {cases} | "
            f"{mean('dynamics/grad_correct_mean'):.3f} / {mean('dynamics/grad_misranked_mean'):.3f} | {seconds:.0f} |")


def provenance() -> str:
    """Date, command, commit, versions and load: the seconds column is wall time on whatever else the machine ran."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    return (f"\n{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, `python {' '.join(sys.argv)}`, "
            f"commit {commit or 'unknown'}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
            f"load average at the end {' / '.join(f'{x:.1f}' for x in os.getloadavg())}.\n")


def plot(results: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (share_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    for loss_type, (records, _) in results.items():
        steps = [r for r in records if "dynamics/misranked_grad_share" in r]
        share_axis.plot([r["step"] for r in steps], [r["dynamics/misranked_grad_share"] for r in steps], label=loss_type)
        evals = [r for r in records if "eval/ranking_accuracy" in r]
        accuracy_axis.plot([r["step"] for r in evals], [r["eval/ranking_accuracy"] for r in evals], marker="o",
                           label=loss_type)
    share_axis.set(xlabel="optimizer step", ylabel="misranked gradient share (training micro-batch)",
                   title="share of |d loss / dz| on misranked pairs")
    accuracy_axis.set(xlabel="optimizer step", ylabel="held-out ranking accuracy", title="held-out ranking accuracy")
    for axis in (share_axis, accuracy_axis):
        axis.grid(alpha=0.3)
    accuracy_axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loss_types", default=",".join(DEFAULT_LOSSES), help="comma-separated loss types")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run (the default run's 100)")
    parser.add_argument("--eval_every", type=int, default=10, help="held-out evaluation every N steps")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--name", default=f"dynamics-{datetime.date.today().isoformat()}")
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory(prefix="dynamics-") as folder:
        for loss_type in args.loss_types.split(","):
            results[loss_type] = run(loss_type, args.steps, args.eval_every, args.seed, Path(folder))
            print(summary_row(loss_type, *results[loss_type]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    header = (
        f"Dynamics on the embedded default: {args.steps} steps of 16 pairs, seed {args.seed}, the same pairs for "
        "every loss (`python bench/dynamics.py`). Ranking accuracy on the 256 held-out pairs before and after; "
        "misranked share = the mean over steps of the fraction of the gradient magnitude |d loss / dz| that goes "
        "to misranked pairs (r <= 0), over all steps and over the second half; cases = the mean fractions of "
        "the paper's Table 1 cases 1 / 2 / 3 / 4; |d| = the mean gradient magnitude of correctly ranked / "
        "misranked pairs.\n\n"
        "| loss | accuracy before | accuracy after | misranked share | misranked share, 2nd half | cases 1 / 2 / 3 / 4 "
        "| mean \\|d\\| correct / misranked | s |\n|---|---|---|---|---|---|---|---|\n"
    )
    table = header + "\n".join(summary_row(loss, *result) for loss, result in results.items()) + "\n" + provenance()
    (args.out / f"{args.name}.md").write_text(table)
    (args.out / f"{args.name}.json").write_text(json.dumps({loss: {"records": records, "seconds": seconds}
                                                            for loss, (records, seconds) in results.items()}, indent=1))
    plot(results, args.out / f"{args.name}.png")
    print(f"wrote {args.out / args.name}.md / .json / .png")


if __name__ == "__main__":
    main()
