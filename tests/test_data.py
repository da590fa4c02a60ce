"""Preference data: formats, chat template and BOS, truncation, dropped rows, missing columns, batches."""
import json
import logging
import random

import pytest
import torch

# A machine without `datasets` (e.g. a bare GPU image) skips this module instead of stopping collection.
Dataset = pytest.importorskip("datasets").Dataset

from amapo_fast.data import (
    IGNORE_INDEX,
    PreferenceCollator,
    load_preference_dataset,
    tokenize_preference_dataset,
)
from amapo_fast.errors import DataError
from amapo_fast.model import load_policy
from amapo_fast.toy import build_toy_tokenizer, make_toy_preference_dataset


@pytest.fixture(scope="module")
def tokenizer():
    return build_toy_tokenizer()


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


def _conversation(prompt, chosen, rejected):
    user = {"role": "user", "content": prompt}
    return {
        "prompt": prompt,
        "chosen": [user, {"role": "assistant", "content": chosen}],
        "rejected": [user, {"role": "assistant", "content": rejected}],
    }


def test_conversational_rows_use_the_chat_template_once(tokenizer):
    row = _conversation("Copy the word: abc", "abc", "xyz")
    (encoded,) = tokenize_preference_dataset(Dataset.from_list([row]), tokenizer, 64, 32).to_list()
    prompt = "<s><|user|>\nCopy the word: abc</s>\n<|assistant|>\n"
    assert encoded["prompt_input_ids"] == _ids(tokenizer, prompt)
    assert encoded["chosen_input_ids"] == _ids(tokenizer, "abc</s>\n")
    assert encoded["rejected_input_ids"] == _ids(tokenizer, "xyz</s>\n")
    assert encoded["prompt_input_ids"].count(tokenizer.bos_token_id) == 1


def test_trl_and_plain_text_formats(tokenizer):
    trl = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "ok"}],
        "rejected": [{"role": "assistant", "content": "no"}],
    }
    (encoded,) = tokenize_preference_dataset(Dataset.from_list([trl]), tokenizer, 64, 32).to_list()
    assert encoded["prompt_input_ids"] == _ids(tokenizer, "<s><|user|>\nhi</s>\n<|assistant|>\n")
    assert encoded["chosen_input_ids"] == _ids(tokenizer, "ok</s>\n")

    plain = {"prompt": "2+2=", "chosen": "4", "rejected": "5"}
    (encoded,) = tokenize_preference_dataset(Dataset.from_list([plain]), tokenizer, 64, 32).to_list()
    # No chat template for plain text, EOS closes the response; this tokenizer adds no BOS by itself.
    assert encoded["prompt_input_ids"] == _ids(tokenizer, "2+2=")
    assert encoded["chosen_input_ids"] == _ids(tokenizer, "4</s>")


def test_bos_is_never_doubled(tokenizer):
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    # A tokenizer that adds BOS to plain text itself, like Llama 2 / Mistral.
    backend = tokenizer.backend_tokenizer.__class__.from_str(tokenizer.backend_tokenizer.to_str())
    backend.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)])
    adds_bos = PreTrainedTokenizerFast(
        tokenizer_object=backend, chat_template=tokenizer.chat_template,
        bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
    )
    rows = [_conversation("hello", "a", "b"), {"prompt": "hello", "chosen": "a", "rejected": "b"}]
    for row in rows:  # the template writes BOS / the plain text gets it from the tokenizer: once either way
        (encoded,) = tokenize_preference_dataset(Dataset.from_list([row]), adds_bos, 64, 32).to_list()
        assert encoded["prompt_input_ids"][0] == adds_bos.bos_token_id
        assert encoded["prompt_input_ids"].count(adds_bos.bos_token_id) == 1


