"""A resumed run draws the same random numbers as the run it continues, and logs the same curve.

The trainer turns dropout off, so its other tests would pass with the RNG state never restored; here the
toy model keeps attention dropout on, making every training loss depend on the RNG stream.
"""
import json

import pytest
import torch

pytest.importorskip("datasets")  # the trainer's toy data

from amapo_fast import model as model_module
from amapo_fast.train import main

SHORT = [
    "--toy_num_train", "32", "--eval_split", "none", "--max_steps", "4", "--per_device_train_batch_size", "8",
    "--logging_steps", "1", "--save_steps", "2", "--save_total_limit", "0", "--save_final", "false",
]


@pytest.fixture
def dropout_on(monkeypatch):
    def with_attention_dropout(config):
        config.attention_dropout = 0.3
        return config

    monkeypatch.setattr(model_module, "_without_dropout", with_attention_dropout)


def _losses(output_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    return {record["step"]: record["loss"] for record in records if "loss" in record}


def test_dropout_is_really_on(dropout_on):
    """Guards the test below: two training-mode forwards of the same batch give different losses."""
    from amapo_fast.data import PreferenceCollator, tokenize_preference_dataset
    from amapo_fast.toy import build_toy_tokenizer, make_toy_preference_dataset

    tokenizer = build_toy_tokenizer()
    policy = model_module.load_policy("toy", tokenizer=tokenizer, beta=2.0).train()
    rows = tokenize_preference_dataset(make_toy_preference_dataset(4, seed=0), tokenizer, 128, 64).to_list()
    batch = PreferenceCollator(tokenizer.pad_token_id)(rows)
    with torch.no_grad():
        assert policy(batch)[0] != policy(batch)[0]


def test_resume_restores_the_rng_with_dropout_on(dropout_on, tmp_path):
    main(SHORT + ["--output_dir", str(tmp_path / "whole")])
    main(SHORT + ["--output_dir", str(tmp_path / "resumed"), "--resume", str(tmp_path / "whole" / "checkpoint-2")])
    whole, resumed = _losses(tmp_path / "whole"), _losses(tmp_path / "resumed")
    assert sorted(resumed) == [3, 4]
    for step in resumed:
        assert resumed[step] == pytest.approx(whole[step], rel=1e-6), f"step {step}"


def test_the_logged_curve_after_a_resume_equals_the_uninterrupted_one(tmp_path):
    """A checkpoint between two records (step 4 of a 3-step logging window): the first record after the resume
    averages steps 4 to 6, as the uninterrupted run's does, not only the steps since the resume."""
    args = SHORT + ["--max_steps", "6", "--logging_steps", "3", "--toy_num_train", "48"]
    main(args + ["--output_dir", str(tmp_path / "whole")])
    main(args + ["--output_dir", str(tmp_path / "resumed"), "--resume", str(tmp_path / "whole" / "checkpoint-4")])

    def records(name):
        lines = (tmp_path / name / "log.jsonl").read_text().splitlines()
        return {record["step"]: record for record in map(json.loads, lines) if "loss" in record}

    whole, resumed = records("whole"), records("resumed")
    assert sorted(whole) == [3, 6] and sorted(resumed) == [6]  # resumed into a fresh folder
    timing = {"tokens_per_s", "memory/peak_gib"}  # wall-clock figures, different in every run
    assert resumed[6].keys() == whole[6].keys()
    for key in resumed[6].keys() - timing:
        assert resumed[6][key] == pytest.approx(whole[6][key], rel=1e-6), key
