"""Prefix sharing: the [prompt | chosen | rejected] layout and its mask, the loss's explicit token list (a hidden row
read twice), and exactness against the unshared forward: log-probs, gradients and short training runs."""
import importlib.util
import json

import pytest
import torch

from amapo_fast import ResponseTokens, linear_preference_loss, prefix, sequence_logps
from amapo_fast.data import PreferenceCollator, tokenize_preference_dataset
from amapo_fast.model import PreferencePolicy, load_policy, resolve_attn_implementation
from amapo_fast.toy import build_toy_tokenizer, make_toy_preference_dataset

PAD = 0


@pytest.fixture(scope="module")
def tokenizer():
    return build_toy_tokenizer()


@pytest.fixture(scope="module")
def rows(tokenizer):
    return tokenize_preference_dataset(make_toy_preference_dataset(6, seed=5), tokenizer, 64, 32).to_list()


def _row(prompt, chosen, rejected):
    return {"prompt_input_ids": prompt, "chosen_input_ids": chosen, "rejected_input_ids": rejected}


def test_layout_runs_the_prompt_once_and_restarts_positions():
    rows = [_row([11, 12, 13], [21, 22], [31, 32, 33]), _row([14], [24], [34, 35])]
    batch = PreferenceCollator(PAD, prefix_sharing=True)(rows)
    # pair 0: prompt + chosen[:-1] + rejected[:-1]; pair 1 has a one-token chosen answer (no input token of its own)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 31, 32], [14, 34, PAD, PAD, PAD, PAD]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 3, 4], [0, 1, 0, 0, 0, 0]]
    assert batch["prefix_block"].tolist() == [[0] * 6, [1, 1, -1, -1, -1, -1]]
    rows_, targets, sequence = batch["response_index"].tolist()
    # the last prompt position (flat row 2, and 6 for pair 1) predicts the first token of both answers
    assert list(zip(rows_, targets, sequence)) == [
        (2, 21, 0), (3, 22, 0), (2, 31, 2), (4, 32, 2), (5, 33, 2), (6, 24, 1), (6, 34, 3), (7, 35, 3),
    ]
    assert batch["response_lengths"].tolist() == [2, 1, 3, 2]
    assert prefix.unshared_token_count(batch) == (4 + 5) + (1 + 2)  # sequences' tokens: prompt + answer - 1 each

    # packed: first fit, longest first, into rows as long as the longest block (6): pairs 2 and 1 share row 1
    rows.append(_row([15, 16], [26], [36, 37]))
    packed = PreferenceCollator(PAD, packed=True, prefix_sharing=True)(rows)
    assert packed["input_ids"].tolist() == [[11, 12, 13, 21, 31, 32], [15, 16, 36, 14, 34, PAD]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 3, 4], [0, 1, 2, 0, 1, 0]]
    assert packed["prefix_block"].tolist() == [[0] * 6, [2, 2, 2, 1, 1, -1]]
    assert packed["response_index"][0].tolist() == [2, 3, 2, 4, 5, 9, 9, 10, 7, 7, 8]
    assert prefix.pack_blocks([5, 1, 3, 2, 4]) == ([(0, 0), (1, 4), (2, 0), (2, 3), (1, 0)], 3)


def test_mask_blinds_rejected_to_chosen_and_pairs_to_each_other():
    rows = [_row([11, 12], [21, 22], [31, 32]), _row([14], [24], [34]), _row([15, 16], [26], [36])]
    batch = PreferenceCollator(PAD, packed=True, prefix_sharing=True)(rows)
    mask = prefix.dense_mask(batch["prefix_block"], batch["prefix_branch"])[:, 0].int()
    # row 0, pair 0: p p c r
    assert mask[0].tolist() == [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 0],
        [1, 1, 0, 1],  # the rejected token sees the prompt and itself, not the chosen token
    ]
    # row 1: pair 2's prompt (2 tokens; one-token answers add no input), pair 1's prompt, padding
    assert mask[1].tolist() == [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [0, 0, 1, 0],  # a pair sees nothing of the pair before it in the row
        [0, 0, 0, 1],  # padding sees itself only: no all-masked row, no NaN
    ]


