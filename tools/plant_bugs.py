#!/usr/bin/env python
"""Plant small, plausible bugs one at a time in a copy of the repository and report which the tests catch.

Not part of CI: a tool to rerun when the code or the tests change. For every bug below, the copy gets
exactly one edit (an exact snippet replaced), the bug's fast test selection runs there with pytest -x
under a time limit, and the edit is undone. The working tree is never modified.

    python tools/plant_bugs.py                     # every bug; non-zero exit if any is missed
    python tools/plant_bugs.py --only ties-count-as-correct dpo-reference-added
    python tools/plant_bugs.py --list              # the bugs and their test selections
    python tools/plant_bugs.py --tests "tests/test_loss.py -k 'not gradcheck'"   # one selection for every bug

Each snippet must occur exactly once in its file: when the code has drifted, the tool says which
snippets no longer match and stops before running anything. Before the bugs, every selection runs on the
unmodified copy and must pass (a selection that fails without a bug would count every bug as caught).
The tests run one after another: the tool is CPU-heavy (several minutes), so run it on an idle machine.
"""
import argparse
import dataclasses
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Fast test selections (pytest arguments), the quickest to catch a bug of the area first.
OBJECTIVE = ("tests/test_objective.py", "tests/test_loss.py")
FUSED = ("tests/test_chunked.py", "tests/test_loss.py")
DATA = ("tests/test_data.py",)
EVALUATION = ("tests/test_evaluate.py", "-k", "not trained_model and not gathers_every_rank")
RESUME = ("tests/test_resume_rng.py",)
# Boundary cases: a pair exactly at the group mean, infinite (not only NaN) losses and norms, accumulation.
BOUNDARIES = ("tests/test_boundaries.py",)


@dataclasses.dataclass(frozen=True)
class Bug:
    name: str
    path: str  # relative to the repository root
    original: str  # must occur exactly once in the file
    replacement: str
    description: str
    tests: tuple[str, ...]