def test_prompt_truncated_from_the_left_then_the_pair(tokenizer):
    word = "".join(random.choices("abcdefghij", k=40))
    row = _conversation(f"Copy the word: {word}", word, word[::-1])
    (encoded,) = tokenize_preference_dataset(Dataset.from_list([row]), tokenizer, 30, 12).to_list()
    full_prompt = _ids(tokenizer, tokenizer.apply_chat_template(row["chosen"][:-1], tokenize=False, add_generation_prompt=True))
    assert encoded["prompt_input_ids"] == full_prompt[:1] + full_prompt[-11:]  # BOS kept, the end kept
    assert len(encoded["prompt_input_ids"]) + len(encoded["chosen_input_ids"]) == 30
    assert encoded["chosen_input_ids"] == _ids(tokenizer, word)[:18]  # the response cut from the right


def test_plain_text_prompt_truncated_from_the_left(tokenizer):
    """Plain text takes no chat template, so it reaches the cut without a BOS: the prompt's end is kept."""
    prompt = "".join(random.choices("abcdefghij", k=40))
    row = {"prompt": prompt, "chosen": "yes", "rejected": "no"}
    (encoded,) = tokenize_preference_dataset(Dataset.from_list([row]), tokenizer, 30, 12).to_list()
    assert encoded["prompt_input_ids"] == _ids(tokenizer, prompt)[-12:]
    assert encoded["chosen_input_ids"] == _ids(tokenizer, "yes</s>")


def test_unusable_rows_are_dropped_with_counts_and_the_first_row_shown(tokenizer, caplog):
    rows = make_toy_preference_dataset(12, seed=random.randrange(10**6)).remove_columns("task").to_list()
    rows[2]["chosen"][-1]["content"] = "  "  # empty response
    rows[5]["rejected"][-1]["content"] = ""  # empty response
    rows[7]["rejected"][0]["content"] = "another prompt"  # chosen and rejected disagree on the prompt
    rows[9]["chosen"] = None  # missing value
    for side in ("chosen", "rejected"):  # prompt longer than max_length once truncated to 60
        rows[10][side][0]["content"] = "x" * 80
    with caplog.at_level(logging.WARNING, logger="amapo_fast.data"):
        encoded = tokenize_preference_dataset(Dataset.from_list(rows), tokenizer, 40, 60)
    assert len(encoded) == 7
    (message,) = [record.getMessage() for record in caplog.records if "dropped" in record.getMessage()]
    assert message.startswith("dropped 5 of 12 rows (")
    for expected in ("empty response: 2", "chosen and rejected differ before the last message: 1",
                     "missing value: 1", "prompt longer than max_length: 1"):
        assert expected in message
    assert "first dropped row (index 2, empty response)" in message and "'content': '  '" in message


def test_missing_columns_are_rejected_with_a_clear_error(tokenizer):
    rows = make_toy_preference_dataset(3, seed=0).to_list()
    without_rejected = Dataset.from_list([{k: v for k, v in row.items() if k != "rejected"} for row in rows])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['rejected'\]"):
        tokenize_preference_dataset(without_rejected, tokenizer, 64, 32)
    assistant_only = Dataset.from_list(
        [{"chosen": row["chosen"][-1:], "rejected": row["rejected"][-1:]} for row in rows]
    )
    with pytest.raises(ValueError, match="needs a 'prompt' column"):
        tokenize_preference_dataset(assistant_only, tokenizer, 64, 32)
    plain = Dataset.from_list([{"chosen": "a", "rejected": "b"}])
    with pytest.raises(ValueError, match="plain-text rows need a 'prompt' column"):
        tokenize_preference_dataset(plain, tokenizer, 64, 32)


@pytest.mark.parametrize("extension", ["json", "jsonl", "parquet"])
def test_local_files_load_as_the_named_split(tmp_path, extension):
    rows = make_toy_preference_dataset(5, seed=random.randrange(10**6)).to_list()
    path = tmp_path / f"pairs.{extension}"
    if extension == "parquet":
        Dataset.from_list(rows).to_parquet(str(path))
    elif extension == "json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("\n".join(json.dumps(row) for row in rows))
    loaded = load_preference_dataset(str(path), "test_prefs[:3]")
    assert loaded.to_list() == rows[:3]


