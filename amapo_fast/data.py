"""Preference data: loading, tokenization (chat template, truncation, dropped rows) and batching.

Accepted row formats (the first two are UltraFeedback's and TRL's conversational formats):
  * `chosen` / `rejected` are message lists that include the user turn(s); the prompt is every message but
    the last, the response is the last (assistant) message. A `prompt` column, if any, is not needed.
  * `chosen` / `rejected` hold only the assistant message; `prompt` is a message list or a string (one user turn).
  * plain text: `prompt`, `chosen`, `rejected` are strings; no chat template, EOS appended to the responses.
Optional `ref_chosen_logps` / `ref_rejected_logps` columns carry precomputed DPO reference log-probs.
"""
import collections
import json
import logging
import math
import os
import re

import torch

from . import prefix
from .cli import datasets_progress
from .errors import DataError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
TOKENIZED_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
# Optional: each row's index in the file it came from, when rows were shuffled or split off (a held-out slice);
# errors and the dropped-rows warning name that index instead of the position in the split.
SOURCE_ROW = "source_row_index"
LOCAL_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# A local file's split name must contain one of these words ('train', 'test_prefs', 'validation_2', ...).
SPLIT_WORDS = {"train", "test", "validation", "valid", "val", "eval", "dev", "held", "heldout"}

# Why a row cannot be used; rows are dropped with a count per reason.
MISSING_VALUE = "missing value"
MISSING_PROMPT = "no prompt"
PROMPT_MISMATCH = "chosen and rejected differ before the last message"
NOT_ASSISTANT = "last message is not the assistant's"
EMPTY_RESPONSE = "empty response"
TEMPLATE_NOT_PREFIX = "chat template does not render the prompt as a prefix of the conversation"
PROMPT_TOO_LONG = "prompt longer than max_length"
IDENTICAL_RESPONSES = "chosen and rejected are the same tokens"


def load_preference_dataset(name_or_path: str, split: str, config_name: str | None = None, *, split_flag="--split"):
    """A `datasets.Dataset` from a hub name, a local json/jsonl/parquet file, or a local folder.

    A local file is taken as the named split, so `split="test_prefs[:100]"` slices it like a hub split would;
    the name must still look like a split's (train, test, validation, test_prefs, ...), so that a misspelled
    one is not taken silently. `split_flag` names the setting in messages.
    """
    from datasets import load_dataset

    split_name = split.split("[")[0]
    if os.path.isfile(name_or_path):
        extension = os.path.splitext(name_or_path)[1].lower()
        if extension not in LOCAL_FILE_BUILDERS:
            raise ValueError(f"{name_or_path}: expected a .json, .jsonl or .parquet file, got {extension!r}")
        if os.path.getsize(name_or_path) == 0:
            raise DataError(f"{name_or_path} is empty: expected preference pairs (see docs/train.md, Data)")
        if not set(re.split(r"[_\-]", split_name.lower())) & SPLIT_WORDS:
            raise DataError(
                f"{split_flag} {split}: {split_name!r} does not name a split; a local file is read as one split, "
                f"so any of {', '.join(sorted(SPLIT_WORDS))} (or a name made of them, like test_prefs) serves"
            )
        builder = LOCAL_FILE_BUILDERS[extension]
        # datasets would load undecodable bytes and fail only when a row is read, reports JSON problems without
        # the file or the line (or as a bare StopIteration), and keeps one value of a key written twice: check first.
        if builder == "json" and (problem := json_file_problem(name_or_path)):
            raise DataError(f"{name_or_path}: {problem}")
        dataset = load_dataset(builder, data_files={split_name: name_or_path}, split=split)
        where = f"{name_or_path}{'' if split == split_name else f' ({split})'}"
        columns = _ref_columns(dataset)
        if builder == "json" and not all(_is_number_feature(dataset.features[column]) for column in columns):
            # A column of numbers and text becomes a JSON column that decodes "-3.5" as -3.5: read the file's values.
            problem = _reference_problem(_json_rows(name_or_path), columns)
            if problem:
                raise DataError(f"{where}: {problem}")
        check_rows(dataset, where)
        return dataset
    if os.path.isdir(name_or_path) and os.path.exists(os.path.join(name_or_path, "dataset_dict.json")):
        dataset = _saved_split(name_or_path, split, split_flag)
    else:
        dataset = load_dataset(name_or_path, config_name, split=split)
    check_rows(dataset, f"{name_or_path} ({split})")
    return dataset


