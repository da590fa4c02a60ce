"""What a new user meets first: one-line errors (under python and torchrun), refused settings and output
folders before anything loads, a small local file that trains and holds rows out, the start-up summary,
num_tokens in the log, and a warmup whose first step moves the weights."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from amapo_fast import evaluate, train
from amapo_fast.cli import UserError
from amapo_fast.config import parse_config
from amapo_fast.data import PreferenceCollator
from amapo_fast.distributed import OptimConfig, cosine_schedule, warmup_cosine_factor
from amapo_fast.toy import build_toy_tokenizer, make_toy_preference_dataset

REPO = Path(__file__).resolve().parents[1]
# 20 rows, the size of a first try with one's own data: 2 held out, 18 to train, one step of 16 at the defaults.
SMALL_ROWS = 20


@pytest.fixture(scope="module")
def small_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    make_toy_preference_dataset(SMALL_ROWS, seed=7).remove_columns(["task"]).to_json(str(path))
    return path


def _records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]


def _user_error(capsys, main, argv) -> str:
    """Run a command's main; assert it exits with status 2 and one line on stderr; return that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# --- the learning-rate schedule ------------------------------------------------------------------------------


@pytest.mark.parametrize("warmup, total", [(0, 1), (1, 2), (10, 100), (0, 5), (3, 4)])
def test_first_optimizer_step_has_a_positive_learning_rate(warmup, total):
    optim = OptimConfig(3e-3, 0.0, (0.9, 0.999), 1e-8, warmup, total, 1.0, 1, 16, False, False)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=optim.learning_rate)
    schedule = cosine_schedule(optimizer, optim)
    rates = []
    for _ in range(total):
        rates.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert all(rate > 0 for rate in rates), rates
    assert max(rates) == pytest.approx(3e-3)


def test_after_warmup_the_schedule_is_transformers_cosine():
    from transformers.optimization import _get_cosine_schedule_with_warmup_lr_lambda as transformers_cosine

    for step in range(10, 100):
        expected = transformers_cosine(step, num_warmup_steps=10, num_training_steps=100, num_cycles=0.5)
        assert warmup_cosine_factor(step, 10, 100) == pytest.approx(expected)


# --- one-line user errors, before anything loads --------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--config", "missing.yaml"], "--config missing.yaml: No such file"),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0: must be positive"),
        (["--max_steps", "-5"], "--max_steps -5: must be a positive number"),
        (["--learning_rate", "nan"], "--learning_rate nan: must be positive"),
        (["--learning_rate", "abc"], "invalid float value: 'abc'"),
        (["--bogus", "1"], "unrecognized arguments: --bogus"),
        (["--dataset_name", "./missing.jsonl"], "--dataset_name ./missing.jsonl: no such file"),
        (["--resume", "--overwrite_output_dir"], "choose one"),
    ],
)
def test_train_user_errors_are_one_line(tmp_path, capsys, monkeypatch, argv, expected):
    monkeypatch.chdir(tmp_path)
    assert expected in _user_error(capsys, train.main, argv + ["--output_dir", str(tmp_path / "out")])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton path runs on a GPU")
def test_triton_loss_on_a_cpu_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the test setup sets it; a user's shell would not
    monkeypatch.setattr("amapo_fast.train.load_tokenizer", None)  # reached only if the check came too late
    line = _user_error(capsys, train.main, ["--loss_impl", "triton", "--output_dir", str(tmp_path / "out")])
    assert "--loss_impl: impl='triton' got tensors on cpu" in line


@pytest.mark.parametrize(
    "yaml_text, expected",
    [("beta: [1, 2]\n", "beta: expected type float, got [1, 2]"), ("max_length: 1.5\n", "max_length: expected type int"),
     ("packed: 3\n", "packed: expected type bool"), ("beta: abc\n", "invalid float value: 'abc'"),
     ("- beta\n", "expected a mapping"), ("beta: [\n", "not valid YAML")],
)
def test_config_file_mistakes_are_one_line(tmp_path, capsys, yaml_text, expected):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml_text)
    assert expected in _user_error(capsys, train.main, ["--config", str(config_file)])


