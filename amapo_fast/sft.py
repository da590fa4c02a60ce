"""The SFT stage: supervised fine-tuning on chat data through the fused cross-entropy head.

`torchrun amapo_fast/train.py --stage sft` trains with the same engines, checkpoints, resume and logging as
preference training; this module supplies what differs (`SftStage`): the data pipeline and the loss.

Rows come in one of two formats:
  * `messages`: a list of {'role', 'content'} messages (UltraChat-200k's format); every assistant turn is
    trained on, in multi-turn conversations too;
  * `prompt` / `completion`: strings (plain text, no chat template, EOS appended to the completion) or message
    lists (the completion's assistant turns are trained on, the prompt's are context).
The loss covers assistant tokens only. They are found from the chat template: where the template marks the
assistant's text with `{% generation %}` blocks, transformers' `return_assistant_tokens_mask` gives them;
otherwise by rendering the conversation turn by turn (the text up to an assistant turn with the generation
prompt, then up to the end of that turn: the difference is the turn), each piece tokenized on its own. A row
whose template does not render each turn as a prefix of the whole conversation is dropped and counted.
Sequences longer than max_length are cut at the end; BOS appears once, as for preference pairs.
Batches are packed (padding-free) unless --packed false: one row of concatenated sequences whose
position_ids restart at each sequence, which attention reads as the boundaries.
"""
import random
import re

import torch
from torch import nn

from .cross_entropy import LinearCrossEntropyHead
from .data import IGNORE_INDEX, _adds_bos, _as_messages, _report_dropped

# Settings where SFT's defaults differ from preference training's (flags and --config still override them).
SFT_DEFAULTS = {"packed": True, "prefix_sharing": False, "output_dir": "outputs/sft-toy"}

# The Zephyr chat template (the paper's Base setups start from models fine-tuned with it), with the
# assistant's text marked for transformers' assistant-token mask. Like the original it writes no BOS: the
# tokenizers of Mistral and Llama 3 base models add it themselves.
ZEPHYR_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token + '\n' }}{% endgeneration %}"
    "{% else %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
CHAT_TEMPLATES = {"zephyr": ZEPHYR_CHAT_TEMPLATE}
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

# Why a row cannot be used; rows are dropped with a count per reason.
NO_MESSAGES = "no messages"
NO_ASSISTANT = "no assistant turn to train on"
TEMPLATE_NOT_PREFIX = "chat template does not render each turn as a prefix of the conversation"
TRUNCATED_AWAY = "no assistant token within max_length"
TOKENIZED_COLUMNS = ("input_ids", "assistant_masks")


def make_toy_sft_dataset(num_rows: int, seed: int):
    """Generated chats on the toy's string-edit tasks (see toy.py): the user asks, the assistant answers right.
    About a third of the conversations have two exchanges, so that every turn's masking is exercised."""
    from datasets import Dataset

    from .toy import _toy_row

    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        messages = []
        for _ in range(1 + (rng.random() < 1 / 3)):
            messages += _toy_row(rng)["chosen"]
        rows.append({"messages": messages})
    return Dataset.from_list(rows)


def _segments(tokenizer, messages, first_trained):
    """[(text, trained)] pieces of the rendered conversation, by incremental rendering, or a drop reason."""
    render = tokenizer.apply_chat_template
    full = render(messages, tokenize=False)
    pieces, done = [], 0
    for index, message in enumerate(messages):
        if message.get("role") != "assistant" or index < first_trained:
            continue
        before = render(messages[:index], tokenize=False, add_generation_prompt=True) if index else ""
        through = render(messages[: index + 1], tokenize=False)
        if not (through.startswith(before) and full.startswith(through) and len(before) >= done):
            return TEMPLATE_NOT_PREFIX
        pieces += [(full[done : len(before)], False), (full[len(before) : len(through)], True)]
        done = len(through)
    return pieces + [(full[done:], False)]


