"""RM-Bench (Liu et al. 2024): the 3x3 style matrix and its easy / normal / hard accuracies.

Each RM-Bench item has a prompt, three chosen and three rejected responses in the styles
`STYLES` (concise, detailed plain text, detailed with markdown) and a `domain`. The convention is the
one of RM-Bench's own `compute_accuracy` (THU-KEG/RM-Bench, `scripts/utils.py` and its README):

- `M[i][j]` is the fraction of items whose chosen response in style i scores strictly higher than
  the rejected response in style j (rows: chosen style, columns: rejected style; ties count as wrong);
- hard = mean of the upper triangle (j > i: the chosen answer is plainer than the rejected one),
  normal = mean of the diagonal (same style), easy = mean of the lower triangle (i > j);
- items are grouped by domain with a prefix match on chat / math / code / safety
  (so safety-refuse and safety-response form one "safety" domain); a domain's average is the mean of
  its hard, normal and easy accuracies; the overall hard / normal / easy are unweighted means over
  domains, and the overall average is the mean of the domain averages.

The AMaPO paper's Table 3 reports these numbers with the policy's average log-prob (no reference
model) as the score. Domains outside RM-Bench's four keep their own name and are averaged the same
way.
"""
from collections import defaultdict

import torch

STYLES = ("concise", "detailed", "detailed_markdown")
RMBENCH_DOMAINS = ("chat", "math", "code", "safety")
DIFFICULTIES = ("easy", "normal", "hard")
PAIR_COLUMNS = ("prompt", "chosen", "rejected", "rmbench_item", "rmbench_style", "domain")

_NUM_STYLES = len(STYLES)
_UPPER = torch.triu(torch.ones(_NUM_STYLES, _NUM_STYLES, dtype=torch.bool), diagonal=1)
_TRIANGLES = {
    "hard": _UPPER,
    "normal": torch.eye(_NUM_STYLES, dtype=torch.bool),
    "easy": _UPPER.T.contiguous(),
}


def is_rmbench(dataset) -> bool:
    """True when rows hold a string prompt and lists of three chosen and three rejected strings."""
    if not {"prompt", "chosen", "rejected"} <= set(dataset.column_names) or len(dataset) == 0:
        return False
    first = dataset[0]
    return isinstance(first["prompt"], str) and all(
        isinstance(first[key], list) and len(first[key]) == _NUM_STYLES and all(isinstance(r, str) for r in first[key])
        for key in ("chosen", "rejected")
    )


def domain_group(domain: str) -> str:
    """RM-Bench's domain grouping: a prefix match on its four domains, other names kept as they are."""
    return next((group for group in RMBENCH_DOMAINS if domain.startswith(group)), domain)


def rmbench_to_pairs(dataset):
    """One conversational preference pair per (item, style): chosen[k] vs rejected[k], k = 0, 1, 2.

    The 3N pairs hold all six responses of every item, so scoring them once gives every cell of the
    3x3 matrix; they are ordered item-major (item 0 styles 0, 1, 2, then item 1, ...).
    """
    from datasets import Dataset

    rows = {column: [] for column in PAIR_COLUMNS}
    for item, example in enumerate(dataset):
        for name in ("chosen", "rejected"):
            if len(example[name]) != _NUM_STYLES:
                raise ValueError(
                    f"RM-Bench item {item}: '{name}' has {len(example[name])} responses, expected {_NUM_STYLES} "
                    f"({', '.join(STYLES)})"
                )
        user_turn = {"role": "user", "content": example["prompt"]}
        for style in range(_NUM_STYLES):
            rows["prompt"].append(example["prompt"])
            rows["chosen"].append([user_turn, {"role": "assistant", "content": example["chosen"][style]}])
            rows["rejected"].append([user_turn, {"role": "assistant", "content": example["rejected"][style]}])
            rows["rmbench_item"].append(item)
            rows["rmbench_style"].append(style)
            rows["domain"].append(str(example.get("domain") or "all"))
    return Dataset.from_dict(rows)


def style_matrix(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """[N, 3, 3] bool: entry [n, i, j] is True when chosen style i beats rejected style j on item n."""
    for name, scores in (("chosen_scores", chosen_scores), ("rejected_scores", rejected_scores)):
        if scores.dim() != 2 or scores.shape[1] != _NUM_STYLES:
            raise ValueError(f"{name} must be [items, {_NUM_STYLES}], got {tuple(scores.shape)}")
    if chosen_scores.shape != rejected_scores.shape:
        raise ValueError(
            f"chosen_scores {tuple(chosen_scores.shape)} and rejected_scores {tuple(rejected_scores.shape)} differ"
        )
    return chosen_scores[:, :, None] > rejected_scores[:, None, :]


def difficulty_accuracies(correct: torch.Tensor) -> dict:
    """Easy / normal / hard / avg accuracy of a group of items from their [N, 3, 3] matrices."""
    matrix = correct.double().mean(0)
    accuracies = {name: float(matrix[mask].mean()) for name, mask in _TRIANGLES.items()}
    accuracies["avg"] = sum(accuracies[name] for name in DIFFICULTIES) / len(DIFFICULTIES)
    accuracies["num_items"] = int(correct.shape[0])
    return accuracies


def rmbench_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, domains) -> dict:
    """RM-Bench figures from per-item scores [N, 3] (style order `STYLES`) and each item's domain.

    Returns {"domains": {domain: {easy, normal, hard, avg, num_items}}, "overall": {easy, normal,
    hard, avg, num_items}, "matrix": 3x3 list (all items pooled)}; see the module docstring for the
    averaging convention.
    """
    correct = style_matrix(chosen_scores, rejected_scores)
    if len(domains) != correct.shape[0]:
        raise ValueError(f"got {len(domains)} domains for {correct.shape[0]} items")
    members = defaultdict(list)
    for item, domain in enumerate(domains):
        members[domain_group(domain)].append(item)
    per_domain = {domain: difficulty_accuracies(correct[items]) for domain, items in sorted(members.items())}
    overall = {
        name: sum(figures[name] for figures in per_domain.values()) / len(per_domain)
        for name in DIFFICULTIES + ("avg",)
    }
    overall["num_items"] = int(correct.shape[0])
    return {"domains": per_domain, "overall": overall, "matrix": correct.double().mean(0).tolist()}


def rmbench_item_scores(pair_scores: torch.Tensor, items, styles) -> torch.Tensor:
    """Scatter per-pair scores (one per (item, style) pair) into an [N, 3] item-by-style matrix."""
    items = torch.as_tensor(items, dtype=torch.long)
    styles = torch.as_tensor(styles, dtype=torch.long)
    num_items = int(items.max()) + 1 if items.numel() else 0
    filled = torch.zeros(num_items, _NUM_STYLES, dtype=torch.bool)
    filled[items, styles] = True
    if not bool(filled.all()):
        missing = (~filled).nonzero()[0].tolist()
        raise ValueError(f"RM-Bench item {missing[0]} has no score for style {STYLES[missing[1]]}")
    scores = torch.empty(num_items, _NUM_STYLES, dtype=pair_scores.dtype)
    scores[items, styles] = pair_scores
    return scores