def _saved_split(path: str, split: str, split_flag: str):
    """A split of a DatasetDict written by save_to_disk, sliced like a hub split ('train[:100]', 'test[10%:]')."""
    from datasets import ReadInstruction, load_from_disk

    saved = load_from_disk(path)
    split_name = split.split("[")[0]
    if split_name not in saved:
        raise DataError(
            f"{path}: the saved dataset has no split {split_name!r}; it has {', '.join(saved)}: pass one of "
            f"them as {split_flag}"
        )
    dataset = saved[split_name]
    if split_name == split:
        return dataset
    (bounds,) = ReadInstruction.from_spec(split).to_absolute({split_name: len(dataset)})
    return dataset.select(range(bounds.from_, bounds.to))


def check_rows(dataset, where: str):
    """Refuse a dataset whose values have the wrong types (a message content that is not text, a reference
    log-prob that is missing, not a number or not finite), naming `where` and the first such row."""
    problem = None if _uniform_row_types(dataset.features) else _first_row_problem(dataset)
    columns = _ref_columns(dataset)
    problem = problem or (_reference_problem(dataset.select_columns(columns), columns) if columns else None)
    if problem:
        raise DataError(f"{where}: {problem}")


def _ref_columns(dataset) -> list[str]:
    return [column for column in REF_COLUMNS if column in dataset.column_names]


def _is_number_feature(feature) -> bool:
    return str(getattr(feature, "dtype", "")).startswith(("float", "int"))


def _json_rows(path: str) -> list[dict]:
    """The rows of a .json document (a list of objects) or of a .jsonl file (one object per line), as written."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        document = json.loads(text)
        return document if isinstance(document, list) else []
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.split("\n") if line.strip()]


def _reference_problem(rows, columns) -> str | None:
    """The first row whose precomputed reference log-prob is missing, not a number or not finite."""
    for index, row in enumerate(rows):
        for column in columns:
            value = row.get(column)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return (
                    f"row {index}: {column!r} is {_kind(value)}; expected a finite number (the reference model's "
                    "summed response log-prob)"
                )
    return None


def json_file_problem(path: str) -> str | None:
    """Where and why a .json/.jsonl file is not one JSON document or one JSON object per line; None if it is."""
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        return f"line {line}, column {column}: byte 0x{data[error.start]:02x} is not UTF-8; expected UTF-8 text"
    if not text.strip():
        return "holds only whitespace; expected preference pairs, one JSON object per line"
    try:
        document = json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as error:
        return f"{error}; each key may appear once per object"
    except json.JSONDecodeError:
        pass
    else:
        return None  # one JSON document; datasets' own message about its layout stands
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line, object_pairs_hook=_unique_keys)
        except _DuplicateKey as error:
            return f"line {number}: {error}; each key may appear once per object"
        except json.JSONDecodeError as error:
            return f"line {number}, column {error.colno}: {error.msg}; expected one JSON object per line"
        if not isinstance(value, dict):
            return f"line {number}: a JSON {type(value).__name__}; expected one JSON object ({{...}}) per line"
    return None


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs):
    keys = [key for key, _ in pairs]
    for key in keys:
        if keys.count(key) > 1:
            raise _DuplicateKey(f"key {key!r} appears twice in one object")
    return dict(pairs)


def _kind(value) -> str:
    """'missing', 'a string', 'a message list', or what else the value is, for row checks and their messages."""
    if value is None:
        return "missing"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)) and all(isinstance(item, dict) and "content" in item for item in value):
        contents = [item["content"] for item in value]
        if all(content is None or isinstance(content, str) for content in contents):
            return "a message list"
        bad = next(content for content in contents if not (content is None or isinstance(content, str)))
        return f"a message list whose 'content' {str(bad)[:60]!r} is not text ({type(bad).__name__})"
    return f"a {type(value).__name__} ({str(value)[:60]!r})"


def _row_problem(row, index: int) -> str | None:
    """Why a row's values have the wrong types (an error, unlike the drop reasons, which are counted)."""
    kinds = {column: _kind(row.get(column)) for column in ("prompt", "chosen", "rejected")}
    for column, kind in kinds.items():
        if kind not in ("missing", "a string", "a message list"):
            return f"row {index}: {column!r} is {kind}; expected a string or a list of {{'role', 'content'}} messages"
    if "missing" not in (kinds["chosen"], kinds["rejected"]) and kinds["chosen"] != kinds["rejected"]:
        return (
            f"row {index}: 'chosen' is {kinds['chosen']} but 'rejected' is {kinds['rejected']}; expected both strings "
            "or both message lists"
        )
    if kinds["chosen"] == "a string" and kinds["prompt"] == "a message list":
        return f"row {index}: plain-text 'chosen'/'rejected' need a string 'prompt', got a message list"
    return None


