"""Ranking accuracy (paper eq. 4), the paper's own yardstick: `python -m amapo_fast.evaluate`.

A pair is ranked correctly when the policy gives the chosen response a strictly higher average
response log-prob than the rejected one (the mean over response tokens, no reference model). Log-probs come from the fused head (`sequence_logps`: no [tokens x vocab] logits), batched,
under no-grad, with the training tokenization (`data.tokenize_preference_dataset`).

Library entry points (stable; the trainer's periodic evaluation calls them):
  `eval_dataloader(tokenized, collator, batch_size)`  this rank's length-sorted share of a tokenized set
  `score_pairs(model, dataloader)`  -> `PairScores`, every rank's pairs gathered in dataset order
  `ranking_summary(scores, beta)`   -> dict: accuracy, 95% Wilson interval, mean reward margin, counts, and
                                       the paper's Table 1 figures under AMaPO's split (`amapo_dynamics`)
  `evaluate_ranking(model, dataloader, beta=...)` = `ranking_summary(score_pairs(...))`
`model` is anything whose `model(batch, sequence_logps=True)` returns per-row summed response log-probs
and response-token counts ([2B] each, chosen rows first): a `PreferencePolicy`, the same policy sharded by
FSDP2, or a DeepSpeed engine around it. Under torch.distributed every rank scores its share and the
scores are gathered; each rank runs the same number of forwards, as sharded models require.

Command line (one or several devices; under torchrun each process holds a replica and scores a share):
  python -m amapo_fast.evaluate --model DIR_OR_NAME --dataset NAME_OR_FILE [--split test_prefs]
  torchrun --nproc_per_node 8 -m amapo_fast.evaluate --compare DIR_A DIR_B --dataset THU-KEG/RM-Bench --split train
writes `ranking_eval.json` and `ranking_eval.md` (one column per model) to --output-dir. RM-Bench-format data
(three chosen and three rejected responses per prompt) also gets the easy / normal / hard figures of the
paper's Table 3 (see rmbench.py). See docs/evaluate.md.
"""
import argparse
import dataclasses
import json
import math
import os
import time

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from . import rmbench
from .cli import (
    ArgumentParser,
    HelpFormatter,
    UserError,
    add_debug_flag,
    both_spellings,
    check_model_folder,
    check_output_dir,
    exits_cleanly_on_user_errors,
    progress_bars,
    quiet_library_progress,
    require_existing_if_local,
    user_errors,
)
from .errors import NonFiniteError
from .objective import DYNAMICS_KEYS, preference_objective

# Two-sided 95% normal quantile, for the Wilson score interval.
Z_95 = 1.959963984540054
# Columns whose values name a pair's subset; the first one present gets per-subset figures.
SUBSET_COLUMNS = ("subset", "domain")
RESULT_FILES = ("ranking_eval.json", "ranking_eval.md")


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclasses.dataclass
class PairScores:
    """Per-pair summed response log-probs and response-token counts, in dataset order (fp64 / int64, CPU)."""

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    @property
    def chosen_mean(self) -> torch.Tensor:
        return self.chosen_logps / self.chosen_tokens

    @property
    def rejected_mean(self) -> torch.Tensor:
        return self.rejected_logps / self.rejected_tokens

    def __len__(self):
        return self.chosen_logps.numel()

    def select(self, index) -> "PairScores":
        return PairScores(*(getattr(self, field.name)[index] for field in dataclasses.fields(self)))


class RankShardSampler(Sampler):
    """This rank's share of a dataset for evaluation.

    Rows are visited longest first (less padding per batch; an out-of-memory shows up at once) and dealt
    round-robin, so ranks get similar lengths. Every rank gets ceil(N / world) positions, padded with
    repeats of its last row, so that all ranks run the same number of forwards; `num_real` says how many
    positions count.
    """

    def __init__(self, lengths, rank: int | None = None, world_size: int | None = None):
        if len(lengths) == 0:
            raise ValueError("cannot evaluate an empty dataset")
        default_rank, default_world = _rank_and_world()
        rank = default_rank if rank is None else rank
        world_size = default_world if world_size is None else world_size
        order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
        mine = order[rank::world_size]
        self.num_real = len(mine)
        per_rank = math.ceil(len(order) / world_size)
        self.indices = mine + [(mine or order)[-1]] * (per_rank - len(mine))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def sequence_lengths(tokenized) -> list[int]:
    """Longest of a pair's two sequences (prompt + response), per tokenized row."""
    columns = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
    prompts, chosen, rejected = (tokenized[column] for column in columns)
    return [len(p) + max(len(c), len(r)) for p, c, r in zip(prompts, chosen, rejected)]