OBJ = "amapo_fast/objective.py"
AMAPO = "amapo_fast/losses/amapo.py"
LOSS_BASE = "amapo_fast/losses/base.py"
BUGS = [
    Bug("std-biased", AMAPO, "sd = group.std(unbiased=True)", "sd = group.std(unbiased=False)",
        "group standard deviation with the biased (n) divisor instead of n - 1", OBJECTIVE),
    Bug("zscore-times-beta-mu", AMAPO, "margin = beta * torch.exp(torch.clamp(mu * gap / sd",
        "margin = beta * torch.exp(torch.clamp(beta * mu * gap / sd",
        "amapo exponent multiplied by beta * mu instead of mu", OBJECTIVE),
    Bug("no-exp-without-mu", AMAPO, "margin = beta * mu * gap / sd", "margin = beta * gap / sd",
        "amapo_no_exp margin without the factor mu", OBJECTIVE),
    Bug("no-adaptive-without-mu", AMAPO, "margin = beta * mu * gap\n", "margin = beta * gap\n",
        "amapo_no_adaptive margin without the factor mu", OBJECTIVE),
    Bug("no-znorm-divides-by-sd", AMAPO, "torch.clamp(mu * gap, max=", "torch.clamp(mu * gap / sd, max=",
        "amapo_no_znorm exponent z-normalised after all", OBJECTIVE),
    Bug("no-zero-only-below-mean", AMAPO,
        "return beta * torch.exp(torch.clamp(mu * gap / sd, max=MAX_MARGIN_EXPONENT)), mu",
        "margin = beta * torch.exp(torch.clamp(mu * gap / sd, max=MAX_MARGIN_EXPONENT))",
        "amapo_no_zero margin applied only where delta < mu", OBJECTIVE),
    Bug("margin-above-mean", AMAPO, "torch.where(delta < mu, margin", "torch.where(delta >= mu, margin",
        "margin applied where delta >= mu instead of delta < mu", OBJECTIVE),
    Bug("margin-not-detached", AMAPO, "    delta = delta.detach()\n    mu = group.mean()", "    mu = group.mean()",
        "margin not detached: gradient flows through it", OBJECTIVE),
    Bug("degenerate-inf-sd", AMAPO, "if not bool(torch.isfinite(sd) & (sd != 0)):", "if not bool(sd != 0):",
        "degenerate rule without the non-finite sd case", OBJECTIVE),
    Bug("degenerate-zero-sd", AMAPO, "if not bool(torch.isfinite(sd) & (sd != 0)):",
        "if not bool(torch.isfinite(sd)):", "degenerate rule without the sd == 0 case", OBJECTIVE),
    Bug("label-smoothing-sign", LOSS_BASE, "- label_smoothing * F.logsigmoid(-z)", "+ label_smoothing * F.logsigmoid(-z)",
        "label-smoothing term added with the wrong sign", OBJECTIVE),
    Bug("label-smoothing-ignored", LOSS_BASE,
        "-(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)", "-F.logsigmoid(z)",
        "label smoothing ignored", OBJECTIVE),
    Bug("dpo-reference-added", "amapo_fast/losses/dpo.py",
        "beta * (chosen - ref[:num_pairs])\n        rewards_rejected = beta * (rejected - ref[num_pairs:])",
        "beta * (chosen + ref[:num_pairs])\n        rewards_rejected = beta * (rejected + ref[num_pairs:])",
        "DPO reference log-probs added instead of subtracted", OBJECTIVE),
    Bug("dpo-mean-logps", "amapo_fast/losses/dpo.py", "summed = True  # DPO scores summed log-probs", "summed = False",
        "DPO on length-normalised instead of summed log-probs", OBJECTIVE),
    Bug("simpo-gamma-unscaled", "amapo_fast/losses/simpo.py", "torch.full_like(delta, beta * gamma_beta_ratio)",
        "torch.full_like(delta, gamma_beta_ratio)", "SimPO margin gamma_beta_ratio not multiplied by beta", OBJECTIVE),
    Bug("metric-logps-swapped", OBJ,
        '"logps/chosen": chosen.mean(),\n            "logps/rejected": rejected.mean(),',
        '"logps/chosen": rejected.mean(),\n            "logps/rejected": chosen.mean(),',
        "logps/chosen and logps/rejected metric values swapped", OBJECTIVE),
    Bug("margin-accuracy-vs-zero", OBJ, "(delta > mu).double().mean()", "(delta > 0).double().mean()",
        "margin/accuracies counts delta > 0 instead of delta > mu", OBJECTIVE),
    Bug("zero-fraction-inverted", OBJ, "(margin == 0).double().mean()", "(margin != 0).double().mean()",
        "margin/zero_fraction counts the pairs with a margin", OBJECTIVE),
    Bug("loss-summed", OBJ, "loss = terms.per_pair.mean()", "loss = terms.per_pair.sum()",
        "loss summed over pairs instead of averaged", OBJECTIVE),
    Bug("token-accuracy-per-sequence", OBJ, '"mean_token_accuracy": argmax_hit_sums.double().sum() / counts.sum()',
        '"mean_token_accuracy": (argmax_hit_sums.double() / counts).mean()',
        "mean_token_accuracy averaged per sequence instead of per token", OBJECTIVE),
    Bug("slic-hinge-reversed", "amapo_fast/losses/slic.py", "per_pair = torch.relu(-z)", "per_pair = torch.relu(z)",
        "SLiC hinge active above the margin instead of below it", OBJECTIVE),
    Bug("ipo-target-not-halved", "amapo_fast/losses/ipo.py", "target = 1.0 / (2.0 * beta)", "target = 1.0 / beta",
        "IPO target 1/beta instead of 1/(2 beta)", OBJECTIVE),
    Bug("cpo-nll-dropped", "amapo_fast/losses/cpo.py", "nll_weight * pairs.chosen_nll()", "0.0 * pairs.chosen_nll()",
        "CPO without its NLL term", OBJECTIVE),
    Bug("orpo-odds-swapped", "amapo_fast/losses/orpo.py", "(log1m_exp(chosen) - log1m_exp(rejected))",
        "(log1m_exp(rejected) - log1m_exp(chosen))", "ORPO log odds with the log(1 - p) terms swapped", OBJECTIVE),
    Bug("kto-kl-sign-rejected", "amapo_fast/losses/kto.py", "u_rejected = beta * (kl - (rejected - ref_rejected))",
        "u_rejected = beta * ((rejected - ref_rejected) - kl)", "KTO undesirable term with the sign flipped", OBJECTIVE),
    Bug("kl-completions-matched", "amapo_fast/losses/kto.py", "rows[(index + 1) % len(rows)][\"chosen_input_ids\"]",
        "row[\"chosen_input_ids\"]", "KTO's KL completions are each prompt's own chosen response, not the next pair's",
        ("tests/test_losses.py", "-k", "kl_completions")),
    Bug("nll-over-every-row", LOSS_BASE, "return -chosen_sums.sum() / chosen_counts.sum()",
        "return -self.sums.sum() / self.counts.sum()", "NLL_w over chosen and rejected responses", OBJECTIVE),
    Bug("dynamics-share-of-correct", OBJ, "misranked = torch.where(correct, 0.0, grad).sum()",
        "misranked = torch.where(correct, grad, 0.0).sum()",
        "misranked gradient share sums the correctly ranked pairs' gradients", OBJECTIVE),
    Bug("chunk-local-targets-backward", "amapo_fast/chunked.py",
        "rows = ((targets >= start) & (targets < stop)).nonzero().squeeze(1)",
        "rows = (targets < stop).nonzero().squeeze(1)",
        "chunked backward: the target range check of a vocabulary chunk ignores its start", FUSED),
    Bug("chunk-local-targets-forward", "amapo_fast/chunked.py", "logits.gather(1, targets[start:stop, None])",
        "logits.gather(1, targets[: stop - start, None])",
        "chunked forward uses the first chunk's targets in every token chunk", FUSED),
    Bug("argmax-hit-strict", "amapo_fast/chunked.py", "(target_logit >= top)", "(target_logit > top)",
        "chunked pass 1 never counts a target with the largest logit as a hit", FUSED),
    Bug("chunk-local-weight-rows", "amapo_fast/vocab_chunks.py",
        "_accumulate(d_hidden, dlogits, gemm_weight[start:stop])",
        "_accumulate(d_hidden, dlogits, gemm_weight[: stop - start])",
        "pass 2 forms d_hidden from the first vocabulary chunk's weight rows in every chunk", FUSED),
    Bug("upstream-grad-ignored", "amapo_fast/loss.py", "coef * grad_loss.to(coef.dtype)", "coef",
        "fused backward ignores the incoming gradient (loss scaling, accumulation)", FUSED),
    Bug("plain-prompt-wrong-end", "amapo_fast/data.py", "return prompt_ids[-self.max_prompt_length :]",
        "return prompt_ids[: self.max_prompt_length]", "prompt without BOS truncated from the right", DATA),
    Bug("bos-prompt-wrong-end", "amapo_fast/data.py",
        "return prompt_ids[:1] + prompt_ids[len(prompt_ids) - self.max_prompt_length + 1 :]",
        "return prompt_ids[: self.max_prompt_length]", "prompt with BOS (chat template) truncated from the right",
        DATA),
    Bug("response-cut-from-left", "amapo_fast/data.py", "chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]",
        "chosen_ids, rejected_ids = chosen_ids[-room:], rejected_ids[:room]",
        "chosen response truncated from the left", DATA),
    Bug("labels-not-shifted", "amapo_fast/data.py", "sequences.append((tokens[:-1], labels[1:]))",
        "sequences.append((tokens[:-1], labels[:-1]))", "collator labels not shifted by one", DATA),
    Bug("ties-count-as-correct", "amapo_fast/evaluate.py", "correct = int((delta > 0).sum())",
        "correct = int((delta >= 0).sum())", "ranking ties counted as correct", EVALUATION),
    Bug("ranking-on-sums", "amapo_fast/evaluate.py", "delta = scores.chosen_mean - scores.rejected_mean",
        "delta = scores.chosen_logps - scores.rejected_logps",
        "ranking accuracy on summed instead of average log-probs", EVALUATION),
    Bug("rng-not-restored", "amapo_fast/checkpoint.py", "set_rng_state(torch.load(rng_file, weights_only=False))",
        "torch.load(rng_file, weights_only=False)", "resume does not restore the RNG state", RESUME),
    Bug("margin-at-mean-too", AMAPO, "torch.where(delta < mu, margin", "torch.where(delta <= mu, margin",
        "AMaPO margin also given to a pair exactly at the group mean", BOUNDARIES + OBJECTIVE),
    Bug("inf-grad-norm-finite", "amapo_fast/guard.py", "if math.isfinite(grad_norm):",
        "if not math.isnan(grad_norm):", "non-finite guard treats an infinite gradient norm as finite", BOUNDARIES),
    Bug("inf-loss-finite", "amapo_fast/guard.py", "finite = torch.isfinite(loss.detach())",
        "finite = ~torch.isnan(loss.detach())", "non-finite guard lets an infinite loss through", BOUNDARIES),
    Bug("fsdp2-applies-inf-step", "amapo_fast/distributed.py", "if math.isfinite(norm):  # as DeepSpeed does",
        "if not math.isnan(norm):  # as DeepSpeed does", "FSDP2 applies a step whose gradient norm is infinite",
        BOUNDARIES),
    Bug("fsdp2-accumulation-undivided", "amapo_fast/distributed.py",
        "(loss / self.optim.gradient_accumulation_steps).backward()", "loss.backward()",
        "FSDP2 gradient accumulation does not divide the loss by the accumulation steps", BOUNDARIES),
    Bug("manifest-vouches-listed-only", "amapo_fast/checkpoint.py",
        "unlisted = [name for name in needed if name not in entries]", "unlisted = []",
        "resume verifies only the files the manifest lists, not every file the checkpoint needs",
        ("tests/test_trust.py", "-k", "vouch")),
    Bug("resume-passes-over-damaged", "amapo_fast/checkpoint.py", "for marker in (TRAINER_STATE, MANIFEST))",
        "for marker in (TRAINER_STATE,))", "--resume latest passes over a newest checkpoint without its trainer state",
        ("tests/test_trust.py", "-k", "passed_over")),
    Bug("metric-window-not-restored", "amapo_fast/train.py",
        '        window.restore(state.get("metric_window"), self.env.is_main)\n', "",
        "the first log record after a resume averages only the steps since the resume", RESUME),
    Bug("dataloader-draws-global-rng", "amapo_fast/batches.py", "                generator=torch.Generator(),\n", "",
        "training DataLoader draws its seed from the global RNG (shifts dropout after a resume)", RESUME),
]


