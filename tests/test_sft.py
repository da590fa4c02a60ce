"""The SFT stage: assistant-token masks from chat templates (with and without generation markers), batches, and
`--stage sft` end to end against a plain PyTorch cross-entropy loop on the same batches."""
import math

import pytest
import torch
from torch.nn import functional as F

pytest.importorskip("datasets")

from amapo_fast.data import IGNORE_INDEX
from amapo_fast.distributed import warmup_cosine_factor
from amapo_fast.model import load_causal_lm
from amapo_fast.sft import (
    ZEPHYR_CHAT_TEMPLATE,
    SftCollator,
    SftPolicy,
    make_toy_sft_dataset,
    tokenize_sft_dataset,
)
from amapo_fast.toy import build_toy_tokenizer
from test_train import _records, _run

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Copy the word: abc"},
    {"role": "assistant", "content": "abc"},
    {"role": "user", "content": "Reverse the word: xyz"},
    {"role": "assistant", "content": "zyx"},
]


def _trained_text(tokenizer, row):
    return tokenizer.decode([token for token, trained in zip(row["input_ids"], row["assistant_masks"]) if trained])


@pytest.mark.parametrize("template", ["incremental", "generation-marks"])
def test_every_assistant_turn_and_nothing_else_is_trained(template):
    """The toy template has no generation marks (turn-by-turn rendering); the Zephyr one has (transformers' mask)."""
    from datasets import Dataset

    tokenizer = build_toy_tokenizer()
    if template == "generation-marks":
        tokenizer.chat_template = ZEPHYR_CHAT_TEMPLATE
    rows = tokenize_sft_dataset(Dataset.from_list([{"messages": CHAT}]), tokenizer, max_length=256)
    (row,) = list(rows)
    assert tokenizer.decode(row["input_ids"]) == tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert _trained_text(tokenizer, row) == "abc</s>\nzyx</s>\n"


def test_prompt_completion_rows_train_on_the_completion_only():
    from datasets import Dataset

    tokenizer = build_toy_tokenizer()
    # Plain text: no template, EOS appended to the completion.
    (plain,) = list(tokenize_sft_dataset(Dataset.from_list([{"prompt": "Copy: ab", "completion": " ab"}]), tokenizer, 256))
    assert tokenizer.decode(plain["input_ids"]) == "Copy: ab ab</s>"
    assert _trained_text(tokenizer, plain) == " ab</s>"
    # Conversational: the prompt's assistant turn is context; a completion without an assistant turn is dropped.
    rows = [
        {"prompt": CHAT[:4], "completion": [CHAT[4]]},
        {"prompt": CHAT[:2], "completion": [{"role": "user", "content": "no answer"}]},
    ]
    encoded = list(tokenize_sft_dataset(Dataset.from_list(rows), tokenizer, max_length=256))
    assert len(encoded) == 1
    assert _trained_text(tokenizer, encoded[0]) == "zyx</s>\n"


def test_truncation_keeps_the_first_max_length_tokens():
    from datasets import Dataset

    tokenizer = build_toy_tokenizer()
    (row,) = list(tokenize_sft_dataset(Dataset.from_list([{"messages": CHAT}]), tokenizer, max_length=50))
    assert len(row["input_ids"]) == 50
    assert _trained_text(tokenizer, row) == "abc</s>\n"  # the second answer lies past the cut


def test_packed_and_padded_batches_give_the_same_loss():
    tokenizer = build_toy_tokenizer()
    rows = list(tokenize_sft_dataset(make_toy_sft_dataset(6, seed=3), tokenizer, max_length=128))
    torch.manual_seed(0)
    policy = SftPolicy(load_causal_lm("toy", tokenizer=tokenizer))
    packed = SftCollator(tokenizer.pad_token_id, packed=True)(rows)
    padded = SftCollator(tokenizer.pad_token_id, packed=False)(rows)
    assert packed["labels"].shape[0] == 1 and padded["labels"].shape[0] == 6
    assert int((packed["labels"] != IGNORE_INDEX).sum()) == int((padded["labels"] != IGNORE_INDEX).sum())
    (packed_loss, packed_metrics), (padded_loss, padded_metrics) = policy(packed), policy(padded)
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed_metrics["mean_token_accuracy"], padded_metrics["mean_token_accuracy"])


def _plain_cross_entropy_losses(steps, num_rows, batch_size, lr, seed=42):
    """The same run written out in plain PyTorch: HF model -> logits -> F.cross_entropy, AdamW, warmup + cosine,
    clipping at 1, over the trainer's batches (its data order: one seeded permutation per epoch)."""
    from transformers import set_seed

    from amapo_fast.batches import MicroBatches

    tokenizer = build_toy_tokenizer()
    train_set = tokenize_sft_dataset(make_toy_sft_dataset(num_rows, seed=seed), tokenizer, max_length=128)
    set_seed(seed)
    model = load_causal_lm("toy", tokenizer=tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    warmup = min(math.ceil(0.1 * steps), steps - 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine_factor(step, warmup, steps))
    batches = MicroBatches(train_set, SftCollator(tokenizer.pad_token_id), 0, 1, batch_size, seed, num_rows // batch_size)
    stream, losses = batches.iterate((0, 0)), []
    for _ in range(steps):
        batch = next(stream)
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch["labels"].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_sft_stage_trains_like_a_plain_cross_entropy_loop(tmp_path):
    steps, rows, batch_size, lr = 6, 48, 8, 3e-3
    output_dir = tmp_path / "sft"
    output = _run(1, [
        "--stage", "sft", "--toy_num_train", str(rows), "--toy_num_eval", "16", "--max_steps", str(steps),
        "--per_device_train_batch_size", str(batch_size), "--learning_rate", str(lr), "--logging_steps", "1",
        "--output_dir", str(output_dir),
    ], tmp_path)  # fmt: skip
    records = _records(output_dir)
    logged = [record for record in records if "loss" in record and "eval/loss" not in record]
    assert [record["step"] for record in logged] == list(range(1, steps + 1))
    assert all(0 < record["mean_token_accuracy"] < 1 and record["tokens_per_s"] > 0 for record in logged)
    expected = _plain_cross_entropy_losses(steps, rows, batch_size, lr)
    torch.testing.assert_close(torch.tensor([r["loss"] for r in logged]), torch.tensor(expected), rtol=1e-4, atol=1e-5)
    evals = [record for record in records if "eval/loss" in record]
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]  # it learns
    assert "held-out loss:" in output and (output_dir / "final" / "model.safetensors").exists()