@pytest.mark.parametrize("impl", ["triton", "chunked", "reference"])
def test_token_list_reads_a_row_twice_and_sums_its_gradient(impl):
    """One hidden row predicting the first token of two sequences equals that row duplicated, in the loss and in
    the gradient (the backward accumulates into the shared row)."""
    torch.manual_seed(0)
    vocab, dim = 17, 8
    dtype = torch.float32 if impl == "triton" else torch.float64  # the kernels take bf16, fp16 and fp32
    shared = torch.randn(2, 5, dim, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, dim, dtype=dtype, requires_grad=True)
    positions = torch.tensor([0, 1, 2, 0, 3, 5, 6, 5, 7, 8])  # flat rows 0 and 5 are each read twice
    targets = torch.randint(0, vocab, (10,))
    sequence = torch.tensor([0, 0, 0, 2, 2, 1, 1, 3, 3, 3])
    tokens = ResponseTokens.from_index(positions, targets, sequence, num_rows=4, num_positions=10)
    loss, metrics = linear_preference_loss(shared, weight, None, beta=2.0, impl=impl, token_index=tokens)
    d_shared, d_weight = torch.autograd.grad(loss, (shared, weight))

    # The same tokens, each row copied into its own sequence (packed layout, grouped by sequence).
    order = torch.argsort(sequence, stable=True)
    copies = shared.detach().reshape(-1, dim)[positions[order]].requires_grad_(True)
    cu_seqlens = torch.tensor([0, 3, 5, 7, 10])
    expected, expected_metrics = linear_preference_loss(copies, weight, targets[order], beta=2.0, impl=impl, cu_seqlens=cu_seqlens)
    d_copies, d_weight_expected = torch.autograd.grad(expected, (copies, weight))
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(metrics, expected_metrics)
    torch.testing.assert_close(d_weight, d_weight_expected)
    d_expected = torch.zeros(10, dim, dtype=dtype).index_add_(0, positions[order], d_copies)
    torch.testing.assert_close(d_shared.reshape(-1, dim), d_expected)

    sums, counts = sequence_logps(shared, weight, None, impl=impl, token_index=tokens)
    assert counts.tolist() == [3, 2, 2, 3]
    expected_sums, _ = sequence_logps(copies.detach(), weight, targets[order], impl=impl, cu_seqlens=cu_seqlens)
    torch.testing.assert_close(sums, expected_sums)
    with pytest.raises(ValueError, match="token_index replaces labels"):
        linear_preference_loss(shared, weight, targets, beta=2.0, token_index=tokens)
    bad = ResponseTokens.from_index(positions, targets + vocab, sequence, num_rows=4, num_positions=10)
    with pytest.raises(ValueError, match="targets contain"):
        linear_preference_loss(shared, weight, None, beta=2.0, token_index=bad)
    with pytest.raises(ValueError, match="positions must lie in"):
        ResponseTokens.from_index(positions + 5, targets, sequence, num_rows=4, num_positions=10)


def _mistral_policy(tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=256, sliding_window=4096, pad_token_id=tokenizer.pad_token_id,
    )
    causal_lm = MistralForCausalLM._from_config(config, attn_implementation="sdpa")
    return PreferencePolicy(causal_lm, beta=2.0)