def test_collator_stacks_chosen_then_rejected_with_shifted_labels(tokenizer):
    rows = tokenize_preference_dataset(make_toy_preference_dataset(3, seed=random.randrange(10**6)), tokenizer, 64, 32)
    rows = rows.to_list()
    batch = PreferenceCollator(tokenizer.pad_token_id)(rows)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 6
    for index, (row, side) in enumerate([(r, "chosen_input_ids") for r in rows] + [(r, "rejected_input_ids") for r in rows]):
        sequence = row["prompt_input_ids"] + row[side]
        length = len(sequence) - 1
        assert batch["input_ids"][index, :length].tolist() == sequence[:-1]
        assert batch["attention_mask"][index].sum() == length
        labels = batch["labels"][index]
        # labels[t] is the token at t + 1, only where that token belongs to the response
        assert labels[labels != IGNORE_INDEX].tolist() == row[side]
        first = len(row["prompt_input_ids"]) - 1
        assert (labels[:first] == IGNORE_INDEX).all() and labels[first] == row[side][0]
        assert (labels[length:] == IGNORE_INDEX).all() and (batch["input_ids"][index, length:] == tokenizer.pad_token_id).all()


def test_packed_batches_give_the_padded_log_probs(tokenizer):
    torch.manual_seed(random.randrange(10**6))
    rows = tokenize_preference_dataset(make_toy_preference_dataset(4, seed=random.randrange(10**6)), tokenizer, 64, 32)
    rows = rows.to_list()
    padded = PreferenceCollator(tokenizer.pad_token_id)(rows)
    packed = PreferenceCollator(tokenizer.pad_token_id, packed=True)(rows)
    lengths = padded["attention_mask"].sum(1)
    assert packed["cu_seqlens"].tolist() == [0] + lengths.cumsum(0).tolist()
    assert packed["input_ids"].shape == (1, int(lengths.sum()))
    assert packed["position_ids"][0, : int(lengths[0])].tolist() == list(range(int(lengths[0])))

    policy = load_policy("toy", tokenizer=tokenizer, beta=2.0)
    padded_sums, padded_counts = policy.sequence_logps(padded)
    packed_sums, packed_counts = policy.sequence_logps(packed)
    assert torch.equal(padded_counts, packed_counts)
    torch.testing.assert_close(packed_sums, padded_sums, rtol=1e-5, atol=1e-4)
    # and both equal an independent computation from the model's own logits
    logits = policy.causal_lm(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    mask = padded["labels"] != IGNORE_INDEX
    token_logps = torch.log_softmax(logits.float(), -1).gather(-1, padded["labels"].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(padded_sums, (token_logps * mask).sum(1), rtol=1e-5, atol=1e-4)
    loss_padded, _ = policy(padded)
    loss_packed, _ = policy(packed)
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=1e-5)


def test_pairs_identical_after_tokenization_are_dropped(tokenizer, caplog):
    """Equal texts, responses cut to the same tokens, responses that map to the same unknown tokens: no preference."""
    prefix_word = "".join(random.choices("abcdefghij", k=30))
    rows = [
        _conversation("Copy: ab", "ab", "ab"),  # the same string
        _conversation("Copy: cd", prefix_word + "x", prefix_word + "y"),  # differ only past the cut
        _conversation("Copy: ef", "é", "漢"),  # both <unk>
        _conversation("Copy: gh", "gh", "hg"),  # kept
        {"prompt": "2+2=", "chosen": "4", "rejected": "4"},  # plain text
    ]
    plain = rows.pop()
    with caplog.at_level(logging.WARNING, logger="amapo_fast.data"):
        encoded = tokenize_preference_dataset(Dataset.from_list(rows), tokenizer, 40, 16)
    assert len(encoded) == 1 and encoded[0]["chosen_input_ids"] != encoded[0]["rejected_input_ids"]
    (message,) = [record.getMessage() for record in caplog.records if "dropped" in record.getMessage()]
    assert "dropped 3 of 4 rows (chosen and rejected are the same tokens: 3)" in message
    with pytest.raises(ValueError, match="every one of the 2 rows was dropped"):
        tokenize_preference_dataset(Dataset.from_list([plain, plain]), tokenizer, 40, 16)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.mark.parametrize("value, expected", [(None, "missing"), (float("nan"), "not a number"),
                                             (float("-inf"), "not a number"), ("-3.5", "a string")])
def test_reference_log_probs_that_are_not_finite_numbers_are_refused_naming_file_and_row(tmp_path, value, expected):
    rows = make_toy_preference_dataset(4, seed=random.randrange(10**6)).remove_columns("task").to_list()
    for row in rows:
        row.update(ref_chosen_logps=-random.random() * 10, ref_rejected_logps=-random.random() * 10)
    rows[2]["ref_rejected_logps"] = value
    path = _write_jsonl(tmp_path / "with_ref.jsonl", rows)
    kind = {"missing": "missing", "not a number": "a float", "a string": "a string"}[expected]
    with pytest.raises(DataError, match=rf"with_ref.jsonl: row 2: 'ref_rejected_logps' is {kind}.*expected a finite number"):
        load_preference_dataset(path, "train")


def test_duplicate_keys_and_non_text_contents_are_one_line_naming_file_and_row(tmp_path):
    rows = make_toy_preference_dataset(3, seed=random.randrange(10**6)).remove_columns("task").to_list()
    lines = [json.dumps(row) for row in rows]
    lines[1] = lines[1][:-1] + ', "chosen": "again"}'
    duplicate = tmp_path / "duplicate.jsonl"
    duplicate.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"duplicate.jsonl: line 2: key 'chosen' appears twice in one object"):
        load_preference_dataset(str(duplicate), "train")

    rows[2]["chosen"][-1]["content"] = 5
    path = _write_jsonl(tmp_path / "number.jsonl", rows)
    with pytest.raises(DataError, match=r"number.jsonl: row 2: 'chosen' is a message list whose 'content' '5' is not text"):
        load_preference_dataset(path, "train")


