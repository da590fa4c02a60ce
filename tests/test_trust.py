"""A run that never silently loses or corrupts: divergence stops (or is skipped) without saving non-finite
weights, logs stay strict JSON, checkpoints are verified against their manifest, rotation never leaves a
half-deleted checkpoint that looks complete, a second run on the same output folder is refused, a resume on
another number of processes continues with exactly the next pairs (FSDP2) or is refused in one line
(DeepSpeed), evaluation refuses NaN log-probs, and data errors say where."""
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from amapo_fast.batches import MicroBatches
from amapo_fast.checkpoint import (
    MANIFEST,
    TRAINER_STATE,
    completed_checkpoints,
    load_checkpoint,
    resolve_resume,
    verify_checkpoint,
    write_manifest,
)
from amapo_fast.data import load_preference_dataset, tokenize_preference_dataset
from amapo_fast.errors import CheckpointError, DataError, NonFiniteError, OutputDirBusyError
from amapo_fast.guard import LOCK_FILE, OutputDirLock
from amapo_fast.model import load_tokenizer
from amapo_fast.train import main
from test_train import TRAIN, _records, _run, _train_losses

TINY = ["--toy_num_train", "64", "--toy_num_eval", "16", "--per_device_train_batch_size", "8", "--logging_steps", "1",
        "--save_final", "false"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _strict_records(output_dir: Path) -> list[dict]:
    """log.jsonl parsed as standard JSON: a bare NaN / Infinity is an error."""
    def reject(constant):
        raise ValueError(f"log.jsonl holds a bare {constant}, which is not JSON")

    text = (output_dir / "log.jsonl").read_text()
    return [json.loads(line, parse_constant=reject) for line in text.splitlines()]


def _dcp_model_is_finite(checkpoint: Path) -> bool:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    converted = checkpoint.parent / f"{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint / "dcp", converted)
    state = torch.load(converted, weights_only=False)["model"]
    converted.unlink()
    return all(torch.isfinite(value).all() for value in state.values() if torch.is_tensor(value))


# --- divergence -----------------------------------------------------------------------------------------


def test_divergence_stops_in_one_line_and_keeps_the_last_checkpoint(tmp_path):
    """lr 1e30: within a few steps the loss or the gradient norm is NaN. The run exits with one line naming the
    step, the quantity and the last checkpoint; that checkpoint survives rotation, no later one nor final/ is
    written."""
    output_dir = tmp_path / "out"
    args = TINY + ["--max_steps", "8", "--learning_rate", "1e30", "--save_steps", "1", "--save_total_limit", "1",
                   "--save_final", "true", "--eval_split", "none", "--output_dir", str(output_dir)]
    result = subprocess.run([sys.executable, str(TRAIN), *args], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    match = re.search(r"step (\d+): the (loss|gradient norm) is not finite", errors[0])
    assert match and int(match.group(1)) >= 2, errors[0]
    last_good = f"checkpoint-{int(match.group(1)) - 1}"
    assert f"last checkpoint saved before it is {output_dir / last_good}" in errors[0]
    assert [Path(path).name for path in completed_checkpoints(str(output_dir))] == [last_good]
    assert _dcp_model_is_finite(output_dir / last_good)
    assert not (output_dir / "final").exists()
    assert max(record["step"] for record in _strict_records(output_dir)) == int(match.group(1)) - 1


def test_skipped_steps_are_counted_and_evaluation_refuses_nan_scores(tmp_path):
    """--on_nonfinite skip: the NaN steps are not applied (the schedule stands still), counted in strict-JSON
    records; the end-of-run evaluation of the NaN-producing model is refused instead of reporting 0.0."""
    output_dir = tmp_path / "out"
    args = TINY + ["--max_steps", "6", "--learning_rate", "1e30", "--on_nonfinite", "skip", "--output_dir",
                   str(output_dir)]
    with pytest.raises(NonFiniteError, match=r"[1-9]\d* of 16 pairs have a NaN or infinite response log-prob"):
        main(args + ["--debug"])  # --debug: the error itself, not the command line's exit
    records = [record for record in _strict_records(output_dir) if "loss" in record]
    skipped = [index for index, record in enumerate(records) if record["grad_norm"] == "nan"]
    assert len(skipped) >= 3 and skipped == list(range(skipped[0], len(records)))
    assert [record["skipped_steps"] for record in records] == [max(0, i - skipped[0] + 1) for i in range(len(records))]
    assert len({record["lr"] for record in records[skipped[0] :]}) == 1  # the schedule stood still


def test_collapse_to_a_zero_gradient_is_reported(tmp_path, capsys):
    """lr 1e3 saturates the toy model: loss ln 2, gradient norm exactly 0. That is reported, once."""
    main(TINY + ["--max_steps", "6", "--learning_rate", "1e3", "--eval_split", "none", "--output_dir",
                 str(tmp_path / "out")])
    assert capsys.readouterr().out.count("the gradient norm is exactly 0") == 1


def test_evaluation_of_a_nan_model_is_refused_naming_how_many_pairs():
    from amapo_fast.data import PreferenceCollator
    from amapo_fast.evaluate import eval_dataloader, evaluate_ranking
    from amapo_fast.model import load_policy
    from amapo_fast.toy import make_toy_preference_dataset

    tokenizer = load_tokenizer("toy")
    policy = load_policy("toy", tokenizer=tokenizer)
    with torch.no_grad():
        policy.causal_lm.model.norm.weight[0] = float("nan")  # every position's hidden state, so every pair
    tokenized = tokenize_preference_dataset(make_toy_preference_dataset(12, seed=0), tokenizer, 128, 64)
    loader = eval_dataloader(tokenized, PreferenceCollator(tokenizer.pad_token_id), batch_size=4)
    with pytest.raises(NonFiniteError, match=r"12 of 12 pairs have a NaN or infinite response log-prob"):
        evaluate_ranking(policy, loader, progress=False)


# --- checkpoints ----------------------------------------------------------------------------------------


FROZEN = TINY + ["--gradient_accumulation_steps", "2", "--learning_rate", "1e-20", "--loss_type", "simpo",
                 "--eval_split", "none", "--save_steps", "2"]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """1 process, 8 steps of 2 micro-batches of 8 pairs (64 pairs: 4 steps per epoch), with a learning rate too
    small to move any fp32 weight: each logged loss depends only on which pairs the step took, and SimPO's loss
    is a plain mean over pairs. Checkpoints every 2 steps."""
    output_dir = tmp_path_factory.mktemp("one") / "out"
    main(FROZEN + ["--max_steps", "8", "--save_total_limit", "0", "--output_dir", str(output_dir)])
    return output_dir


def _copy_checkpoint(source: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "out" / source.name
    shutil.copytree(source, copy)
    return copy


def test_same_size_corruption_is_refused_naming_the_file(one_process_run, tmp_path):
    checkpoint = _copy_checkpoint(one_process_run / "checkpoint-2", tmp_path)
    shard = next((checkpoint / "dcp").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64  # NaN bit patterns, same size
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{shard}.* differs from the hash {MANIFEST} records"):
        main(FROZEN + ["--max_steps", "4", "--resume", str(checkpoint), "--output_dir", str(tmp_path / "out"),
                       "--debug"])


@pytest.mark.parametrize("damage", ["truncated shard", "truncated metadata", "missing manifest"])
def test_damaged_checkpoint_is_one_line(one_process_run, tmp_path, damage):
    checkpoint = _copy_checkpoint(one_process_run / "checkpoint-2", tmp_path)
    if damage == "missing manifest":
        (checkpoint / MANIFEST).unlink()
        expected = rf"{checkpoint} has no {MANIFEST}, so its files cannot be verified"
    else:
        victim = next((checkpoint / "dcp").glob("*.distcp" if damage == "truncated shard" else ".metadata"))
        victim.write_bytes(victim.read_bytes()[:100])
        expected = rf"{victim} has 100 bytes where {MANIFEST} records \d+ \(truncated"
    with pytest.raises(CheckpointError, match=expected) as raised:
        main(FROZEN + ["--max_steps", "4", "--resume", str(checkpoint), "--output_dir", str(tmp_path / "out"),
                       "--debug"])
    assert "\n" not in str(raised.value)


def _flip_a_byte(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_manifest(checkpoint: Path, edit):
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    (checkpoint / MANIFEST).write_text(json.dumps(edit(manifest)))


def _without(entries: dict, name: str) -> dict:
    return {key: value for key, value in entries.items() if key != name}


@pytest.mark.parametrize(
    "damage",
    ["emptied manifest, changed shard", "shard's entry deleted, shard changed", "shard and its entry deleted",
     "metadata and its entry deleted", "scheduler's entry deleted", "an rng state and its entry deleted",
     "files is a list", "entry without a size"],
)
def test_a_manifest_that_does_not_vouch_for_every_file_is_refused(one_process_run, tmp_path, damage):
    """The manifest must list every file the checkpoint needs: emptying it, or deleting a file's entry (and the
    file), never lets a resume load different weights or die with a traceback."""
    checkpoint = _copy_checkpoint(one_process_run / "checkpoint-2", tmp_path)
    shard = next((checkpoint / "dcp").glob("*.distcp"))
    shard_name = f"dcp/{shard.name}"
    if damage == "emptied manifest, changed shard":
        _edit_manifest(checkpoint, lambda manifest: {"files": {}})
        _flip_a_byte(shard)
        expected = rf"{MANIFEST} does not list {TRAINER_STATE}"
    elif damage == "shard's entry deleted, shard changed":
        _edit_manifest(checkpoint, lambda manifest: {"files": _without(manifest["files"], shard_name)})
        _flip_a_byte(shard)
        expected = rf"{MANIFEST} does not list {shard}, which the checkpoint needs"
    elif damage == "files is a list":
        _edit_manifest(checkpoint, lambda manifest: {"files": []})
        expected = rf"{checkpoint / MANIFEST} holds no 'files' object"
    elif damage == "entry without a size":
        _edit_manifest(checkpoint, lambda manifest: {"files": {**manifest["files"], shard_name: {"xxh3_64": "0"}}})
        expected = rf"{checkpoint / MANIFEST}: entry '{shard_name}' is not a file inside the checkpoint"
    else:
        name = {"shard and its entry deleted": shard_name, "metadata and its entry deleted": "dcp/.metadata",
                "scheduler's entry deleted": "scheduler.pt",
                "an rng state and its entry deleted": "rng_state_0.pt"}[damage]
        if damage != "scheduler's entry deleted":
            (checkpoint / name).unlink()
        _edit_manifest(checkpoint, lambda manifest: {"files": _without(manifest["files"], name)})
        expected = rf"{MANIFEST} does not list {checkpoint / name}, which the checkpoint needs"
    with pytest.raises(CheckpointError, match=rf"^checkpoint {checkpoint} is damaged: {expected}") as raised:
        main(FROZEN + ["--max_steps", "4", "--resume", str(checkpoint), "--output_dir", str(tmp_path / "out"),
                       "--debug"])
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("resume", ["latest", "checkpoint-4"])
def test_a_checkpoint_without_its_trainer_state_is_refused_not_passed_over(tmp_path, resume):
    """A checkpoint-N folder holding a manifest was completed by a save: without trainer_state.json it is
    damaged, and --resume stops in one line instead of silently resuming from the checkpoint before it."""
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / MANIFEST).write_text('{"files": {}}')
        (tmp_path / f"checkpoint-{step}" / TRAINER_STATE).write_text("{}")
    (tmp_path / "checkpoint-4" / TRAINER_STATE).unlink()
    path = resume if resume == "latest" else str(tmp_path / resume)
    with pytest.raises(CheckpointError, match=rf"^checkpoint {tmp_path / 'checkpoint-4'} is damaged: it has a "
                                              rf"{MANIFEST} but no {TRAINER_STATE}"):
        resolve_resume(path, str(tmp_path))


class _FakeEngine:
    """Stands for an engine in save_checkpoint: one small 'shard' file per save."""

    policy = torch.nn.Linear(2, 2)

    def save(self, directory):
        os.makedirs(os.path.join(directory, "dcp"))
        Path(directory, "dcp", "__0_0.distcp").write_bytes(b"shard")


def test_rotation_killed_halfway_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    """A kill while the rotated-out checkpoint is being deleted: its shards already gone, its trainer state not."""
    import torch.distributed as dist

    from amapo_fast.checkpoint import save_checkpoint

    real_rmtree = shutil.rmtree

    def killed_after_the_shards(path, ignore_errors=False):
        if Path(path).name.startswith("checkpoint-2") and Path(path).exists():
            real_rmtree(Path(path) / "dcp")
            raise KeyboardInterrupt  # stands for SIGKILL: nothing after this line runs
        real_rmtree(path, ignore_errors=ignore_errors)

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        save_checkpoint(_FakeEngine(), str(tmp_path), 2, {"global_step": 2}, 1, 0)
        monkeypatch.setattr(shutil, "rmtree", killed_after_the_shards)
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(_FakeEngine(), str(tmp_path), 4, {"global_step": 4}, 1, 0)
    finally:
        dist.destroy_process_group()
    assert completed_checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoint-4")]


class _FullDiskEngine(_FakeEngine):
    def save(self, directory):
        os.makedirs(os.path.join(directory, "dcp"))
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_abandons_the_checkpoint_and_keeps_the_earlier_ones(tmp_path):
    import torch.distributed as dist

    from amapo_fast.checkpoint import save_checkpoint

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        save_checkpoint(_FakeEngine(), str(tmp_path), 2, {"global_step": 2}, 1, 0)
        with pytest.raises(CheckpointError, match=rf"^checkpoint-4 abandoned: the disk holding {tmp_path} is full "
                                                  r"\(\[Errno 28\] No space left on device\); its partial files were "
                                                  rf"removed.*the last checkpoint saved before it is "
                                                  rf"{tmp_path / 'checkpoint-2'}\)") as raised:
            save_checkpoint(_FullDiskEngine(), str(tmp_path), 4, {"global_step": 4}, 1, 0)
    finally:
        dist.destroy_process_group()
    assert "\n" not in str(raised.value)
    assert completed_checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoint-2")]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint-2"]
    verify_checkpoint(str(tmp_path / "checkpoint-2"))


# What torch.save's zip writer raises when the disk takes fewer bytes than it wrote.
SHORT_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"


@pytest.mark.parametrize("what", ["checkpoint-4", "final"])
def test_a_full_disk_during_a_save_is_one_line_and_loses_nothing(tmp_path, monkeypatch, what):
    """The trainer's own saves: the scheduler state of checkpoint-4 (torch.save), or final/'s weights."""
    import transformers.modeling_utils

    output_dir = tmp_path / "out"
    if what == "final":
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
        detail = r"\[Errno 28\] No space left on device"
    else:
        real_save = torch.save

        def full(obj, path, *args, **kwargs):
            if f"{what}.tmp" in str(path):
                raise RuntimeError(SHORT_WRITE)
            return real_save(obj, path, *args, **kwargs)

        monkeypatch.setattr(torch, "save", full)
        detail = re.escape(SHORT_WRITE)
    target = output_dir / what
    with pytest.raises(CheckpointError, match=rf"^{'checkpoint-4' if what != 'final' else target} abandoned: the "
                                              rf"disk holding {output_dir} is full \({detail}\)"):
        main(FROZEN + ["--max_steps", "4", "--save_total_limit", "1", "--save_final", "true", "--output_dir",
                       str(output_dir), "--debug"])
    expected = ["checkpoint-2", "checkpoint-4"] if what == "final" else ["checkpoint-2"]
    assert completed_checkpoints(str(output_dir)) == [str(output_dir / name) for name in expected[-1:]]
    assert not [path.name for path in output_dir.iterdir() if path.name.endswith((".tmp", ".partial"))]
    assert not (output_dir / "final").exists()
    verify_checkpoint(str(output_dir / expected[-1]))
    assert max(_train_losses(output_dir)) == 4


def test_second_run_on_a_busy_output_dir_is_refused_and_a_dead_holder_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from amapo_fast.guard import OutputDirLock\n"
         f"with OutputDirLock({str(tmp_path)!r}, True):\n    print('locked', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path(TRAIN).parents[1])},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        (tmp_path / "log.jsonl").write_text("{}\n")  # the other run's log
        with pytest.raises(OutputDirBusyError, match=rf"in use by another run \(pid {holder.pid} on host \S+"):
            main(TINY + ["--max_steps", "1", "--overwrite_output_dir", "--output_dir", str(tmp_path), "--debug"])
        assert (tmp_path / "log.jsonl").exists()  # refused before --overwrite_output_dir removed anything
        assert time.monotonic() - started < 5  # refused before any model or data is loaded
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / LOCK_FILE).exists()  # left behind by the killed holder
    with OutputDirLock(str(tmp_path), True):  # and taken over
        pass
    assert not (tmp_path / LOCK_FILE).exists()


class _KilledWhileWriting:
    """A file whose writes never happen: stands for a kill (or a full disk) right after it was opened."""

    def __init__(self, handle):
        self.handle = handle

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.handle.close()

    def write(self, text):
        raise KeyboardInterrupt

    writelines = write

    def __getattr__(self, name):
        return getattr(self.handle, name)


def test_resuming_rewrites_the_log_atomically(tmp_path, monkeypatch):
    """A resumed run drops the log records after its checkpoint; killed while doing so, the log stays whole."""
    import builtins
    from types import SimpleNamespace

    from amapo_fast import train

    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": step, "loss": 1.0 / step}) + "\n" for step in range(1, 7)))
    before = log.read_text()
    config = SimpleNamespace(output_dir=str(tmp_path), report_to="none", run_name=None)
    env = SimpleNamespace(is_main=True)

    def open_killed_while_writing(file, mode="r", *args, **kwargs):
        handle = builtins.open(file, mode, *args, **kwargs)
        return _KilledWhileWriting(handle) if "w" in mode else handle

    monkeypatch.setattr(train, "open", open_killed_while_writing, raising=False)
    with pytest.raises(KeyboardInterrupt):
        train.Loggers(config, env, total_steps=8, start_step=4)
    assert log.read_text() == before
    monkeypatch.undo()

    loggers = train.Loggers(config, env, total_steps=8, start_step=4)
    loggers.log(5, {"loss": 0.5})
    loggers.close()
    assert [record["step"] for record in _strict_records(tmp_path)] == [1, 2, 3, 4, 5]
    assert not (tmp_path / "log.jsonl.tmp").exists()


# --- a different number of processes --------------------------------------------------------------------


def test_data_position_is_exact_in_pairs_across_world_sizes():
    """Pairs consumed on 2 ranks, then on 1 or 3 from the saved position: no pair twice, and none skipped but
    the epoch's last few that do not fill a whole micro-step of the new world size."""
    dataset = list(range(96))

    def collate(rows):
        return rows

    def consumed(world: int, position, micro_batches: int, batch: int = 4):
        pairs = []
        for rank in range(world):
            stream = MicroBatches(dataset, collate, rank, world, batch, 7, 96 // (world * batch)).iterate(position)
            pairs += [pair for _ in range(micro_batches) for pair in next(stream)]
        return pairs

    two_ranks = MicroBatches(dataset, collate, 0, 2, 4, 7, 12)
    first = consumed(2, (0, 0), 5)
    position = two_ranks.advance((0, 0), 5)
    assert position == (0, 40)
    for world in (1, 3):
        rest = consumed(world, position, 56 // (world * 4))
        assert len(set(first + rest)) == len(first + rest), world
        assert len(first + rest) == 96 - 56 % (world * 4), world


def test_fsdp2_resume_on_another_number_of_processes_takes_the_next_pairs(one_process_run, tmp_path):
    """1 -> 2 -> 1 processes with the same flags (16 pairs per step on 1 process, 32 on 2): after each resume
    the steps take exactly the pairs that follow the checkpoint's position, which the losses of the
    weight-frozen runs identify."""
    one = _train_losses(one_process_run)  # step s: epoch (s-1) // 4, pairs 16((s-1) % 4) .. +16
    assert len(set(one.values())) == len(one)  # the losses do tell the steps' pairs apart

    # 1 -> 2 after 32 pairs: step 3 takes pairs 32..64 (the 1-process steps 3, 4), step 4 the next epoch's 0..32.
    two = tmp_path / "two"
    _run(2, FROZEN + ["--max_steps", "4", "--resume", str(one_process_run / "checkpoint-2"), "--output_dir", str(two)],
         tmp_path)
    losses = _train_losses(two)
    assert [losses[3], losses[4]] == pytest.approx([(one[3] + one[4]) / 2, (one[5] + one[6]) / 2], rel=1e-5)

    # 2 -> 1 after epoch 1's first 32 pairs: steps 5 and 6 take its pairs 32..64, the 1-process steps 7, 8.
    back = tmp_path / "back"
    main(FROZEN + ["--max_steps", "6", "--resume", str(two / "checkpoint-4"), "--output_dir", str(back)])
    losses = _train_losses(back)
    assert [losses[5], losses[6]] == pytest.approx([one[7], one[8]], rel=1e-6)


def test_deepspeed_checkpoint_on_another_number_of_processes_is_refused_in_one_line(tmp_path):
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    state = {"global_step": 2, "data_position": [0, 64], "world_size": 2, "config": {"backend": "deepspeed"}}
    (checkpoint / TRAINER_STATE).write_text(json.dumps(state))
    write_manifest(str(checkpoint))
    with pytest.raises(CheckpointError, match=r"written by 2 processes and this run has 1: .* relaunch with 2"):
        load_checkpoint(None, str(checkpoint), 0, "deepspeed")
    with pytest.raises(CheckpointError, match=r"written by --backend deepspeed; resume it with --backend deepspeed"):
        load_checkpoint(None, str(checkpoint), 0, "fsdp2")


# --- data -----------------------------------------------------------------------------------------------

PAIR = {"prompt": "p", "chosen": "a", "rejected": "b"}


@pytest.mark.parametrize(
    "content, expected",
    [
        (json.dumps(PAIR) + "\n" + json.dumps(PAIR)[:-1] + ' "x": 1}\n',
         r"line 2, column \d+: Expecting ',' delimiter"),
        (json.dumps(PAIR).encode() + b'\n{"prompt": "\xff"}\n', r"line 2, column 13: byte 0xff is not UTF-8"),
        ("", r"is empty"),
        (json.dumps(PAIR) + "\n[1, 2]\n", r"line 2: a JSON list; expected one JSON object"),
    ],
    ids=["malformed", "not-utf8", "empty", "not-an-object"],
)
def test_bad_jsonl_names_the_file_and_line(tmp_path, content, expected):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=rf"{path}:? {expected}"):
        load_preference_dataset(str(path), "train")


def test_row_mixing_strings_and_message_lists_names_the_file_and_row(tmp_path):
    path = tmp_path / "pairs.jsonl"
    mixed = {"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}
    path.write_text(json.dumps(PAIR) + "\n" + json.dumps(mixed) + "\n")
    with pytest.raises(DataError, match=rf"{path}: row 1: 'chosen' is a message list but 'rejected' is a string"):
        load_preference_dataset(str(path), "train")
    # Any other source (a hub dataset, a folder): the row is named when it is tokenized.
    from datasets import Dataset

    rows = Dataset.from_list([{"prompt": "p", "chosen": "a", "rejected": ["b"]}] * 2)
    with pytest.raises(ValueError, match=r"row 0: 'rejected' is a list \(\"\['b'\]\"\); expected a string or a list"):
        tokenize_preference_dataset(rows, load_tokenizer("toy"), 128, 64)


def test_a_folder_holding_only_a_stale_lock_starts_a_fresh_run(tmp_path):
    """A run killed before its first checkpoint leaves only its lock: the same command starts again."""
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / LOCK_FILE).write_text(json.dumps({"pid": 2**22 + 12345, "host": os.uname().nodename}))
    main(TINY + ["--max_steps", "1", "--eval_split", "none", "--output_dir", str(output_dir)])
    assert _train_losses(output_dir)


def test_a_resumed_run_with_a_longer_schedule_follows_its_own_rates(tmp_path):
    """Resuming with a larger --max_steps: the first resumed step's rate comes from the new schedule, not
    from the rate the checkpoint's optimizer state carried (the old schedule's end)."""
    common = TINY + ["--eval_split", "none", "--save_steps", "2"]
    main(common + ["--max_steps", "4", "--output_dir", str(tmp_path / "a")])
    main(common + ["--max_steps", "8", "--output_dir", str(tmp_path / "a"), "--resume"])
    main(common + ["--max_steps", "8", "--output_dir", str(tmp_path / "b")])
    rates = [{r["step"]: r["lr"] for r in _records(tmp_path / name) if "lr" in r} for name in ("a", "b")]
    assert rates[0][5] == pytest.approx(rates[1][5], rel=1e-9) and rates[0][5] > 0


def test_final_folder_appears_complete_and_readable(tmp_path):
    """final/ is written beside its place and renamed in once complete, its files as readable as any new file."""
    output_dir = tmp_path / "out"
    old_umask = os.umask(0o022)
    try:
        main(TINY + ["--max_steps", "1", "--eval_split", "none", "--save_final", "true", "--output_dir", str(output_dir)])
    finally:
        os.umask(old_umask)
    final = output_dir / "final"
    assert not (output_dir / "final.partial").exists()
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= {p.name for p in final.iterdir()}
    assert all((path.stat().st_mode & 0o777) == 0o644 for path in final.iterdir() if path.is_file())
