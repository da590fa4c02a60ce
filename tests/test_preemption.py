"""A stop signal (SIGTERM from a scheduler, SIGINT from Ctrl-C) ends a run after the step in progress with a
complete, verified checkpoint of that step, rotated as usual, and one line naming it; --resume then continues
exactly. All ranks stop after the same step, even when only one received the signal. A second signal ends the
process at once."""
import os
import re
import signal
import time

import psutil
import pytest
import torch

from amapo_fast import guard, train
from amapo_fast.checkpoint import completed_checkpoints, read_trainer_state, verify_checkpoint
from amapo_fast.guard import StopSignals
from test_train import TIMEOUT_S, _kill_tree, _launch, _records, _train_losses

RUN = ["--toy_num_train", "64", "--per_device_train_batch_size", "8", "--max_steps", "6", "--logging_steps", "1",
       "--save_steps", "2", "--save_total_limit", "1", "--eval_split", "none", "--save_final", "false"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sigterm_saves_the_step_in_progress_and_resume_continues_exactly(tmp_path, monkeypatch, capsys):
    train.main(RUN + ["--output_dir", str(tmp_path / "whole")])

    real_train_step = train.Trainer.train_step
    steps = []

    def signalled_during_step_3(self, stream, window):
        result = real_train_step(self, stream, window)
        steps.append(None)
        if len(steps) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while step 3 is still being finished
        return result

    monkeypatch.setattr(train.Trainer, "train_step", signalled_during_step_3)
    output_dir = tmp_path / "stopped"
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        train.main(RUN + ["--output_dir", str(output_dir)])
    assert stopped.value.code == 128 + signal.SIGTERM
    errors = capsys.readouterr().err
    lines = [line for line in errors.splitlines() if line.startswith("stopped by")]
    assert lines == [f"stopped by SIGTERM after step 3/6: saved {output_dir / 'checkpoint-3'}; the same command "
                     "with --resume continues from it exactly"], errors[-3000:]
    assert "Traceback" not in errors
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the trainer's handler is gone with the run
    # checkpoint-2 was rotated out (--save_total_limit 1); checkpoint-3 is complete and verified.
    assert completed_checkpoints(str(output_dir)) == [str(output_dir / "checkpoint-3")]
    assert verify_checkpoint(str(output_dir / "checkpoint-3"))["global_step"] == 3
    assert not list(output_dir.glob("*.tmp"))

    monkeypatch.undo()
    train.main(RUN + ["--output_dir", str(output_dir), "--resume"])
    whole, resumed = _train_losses(tmp_path / "whole"), _train_losses(output_dir)
    assert [record["step"] for record in _records(output_dir) if "loss" in record] == list(range(1, 7))
    for step in range(4, 7):
        assert resumed[step] == pytest.approx(whole[step], rel=1e-6), f"step {step}"


class _Exited(Exception):
    pass


def test_a_second_signal_ends_the_process_at_once(monkeypatch, capfd):
    def exit_at_once(status):
        raise _Exited(status)

    monkeypatch.setattr(guard.os, "_exit", exit_at_once)
    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        assert stop.requested(torch.device("cpu")) == 0
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: the request is recorded
        assert stop.requested(torch.device("cpu")) == signal.SIGINT
        with pytest.raises(_Exited) as exited:
            os.kill(os.getpid(), signal.SIGTERM)
    assert exited.value.args == (128 + signal.SIGTERM,)
    assert "second stop signal (SIGTERM): stopping at once" in capfd.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before


def _worker(torchrun: psutil.Process, rank: int) -> psutil.Process:
    for process in torchrun.children(recursive=True):
        try:
            if process.environ().get("RANK") == str(rank) and "train.py" in " ".join(process.cmdline()):
                return process
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no rank {rank} worker under torchrun")


def test_two_ranks_stop_after_the_same_step_when_one_is_signalled(tmp_path):
    """SIGTERM to rank 1 alone: the stop flag is reduced over ranks every step, so rank 0 stops with it, and
    both write their part of one complete checkpoint."""
    output_dir = tmp_path / "out"
    args = RUN + ["--max_steps", "200", "--toy_num_train", "256", "--save_steps", "0", "--output_dir", str(output_dir)]
    process, log = _launch(2, args, tmp_path)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while max(_train_losses(output_dir), default=0) < 2:
            assert process.poll() is None, f"run ended before the signal:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, "run did not reach step 2"
            time.sleep(0.05)
        _worker(psutil.Process(process.pid), 1).send_signal(signal.SIGTERM)
        process.wait(timeout=TIMEOUT_S)
    except BaseException:
        _kill_tree(process)
        raise
    output = log.read_text()
    assert process.returncode != 0
    lines = re.findall(r"^stopped by SIGTERM after step (\d+)/200: saved (\S+);", output, re.MULTILINE)
    assert len(lines) == 1, output[-4000:]  # printed once, by rank 0
    step, checkpoint = int(lines[0][0]), lines[0][1]
    assert checkpoint == str(output_dir / f"checkpoint-{step}") and 2 <= step < 200
    state = read_trainer_state(checkpoint)
    assert state["global_step"] == step and state["world_size"] == 2
    assert {"rng_state_0.pt", "rng_state_1.pt"} <= set(state["checkpoint_files"])
    verify_checkpoint(checkpoint)
    assert max(_train_losses(output_dir)) == step