def _feature_kind(feature) -> str:
    if getattr(feature, "dtype", None) in ("string", "large_string"):
        return "a string"
    if isinstance(feature, list) or type(feature).__name__ in ("List", "LargeList", "Sequence"):
        message = feature[0] if isinstance(feature, list) else getattr(feature, "feature", None)
        if not isinstance(message, dict):
            return "a list"  # of strings, say (RM-Bench's three responses per row): read by its own code
        if getattr(message.get("content"), "dtype", None) in ("string", "large_string"):
            return "a message list"
    return "mixed"  # e.g. datasets' Json feature: strings in some rows, lists in others; or non-text contents


def _uniform_row_types(features) -> bool:
    """Whether the column types alone show that every row has usable types (no row needs to be looked at)."""
    kinds = {column: _feature_kind(features[column]) for column in ("prompt", "chosen", "rejected") if column in features}
    if "mixed" in kinds.values() or kinds.get("chosen") != kinds.get("rejected"):
        return False
    return not (kinds.get("chosen") == "a string" and kinds.get("prompt") == "a message list")


def _first_row_problem(dataset) -> str | None:
    columns = [column for column in ("prompt", "chosen", "rejected") if column in dataset.column_names]
    for index, row in enumerate(dataset.select_columns(columns)):
        if problem := _row_problem(row, index):
            return problem
    return None


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of plain text by itself (Llama 2, Mistral) or not (Llama 3, Qwen)."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a").input_ids
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def _as_messages(prompt):
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _split_conversation(row, has_prompt_column):
    """(prompt messages, chosen message, rejected message) of a conversational row, or a drop reason."""
    chosen, rejected = row["chosen"], row["rejected"]
    if len(chosen) > 1 or len(rejected) > 1:
        if chosen[:-1] != rejected[:-1]:
            return PROMPT_MISMATCH
        prompt = chosen[:-1]
    else:
        if not has_prompt_column:
            raise ValueError(
                "chosen/rejected hold only the assistant message, so the dataset needs a 'prompt' column "
                "(a string or a message list); it has none"
            )
        if row["prompt"] is None or len(row["prompt"]) == 0:
            return MISSING_PROMPT
        prompt = _as_messages(row["prompt"])
    if chosen[-1].get("role") != "assistant" or rejected[-1].get("role") != "assistant":
        return NOT_ASSISTANT
    return prompt, chosen[-1], rejected[-1]