@pytest.mark.parametrize("architecture", ["llama", "mistral"])
def test_log_probs_and_gradients_equal_the_unshared_forward(tokenizer, rows, architecture):
    torch.manual_seed(1)
    if architecture == "llama":
        policy = load_policy("toy", tokenizer=tokenizer, beta=2.0, prefix_sharing=True)
    else:
        policy = _mistral_policy(tokenizer)
    unshared = PreferenceCollator(tokenizer.pad_token_id)(rows)
    expected_sums, expected_counts = policy.sequence_logps(unshared)
    policy.zero_grad()
    expected_loss, _ = policy(unshared)
    expected_loss.backward()
    expected_grads = [parameter.grad.clone() for parameter in policy.parameters()]
    for packed in (False, True):
        batch = PreferenceCollator(tokenizer.pad_token_id, packed=packed, prefix_sharing=True)(rows)
        assert prefix.unshared_token_count(batch) == int(unshared["attention_mask"].sum())
        sums, counts = policy.sequence_logps(batch)
        assert torch.equal(counts, expected_counts)
        torch.testing.assert_close(sums, expected_sums, rtol=1e-5, atol=0)
        policy.zero_grad()
        loss, _ = policy(batch)
        loss.backward()
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=0)
        for parameter, expected in zip(policy.parameters(), expected_grads):
            torch.testing.assert_close(parameter.grad, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_eager_attention_takes_an_additive_mask_and_flash_attention_is_refused(tokenizer, rows):
    torch.manual_seed(2)
    policy = load_policy("toy", tokenizer=tokenizer, beta=2.0, prefix_sharing=True, attn_implementation="eager")
    expected, _ = policy.sequence_logps(PreferenceCollator(tokenizer.pad_token_id)(rows))
    sums, _ = policy.sequence_logps(PreferenceCollator(tokenizer.pad_token_id, packed=True, prefix_sharing=True)(rows))
    torch.testing.assert_close(sums, expected, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="cannot take prefix sharing's attention mask"):
        resolve_attn_implementation("flash_attention_2", prefix_sharing=True)
    assert resolve_attn_implementation("auto", prefix_sharing=True) == ("flex_attention" if torch.cuda.is_available() else "sdpa")


def test_trainer_refuses_flash_attention_with_prefix_sharing():
    from amapo_fast.cli import UserError
    from amapo_fast.config import parse_config

    with pytest.raises(UserError, match="flash_attention_2 cannot take prefix sharing's attention mask"):
        parse_config(["--attn_implementation", "flash_attention_2"])
    without_sharing = ["--attn_implementation", "flash_attention_2", "--prefix_sharing", "false"]
    if importlib.util.find_spec("flash_attn") is None:  # then the missing package is what is refused
        with pytest.raises(UserError, match="needs the flash_attn package"):
            parse_config(without_sharing)
    else:
        assert parse_config(without_sharing).packed is False


def test_sliding_window_beyond_the_sequences_is_refused(tokenizer, rows):
    policy = _mistral_policy(tokenizer)
    policy.causal_lm.config.sliding_window = 8
    with pytest.raises(ValueError, match="sliding attention window of 8"):
        policy.sequence_logps(PreferenceCollator(tokenizer.pad_token_id, prefix_sharing=True)(rows))


@pytest.mark.parametrize("loss_type", ["amapo", "simpo", "dpo"])
def test_training_runs_shared_and_unshared_agree(tmp_path, loss_type):
    """Same loss curve and held-out scores with and without prefix sharing; DPO's frozen reference model takes the
    shared layout too (the first DPO loss is log 2 only if the reference log-probs match the policy's)."""
    from amapo_fast.train import main

    args = ["--toy_num_train", "48", "--toy_num_eval", "16", "--max_steps", "3", "--per_device_train_batch_size", "16",
            "--logging_steps", "1", "--save_final", "false", "--loss_type", loss_type, "--beta", "0.5"]
    runs = {}
    for sharing in ("false", "true"):
        output_dir = tmp_path / sharing
        main(args + ["--prefix_sharing", sharing, "--output_dir", str(output_dir)])
        runs[sharing] = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
    assert len(runs["true"]) == len(runs["false"]) == 5  # eval before, 3 steps, eval after
    for shared, unshared in zip(runs["true"], runs["false"]):
        for key in ("loss", "rewards/margins", "eval/loss", "eval/ranking_accuracy"):
            if key in unshared:
                assert shared[key] == pytest.approx(unshared[key], rel=1e-5, abs=1e-6), (key, shared["step"])
    if loss_type == "dpo":
        assert runs["true"][1]["loss"] == pytest.approx(0.6931472, abs=1e-6)


def test_evaluation_scores_pairs_with_the_shared_layout(tokenizer, rows):
    from datasets import Dataset

    from amapo_fast.evaluate import eval_dataloader, score_pairs

    torch.manual_seed(3)
    policy = load_policy("toy", tokenizer=tokenizer, prefix_sharing=True)
    scores = {}
    for sharing in (False, True):
        collator = PreferenceCollator(tokenizer.pad_token_id, prefix_sharing=sharing)
        loader = eval_dataloader(Dataset.from_list(rows), collator, batch_size=4)
        scores[sharing] = score_pairs(policy, loader, progress=False)
    assert torch.equal(scores[True].chosen_tokens, scores[False].chosen_tokens)
    torch.testing.assert_close(scores[True].chosen_logps, scores[False].chosen_logps, rtol=1e-5, atol=0)
    torch.testing.assert_close(scores[True].rejected_logps, scores[False].rejected_logps, rtol=1e-5, atol=0)


def test_bf16_shared_log_probs_stay_within_bf16_rounding(tokenizer, rows):
    """In bf16 the shared and unshared forwards may round differently (other summation shapes; some builds give
    identical bits), but they differ from each other by no more than bf16's own distance from the fp32 result."""
    torch.manual_seed(4)
    fp32 = load_policy("toy", tokenizer=tokenizer, beta=2.0, prefix_sharing=True)
    bf16 = load_policy("toy", tokenizer=tokenizer, beta=2.0, prefix_sharing=True, dtype=torch.bfloat16)
    bf16.load_state_dict({key: value.bfloat16() for key, value in fp32.state_dict().items()})
    unshared = PreferenceCollator(tokenizer.pad_token_id)(rows)
    shared = PreferenceCollator(tokenizer.pad_token_id, packed=True, prefix_sharing=True)(rows)
    exact, _ = fp32.sequence_logps(unshared)
    bf16_unshared, _ = bf16.sequence_logps(unshared)
    bf16_shared, _ = bf16.sequence_logps(shared)
    rounding = ((bf16_unshared - exact).abs() / exact.abs()).max()
    assert rounding > 0  # the bf16 model really computes in bf16
    assert ((bf16_shared - bf16_unshared).abs() / exact.abs()).max() <= rounding
