"""The inputs every path is timed on: shapes, and which tokens are prompt, response or padding.

Two workloads matter (plus fixed prompt fractions for the goals):
  dense       every token is a response token: the worst case for a path that skips prompt/padding;
  realistic   prompt, response and padding lengths drawn from a model of UltraFeedback-binarized
              (the paper's data), truncated like the authors' trainer (see `UltraFeedbackLengths`);
  promptXX    the first XX% of every row is prompt, the rest response, no padding (e.g. `prompt25`,
              the CPU goal's "a quarter of them prompt").
Chosen row i and rejected row B+i share their prompt, as in a real pair. All paths of one case get the
same tensors: labels come from a seeded CPU generator, hidden and weight from a seeded generator on the
benchmark's device.
"""
import math
import re
from dataclasses import asdict, dataclass

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Shape:
    """tokens = rows * seq_len positions of hidden size `hidden` and vocabulary `vocab`."""

    tokens: int
    seq_len: int
    hidden: int
    vocab: int

    def __post_init__(self):
        for name in ("tokens", "seq_len", "hidden", "vocab"):
            if getattr(self, name) <= 0:
                raise ValueError(f"shape field {name}={getattr(self, name)} must be positive")
        if self.tokens % self.seq_len:
            raise ValueError(f"tokens N={self.tokens} is not a multiple of the sequence length T={self.seq_len}")
        if self.rows % 2:
            raise ValueError(
                f"N/T = {self.rows} rows: need an even number (B chosen + B rejected); change N={self.tokens} or T={self.seq_len}"
            )

    @property
    def rows(self) -> int:
        return self.tokens // self.seq_len

    def label(self) -> str:
        return f"N={self.tokens} T={self.seq_len} D={self.hidden} V={self.vocab}"

    def to_dict(self) -> dict:
        return asdict(self)


SHAPE_KEYS = {"N": "tokens", "T": "seq_len", "D": "hidden", "V": "vocab"}


def parse_shapes(text: str, default: Shape) -> list:
    """`"N=4096,T=512;N=8192"` -> Shapes; keys left out keep `default`'s value. Separator between shapes: ';'."""
    shapes = []
    for entry in filter(None, (part.strip() for part in text.split(";"))):
        fields = default.to_dict()
        for item in filter(None, (part.strip() for part in entry.split(","))):
            key, _, value = item.partition("=")
            if key.strip() not in SHAPE_KEYS or not value.strip().isdigit():
                raise ValueError(f"--shapes entry {entry!r}: expected KEY=INT with KEY in N, T, D, V; got {item!r}")
            fields[SHAPE_KEYS[key.strip()]] = int(value)
        shapes.append(Shape(**fields))
    if not shapes:
        raise ValueError(f"--shapes {text!r} names no shape")
    return shapes


@dataclass(frozen=True)
class UltraFeedbackLengths:
    """Token lengths of an UltraFeedback-binarized pair, as log-normal distributions (median, sigma).

    No published token-length statistic of ultrafeedback_binarized could be found from this project's
    machines (searched: dataset cards, the UltraFeedback paper, length-bias papers); these medians are
    therefore our assumption, chosen to agree with the one published size we could check, the dataset
    card's train_prefs split: 405,688,662 bytes for 61,135 records = 6,636 bytes per record. A record
    stores the prompt 4 times (prompt, chosen[0], rejected[0], messages[0]), the chosen answer twice
    and the rejected answer once: 4*180 + 3*307 = 1641 tokens at ~4 characters per token = 6,564
    bytes, within 2% of the card. See docs/bench.md; replace with measured figures when available.
    Truncation follows the authors' recipe: the prompt is cut from the left to max_prompt,
    then the answer to max_len - prompt; rows are padded to the batch's T.
    """

    prompt_median: float = 120.0  # mean = median * exp(sigma^2 / 2) = 180 tokens
    prompt_sigma: float = 0.9
    response_median: float = 240.0  # mean = 307 tokens
    response_sigma: float = 0.7
    max_prompt_fraction: float = 0.5  # max_prompt / max_len: 512/1024 in the UltraFeedback-binarized recipe

    def sample(self, pairs: int, seq_len: int, generator: torch.Generator):
        """(prompt [pairs], chosen [pairs], rejected [pairs]) token counts after truncation to seq_len."""

        def lognormal(median, sigma, count):
            normal = torch.randn(count, generator=generator, dtype=torch.float64)
            return (median * torch.exp(sigma * normal)).round().long().clamp_min(1)

        max_prompt = max(1, int(seq_len * self.max_prompt_fraction))
        prompt = lognormal(self.prompt_median, self.prompt_sigma, pairs).clamp_max(max_prompt)
        room = seq_len - prompt
        chosen = torch.minimum(lognormal(self.response_median, self.response_sigma, pairs), room)
        rejected = torch.minimum(lognormal(self.response_median, self.response_sigma, pairs), room)
        return prompt, chosen, rejected


ULTRAFEEDBACK = UltraFeedbackLengths()
WORKLOAD_PATTERN = re.compile(r"^(dense|realistic|prompt(\d{1,2}))$")


def check_workload(name: str) -> str:
    if not WORKLOAD_PATTERN.match(name):
        raise ValueError(f"workload {name!r}: expected dense, realistic or promptXX (XX = prompt percent, e.g. prompt25)")
    return name


def response_spans(workload: str, shape: Shape, generator: torch.Generator):
    """(start [rows], stop [rows]): row r's response tokens are positions start[r] <= t < stop[r]."""
    pairs = shape.rows // 2
    if workload == "dense":
        start = torch.zeros(shape.rows, dtype=torch.long)
        return start, torch.full_like(start, shape.seq_len)
    if workload == "realistic":
        prompt, chosen, rejected = ULTRAFEEDBACK.sample(pairs, shape.seq_len, generator)
        start = torch.cat([prompt, prompt])
        return start, start + torch.cat([chosen, rejected])
    percent = int(WORKLOAD_PATTERN.match(check_workload(workload)).group(2))
    prompt = min(shape.seq_len - 1, math.floor(shape.seq_len * percent / 100))
    start = torch.full((shape.rows,), prompt, dtype=torch.long)
    return start, torch.full_like(start, shape.seq_len)


def make_labels(workload: str, shape: Shape, seed: int) -> torch.Tensor:
    """labels [rows, T] (int64, CPU): random token ids on response positions, IGNORE_INDEX elsewhere."""
    generator = torch.Generator().manual_seed(seed)
    start, stop = response_spans(check_workload(workload), shape, generator)
    position = torch.arange(shape.seq_len)
    response = (position >= start[:, None]) & (position < stop[:, None])
    tokens = torch.randint(0, shape.vocab, (shape.rows, shape.seq_len), generator=generator)
    return torch.where(response, tokens, torch.full_like(tokens, IGNORE_INDEX))


def make_hidden_and_weight(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int):
    """hidden [rows, T, D] ~ N(0, 1) and weight [V, D] ~ N(0, 1/D), so logits are O(1) like a trained head's."""
    generator = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(shape.rows, shape.seq_len, shape.hidden, generator=generator, device=device, dtype=dtype)
    weight = torch.randn(shape.vocab, shape.hidden, generator=generator, device=device, dtype=dtype)
    weight.mul_(shape.hidden**-0.5)
    return hidden, weight


def token_mix(labels: torch.Tensor) -> dict:
    """Fractions of response / non-response positions (for the report)."""
    response = int((labels != IGNORE_INDEX).sum())
    return {"response_tokens": response, "response_fraction": response / labels.numel()}