@pytest.mark.parametrize("layout, expected", [("file", "is a file, not a folder"), ("under_file", "is a file")])
def test_unusable_output_dir_is_refused_before_any_model_loads(tmp_path, capsys, monkeypatch, layout, expected):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    output_dir = blocker if layout == "file" else blocker / "run"
    monkeypatch.setattr(train, "Trainer", None)  # reaching the Trainer would be a TypeError, not a user error
    assert expected in _user_error(capsys, train.main, ["--output_dir", str(output_dir)])
    monkeypatch.setattr("amapo_fast.model.load_policy", None)
    line = _user_error(capsys, evaluate.main, ["--model", "toy", "--dataset", "toy", "--output-dir", str(output_dir)])
    assert "--output-dir" in line and expected in line


def test_evaluate_refuses_bad_numbers_at_parse_time(capsys):
    line = _user_error(capsys, evaluate.main, ["--model", "toy", "--dataset", "toy", "--batch-size", "0"])
    assert "--batch-size: must be positive, got 0" in line
    line = _user_error(capsys, evaluate.main, ["--model", "toy", "--dataset", "toy", "--max-length", "64"])
    assert "--max-prompt-length 1800 must be smaller than --max-length 64" in line


def test_evaluate_help_shows_defaults_and_the_rmbench_format():
    help_text = evaluate.parse_args.__globals__["DESCRIPTION"]
    assert "RM-Bench-format data is recognised" in help_text
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--help"])


def test_debug_shows_the_traceback_and_internal_errors_keep_theirs(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="must be positive"):
        train.main(["--per_device_train_batch_size", "0", "--debug"])
    monkeypatch.setenv("AMAPO_DEBUG", "1")
    with pytest.raises(UserError, match="must be positive"):
        train.main(["--per_device_train_batch_size", "0"])
    monkeypatch.delenv("AMAPO_DEBUG")

    def broken(*args, **kwargs):
        raise RuntimeError("a bug, not the user's doing")

    monkeypatch.setattr(train, "Trainer", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        train.main(["--output_dir", str(tmp_path / "out")])


def test_missing_column_is_one_line_under_torchrun(tmp_path):
    """Two processes, the error found after the process group formed: one line (rank 0's), no worker frames."""
    data = tmp_path / "no_rejected.jsonl"
    make_toy_preference_dataset(8, seed=0).remove_columns(["rejected"]).to_json(str(data))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), str(REPO / "amapo_fast" / "train.py"), "--dataset_name", str(data),
               "--output_dir", str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "missing column(s) ['rejected']" in errors[0], output[-3000:]
    # torchrun adds its own failure report (exit code 2), but no frame of our processes is shown.
    assert "[rank" not in output and "amapo_fast" not in "".join(
        line for line in output.splitlines() if line.strip().startswith("File ")
    ), output[-3000:]


# --- a small local file ---------------------------------------------------------------------------------------


@pytest.fixture
def process_group():
    """A one-process group, as `python amapo_fast/train.py` forms (tokenization synchronises the ranks)."""
    import torch.distributed as dist

    from amapo_fast.distributed import init_distributed

    init_distributed()
    yield
    dist.destroy_process_group()


def test_local_file_gets_a_seeded_held_out_slice(small_file, process_group):
    tokenizer = build_toy_tokenizer()
    config = parse_config(["--dataset_name", str(small_file)])
    splits = train.load_splits(config, tokenizer)
    assert (len(splits.train), len(splits.held_out)) == (SMALL_ROWS - 2, 2)
    train_rows = {tuple(row) for row in splits.train["chosen_input_ids"]}
    assert not train_rows & {tuple(row) for row in splits.held_out["chosen_input_ids"]}
    assert "--eval_fraction 0.1" in splits.held_out_source
    again = train.load_splits(config, tokenizer)
    assert again.held_out["chosen_input_ids"] == splits.held_out["chosen_input_ids"]  # seeded
    larger = train.load_splits(parse_config(["--dataset_name", str(small_file), "--eval_fraction", "0.25"]), tokenizer)
    assert len(larger.held_out) == 5
    everything = train.load_splits(parse_config(["--dataset_name", str(small_file), "--eval_fraction", "0"]), tokenizer)
    assert everything.held_out is None and len(everything.train) == SMALL_ROWS