def eval_dataloader(tokenized, collator, batch_size: int) -> DataLoader:
    """This rank's batches of a tokenized preference dataset, for `score_pairs` (see `RankShardSampler`)."""
    sampler = RankShardSampler(sequence_lengths(tokenized))
    return DataLoader(tokenized, batch_size=batch_size, sampler=sampler, collate_fn=collator)


def _model_device(model) -> torch.device:
    parameter = next(iter(model.parameters()), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _all_gather(value) -> list:
    """[value of rank 0, value of rank 1, ...]; [value] outside torch.distributed."""
    _, world = _rank_and_world()
    if world == 1:
        return [value]
    gathered = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


@torch.no_grad()
def score_pairs(model, dataloader, *, desc: str = "ranking eval", progress: bool = True) -> PairScores:
    """Summed response log-probs and token counts of every pair, gathered from all ranks (the same on each).

    With an `eval_dataloader` the pairs come back in the tokenized dataset's order and padding repeats are
    dropped; with any other dataloader every row it yields counts, concatenated in rank order.
    """
    rank, _ = _rank_and_world()
    device = _model_device(model)
    was_training = model.training
    model.eval()
    sums, counts = [], []
    bar = progress and rank == 0 and progress_bars()
    for batch in tqdm(dataloader, desc=desc, unit="batch", disable=not bar, dynamic_ncols=True):
        batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
        row_sums, row_counts = model(batch, sequence_logps=True)
        sums.append(row_sums.detach().double().cpu().view(2, -1))  # [chosen rows; rejected rows]
        counts.append(row_counts.detach().long().cpu().view(2, -1))
    model.train(was_training)
    sums = torch.cat(sums, dim=1) if sums else torch.zeros(2, 0, dtype=torch.float64)
    counts = torch.cat(counts, dim=1) if counts else torch.zeros(2, 0, dtype=torch.long)

    sampler = getattr(dataloader, "sampler", None)
    positions = None
    if isinstance(sampler, RankShardSampler):
        positions = torch.tensor(sampler.indices[: sampler.num_real], dtype=torch.long)
        sums, counts = sums[:, : sampler.num_real], counts[:, : sampler.num_real]
    shards = _all_gather((positions, sums, counts))
    sums = torch.cat([shard[1] for shard in shards], dim=1)
    counts = torch.cat([shard[2] for shard in shards], dim=1)
    if positions is not None:
        order = torch.argsort(torch.cat([shard[0] for shard in shards]))
        sums, counts = sums[:, order], counts[:, order]
    if sums.shape[1] == 0:
        raise ValueError("the evaluation dataloader yielded no pair")
    # Checked after the gather, so that every rank raises together instead of leaving the others waiting.
    nonfinite = (~torch.isfinite(sums)).any(0).nonzero().flatten()
    if nonfinite.numel():
        raise NonFiniteError(
            f"{nonfinite.numel()} of {sums.shape[1]} pairs have a NaN or infinite response log-prob (first: pair "
            f"{nonfinite[0].item()} in dataset order): the model's outputs are not finite, so no ranking accuracy "
            "is reported"
        )
    empty = (counts == 0).any(0).nonzero().flatten()
    if empty.numel():
        raise ValueError(
            f"pair(s) {empty[:8].tolist()} (dataset order) have a sequence with no response token: "
            "their average log-prob is undefined"
        )
    return PairScores(sums[0], sums[1], counts[0], counts[1])


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (stays inside [0, 1], sound for small n and p near 0 or 1)."""
    if trials <= 0:
        raise ValueError(f"trials must be positive, got {trials}")
    p = successes / trials
    denominator = 1 + z * z / trials
    center = (p + z * z / (2 * trials)) / denominator
    half_width = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, center - half_width), min(1.0, center + half_width)


def ranking_summary(scores: PairScores, beta: float = 1.0) -> dict:
    """Ranking accuracy (ties count as wrong) with its 95% Wilson interval, and the mean reward margin.

    The reward is beta times the average log-prob (as in SimPO and AMaPO), so the margin is beta * (s(c) - s(r));
    with beta = 1 it is in nats per token.
    """
    if len(scores) == 0:
        raise ValueError("no pairs to summarise")
    delta = scores.chosen_mean - scores.rejected_mean
    correct = int((delta > 0).sum())
    low, high = wilson_interval(correct, len(scores))
    # The paper's Table 1 over the whole set, with AMaPO's split (r = beta * delta, gamma its adaptive margin).
    _, metrics = preference_objective(
        torch.cat([scores.chosen_logps, scores.rejected_logps]), torch.cat([scores.chosen_tokens, scores.rejected_tokens]),
        beta=beta, loss_type="amapo", stats_scope="local",
    )
    return {
        "ranking_accuracy": correct / len(scores),
        "ranking_accuracy_ci95_low": low,
        "ranking_accuracy_ci95_high": high,
        "reward_margin_mean": beta * float(delta.mean()),
        "logps_chosen_mean": float(scores.chosen_mean.mean()),
        "logps_rejected_mean": float(scores.rejected_mean.mean()),
        "num_pairs": len(scores),
        "num_correct": correct,
        "beta": beta,
        "amapo_dynamics": {key.split("/", 1)[1]: float(metrics[key]) for key in DYNAMICS_KEYS},
    }


def evaluate_ranking(model, dataloader, *, beta: float = 1.0, desc: str = "ranking eval", progress: bool = True):
    """`ranking_summary` of every rank's pairs (the same dict on every rank); see `score_pairs`."""
    return ranking_summary(score_pairs(model, dataloader, desc=desc, progress=progress), beta)


# --- whole datasets: plain pairs, per-subset figures, RM-Bench ------------------------------------------


@dataclasses.dataclass
class EvalSettings:
    max_length: int = 2048
    max_prompt_length: int = 1800
    batch_size: int = 8
    beta: float = 1.0
    subset_column: str | None = None
    num_proc: int | None = None
    prefix_sharing: bool = True  # each pair's prompt computed once (exact, see prefix.py)


def _tokenize_by_group(pairs, groups, tokenizer, settings: EvalSettings):
    """Tokenize each group of rows on its own, so every kept row keeps its group label.

    `tokenize_preference_dataset` drops unusable rows (with a warning) and keeps no other columns; per
    group, whichever rows it drops, the survivors still belong to that group.
    """
    from datasets import concatenate_datasets

    from .data import tokenize_preference_dataset

    parts, labels = [], []
    for group in sorted(set(groups)):
        members = [index for index, value in enumerate(groups) if value == group]
        part = pairs.select(members) if len(members) < len(pairs) else pairs
        tokenized = tokenize_preference_dataset(
            part, tokenizer, settings.max_length, settings.max_prompt_length, num_proc=settings.num_proc
        )
        parts.append(tokenized)
        labels.extend([group] * len(tokenized))
    return (parts[0] if len(parts) == 1 else concatenate_datasets(parts)), labels


def _score_tokenized(model, tokenized, tokenizer, settings: EvalSettings, desc: str) -> PairScores:
    from .data import PreferenceCollator

    collator = PreferenceCollator(tokenizer.pad_token_id, prefix_sharing=settings.prefix_sharing)
    loader = eval_dataloader(tokenized, collator, settings.batch_size)
    return score_pairs(model, loader, desc=desc)


def _subset_summaries(scores: PairScores, labels, beta: float) -> dict:
    return {
        str(label): ranking_summary(scores.select([i for i, value in enumerate(labels) if value == label]), beta)
        for label in sorted(set(labels))
    }


def evaluate_rmbench(model, tokenizer, dataset, settings: EvalSettings, desc: str = "RM-Bench") -> dict:
    """RM-Bench figures (3x3 style matrix per domain) and the plain summary of its 3N same-style pairs."""
    from .data import tokenize_preference_dataset

    pairs = rmbench.rmbench_to_pairs(dataset)
    tokenized = tokenize_preference_dataset(
        pairs.select_columns(["chosen", "rejected"]), tokenizer, settings.max_length, settings.max_prompt_length,
        num_proc=settings.num_proc,
    )
    if len(tokenized) != len(pairs):
        raise ValueError(
            f"RM-Bench needs all six responses of every item, but tokenization dropped {len(pairs) - len(tokenized)} "
            f"of {len(pairs)} pairs (see the warning above); raise --max-length or fix those rows"
        )
    scores = _score_tokenized(model, tokenized, tokenizer, settings, desc)
    items, styles = pairs["rmbench_item"], pairs["rmbench_style"]
    chosen = rmbench.rmbench_item_scores(scores.chosen_mean, items, styles)
    rejected = rmbench.rmbench_item_scores(scores.rejected_mean, items, styles)
    domains = pairs["domain"][:: len(rmbench.STYLES)]  # one per item (pairs are item-major)
    return {
        "overall": ranking_summary(scores, settings.beta),
        "rmbench": rmbench.rmbench_accuracy(chosen, rejected, domains),
    }


def evaluate_pairs(model, tokenizer, dataset, settings: EvalSettings, desc: str = "ranking eval") -> dict:
    """Plain preference pairs (any training format): overall summary, and per subset when the data has one."""
    column = settings.subset_column or next((name for name in SUBSET_COLUMNS if name in dataset.column_names), None)
    if column is not None and column not in dataset.column_names:
        raise ValueError(f"--subset-column {column!r} is not a column of the dataset; it has {dataset.column_names}")
    groups = [str(value) for value in dataset[column]] if column else [""] * len(dataset)
    tokenized, labels = _tokenize_by_group(dataset, groups, tokenizer, settings)
    scores = _score_tokenized(model, tokenized, tokenizer, settings, desc)
    result = {"overall": ranking_summary(scores, settings.beta)}
    if column:
        result["subset_column"] = column
        result["subsets"] = _subset_summaries(scores, labels, settings.beta)
    return result


def evaluate_dataset(model, tokenizer, dataset, settings: EvalSettings, desc: str = "ranking eval") -> dict:
    """RM-Bench figures for RM-Bench-format data, plain (per-subset) figures for anything else."""
    started = time.perf_counter()
    if rmbench.is_rmbench(dataset):
        result = {"format": "rmbench", **evaluate_rmbench(model, tokenizer, dataset, settings, desc)}
    else:
        result = {"format": "pairs", **evaluate_pairs(model, tokenizer, dataset, settings, desc)}
    seconds = time.perf_counter() - started
    result["seconds"] = seconds
    result["pairs_per_second"] = result["overall"]["num_pairs"] / max(seconds, 1e-9)
    return result


# --- reports ---------------------------------------------------------------------------------------------


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def _accuracy_cell(summary: dict) -> str:
    low, high = summary["ranking_accuracy_ci95_low"], summary["ranking_accuracy_ci95_high"]
    return f"{_percent(summary['ranking_accuracy'])} [{_percent(low)}, {_percent(high)}]"


def _report_rows(result: dict) -> dict:
    """{row name: cell text} of one model's result, in display order."""
    overall = result["overall"]
    rows = {
        "ranking accuracy % [95% CI]": _accuracy_cell(overall),
        f"mean reward margin (beta={overall['beta']:g})": f"{overall['reward_margin_mean']:.4f}",
        "mean log-prob chosen / rejected": f"{overall['logps_chosen_mean']:.3f} / {overall['logps_rejected_mean']:.3f}",
        "pairs": str(overall["num_pairs"]),
    }
    cases = " / ".join(_percent(overall["amapo_dynamics"][f"case{k}"]) for k in range(1, 5))
    rows["AMaPO's Table 1 cases 1 / 2 / 3 / 4 %"] = cases
    rows["AMaPO misranked gradient share %"] = _percent(overall["amapo_dynamics"]["misranked_grad_share"])
    for name, summary in result.get("subsets", {}).items():
        rows[f"{result['subset_column']}={name}: accuracy % (pairs)"] = (
            f"{_percent(summary['ranking_accuracy'])} ({summary['num_pairs']})"
        )
    if "rmbench" in result:
        figures = result["rmbench"]
        for name in ("avg",) + rmbench.DIFFICULTIES:
            rows[f"RM-Bench {name} %"] = _percent(figures["overall"][name])
        for domain, domain_figures in figures["domains"].items():
            cell = f"{_percent(domain_figures['avg'])} ({domain_figures['num_items']})"
            rows[f"RM-Bench {domain} avg % (items)"] = cell
    return rows


def markdown_table(results: dict) -> str:
    """One Markdown table, a column per model ({label: result of `evaluate_dataset`})."""
    per_model = {label: _report_rows(result) for label, result in results.items()}
    row_names = list(dict.fromkeys(name for rows in per_model.values() for name in rows))
    lines = [
        "| metric | " + " | ".join(per_model) + " |",
        "|---|" + "---|" * len(per_model),
    ]
    for name in row_names:
        lines.append(f"| {name} | " + " | ".join(rows.get(name, "-") for rows in per_model.values()) + " |")
    return "\n".join(lines) + "\n"


def write_reports(report: dict, output_dir: str) -> list[str]:
    """`ranking_eval.json` (everything) and `ranking_eval.md` (the table) in output_dir; returns their paths."""
    os.makedirs(output_dir, exist_ok=True)
    json_path, markdown_path = (os.path.join(output_dir, name) for name in RESULT_FILES)
    with open(json_path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    header = f"Ranking accuracy on `{report['dataset']}` (split `{report['split']}`)\n\n"
    with open(markdown_path, "w", encoding="utf-8") as handle:
        handle.write(header + markdown_table(report["models"]))
    return [json_path, markdown_path]


# --- command line ----------------------------------------------------------------------------------------

def _positive(parse):
    def parse_positive(text):
        value = parse(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse_positive.__name__ = parse.__name__  # argparse names the expected type after it
    return parse_positive


DESCRIPTION = """\
Ranking accuracy of one or several models: the fraction of preference pairs whose chosen response gets a
strictly higher average response log-prob than the rejected one, with its 95% Wilson interval, the mean
reward margin and per-subset figures (a 'subset' or 'domain' column, or --subset-column).

Data: any format the trainer takes (chosen/rejected message lists, or prompt + chosen/rejected strings or
messages). RM-Bench-format data is recognised by its columns: a string 'prompt', 'chosen' and 'rejected' as
lists of three responses (concise, detailed, detailed with markdown) and a 'domain'; it also gets RM-Bench's
easy / normal / hard accuracies and per-domain averages (as in the AMaPO paper's Table 3).
"""

EPILOG = """\
examples:
  python -m amapo_fast.evaluate --model outputs/amapo-toy/final --dataset toy   # truncation: the model's training
  python -m amapo_fast.evaluate --model DIR --dataset HuggingFaceH4/ultrafeedback_binarized --split "test_prefs[:500]"
  torchrun --nproc_per_node 8 -m amapo_fast.evaluate --compare BASE DIR --dataset THU-KEG/RM-Bench --split train
"""


def parse_args(argv=None):
    from .config import TrainConfig
    from .loss import IMPLS

    parser = ArgumentParser(
        prog="python -m amapo_fast.evaluate", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    positive_int, positive_float = _positive(int), _positive(float)
    models = parser.add_mutually_exclusive_group(required=True)
    models.add_argument(*both_spellings("--model", "--model_name_or_path"), help="hub name or local folder of a causal LM; 'toy': the trainer's initial model")
    models.add_argument(*both_spellings("--compare"), nargs="+", metavar="MODEL", help="several models, side by side in one table")
    parser.add_argument(
        *both_spellings("--dataset", "--dataset_name"), required=True,
        help="hub name, local json/jsonl/parquet file or save_to_disk folder; 'toy': the trainer's held-out toy pairs",
    )
    parser.add_argument(*both_spellings("--split"), default="test_prefs", help="split (slicing works: 'test_prefs[:200]'); a local file is read as this split")
    parser.add_argument(*both_spellings("--dataset-config", "--dataset_config_name"), default=None, help="hub dataset config name")
    parser.add_argument(*both_spellings("--tokenizer", "--tokenizer_name_or_path"), default=None, help="tokenizer to use for every model; default: each model's own")
    parser.add_argument(
        *both_spellings("--max-length"), type=positive_int, default=None,
        help=f"prompt + response tokens; default: the model's training setting when the trainer wrote it, else "
        f"{EvalSettings.max_length}",
    )
    parser.add_argument(
        *both_spellings("--max-prompt-length"), type=positive_int, default=None,
        help=f"prompts are cut from the left to this many tokens; default: the training setting, else "
        f"{EvalSettings.max_prompt_length}",
    )
    parser.add_argument(*both_spellings("--batch-size"), type=positive_int, default=EvalSettings.batch_size, help="pairs per forward, per device")
    parser.add_argument(*both_spellings("--beta"), type=positive_float, default=EvalSettings.beta, help="reward scale of the reported margin (1: nats per token)")
    parser.add_argument(*both_spellings("--subset-column"), default=None, help=f"per-subset figures; default: the first of {SUBSET_COLUMNS} present")
    parser.add_argument(*both_spellings("--precision"), choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    parser.add_argument(*both_spellings("--impl"), choices=IMPLS, default="auto", help="log-prob implementation (auto: triton on GPU, chunked on CPU)")
    parser.add_argument(
        *both_spellings("--attn-implementation"), choices=("auto", "flash_attention_2", "sdpa", "eager", "flex_attention"), default="auto",
        help="auto: flash_attention_2 if installed, else sdpa; with prefix sharing flex_attention on GPU, sdpa elsewhere",
    )
    parser.add_argument(*both_spellings("--num-proc"), type=positive_int, default=None, help="processes for tokenization")
    parser.add_argument(
        *both_spellings("--prefix-sharing"), action=argparse.BooleanOptionalAction, default=EvalSettings.prefix_sharing,
        help="score each pair as one sequence [prompt | chosen | rejected], its prompt computed once",
    )
    parser.add_argument(*both_spellings("--seed"), type=int, default=TrainConfig.seed, help="seed of the toy model's init (the trainer's)")
    parser.add_argument(*both_spellings("--output-dir"), default="outputs/eval", help=f"where {' and '.join(RESULT_FILES)} go")
    add_debug_flag(parser)
    return parser.parse_args(argv)


def training_truncation(names) -> tuple[dict, str] | None:
    """({max_length, max_prompt_length}, source) recorded by the trainer in the models' config.json, or None when
    no model has a record; models recorded with different settings are refused (the flags must then decide)."""
    from .config import TRAINING_RECORD

    found = {}
    for name in names:
        path = os.path.join(name, "config.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                record = json.load(handle).get(TRAINING_RECORD) or {}
            if "max_length" in record and "max_prompt_length" in record:
                found[name] = (record["max_length"], record["max_prompt_length"])
    if not found:
        return None
    if len(set(found.values())) > 1:
        shown = "; ".join(f"{name}: {length}/{prompt}" for name, (length, prompt) in found.items())
        raise UserError(
            f"the models were trained with different truncation (max_length/max_prompt_length {shown}): pass "
            "--max-length and --max-prompt-length"
        )
    (length, prompt), = set(found.values())
    return {"max_length": length, "max_prompt_length": prompt}, f"the training settings in {', '.join(found)}"


def resolve_truncation(args, names) -> str:
    """Fill --max-length / --max-prompt-length not given from the trainer's record (else the defaults); returns
    the line that says what is used and where it comes from."""
    recorded = None if None not in (args.max_length, args.max_prompt_length) else training_truncation(names)
    values, source = recorded or ({"max_length": EvalSettings.max_length,
                                   "max_prompt_length": EvalSettings.max_prompt_length}, "the defaults")
    given = [name for name in ("max_length", "max_prompt_length") if getattr(args, name) is not None]
    for name in ("max_length", "max_prompt_length"):
        if getattr(args, name) is None:
            setattr(args, name, values[name])
    if args.max_prompt_length >= args.max_length:
        raise UserError(
            f"--max-prompt-length {args.max_prompt_length} must be smaller than --max-length {args.max_length}: "
            "a response needs room"
        )
    origin = "the command line" if len(given) == 2 else source + (" and the command line" if given else "")
    return f"truncation: --max-length {args.max_length}, --max-prompt-length {args.max_prompt_length} (from {origin})"


def _load_eval_dataset(args):
    if args.dataset == "toy":  # the trainer's held-out toy split, with its default settings
        from .config import TrainConfig
        from .toy import make_toy_preference_dataset

        return make_toy_preference_dataset(TrainConfig.toy_num_eval, seed=TrainConfig.seed + 1)
    from .data import load_preference_dataset

    return load_preference_dataset(args.dataset, args.split, args.dataset_config)


def _label(name_or_path: str) -> str:
    return os.path.normpath(name_or_path) if os.path.isdir(name_or_path) else name_or_path


@exits_cleanly_on_user_errors
def main(argv=None) -> dict:
    """Evaluate every model on the dataset; rank 0 writes the reports. Returns the report dict."""
    from transformers import set_seed

    from .distributed import init_distributed
    from .model import load_policy, load_tokenizer

    args = parse_args(argv)
    quiet_library_progress()
    names = args.compare or [args.model]
    labels = [_label(name) for name in names]
    if len(set(labels)) != len(labels):
        raise UserError(f"--compare names a model twice: {labels}")
    # Paths are checked before any model loads, not after the evaluation ran.
    check_output_dir(args.output_dir, "--output-dir")
    flag = "--compare" if args.compare else "--model"
    for name in names:
        if name != "toy":
            require_existing_if_local(name, flag)
            check_model_folder(name, flag)
    if args.tokenizer not in (None, "toy"):
        require_existing_if_local(args.tokenizer, "--tokenizer")
    if args.dataset != "toy":
        require_existing_if_local(args.dataset, "--dataset")
    truncation = resolve_truncation(args, names)
    settings = EvalSettings(
        max_length=args.max_length, max_prompt_length=args.max_prompt_length, batch_size=args.batch_size,
        beta=args.beta, subset_column=args.subset_column, num_proc=args.num_proc, prefix_sharing=args.prefix_sharing,
    )
    owns_process_group = not dist.is_initialized()
    env = init_distributed()
    if env.is_main:
        print(truncation, flush=True)
    try:
        bf16 = args.precision == "bf16" or (args.precision == "auto" and env.device.type == "cuda")
        with user_errors(ValueError, OSError, KeyError, prefix=f"dataset {args.dataset}: "):
            dataset = _load_eval_dataset(args)
        report = {
            "dataset": args.dataset, "split": "held-out" if args.dataset == "toy" else args.split,
            "settings": dataclasses.asdict(settings),
            "precision": "bf16" if bf16 else "fp32", "world_size": env.world_size, "device": env.device.type,
            "models": {},
        }
        for name, label in zip(names, labels):
            with user_errors(OSError, ValueError, prefix=f"tokenizer {args.tokenizer or name}: "):
                tokenizer = load_tokenizer(args.tokenizer or name)
            set_seed(args.seed)  # 'toy' is then the trainer's initial model
            policy = load_policy(
                name, tokenizer=tokenizer, dtype=torch.bfloat16 if bf16 else torch.float32,
                attn_implementation=args.attn_implementation, impl=args.impl, prefix_sharing=settings.prefix_sharing,
            ).to(env.device)
            # Unusable data (missing columns, no usable row, an unknown --subset-column) is the user's to fix.
            with user_errors(ValueError, prefix=f"dataset {args.dataset}: "):
                report["models"][label] = evaluate_dataset(policy, tokenizer, dataset, settings, desc=label)
            del policy
        if env.is_main:
            paths = write_reports(report, args.output_dir)
            print(markdown_table(report["models"]), end="")
            print("wrote " + ", ".join(paths))
        return report
    finally:
        if owns_process_group:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