def _dropped(reason: str) -> dict:
    return {"drop_reason": reason, "truncated": [False] * 3, **{column: [] for column in TOKENIZED_COLUMNS}}


class _RowEncoder:
    """Turns one raw row into prompt/chosen/rejected token ids, or names why the row cannot be used."""

    def __init__(self, tokenizer, max_length, max_prompt_length, has_prompt_column):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.has_prompt_column = has_prompt_column
        self.adds_bos = _adds_bos(tokenizer)

    def texts(self, row):
        """(prompt text, chosen response text, rejected response text), or a drop reason."""
        if row["chosen"] is None or row["rejected"] is None:
            return MISSING_VALUE
        if isinstance(row["chosen"], str):
            if not self.has_prompt_column:
                raise ValueError("plain-text rows need a 'prompt' column next to 'chosen' and 'rejected'; it has none")
            if not row["prompt"]:
                return MISSING_PROMPT
            if not row["chosen"].strip() or not row["rejected"].strip():
                return EMPTY_RESPONSE
            eos = self.tokenizer.eos_token or ""
            return row["prompt"], row["chosen"] + eos, row["rejected"] + eos
        if not row["chosen"] or not row["rejected"]:  # empty message lists
            return MISSING_VALUE
        parts = _split_conversation(row, self.has_prompt_column)
        if isinstance(parts, str):
            return parts
        prompt, chosen, rejected = parts
        if not str(chosen.get("content") or "").strip() or not str(rejected.get("content") or "").strip():
            return EMPTY_RESPONSE
        template = self.tokenizer.apply_chat_template
        prompt_text = template(prompt, tokenize=False, add_generation_prompt=True)
        responses = []
        for message in (chosen, rejected):
            full_text = template(prompt + [message], tokenize=False)
            if not full_text.startswith(prompt_text):
                return TEMPLATE_NOT_PREFIX
            responses.append(full_text[len(prompt_text):])
        return prompt_text, responses[0], responses[1]

    def __call__(self, row, index):
        index = row.get(SOURCE_ROW, index)
        problem = _row_problem(row, index)
        if problem:  # a plain ValueError: callers that know the data's name add it (the trainer does)
            raise ValueError(problem)
        texts = self.texts(row)
        if isinstance(texts, str):
            return _dropped(texts)
        prompt_text, chosen_text, rejected_text = texts
        tokenizer = self.tokenizer
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False).input_ids
        # BOS exactly once: a chat template that writes it is trusted; otherwise it is added only if the
        # tokenizer would add it to plain text itself.
        bos = tokenizer.bos_token_id
        if self.adds_bos and (not prompt_ids or prompt_ids[0] != bos):
            prompt_ids = [bos] + prompt_ids
        full_prompt_length = len(prompt_ids)
        prompt_ids = self._truncate_prompt(prompt_ids)
        if len(prompt_ids) >= self.max_length:
            return _dropped(PROMPT_TOO_LONG)
        room = self.max_length - len(prompt_ids)
        chosen_ids = tokenizer(chosen_text, add_special_tokens=False).input_ids
        rejected_ids = tokenizer(rejected_text, add_special_tokens=False).input_ids
        cut = [len(prompt_ids) < full_prompt_length, len(chosen_ids) > room, len(rejected_ids) > room]
        chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
        if not prompt_ids:
            return _dropped(MISSING_PROMPT)
        if not chosen_ids or not rejected_ids:
            return _dropped(EMPTY_RESPONSE)
        if chosen_ids == rejected_ids:  # equal texts, or cut (or mapped to <unk>) to the same tokens: no preference
            return _dropped(IDENTICAL_RESPONSES)
        return {
            "drop_reason": "",
            "truncated": cut,
            "prompt_input_ids": prompt_ids,
            "chosen_input_ids": chosen_ids,
            "rejected_input_ids": rejected_ids,
        }

    def _truncate_prompt(self, prompt_ids):
        """Keep the last max_prompt_length tokens; a leading BOS survives the cut."""
        if len(prompt_ids) <= self.max_prompt_length:
            return prompt_ids
        if prompt_ids[0] == self.tokenizer.bos_token_id and self.tokenizer.bos_token_id is not None:
            return prompt_ids[:1] + prompt_ids[len(prompt_ids) - self.max_prompt_length + 1 :]
        return prompt_ids[-self.max_prompt_length :]