def test_small_file_trains_warns_and_logs_num_tokens(small_file, tmp_path, capsys):
    """20 rows at the defaults: one optimizer step, which must move the weights, with its caveats said."""
    output_dir = tmp_path / "run"
    argv = ["--dataset_name", str(small_file), "--output_dir", str(output_dir), "--save_final", "false"]
    results = train.main(argv)
    stdout = capsys.readouterr().out
    assert "held-out data  2 pairs (a seeded 10% of the file's 20 rows" in stdout
    assert "2 of 18 training pairs are left out of each epoch" in stdout
    assert "only 1 optimizer step(s)" in stdout
    assert "batch          16 pairs per optimizer step" in stdout
    records = _records(output_dir)
    before, step, after = records
    assert (before["step"], step["step"], after["step"]) == (0, 1, 1)
    assert step["lr"] == pytest.approx(3e-3)  # a 1-step run is not spent warming up
    assert after["eval/loss"] != pytest.approx(before["eval/loss"], abs=1e-6)
    assert results["ranking_accuracy_before"] is not None

    # num_tokens: the non-padding tokens of the one batch the step took, rebuilt from the same seeded order.
    config = parse_config(argv)
    train.init_distributed()
    try:
        train_set = train.load_splits(config, build_toy_tokenizer()).train
    finally:
        train.dist.destroy_process_group()
    collator = PreferenceCollator(build_toy_tokenizer().pad_token_id)
    batches = train.MicroBatches(train_set, collator, 0, 1, 16, config.seed, 1)
    assert step["num_tokens"] == train.count_tokens(next(batches.iterate((0, 0))))


def test_output_dir_of_an_earlier_run_is_refused_unless_overwritten(small_file, tmp_path, capsys):
    output_dir = tmp_path / "run"
    argv = ["--dataset_name", str(small_file), "--output_dir", str(output_dir), "--save_final", "false",
            "--eval_fraction", "0"]
    train.main(argv)
    (output_dir / "notes.txt").write_text("mine")
    assert "holds files of an earlier run" in _user_error(capsys, train.main, argv)
    train.main(argv + ["--overwrite_output_dir"])
    assert [record["step"] for record in _records(output_dir)] == [1]  # the earlier run's record is gone
    assert (output_dir / "notes.txt").read_text() == "mine"  # files that are not a run's output stay