class _ChatEncoder:
    """One raw row -> token ids and an assistant mask (1 on trained tokens), or names why the row cannot be used."""

    def __init__(self, tokenizer, max_length):
        self.tokenizer, self.max_length = tokenizer, max_length
        self.adds_bos = _adds_bos(tokenizer)
        self.marks_generation = bool(_GENERATION_TAG.search(tokenizer.chat_template or ""))

    def _conversation(self, messages, first_trained):
        if self.tokenizer.chat_template is None:
            raise ValueError("conversations need a chat template and the tokenizer has none: set --chat_template (zephyr, or a Jinja template)")
        if not any(m.get("role") == "assistant" for m in messages[first_trained:]):
            return NO_ASSISTANT
        if self.marks_generation and first_trained == 0:
            encoded = self.tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            return list(encoded["input_ids"]), list(encoded["assistant_masks"])
        pieces = _segments(self.tokenizer, messages, first_trained)
        if isinstance(pieces, str):
            return pieces
        return self._encode_pieces(pieces)

    def _encode_pieces(self, pieces):
        ids, mask = [], []
        for text, trained in pieces:
            piece = self.tokenizer(text, add_special_tokens=False).input_ids if text else []
            ids += piece
            mask += [int(trained)] * len(piece)
        return ids, mask

    def __call__(self, row):
        if row.get("messages") is not None:
            encoded = self._conversation(list(row["messages"]), 0) if row["messages"] else NO_MESSAGES
        elif isinstance(row.get("completion"), str) and isinstance(row.get("prompt"), str):
            eos = self.tokenizer.eos_token or ""
            encoded = self._encode_pieces([(row["prompt"], False), (row["completion"] + eos, True)])
        elif row.get("completion") and row.get("prompt"):
            prompt = _as_messages(row["prompt"])
            encoded = self._conversation(prompt + _as_messages(row["completion"]), len(prompt))
        else:
            encoded = NO_MESSAGES
        if isinstance(encoded, str):
            return {"drop_reason": encoded, "input_ids": [], "assistant_masks": []}
        ids, mask = encoded
        bos = self.tokenizer.bos_token_id
        if self.adds_bos and (not ids or ids[0] != bos):
            ids, mask = [bos] + ids, [0] + mask
        ids, mask = ids[: self.max_length], mask[: self.max_length]
        # A trained token is predicted from the one before it: the first position cannot be a target.
        if not any(mask[1:]):
            return {"drop_reason": TRUNCATED_AWAY, "input_ids": [], "assistant_masks": []}
        return {"drop_reason": "", "input_ids": ids, "assistant_masks": mask}


def tokenize_sft_dataset(dataset, tokenizer, max_length: int, num_proc=None):
    """`input_ids` and `assistant_masks` per row; unusable rows dropped with a count per reason (a warning)."""
    columns = dataset.column_names
    if "messages" not in columns and not {"prompt", "completion"} <= set(columns):
        raise ValueError(
            f"SFT data needs a 'messages' column (a list of {{'role', 'content'}} messages) or 'prompt' and "
            f"'completion' columns; it has {columns}"
        )
    if len(dataset) == 0:
        raise ValueError("SFT dataset has no rows")
    encoder = _ChatEncoder(tokenizer, max_length)
    from datasets import Features, Sequence, Value

    features = Features(
        {"drop_reason": Value("string"), "input_ids": Sequence(Value("int32")), "assistant_masks": Sequence(Value("int8"))}
    )
    encoded = dataset.map(encoder, remove_columns=columns, features=features, num_proc=num_proc, desc="tokenizing chats")
    reasons = encoded["drop_reason"]
    _report_dropped(dataset, reasons)
    if all(reasons):
        raise ValueError(f"every one of the {len(reasons)} rows was dropped (see the warning above for why)")
    if any(reasons):
        encoded = encoded.filter(lambda reason: not reason, input_columns="drop_reason", num_proc=num_proc)
    return encoded.remove_columns("drop_reason")