def _check_columns(dataset):
    missing = [column for column in ("chosen", "rejected") if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"preference dataset is missing column(s) {missing}; it has "
            f"{[column for column in dataset.column_names if column != SOURCE_ROW]}. Expected "
            "'chosen' and 'rejected' (message lists or strings), plus 'prompt' unless chosen/rejected include "
            "the user turn"
        )
    present = [column for column in REF_COLUMNS if column in dataset.column_names]
    if len(present) == 1:
        raise ValueError(f"dataset has {present[0]!r} but not its partner: precomputed reference log-probs need both {REF_COLUMNS}")


def _report_dropped(dataset, reasons):
    dropped = [index for index, reason in enumerate(reasons) if reason]
    if not dropped:
        return
    counts = collections.Counter(reason for reason in reasons if reason)
    summary = ", ".join(f"{reason}: {count}" for reason, count in counts.most_common())
    first = dropped[0]
    row = dataset[first]
    source_index = row.pop(SOURCE_ROW, first)
    shown = repr(row)
    if len(shown) > 500:
        shown = shown[:500] + "..."
    logger.warning(
        "dropped %d of %d rows (%s); first dropped row (index %d, %s): %s",
        len(dropped), len(reasons), summary, source_index, reasons[first], shown,
    )


def tokenize_preference_dataset(dataset, tokenizer, max_length: int, max_prompt_length: int, num_proc=None):
    """Token ids per row: `prompt_input_ids`, `chosen_input_ids`, `rejected_input_ids` (responses only).

    The prompt is truncated from the left to max_prompt_length, then the responses from the right so that
    prompt + response fits max_length. Rows that cannot be used are dropped, with a count per reason and the
    first offending row in a warning. The map is cached by `datasets` for file-backed datasets, so the
    trainer runs it on one process per node first and the others read the cache.
    """
    _check_columns(dataset)
    if len(dataset) == 0:
        raise ValueError("preference dataset has no rows")
    encoder = _RowEncoder(tokenizer, max_length, max_prompt_length, "prompt" in dataset.column_names)
    from datasets import Features, Sequence, Value

    keep = [column for column in REF_COLUMNS if column in dataset.column_names]
    # Explicit features: a first writer batch made only of dropped rows must not fix the id columns' type.
    features = Features(
        {"drop_reason": Value("string"), "truncated": Sequence(Value("bool"), length=3)}
        | {column: Sequence(Value("int32")) for column in TOKENIZED_COLUMNS}
        | {column: dataset.features[column] for column in keep}
    )
    with datasets_progress():  # the one bar of this phase, on a terminal
        encoded = dataset.map(
            encoder,
            with_indices=True,
            remove_columns=[column for column in dataset.column_names if column not in keep],
            features=features,
            num_proc=num_proc,
            desc="tokenizing preference pairs",
        )
    reasons = encoded["drop_reason"]
    _report_dropped(dataset, reasons)
    if all(reasons):
        raise ValueError(f"every one of the {len(reasons)} rows was dropped (see the warning above for why)")
    _report_truncated(encoded["truncated"], reasons, max_length, max_prompt_length)
    if any(reasons):
        encoded = encoded.filter(lambda reason: not reason, input_columns="drop_reason", num_proc=num_proc)
    return encoded.remove_columns(["drop_reason", "truncated"])