def test_resumed_log_keeps_each_step_once(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": step, "loss": 1.0}) + "\n" for step in (0, 1, 2, 3)) + '{"step": 4, "lo')
    assert [json.loads(line)["step"] for line in train._records_up_to(str(log), 2)] == [0, 1, 2]


def test_readme_python_example_runs_as_written():
    readme = (REPO / "README.md").read_text()
    example = readme.split("```python\n", 1)[1].split("```", 1)[0]
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["hidden"].grad is not None and namespace["lm_head"].weight.grad is not None



def test_dpo_with_precomputed_reference_log_probs_trains_and_evaluates(tmp_path):
    """The reference log-probs come from the file (no reference model), in training and at held-out evaluation."""
    rows = make_toy_preference_dataset(SMALL_ROWS, seed=3).remove_columns(["task"]).to_list()
    for index, row in enumerate(rows):
        row.update(ref_chosen_logps=-20.0 - index, ref_rejected_logps=-25.0 + index)
    data = tmp_path / "with_ref.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    output_dir = tmp_path / "run"
    results = train.main(["--dataset_name", str(data), "--loss_type", "dpo", "--beta", "0.1", "--output_dir",
                          str(output_dir), "--save_final", "false"])
    before, _, after = _records(output_dir)
    assert "eval/loss" in before and after["eval/loss"] == pytest.approx(results["eval/loss"])


def test_dropped_rows_are_named_by_their_index_in_the_file(tmp_path, process_group, caplog):
    import logging

    rows = make_toy_preference_dataset(SMALL_ROWS, seed=5).remove_columns(["task"]).to_list()
    rows[13]["chosen"][-1]["content"] = " "
    data = tmp_path / "one_bad.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with caplog.at_level(logging.WARNING, logger="amapo_fast.data"):
        train.load_splits(parse_config(["--dataset_name", str(data)]), build_toy_tokenizer())
    (message,) = [record.getMessage() for record in caplog.records if "dropped" in record.getMessage()]
    assert "first dropped row (index 13, empty response)" in message and "source_row" not in message


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A trainer's output folder: log.jsonl, checkpoint-2 and final/."""
    output_dir = tmp_path_factory.mktemp("finished") / "run"
    train.main(["--toy_num_train", "32", "--per_device_train_batch_size", "8", "--max_steps", "2", "--save_steps", "2",
                "--eval_split", "none", "--output_dir", str(output_dir)])
    return output_dir


def test_evaluate_says_what_a_wrong_model_folder_is_and_what_to_pass(finished_run, tmp_path, capsys, monkeypatch):
    import shutil

    monkeypatch.setattr("amapo_fast.model.load_policy", None)  # reached only if a check came too late
    broken = tmp_path / "broken"
    shutil.copytree(finished_run / "final", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    no_config = tmp_path / "no_config"
    shutil.copytree(finished_run / "final", no_config)
    (no_config / "config.json").unlink()
    unfinished = tmp_path / "unfinished"
    shutil.copytree(finished_run, unfinished, ignore=shutil.ignore_patterns("final"))
    cases = [
        (finished_run, f"a training run's output folder; its trained model is {finished_run / 'final'}"),
        (finished_run / "checkpoint-2", "a training checkpoint (sharded training state), not a model folder: pass "
                                        "the run's final/ folder, or export this checkpoint to a model folder with "
                                        f"python -m amapo_fast.export {finished_run / 'checkpoint-2'} FOLDER"),
        (unfinished, f"without a final/ model (the run has not finished, or ran with --save_final false): export one "
                     f"of its checkpoints to a model folder with python -m amapo_fast.export {unfinished / 'checkpoint-N'}"),
        (broken, "model.safetensors is cut short"),
        (no_config, "no config.json, so not a model folder"),
        (finished_run / "missing" / "final", "no such file or folder"),
    ]
    for model, expected in cases:
        line = _user_error(capsys, evaluate.main, ["--model", str(model), "--dataset", "toy", "--output-dir",
                                                  str(tmp_path / "eval")])
        assert f"--model {model}: " in line and expected in line, line
    relative = os.path.relpath(finished_run / "nothere" / "final")
    assert "no such file or folder" in _user_error(capsys, evaluate.main, ["--model", relative, "--dataset", "toy"])


@pytest.mark.parametrize(
    "yaml_text, expected",
    [("loss_type: ampo\n", "loss_type: invalid choice 'ampo' (choose from amapo,"),
     ("backend: fsdp\n", "backend: invalid choice 'fsdp'"), ("stats_scope: globl\n", "stats_scope: invalid choice"),
     ("attn_implementation: flash\n", "attn_implementation: invalid choice"),
     ("precision: fp16\n", "precision: invalid choice 'fp16' (choose from auto, bf16, fp32)"),
     ("on_nonfinite: skipp\n", "on_nonfinite: invalid choice"), ("report_to: tensorboar\n", "report_to: invalid choice")],
)
def test_config_file_values_meet_the_flags_choices_before_anything_loads(tmp_path, capsys, monkeypatch, yaml_text, expected):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml_text)
    monkeypatch.setattr(train, "Trainer", None)  # reaching the Trainer would be a TypeError, not a user error
    line = _user_error(capsys, train.main, ["--config", str(config_file), "--output_dir", str(tmp_path / "out")])
    assert f"--config {config_file}: {expected}" in line, line
    with pytest.raises(UserError, match="invalid choice"):  # a config built in code is held to them too
        from amapo_fast.config import TrainConfig, validate

        name, value = yaml_text.strip().split(": ")
        validate(TrainConfig(**{name: value}))


@pytest.mark.parametrize("flag, value, extra", [("--report_to", "tensorboard", "tensorboard"), ("--report_to", "wandb", "wandb"),
                                                ("--backend", "deepspeed", "deepspeed")])
def test_a_missing_optional_package_is_named_with_its_extra_at_start_up(tmp_path, capsys, monkeypatch, flag, value, extra):
    import importlib.util

    find_spec = importlib.util.find_spec
    module = {"tensorboard": "tensorboard", "wandb": "wandb", "deepspeed": "deepspeed"}[extra]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else find_spec(name, *a))
    monkeypatch.setattr(train, "Trainer", None)
    line = _user_error(capsys, train.main, [flag, value, "--output_dir", str(tmp_path / "out")])
    assert f"{flag} {value} needs the {module} package: pip install -e \".[{extra}]\"" in line


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc and /sys")
@pytest.mark.parametrize("output_dir", ["/proc/amapo-out", "/sys/amapo-out"])
def test_output_dir_on_a_kernel_file_system_is_one_line_before_anything_loads(capsys, monkeypatch, output_dir):
    monkeypatch.setattr(train, "Trainer", None)
    line = _user_error(capsys, train.main, ["--output_dir", output_dir])
    assert f"--output_dir {output_dir}: " in line
    monkeypatch.setattr("amapo_fast.model.load_policy", None)
    assert "--output-dir" in _user_error(capsys, evaluate.main, ["--model", "toy", "--dataset", "toy", "--output-dir", output_dir])