def test_saved_dataset_without_the_split_names_its_splits_and_slices_like_the_hub(tmp_path):
    from datasets import DatasetDict

    rows = make_toy_preference_dataset(6, seed=random.randrange(10**6)).to_list()
    folder = tmp_path / "saved"
    DatasetDict({"train_prefs": Dataset.from_list(rows), "test_prefs": Dataset.from_list(rows[:2])}).save_to_disk(str(folder))
    with pytest.raises(DataError, match=r"no split 'train'; it has train_prefs, test_prefs: pass one of them as --train_split"):
        load_preference_dataset(str(folder), "train", split_flag="--train_split")
    assert load_preference_dataset(str(folder), "train_prefs[2:5]").to_list() == rows[2:5]


def test_a_misspelled_split_of_a_local_file_is_refused(tmp_path):
    path = _write_jsonl(tmp_path / "pairs.jsonl", make_toy_preference_dataset(3, seed=0).to_list())
    with pytest.raises(DataError, match=r"--train_split trian\[:20\]: 'trian' does not name a split"):
        load_preference_dataset(path, "trian[:20]", split_flag="--train_split")
    for split in ("train[:2]", "test_prefs", "validation", "heldout"):
        assert len(load_preference_dataset(path, split)) in (2, 3)


def test_truncated_prompts_and_responses_are_counted(tokenizer, caplog):
    long_word = "".join(random.choices("abcdefghij", k=40))
    rows = [
        _conversation(f"Copy: {long_word}", "ab", "ba"),  # prompt cut
        _conversation("Copy: ab", long_word, "ab"),  # one response cut
        _conversation("Copy: cd", "cd", "dc"),  # nothing cut
    ]
    with caplog.at_level(logging.WARNING, logger="amapo_fast.data"):
        tokenize_preference_dataset(Dataset.from_list(rows), tokenizer, 30, 16)
    (message,) = [record.getMessage() for record in caplog.records if "truncated" in record.getMessage()]
    assert message == ("truncated 1 of 3 prompts (from the left, to --max_prompt_length 16) and 1 of 6 responses (to "
                       "fit --max_length 30)")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="amapo_fast.data"):
        tokenize_preference_dataset(Dataset.from_list(rows[2:]), tokenizer, 30, 16)
    assert not [record for record in caplog.records if "truncated" in record.getMessage()]