class SftCollator:
    """Tokenized chats -> one batch. Each sequence is its tokens without the last; `labels[t]` is the token
    position t predicts (already shifted), IGNORE_INDEX where that token is not an assistant token.
      packed: `input_ids`, `position_ids`, `labels` of shape [1, N] (every sequence concatenated, no padding);
      padded: `input_ids`, `attention_mask`, `labels` of shape [B, T] (right padding)."""

    def __init__(self, pad_token_id: int, packed: bool = True):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: give the tokenizer a pad token (the trainer falls back to EOS)")
        self.pad_token_id, self.packed = int(pad_token_id), packed

    def __call__(self, rows):
        if not rows:
            raise ValueError("SftCollator got an empty list of rows")
        sequences = []
        for row in rows:
            ids, mask = list(row["input_ids"]), list(row["assistant_masks"])
            labels = [token if trained else IGNORE_INDEX for token, trained in zip(ids[1:], mask[1:])]
            sequences.append((ids[:-1], labels))
        if self.packed:
            return {
                "input_ids": torch.tensor([t for ids, _ in sequences for t in ids]).unsqueeze(0),
                "position_ids": torch.cat([torch.arange(len(ids)) for ids, _ in sequences]).unsqueeze(0),
                "labels": torch.tensor([y for _, labels in sequences for y in labels]).unsqueeze(0),
            }
        length = max(len(ids) for ids, _ in sequences)
        input_ids = torch.full((len(sequences), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for index, (ids, row_labels) in enumerate(sequences):
            input_ids[index, : len(ids)] = torch.tensor(ids)
            labels[index, : len(row_labels)] = torch.tensor(row_labels)
            attention_mask[index, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class SftPolicy(nn.Module):
    """Causal LM backbone + fused cross-entropy head: `policy(batch) -> (loss, metrics)`, the token-mean loss of
    the batch's assistant tokens; `policy(batch, sums=True)` gives (loss sum, correct tokens, tokens) without
    grad, for evaluation. The head shares the lm_head parameters."""

    def __init__(self, causal_lm, impl="auto"):
        super().__init__()
        self.causal_lm = causal_lm
        self.head = LinearCrossEntropyHead(causal_lm.get_output_embeddings(), ignore_index=IGNORE_INDEX, impl=impl)

    def forward(self, batch, sums=False):
        hidden = self.causal_lm.base_model(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"), use_cache=False,
        ).last_hidden_state
        labels = batch["labels"]
        if not sums:
            return self.head(hidden, labels)
        count = int((labels != IGNORE_INDEX).sum())
        if count == 0:  # a batch of padding rows only: the forward still runs, for the collectives of sharding
            loss, metrics = self.head(hidden[:, :1], torch.zeros_like(labels[:, :1]))
            return loss * 0, metrics["mean_token_accuracy"] * 0, 0
        loss, metrics = self.head(hidden, labels)
        return loss * count, metrics["mean_token_accuracy"] * count, count


class _RankShard(torch.utils.data.Dataset):
    """This rank's rows of the held-out set (every world_size-th), padded to the same count on every rank with
    rows whose assistant mask is all zero (they run, as sharded models need, but count nothing)."""

    def __init__(self, dataset, rank: int, world_size: int):
        self.dataset, self.indices = dataset, list(range(rank, len(dataset), world_size))
        self.length = -(-len(dataset) // world_size)

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if index < len(self.indices):
            return self.dataset[self.indices[index]]
        row = dict(self.dataset[0])
        row["assistant_masks"] = [0] * len(row["assistant_masks"])
        return row


@torch.no_grad()
def evaluate_sft(model, dataset, collator, batch_size: int) -> dict:
    """Held-out token-mean loss and token accuracy over every rank's share of the dataset's assistant tokens."""
    import torch.distributed as dist

    from .distributed import all_reduce_sum

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(_RankShard(dataset, rank, world), batch_size=batch_size, collate_fn=collator)
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for batch in loader:
        loss, correct, count = model({key: value.to(device) for key, value in batch.items()}, sums=True)
        totals += torch.stack([loss.double(), correct.double(), torch.tensor(count, dtype=torch.float64, device=device)])
    model.train(was_training)
    loss, correct, count = (all_reduce_sum(totals) if dist.is_initialized() else totals).tolist()
    return {"eval/loss": loss / count, "eval/mean_token_accuracy": correct / count, "eval/num_tokens": count}


class SftStage:
    """What SFT supplies to the trainer: data, batches, the policy's loss head, evaluation, descriptions."""

    name = "sft"
    unit = "conversations"
    headline = ("eval/loss", "loss")  # the held-out figure printed before -> after

    def make_toy_dataset(self, num_rows: int, seed: int):
        return make_toy_sft_dataset(num_rows, seed)

    def tokenize(self, dataset, tokenizer, config):
        return tokenize_sft_dataset(dataset, tokenizer, config.max_length, num_proc=config.dataset_num_proc)

    def collator(self, tokenizer, config):
        return SftCollator(tokenizer.pad_token_id, packed=config.packed)

    def policy_kwargs(self, config) -> dict:
        return {"policy_class": SftPolicy, "impl": config.loss_impl}

    def needs_reference_model(self, config, train_set) -> bool:
        return False

    def describe_loss(self, config, impl: str) -> str:
        return f"token-mean cross-entropy on assistant tokens, implementation {impl}"

    def evaluate(self, model, ref_model, dataset, collator, config) -> dict:
        return evaluate_sft(model, dataset, collator, config.per_device_eval_batch_size)