def test_both_command_lines_take_both_spellings_and_refuse_abbreviations(tmp_path, capsys):
    config = parse_config(["--dataset-name", "toy", "--output-dir", "x", "--max-length", "96", "--dataset", "toy",
                           "--model", "toy", "--max_prompt_length", "40"])
    assert (config.output_dir, config.max_length, config.max_prompt_length) == ("x", 96, 40)
    args = evaluate.parse_args(["--model_name_or_path", "toy", "--dataset_name", "toy", "--max_length", "96",
                                "--max-prompt-length", "40", "--output_dir", "y", "--batch_size", "4"])
    assert (args.model, args.dataset, args.max_length, args.output_dir, args.batch_size) == ("toy", "toy", 96, "y", 4)
    line = _user_error(capsys, train.main, ["--learning_rat", "1e-3", "--output_dir", str(tmp_path / "out")])
    assert "unrecognized arguments: --learning_rat" in line
    line = _user_error(capsys, evaluate.main, ["--model", "toy", "--data", "toy"])
    assert "--data" in line and "required: --dataset" in line


def test_evaluate_takes_the_training_truncation_from_a_trained_model_and_says_so(finished_run, tmp_path, capsys):
    final = finished_run / "final"
    common = ["--dataset", "toy", "--output-dir", str(tmp_path / "eval"), "--batch-size", "64"]
    report = evaluate.main(["--model", str(final), *common])
    assert (report["settings"]["max_length"], report["settings"]["max_prompt_length"]) == (128, 64)  # the trainer's
    assert f"truncation: --max-length 128, --max-prompt-length 64 (from the training settings in {final})" in capsys.readouterr().out
    report = evaluate.main(["--model", str(final), "--max-length", "100", *common])
    assert (report["settings"]["max_length"], report["settings"]["max_prompt_length"]) == (100, 64)
    assert "(from the training settings in" in capsys.readouterr().out


