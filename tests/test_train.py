"""The trainer end to end on CPU: the embedded default learns; FSDP2 and DeepSpeed ZeRO-3 on 2 ranks (gloo) give
the same loss curve with the fused and the reference loss; a killed run resumes exactly; the final folder loads
with from_pretrained and reproduces the trained model's log-probs; DPO and packed batches; settings."""
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("datasets")  # the trainer's toy data

from amapo_fast.checkpoint import TRAINER_STATE, resolve_resume
from amapo_fast.config import build_parser, parse_config
from amapo_fast.data import IGNORE_INDEX, PreferenceCollator, tokenize_preference_dataset
from amapo_fast.errors import CheckpointError
from amapo_fast.toy import make_toy_preference_dataset

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "amapo_fast" / "train.py"
# 256 pairs / (2 ranks x 8 pairs) = 16 micro-batches per epoch; accumulation 2 -> 8 optimizer steps.
SHORT_RUN = [
    "--toy_num_train", "256", "--toy_num_eval", "64", "--max_steps", "8", "--per_device_train_batch_size", "8",
    "--gradient_accumulation_steps", "2", "--logging_steps", "1", "--save_steps", "2", "--save_total_limit", "2",
]
TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(nproc: int, args: list[str], cwd: Path) -> tuple[subprocess.Popen, Path]:
    """Start torchrun; its output goes to a file (a pipe nobody reads during a run could fill and block it)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(TRAIN), *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 cores: one thread per rank
    log = cwd / f"torchrun-{time.monotonic_ns()}.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT)
    return process, log


def _kill_tree(process: subprocess.Popen):
    """SIGKILL the training processes, then torchrun (it starts each worker in a session of its own)."""
    import psutil  # installed with deepspeed

    for worker in psutil.Process(process.pid).children(recursive=True):
        worker.kill()
    process.kill()
    process.wait()


def _run(nproc: int, args: list[str], cwd: Path) -> str:
    process, log = _launch(nproc, args, cwd)
    try:
        process.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_tree(process)
        pytest.fail(f"training timed out after {TIMEOUT_S}s:\n{log.read_text()[-4000:]}")
    output = log.read_text()
    assert process.returncode == 0, f"training failed ({process.returncode}):\n{output[-6000:]}"
    return output


def _records(output_dir: Path) -> list[dict]:
    path = output_dir / "log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _train_losses(output_dir: Path) -> dict[int, float]:
    """Loss per optimizer step; a resumed run's records come after the killed run's, so the last one wins."""
    return {record["step"]: record["loss"] for record in _records(output_dir) if "loss" in record}


def _final_eval(output_dir: Path) -> dict:
    return [record for record in _records(output_dir) if "eval/ranking_accuracy" in record][-1]


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory):
    """Output folders of 2-rank runs, by (backend, loss impl), all with the same data and seed."""
    pytest.importorskip("deepspeed")
    root = tmp_path_factory.mktemp("runs")
    folders = {}
    for backend in ("fsdp2", "deepspeed"):
        for impl in ("chunked", "reference"):
            output_dir = root / f"{backend}-{impl}"
            _run(2, SHORT_RUN + ["--backend", backend, "--loss_impl", impl, "--output_dir", str(output_dir)], root)
            folders[backend, impl] = output_dir
    return folders


def test_embedded_default_learns(tmp_path):
    """`torchrun amapo_fast/train.py` with no arguments: held-out ranking accuracy goes from chance to well above.

    The README quotes this run's line; a different line here means the README needs the new one.
    """
    output = _run(1, [], tmp_path)
    match = re.search(r"held-out ranking accuracy: ([\d.]+) -> ([\d.]+) \(256 pairs\)", output)
    assert match, output[-3000:]
    for doc in ("README.md", "docs/train.md"):
        assert match.group(0) in (REPO / doc).read_text(), f"{doc} quotes another result than this run's"
    before, after = float(match.group(1)), float(match.group(2))
    assert 0.35 < before < 0.65, f"a random-init model should rank at chance, got {before}"
    assert after > 0.8 and after - before > 0.2, f"ranking accuracy {before} -> {after}"
    assert (tmp_path / "outputs" / "amapo-toy" / "final" / "model.safetensors").exists()


@pytest.mark.parametrize("backend", ["fsdp2", "deepspeed"])
def test_fused_and_reference_loss_give_the_same_curve(short_runs, backend):
    fused = _train_losses(short_runs[backend, "chunked"])
    reference = _train_losses(short_runs[backend, "reference"])
    assert sorted(fused) == list(range(1, 9))
    assert fused.keys() == reference.keys()
    # fp32 on CPU: the two implementations agree to rounding, and stay together over 8 optimizer steps.
    for step in fused:
        assert fused[step] == pytest.approx(reference[step], rel=1e-4, abs=1e-5), f"step {step}"
    assert len(set(fused.values())) > 1  # the model did move


def _grad_norms(output_dir: Path) -> dict[int, float]:
    return {record["step"]: record["grad_norm"] for record in _records(output_dir) if "grad_norm" in record}


def test_fsdp2_and_deepspeed_agree(short_runs):
    fsdp2 = _train_losses(short_runs["fsdp2", "chunked"])
    deepspeed = _train_losses(short_runs["deepspeed", "chunked"])
    for step in fsdp2:
        assert fsdp2[step] == pytest.approx(deepspeed[step], rel=1e-4, abs=1e-5), f"step {step}"
    # The gradient norms too, from step 1 on: an engine that scales the accumulated gradient differently (say,
    # no division by the accumulation steps) shows there at once, long before the losses drift apart.
    fsdp2_norms, deepspeed_norms = _grad_norms(short_runs["fsdp2", "chunked"]), _grad_norms(short_runs["deepspeed", "chunked"])
    assert sorted(fsdp2_norms) == list(range(1, 9))
    for step in fsdp2_norms:
        assert fsdp2_norms[step] == pytest.approx(deepspeed_norms[step], rel=1e-4), f"step {step}"


@pytest.mark.parametrize("backend", ["fsdp2", "deepspeed"])
def test_killed_run_resumes_exactly(short_runs, tmp_path, backend):
    output_dir = tmp_path / "out"
    args = SHORT_RUN + ["--backend", backend, "--output_dir", str(output_dir)]
    process, log = _launch(2, args, tmp_path)
    deadline = time.monotonic() + TIMEOUT_S
    while max(_train_losses(output_dir), default=0) < 3:  # kill once step 3 is logged
        assert process.poll() is None, f"run ended before it could be killed:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, "run did not reach step 3"
        time.sleep(0.05)
    _kill_tree(process)

    output = _run(2, args + ["--resume"], tmp_path)
    match = re.search(r"resumed from (\S+) at step (\d+)", output)
    assert match, output[-3000:]
    resumed_at = int(match.group(2))
    assert 2 <= resumed_at < 8 and resumed_at % 2 == 0  # a checkpoint of the killed run, with steps left to compare
    uninterrupted = _train_losses(short_runs[backend, "chunked"])
    resumed = _train_losses(output_dir)
    for step in range(resumed_at + 1, 9):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-6), f"step {step}"
    # The log holds each step once (the killed run's records after its checkpoint are dropped), and the token
    # count continues from the checkpoint.
    logged_steps = [record["step"] for record in _records(output_dir) if "loss" in record]
    assert logged_steps == list(range(1, 9))
    final_count = [record["num_tokens"] for record in _records(output_dir) if "num_tokens" in record][-1]
    uninterrupted_count = [r["num_tokens"] for r in _records(short_runs[backend, "chunked"]) if "num_tokens" in r][-1]
    assert final_count == uninterrupted_count


def test_num_tokens_counts_every_rank(short_runs):
    """8 steps of 2 ranks x 8 pairs x 2 accumulation = the 256 toy pairs once: num_tokens is all their tokens."""
    from amapo_fast.toy import build_toy_tokenizer

    toy_pairs = make_toy_preference_dataset(256, seed=parse_config([]).seed)
    pairs = tokenize_preference_dataset(toy_pairs, build_toy_tokenizer(), 128, 64)
    # A sequence of n tokens feeds n - 1 inputs to the model (the last token is only a target).
    expected = sum(
        2 * len(prompt) + len(chosen) + len(rejected) - 2
        for prompt, chosen, rejected in zip(pairs["prompt_input_ids"], pairs["chosen_input_ids"], pairs["rejected_input_ids"])
    )
    counts = [record["num_tokens"] for record in _records(short_runs["fsdp2", "chunked"]) if "loss" in record]
    assert counts == sorted(counts) and counts[0] > 0
    assert counts[-1] == expected


def test_resume_ignores_half_written_checkpoints(tmp_path):
    complete = tmp_path / "checkpoint-4"
    complete.mkdir()
    (complete / TRAINER_STATE).write_text("{}")
    (tmp_path / "checkpoint-6.tmp").mkdir()  # a crash while writing step 6
    (tmp_path / "checkpoint-8").mkdir()  # no trainer state: not complete
    assert resolve_resume("latest", str(tmp_path)) == str(complete)
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "checkpoint-8"), str(tmp_path))


def _mean_logps(model, tokenizer, n_pairs):
    """Mean response log-probs (chosen, rejected) of the trainer's toy held-out pairs under a loaded model."""
    held_out = make_toy_preference_dataset(n_pairs, seed=parse_config([]).seed + 1)  # the trainer's toy eval split
    rows = tokenize_preference_dataset(held_out, tokenizer, 128, 64).to_list()
    batch = PreferenceCollator(tokenizer.pad_token_id)(rows)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    mask = batch["labels"] != IGNORE_INDEX
    token_logps = torch.log_softmax(logits, -1).gather(-1, batch["labels"].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    mean = (token_logps * mask).sum(1) / mask.sum(1)
    return mean[:n_pairs], mean[n_pairs:]


@pytest.mark.parametrize("backend", ["fsdp2", "deepspeed"])
def test_final_folder_reproduces_the_trained_log_probs(short_runs, backend):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = short_runs[backend, "chunked"] / "final"
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    chosen, rejected = _mean_logps(model, tokenizer, 64)

    logged = _final_eval(short_runs[backend, "chunked"])
    assert logged["eval/logps/chosen"] == pytest.approx(chosen.mean().item(), abs=1e-4)
    assert logged["eval/logps/rejected"] == pytest.approx(rejected.mean().item(), abs=1e-4)
    assert logged["eval/ranking_accuracy"] == pytest.approx((chosen > rejected).float().mean().item(), abs=1e-9)
    initial = [record for record in _records(short_runs[backend, "chunked"]) if "eval/logps/chosen" in record][0]
    assert initial["eval/logps/chosen"] != pytest.approx(chosen.mean().item(), abs=1e-4)  # trained, not initial


def test_dpo_starts_at_log_2_and_packed_or_checkpointed_runs_train_like_padded(tmp_path):
    from amapo_fast.train import main

    tiny = ["--toy_num_train", "64", "--toy_num_eval", "16", "--max_steps", "3", "--per_device_train_batch_size", "8",
            "--logging_steps", "1", "--save_final", "false"]
    main(tiny + ["--loss_type", "dpo", "--beta", "0.1", "--output_dir", str(tmp_path / "dpo")])
    dpo = _train_losses(tmp_path / "dpo")
    # The frozen reference starts equal to the policy, so the first DPO loss is -log sigmoid(0) = log 2.
    assert dpo[1] == pytest.approx(0.6931472, abs=1e-5)
    assert dpo[3] != pytest.approx(dpo[1], abs=1e-6)

    main(tiny + ["--output_dir", str(tmp_path / "padded")])
    padded = _train_losses(tmp_path / "padded")
    for variant in ("--packed", "--gradient_checkpointing"):
        output_dir = tmp_path / variant.strip("-")
        main(tiny + [variant, "--output_dir", str(output_dir)])
        losses = _train_losses(output_dir)
        for step in padded:
            assert losses[step] == pytest.approx(padded[step], rel=1e-4), f"{variant}, step {step}"


def test_settings_come_from_defaults_yaml_and_flags(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("beta: 3.0\nlearning_rate: 1.0e-6\ngradient_checkpointing: true\n")
    config = parse_config(["--config", str(config_file), "--learning_rate", "2e-6", "--resume"])
    assert (config.beta, config.learning_rate, config.gradient_checkpointing) == (3.0, 2e-6, True)
    assert config.resume == "latest" and config.max_length == 128
    help_text = build_parser().format_help()
    assert "--max_prompt_length" in help_text and "(default: 64)" in help_text
    config_file.write_text("betta: 3.0\n")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['betta'\]"):
        parse_config(["--config", str(config_file)])
    with pytest.raises(ValueError, match="--max_prompt_length 128 must be smaller than --max_length 128"):
        parse_config(["--max_prompt_length", "128"])


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda path: path.stem)
def test_shipped_configs_parse(path):
    config = parse_config(["--config", str(path)])
    assert config.model_name_or_path != "toy" and config.precision == "bf16"


def test_deepspeed_dpo_runs_the_frozen_reference(tmp_path):
    """ZeRO-3 wraps the reference model in an engine of its own (no optimizer) and calls it under no-grad."""
    pytest.importorskip("deepspeed")
    args = ["--backend", "deepspeed", "--loss_type", "dpo", "--beta", "0.1", "--toy_num_train", "64",
            "--toy_num_eval", "16", "--max_steps", "4", "--per_device_train_batch_size", "8", "--logging_steps", "1",
            "--save_final", "false", "--output_dir", str(tmp_path / "out")]
    _run(1, args, tmp_path)
    losses = _train_losses(tmp_path / "out")
    assert losses[1] == pytest.approx(0.6931472, abs=1e-5)  # the reference equals the initial policy
    assert losses[4] < losses[1] - 1e-3  # the policy moved away from the reference, which stayed put
    assert "eval/rewards/margins" in _final_eval(tmp_path / "out")