def _report_truncated(flags, reasons, max_length: int, max_prompt_length: int):
    """One warning with how many prompts and responses the truncation cut (of the rows kept)."""
    flags = [list(row) for row, reason in zip(flags, reasons) if not reason]
    prompts = sum(row[0] for row in flags)
    responses = sum(row[1] + row[2] for row in flags)
    if prompts or responses:
        logger.warning(
            "truncated %d of %d prompts (from the left, to --max_prompt_length %d) and %d of %d responses (to fit "
            "--max_length %d)", prompts, len(flags), max_prompt_length, responses, 2 * len(flags), max_length,
        )


class PreferenceCollator:
    """Tokenized rows -> one batch: chosen sequences first, then rejected ones in the same pair order.

    Each sequence is prompt + response without its last token; `labels[:, t]` is the token that position t
    predicts (already shifted), -100 on prompt and padding.
      padded: `input_ids`, `attention_mask`, `labels` of shape [2B, T] (right padding).
      packed: every sequence concatenated into one row, no padding: `input_ids`, `position_ids`, `labels`
              of shape [1, N] and `cu_seqlens` [2B + 1] (int32) for the packed loss and varlen attention.
      prefix_sharing: each pair as one block [prompt | chosen | rejected] whose prompt is computed once
              (see prefix.py for the keys); one pair per padded row, or with packed several pairs per row.
    `ref_logps` [2B] is added when the rows carry precomputed DPO reference log-probs.
    """

    def __init__(self, pad_token_id: int, packed: bool = False, prefix_sharing: bool = False):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: give the tokenizer a pad token (the trainer falls back to EOS)")
        self.pad_token_id = int(pad_token_id)
        self.packed = packed
        self.prefix_sharing = prefix_sharing

    @staticmethod
    def _sequences(rows):
        sequences = []
        for side in ("chosen_input_ids", "rejected_input_ids"):
            for row in rows:
                prompt, response = list(row["prompt_input_ids"]), list(row[side])
                tokens = prompt + response
                labels = [IGNORE_INDEX] * len(prompt) + response
                sequences.append((tokens[:-1], labels[1:]))
        return sequences

    def __call__(self, rows):
        if not rows:
            raise ValueError("PreferenceCollator got an empty list of rows")
        if self.prefix_sharing:
            pairs = [
                (list(row["prompt_input_ids"]), list(row["chosen_input_ids"]), list(row["rejected_input_ids"]))
                for row in rows
            ]
            batch = prefix.collate(pairs, self.pad_token_id, self.packed)
        else:
            sequences = self._sequences(rows)
            batch = self._packed(sequences) if self.packed else self._padded(sequences)
        if REF_COLUMNS[0] in rows[0]:
            batch["ref_logps"] = torch.tensor(
                [row[REF_COLUMNS[0]] for row in rows] + [row[REF_COLUMNS[1]] for row in rows], dtype=torch.float32
            )
        return batch

    def _padded(self, sequences):
        length = max(len(tokens) for tokens, _ in sequences)
        input_ids = torch.full((len(sequences), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, (tokens, row_labels) in enumerate(sequences):
            input_ids[row, : len(tokens)] = torch.tensor(tokens)
            labels[row, : len(row_labels)] = torch.tensor(row_labels)
            attention_mask[row, : len(tokens)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def _packed(self, sequences):
        lengths = torch.tensor([len(tokens) for tokens, _ in sequences])
        cu_seqlens = torch.zeros(len(sequences) + 1, dtype=torch.int32)
        cu_seqlens[1:] = lengths.cumsum(0)
        return {
            "input_ids": torch.tensor([token for tokens, _ in sequences for token in tokens]).unsqueeze(0),
            "position_ids": torch.cat([torch.arange(length) for length in lengths.tolist()]).unsqueeze(0),
            "labels": torch.tensor([label for _, row_labels in sequences for label in row_labels]).unsqueeze(0),
            "cu_seqlens": cu_seqlens,
        }