def test_a_hub_name_without_the_hub_fails_fast_with_a_hint(tmp_path, capsys, monkeypatch):
    import time

    from amapo_fast import cli

    with socket.socket() as sock:  # a port that nothing listens on: refused at once, like a machine offline
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(cli, "_HUB_REACHABLE", {})
    monkeypatch.setattr("amapo_fast.model.load_policy", None)
    started = time.perf_counter()
    line = _user_error(capsys, evaluate.main, ["--model", "someone/some-model", "--dataset", "toy",
                                              "--output-dir", str(tmp_path / "eval")])
    assert time.perf_counter() - started < 20
    assert "--model someone/some-model: not a local file or folder, and the hub" in line
    assert "set HF_HUB_OFFLINE=1" in line
    line = _user_error(capsys, train.main, ["--dataset_name", "someone/pairs", "--output_dir", str(tmp_path / "out")])
    assert "--dataset_name someone/pairs: not a local file or folder" in line


def test_resume_with_other_data_than_the_checkpoints_run_is_refused(finished_run, small_file, tmp_path, capsys, monkeypatch):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    monkeypatch.setattr(train, "load_tokenizer", None)  # reached only if the check came too late
    line = _user_error(capsys, train.main, ["--resume", str(run / "checkpoint-2"), "--dataset_name", str(small_file),
                                            "--output_dir", str(run)])
    assert f"--resume {run / 'checkpoint-2'}: its run used --dataset_name toy, this one {small_file}" in line


def test_no_progress_bars_when_the_output_is_not_a_terminal(small_file, tmp_path, capfd):
    """A run whose output goes to a file (here: captured) gets its lines and no bar, its own or a library's."""
    train.main(["--dataset_name", str(small_file), "--output_dir", str(tmp_path / "run")])
    evaluate.main(["--model", str(tmp_path / "run" / "final"), "--dataset", str(small_file), "--split", "test",
                   "--output-dir", str(tmp_path / "eval")])
    captured = capfd.readouterr()
    output = captured.out + captured.err
    assert "held-out ranking accuracy" in output and "ranking accuracy % [95% CI]" in output
    for bar in ("it/s", "examples/s", "batch/s", "Loading weights", "Generating train split", "tokenizing", "\r"):
        assert bar not in output, (bar, output[-2000:])


def test_readme_install_lines_are_commands_and_name_the_ones_ci_runs():
    readme = (REPO / "README.md").read_text()
    install = readme.split("## Install", 1)[1].split("## ", 1)[0]
    commands = [line for line in install.splitlines() if line.startswith("pip install")]
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in commands
    assert not [line for line in commands if "<" in line], commands  # no placeholders
    ci_torch = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines() if "install torch" in line]
    assert ci_torch and all(f"`{line}`" in install for line in ci_torch), ci_torch


def test_amapo_train_checks_settings_before_starting_workers(tmp_path, capsys, monkeypatch):
    from amapo_fast import launch

    assert launch.split_argv(["--nproc_per_node", "2", "--max_steps", "3", "--master_port=1234", "--standalone",
                              "--dataset_name", "x.jsonl"]) == (
        ["--nproc_per_node", "2", "--master_port=1234", "--standalone"], ["--max_steps", "3", "--dataset_name", "x.jsonl"])
    monkeypatch.setattr("torch.distributed.run.run", None)  # starting the workers would be a TypeError
    line = _user_error(capsys, launch.main, ["--nproc_per_node", "2", "--per_device_train_batch_size", "0",
                                             "--output_dir", str(tmp_path / "out")])
    assert "--per_device_train_batch_size 0: must be positive" in line


def test_amapo_train_ends_with_the_workers_one_line_and_status(tmp_path):
    """An error found by the workers (after the process group formed): their one line, status 2, no launcher report."""
    data = tmp_path / "no_rejected.jsonl"
    make_toy_preference_dataset(8, seed=0).remove_columns(["rejected"]).to_json(str(data))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "amapo_fast.launch", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), "--dataset_name", str(data), "--output_dir", str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 2, lines[-30:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing column(s) ['rejected']" in lines[0], lines[-30:]
