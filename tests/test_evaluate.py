"""Ranking-accuracy evaluation (amapo_fast/evaluate.py, amapo_fast/rmbench.py)."""
import json
import math
import os
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("datasets")  # the toy data and the evaluation formats are datasets

from amapo_fast import rmbench
from amapo_fast.data import PreferenceCollator, tokenize_preference_dataset
from amapo_fast.evaluate import (
    EvalSettings,
    RankShardSampler,
    eval_dataloader,
    evaluate_dataset,
    evaluate_ranking,
    PairScores,
    main,
    ranking_summary,
    score_pairs,
    wilson_interval,
)
from amapo_fast.model import load_policy, load_tokenizer
from amapo_fast.reference import reference_sequence_logps
from amapo_fast.toy import make_toy_preference_dataset
from spawn_guard import spawn

MAX_LENGTH, MAX_PROMPT_LENGTH = 128, 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The toy model's matmuls are tiny: one thread runs them as fast as two, and a busy 2-core machine
    slows two threads by up to 10x (measured: the training test took 163 s with 2 threads, 13 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_wilson_interval_matches_textbook_values():
    # Values from the closed form, as tabulated e.g. by Newcombe (1998) for 95%.
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    low, high = wilson_interval(500, 1000)
    assert (low + high) / 2 == pytest.approx(0.5)
    assert high - low == pytest.approx(2 * 1.96 * math.sqrt(0.25 / 1000), rel=1e-2)  # large n: the normal interval


def test_ranking_summary_compares_mean_log_probs_and_counts_ties_as_wrong():
    # Per pair: chosen / rejected summed log-probs over their token counts -> mean log-probs.
    scores = PairScores(
        chosen_logps=torch.tensor([-4.0, -3.0, -6.0, -2.0, -9.0], dtype=torch.float64),
        rejected_logps=torch.tensor([-2.0, -3.0, -5.0, -4.0, -1.0], dtype=torch.float64),
        chosen_tokens=torch.tensor([4, 1, 2, 1, 3]),
        rejected_tokens=torch.tensor([1, 1, 1, 4, 1]),
    )
    # means: -1 vs -2 (right, though the chosen sum is lower), -3 vs -3 (tie), -3 vs -5 (right),
    # -2 vs -1 (wrong, though the chosen sum is higher), -3 vs -1 (wrong)
    summary = ranking_summary(scores, beta=2.0)
    assert (summary["num_correct"], summary["num_pairs"]) == (2, 5)
    assert summary["ranking_accuracy"] == pytest.approx(2 / 5)
    assert summary["reward_margin_mean"] == pytest.approx(2.0 * (1 + 0 + 2 - 1 - 2) / 5)
    assert (summary["ranking_accuracy_ci95_low"], summary["ranking_accuracy_ci95_high"]) == pytest.approx(
        wilson_interval(2, 5)
    )
    ties = PairScores(*(torch.tensor([value]) for value in (-3.0, -1.5, 2, 1)))  # -1.5 vs -1.5
    assert ranking_summary(ties)["ranking_accuracy"] == 0.0


def test_rmbench_split_matches_hand_worked_matrices():
    # Rows: chosen style (concise, detailed, markdown); columns: rejected style.
    items = {
        # chosen 1,2,3 vs rejected 0,2.5,5 -> rows [1,0,0], [1,0,0], [1,1,0]
        "chat-a": ("chat", [1.0, 2.0, 3.0], [0.0, 2.5, 5.0]),
        # ties count as wrong -> every row [0,1,1]
        "chat-b": ("chat", [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]),
        # safety-refuse and safety-response form one "safety" domain: all right + all wrong
        "refuse": ("safety-refuse", [0.0, 0.0, 0.0], [-1.0, -1.0, -1.0]),
        "response": ("safety-response", [-5.0, -5.0, -5.0], [0.0, 0.0, 0.0]),
        # rows [1,1,1], [0,1,1], [0,0,1]: only the upper triangle and diagonal are right
        "math": ("math", [3.0, 2.0, 1.0], [2.5, 1.5, 0.5]),
    }
    domains = [domain for domain, _, _ in items.values()]
    chosen = torch.tensor([c for _, c, _ in items.values()])
    rejected = torch.tensor([r for _, _, r in items.values()])
    figures = rmbench.rmbench_accuracy(chosen, rejected, domains)

    assert sorted(figures["domains"]) == ["chat", "math", "safety"]
    chat, math_, safety = (figures["domains"][name] for name in ("chat", "math", "safety"))
    # chat mean matrix: [[.5,.5,.5], [.5,.5,.5], [.5,1,.5]]
    assert (chat["easy"], chat["normal"], chat["hard"]) == pytest.approx((2 / 3, 0.5, 0.5))
    assert chat["avg"] == pytest.approx((2 / 3 + 0.5 + 0.5) / 3)
    assert (math_["easy"], math_["normal"], math_["hard"]) == pytest.approx((0.0, 1.0, 1.0))
    assert (safety["easy"], safety["normal"], safety["hard"], safety["num_items"]) == pytest.approx((0.5, 0.5, 0.5, 2))
    overall = figures["overall"]
    assert overall["easy"] == pytest.approx((2 / 3 + 0.0 + 0.5) / 3)
    assert overall["normal"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert overall["hard"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert overall["avg"] == pytest.approx((chat["avg"] + math_["avg"] + safety["avg"]) / 3)
    assert overall["num_items"] == 5
    # Pooled over items: chosen markdown beats rejected concise on chat-a and refuse only.
    assert figures["matrix"][2][0] == pytest.approx(2 / 5)


def test_rmbench_pairs_round_trip_to_item_scores():
    from datasets import Dataset

    dataset = Dataset.from_list(
        [
            {
                "prompt": f"q{item}",
                "chosen": [f"c{item}{k}" for k in range(3)],
                "rejected": [f"r{item}{k}" for k in range(3)],
                "domain": "code",
            }
            for item in range(4)
        ]
    )
    assert rmbench.is_rmbench(dataset)
    assert not rmbench.is_rmbench(make_toy_preference_dataset(2, seed=0))
    pairs = rmbench.rmbench_to_pairs(dataset)
    assert len(pairs) == 12
    assert pairs[7]["chosen"][-1] == {"role": "assistant", "content": "c21"}
    assert pairs[7]["rejected"][0] == {"role": "user", "content": "q2"}
    values = torch.randn(12, dtype=torch.float64)
    order = torch.randperm(12).tolist()  # any order of the pairs scatters back to the same [item, style] cells
    shuffled = pairs.select(order)
    scores = rmbench.rmbench_item_scores(values[order], shuffled["rmbench_item"], shuffled["rmbench_style"])
    assert torch.equal(scores, values.view(4, 3))
    with pytest.raises(ValueError, match="item 1 has no score for style detailed"):
        rmbench.rmbench_item_scores(values[:4], [0, 0, 0, 1], [0, 1, 2, 0])


@pytest.mark.parametrize("num_rows", [1, 5, 8])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_rank_shards_cover_every_row_once_with_equal_lengths(num_rows, world_size):
    lengths = [random.randint(1, 50) for _ in range(num_rows)]
    shards = [RankShardSampler(lengths, rank, world_size) for rank in range(world_size)]
    assert len({len(shard) for shard in shards}) == 1  # same number of forwards on every rank
    real = [index for shard in shards for index in shard.indices[: shard.num_real]]
    assert sorted(real) == list(range(num_rows))
    for shard in shards:
        assert all(0 <= index < num_rows for index in shard.indices)
        real_lengths = [lengths[index] for index in shard.indices[: shard.num_real]]
        assert real_lengths == sorted(real_lengths, reverse=True)  # longest first


@pytest.fixture(scope="module")
def toy_tokenizer():
    return load_tokenizer("toy")


def _direct_mean_logps(policy, tokenizer, dataset):
    """The obvious computation: one pair at a time, full logits through the reference path."""
    tokenized = tokenize_preference_dataset(dataset, tokenizer, MAX_LENGTH, MAX_PROMPT_LENGTH)
    assert len(tokenized) == len(dataset)
    collator = PreferenceCollator(tokenizer.pad_token_id)
    chosen, rejected = [], []
    with torch.no_grad():
        for row in tokenized:
            batch = collator([row])
            hidden = policy.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            hidden = hidden.last_hidden_state
            weight = policy.causal_lm.get_output_embeddings().weight
            sums, counts = reference_sequence_logps(hidden, weight, batch["labels"])
            chosen.append(float(sums[0] / counts[0]))
            rejected.append(float(sums[1] / counts[1]))
    return torch.tensor(chosen, dtype=torch.float64), torch.tensor(rejected, dtype=torch.float64)


def _expected_summary(chosen, rejected, beta):
    delta = chosen - rejected
    return {"ranking_accuracy": float((delta > 0).double().mean()), "reward_margin_mean": beta * float(delta.mean())}


def test_ranking_accuracy_matches_direct_reference_computation(toy_tokenizer):
    torch.manual_seed(random.randint(0, 2**31))
    policy = load_policy("toy", tokenizer=toy_tokenizer)
    dataset = make_toy_preference_dataset(21, seed=random.randint(0, 2**31)).rename_column("task", "subset")
    chosen, rejected = _direct_mean_logps(policy, toy_tokenizer, dataset)
    beta = 2.5

    # Batched, padded, length-sorted, fused head; odd batch size so the last batch is short.
    tokenized = tokenize_preference_dataset(dataset, toy_tokenizer, MAX_LENGTH, MAX_PROMPT_LENGTH)
    loader = eval_dataloader(tokenized, PreferenceCollator(toy_tokenizer.pad_token_id), batch_size=4)
    scores = score_pairs(policy, loader, progress=False)
    torch.testing.assert_close(scores.chosen_mean, chosen, rtol=0, atol=2e-5)
    torch.testing.assert_close(scores.rejected_mean, rejected, rtol=0, atol=2e-5)
    summary = evaluate_ranking(policy, loader, beta=beta, progress=False)
    expected = _expected_summary(chosen, rejected, beta)
    assert summary["ranking_accuracy"] == expected["ranking_accuracy"]
    assert summary["reward_margin_mean"] == pytest.approx(expected["reward_margin_mean"], abs=1e-4)
    assert summary["num_pairs"] == 21
    assert (summary["ranking_accuracy_ci95_low"], summary["ranking_accuracy_ci95_high"]) == pytest.approx(
        wilson_interval(summary["num_correct"], 21)
    )

    # Whole-dataset path: per-subset figures against the direct computation restricted to each subset.
    settings = EvalSettings(max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH, batch_size=3, beta=beta)
    result = evaluate_dataset(policy, toy_tokenizer, dataset, settings)
    assert result["format"] == "pairs" and result["subset_column"] == "subset"
    assert result["overall"]["ranking_accuracy"] == expected["ranking_accuracy"]
    for name in ("copy", "reverse"):
        members = torch.tensor([value == name for value in dataset["subset"]])
        figures = result["subsets"][name]
        assert figures["num_pairs"] == int(members.sum())
        subset_expected = _expected_summary(chosen[members], rejected[members], beta)
        assert figures["ranking_accuracy"] == subset_expected["ranking_accuracy"]
        assert figures["reward_margin_mean"] == pytest.approx(subset_expected["reward_margin_mean"], abs=1e-4)


class _TokenSumModel(torch.nn.Module):
    """A stand-in policy with a known answer: a sequence's "log-prob" is minus the sum of its response ids."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.forwards = 0

    def forward(self, batch, sequence_logps=False):
        self.forwards += 1
        response = batch["labels"] != -100
        return -(batch["labels"] * response).sum(-1).double(), response.sum(-1)


def _token_rows(num_rows, seed):
    from datasets import Dataset

    generator = random.Random(seed)
    ids = lambda: [generator.randint(1, 9) for _ in range(generator.randint(1, 6))]  # noqa: E731
    return Dataset.from_dict(
        {
            "prompt_input_ids": [ids() for _ in range(num_rows)],
            "chosen_input_ids": [ids() for _ in range(num_rows)],
            "rejected_input_ids": [ids() for _ in range(num_rows)],
        }
    )


def _distributed_worker(rank, world_size, port, rows, results):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = _TokenSumModel()
        scores = score_pairs(model, eval_dataloader(rows, PreferenceCollator(0), batch_size=2), progress=False)
        results.put((rank, model.forwards, scores.chosen_logps.tolist(), scores.rejected_logps.tolist()))
    finally:
        dist.destroy_process_group()


def test_score_pairs_gathers_every_rank_in_dataset_order():
    rows = _token_rows(7, seed=random.randint(0, 2**31))
    single = score_pairs(_TokenSumModel(), eval_dataloader(rows, PreferenceCollator(0), batch_size=2), progress=False)
    expected_chosen = [-float(sum(row["chosen_input_ids"])) for row in rows]
    assert single.chosen_logps.tolist() == expected_chosen

    world_size, context = 2, mp.get_context("spawn")
    results = context.SimpleQueue()
    port = random.randint(20000, 60000)
    spawn(_distributed_worker, args=(world_size, port, rows, results), nprocs=world_size)
    gathered = sorted(results.get() for _ in range(world_size))
    assert [forwards for _, forwards, _, _ in gathered] == [2, 2]  # 4 positions each (one a repeat), batches of 2
    for _, _, chosen, rejected in gathered:
        assert chosen == expected_chosen
        assert rejected == single.rejected_logps.tolist()


def _train_toy_policy(policy, tokenizer, steps, seed):
    """A minimal preference-training loop on the embedded toy task (AMaPO, the fused loss)."""
    rows = make_toy_preference_dataset(16 * steps, seed=seed)
    train = tokenize_preference_dataset(rows, tokenizer, MAX_LENGTH, MAX_PROMPT_LENGTH)
    batches = torch.utils.data.DataLoader(train, batch_size=16, collate_fn=PreferenceCollator(tokenizer.pad_token_id))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    policy.train()
    for batch in batches:
        loss, _ = policy(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _rmbench_file(path, toy_rows):
    """RM-Bench-format items built from toy pairs: three styles of each right and wrong answer."""
    styles = (lambda text: text, lambda text: f"{text}, {text}", lambda text: f"**{text}**")
    items = [
        {
            "id": index,
            "prompt": row["prompt"],
            "chosen": [style(row["chosen"][-1]["content"]) for style in styles],
            "rejected": [style(row["rejected"][-1]["content"]) for style in styles],
            "domain": "chat" if index % 2 else "safety-refuse",
        }
        for index, row in enumerate(toy_rows)
    ]
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(items, handle)


def test_trained_model_beats_its_initial_checkpoint_side_by_side(toy_tokenizer, tmp_path):
    seed = random.randint(0, 2**31)
    torch.manual_seed(seed)
    policy = load_policy("toy", tokenizer=toy_tokenizer, beta=2.0, loss_type="amapo")
    initial_dir, trained_dir = str(tmp_path / "initial"), str(tmp_path / "trained")
    for directory in (initial_dir, trained_dir):
        toy_tokenizer.save_pretrained(directory)
    policy.causal_lm.save_pretrained(initial_dir)
    _train_toy_policy(policy, toy_tokenizer, steps=150, seed=seed + 1)
    policy.causal_lm.save_pretrained(trained_dir)

    held_out = make_toy_preference_dataset(128, seed=seed + 2).rename_column("task", "subset")
    data_file = str(tmp_path / "held_out.jsonl")
    held_out.to_json(data_file)
    out_dir = str(tmp_path / "eval")
    common = ["--max-length", str(MAX_LENGTH), "--max-prompt-length", str(MAX_PROMPT_LENGTH), "--batch-size", "32"]
    common += ["--split", "test", "--output-dir", out_dir]
    report = main(["--compare", initial_dir, trained_dir, "--dataset", data_file, *common])

    with open(os.path.join(out_dir, "ranking_eval.json"), encoding="utf-8") as handle:
        assert json.load(handle) == json.loads(json.dumps(report))
    initial, trained = (report["models"][os.path.normpath(d)]["overall"] for d in (initial_dir, trained_dir))
    assert initial["num_pairs"] == trained["num_pairs"] == 128
    # At initialisation the model cannot tell the answers apart (~50%); 150 steps take it far above.
    assert trained["ranking_accuracy"] > initial["ranking_accuracy"] + 0.15, (initial, trained)
    assert trained["ranking_accuracy_ci95_low"] > initial["ranking_accuracy"]
    assert trained["reward_margin_mean"] > initial["reward_margin_mean"]
    with open(os.path.join(out_dir, "ranking_eval.md"), encoding="utf-8") as handle:
        table = handle.read()
    assert f"| metric | {os.path.normpath(initial_dir)} | {os.path.normpath(trained_dir)} |" in table
    assert "| subset=copy: accuracy % (pairs) |" in table

    # The same trained model on RM-Bench-format data: the 3x3 figures come through the command too.
    rmbench_file = str(tmp_path / "rmbench.json")
    _rmbench_file(rmbench_file, held_out.select(range(16)))
    report = main(["--model", trained_dir, "--dataset", rmbench_file, *common])
    result = report["models"][os.path.normpath(trained_dir)]
    assert result["format"] == "rmbench" and result["overall"]["num_pairs"] == 48
    figures = result["rmbench"]
    assert sorted(figures["domains"]) == ["chat", "safety"]
    # The diagonal cells are exactly the same-style pairs that the plain summary counts.
    diagonal_correct = sum(domain["normal"] * 3 * domain["num_items"] for domain in figures["domains"].values())
    assert diagonal_correct == pytest.approx(result["overall"]["num_correct"])
    assert figures["overall"]["avg"] > 0.5


def test_identical_pairs_are_left_out_of_ranking_accuracy(toy_tokenizer):
    """A pair whose two responses are the same tokens would always count as wrong: evaluation drops it."""
    from datasets import Dataset

    rows = make_toy_preference_dataset(6, seed=random.randrange(10**6)).to_list()
    rows[1]["rejected"] = rows[1]["chosen"]
    policy = load_policy("toy", tokenizer=toy_tokenizer, beta=2.0)
    result = evaluate_dataset(policy, toy_tokenizer, Dataset.from_list(rows), EvalSettings(MAX_LENGTH, MAX_PROMPT_LENGTH))
    assert result["overall"]["num_pairs"] == 5