def drift(bugs, root: Path | None = None) -> list[str]:
    """One line per bug whose snippet does not occur exactly once in its file under root (default: this
    repository), or whose edit would not compile."""
    problems = []
    for bug in bugs:
        path = (root or REPO) / bug.path
        if not path.is_file():
            problems.append(f"{bug.name}: {bug.path} does not exist")
            continue
        count = path.read_text(encoding="utf-8").count(bug.original)
        if count != 1:
            problems.append(f"{bug.name}: snippet found {count} times in {bug.path} (expected once): {bug.original!r}")
        elif bug.path.endswith(".py"):
            planted = path.read_text(encoding="utf-8").replace(bug.original, bug.replacement)
            try:
                compile(planted, bug.path, "exec")
            except SyntaxError as error:
                problems.append(f"{bug.name}: the planted {bug.path} does not compile: {error}")
    return problems


def copy_repository(destination: Path):
    """Tracked and untracked-but-not-ignored files (no caches, no build outputs, no .git)."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout
    for name in filter(None, listing.split(b"\0")):
        relative = os.fsdecode(name)
        source = REPO / relative
        if not os.path.lexists(source) or (source.is_dir() and not source.is_symlink()):
            continue  # deleted in the working tree, or a nested repository
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)
    # `amapo_fast.kernels` is the top-level kernels/ folder once installed; from a source tree it takes a link.
    link = destination / "amapo_fast" / "kernels"
    if (destination / "kernels").is_dir() and not os.path.lexists(link):
        link.symlink_to(os.path.join("..", "kernels"))


def test_environment(copy: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    # The copy's package must be the one imported, not an installed one.
    probe = "import amapo_fast, amapo_fast.kernels as k; print(amapo_fast.__file__); print(k.__file__)"
    result = subprocess.run([sys.executable, "-c", probe], cwd=copy, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"the repository copy does not import: {result.stderr.strip().splitlines()[-1:]}")
    for imported in result.stdout.split():
        if not Path(imported).absolute().is_relative_to(copy):
            sys.exit(f"tests in the copy would import {imported}, not the copy's code: check PYTHONPATH / installs")
    return env


def run_tests(copy: Path, env: dict, selection, timeout: float) -> tuple[str, str, float]:
    """(status, detail, seconds): status is passed, failed, timeout or error (pytest could not run the tests)."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider", *selection]
    started = time.monotonic()
    process = subprocess.Popen(
        command, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return "timeout", f"no result within {timeout:.0f} s", time.monotonic() - started
    seconds = time.monotonic() - started
    lines = output.splitlines()
    if process.returncode == 0:
        return "passed", lines[-1] if lines else "", seconds
    if process.returncode == 1:
        failed = [line for line in lines if line.startswith("FAILED ")]
        return "failed", (failed[0][len("FAILED "):] if failed else lines[-1])[:110], seconds
    return "error", f"pytest exit {process.returncode}: " + " | ".join(lines[-3:])[-200:], seconds


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="plant only these bugs (see --list)")
    parser.add_argument("--tests", metavar="ARGS", help="pytest arguments (one string) for every bug instead of each bug's selection")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per test run (default 600)")
    parser.add_argument("--skip-baseline", action="store_true", help="do not first check that the selections pass unmodified")
    parser.add_argument("--list", action="store_true", help="print the bugs and their test selections, run nothing")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    bugs = BUGS
    if args.only:
        unknown = sorted(set(args.only) - {bug.name for bug in BUGS})
        if unknown:
            sys.exit(f"unknown bug name(s) {unknown}; --list shows them")
        bugs = [bug for bug in BUGS if bug.name in args.only]
    if args.tests:
        bugs = [dataclasses.replace(bug, tests=tuple(shlex.split(args.tests))) for bug in bugs]
    if args.list:
        for bug in bugs:
            print(f"{bug.name:30} {bug.path:26} {bug.description}\n{'':30} tests: {' '.join(bug.tests)}")
        return 0
    problems = drift(bugs)
    if problems:
        print("the code has drifted from these snippets; update BUGS in tools/plant_bugs.py:", file=sys.stderr)
        print("\n".join(f"  {line}" for line in problems), file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="plant-bugs-") as directory:
        copy = Path(directory)
        copy_repository(copy)
        env = test_environment(copy)
        if not args.skip_baseline:
            for selection in dict.fromkeys(bug.tests for bug in bugs):
                status, detail, seconds = run_tests(copy, env, selection, args.timeout)
                print(f"baseline {' '.join(selection)}: {status} ({seconds:.0f} s) {detail}", flush=True)
                if status != "passed":
                    print("the selection fails without any planted bug: fix that first", file=sys.stderr)
                    return 2

        rows = []
        for bug in bugs:
            path = copy / bug.path
            original = path.read_text(encoding="utf-8")
            path.write_text(original.replace(bug.original, bug.replacement), encoding="utf-8")
            try:
                status, detail, seconds = run_tests(copy, env, bug.tests, args.timeout)
            finally:
                path.write_text(original, encoding="utf-8")
            result = {"failed": "caught", "passed": "MISSED", "timeout": "TIMEOUT", "error": "ERROR"}[status]
            rows.append((result, bug, detail, seconds))
            print(f"{result:7} {bug.name:30} {seconds:5.0f} s  {detail}", flush=True)

    print("\n| result | bug | file | what | caught by / detail | s |\n|---|---|---|---|---|---|")
    for result, bug, detail, seconds in rows:
        print(f"| {result} | {bug.name} | {bug.path} | {bug.description} | {detail.replace('|', '/')} | {seconds:.0f} |")
    caught = sum(result == "caught" for result, *_ in rows)
    print(f"\n{caught} of {len(rows)} planted bugs caught")
    # A timeout or a pytest error is not a clean catch either: it needs a look.
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
