"""What keeps a training run from silently going wrong: steps whose loss or gradient norm is NaN or infinite,
weights that are not finite when they are about to be saved, log records that are not strict JSON, two
runs writing to the same output folder, and a stop signal (preemption, Ctrl-C) that would lose the steps
since the last checkpoint.
"""
import fcntl
import json
import math
import os
import signal
import socket
import threading
import time

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .errors import NonFiniteError, OutputDirBusyError

LOCK_FILE = "run.lock"


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def last_checkpoint_text(output_dir: str) -> str:
    from .checkpoint import completed_checkpoints

    checkpoints = completed_checkpoints(output_dir)
    if not checkpoints:
        return "no checkpoint was saved before it"
    return f"the last checkpoint saved before it is {checkpoints[-1]}"


class NonFiniteSteps:
    """The trainer's rule for optimizer steps whose loss or gradient norm is NaN or infinite.

    The engines never apply such a step (its update would make every weight NaN). Policy 'stop' (the
    default) then ends the run with NonFiniteError, before anything else is saved; 'skip' goes on and counts
    the skipped steps. A gradient norm of exactly 0 is reported once: no parameter moves any more, which on
    real data means a collapsed model (saturated outputs, typically from a learning rate far too high).
    """

    def __init__(self, policy: str, output_dir: str, is_main: bool):
        self.policy, self.output_dir, self.is_main = policy, output_dir, is_main
        self.skipped = 0
        self.reported_zero_norm = False
        self.bad_losses = 0  # this step's non-finite micro-batch losses on this rank (a tensor once counted)

    def observe(self, loss: torch.Tensor) -> torch.Tensor:
        """The micro-batch loss to backpropagate: unchanged (times exactly 1.0) when finite, otherwise times NaN.

        An infinite loss can have a finite gradient (softplus saturates); scaled by NaN its gradient is NaN, so
        the engines' rule covers a bad loss too, on every rank (gradients are reduced across ranks), and no
        host synchronisation is needed per micro-batch.
        """
        finite = torch.isfinite(loss.detach())
        self.bad_losses = self.bad_losses + (~finite).to(torch.float64)
        return loss * torch.where(finite, 1.0, float("nan")).to(loss.dtype)

    def after_step(self, step: int, grad_norm: float):
        """Raise NonFiniteError under 'stop', count the step under 'skip', when it was not applied."""
        bad_losses, self.bad_losses = self.bad_losses, 0
        if math.isfinite(grad_norm):
            if grad_norm == 0.0 and not self.reported_zero_norm and self.is_main:
                tqdm.write(
                    f"warning: step {step}: the gradient norm is exactly 0, so no weight moves any more; the model "
                    "has probably collapsed (saturated outputs, often from a learning rate far too high)"
                )
                self.reported_zero_norm = True
            return
        # Every rank sees the same global gradient norm, so every rank takes this branch and joins the reduce.
        bad_losses = torch.as_tensor(bad_losses, dtype=torch.float64).reshape(1)
        if _world_size() > 1:
            dist.all_reduce(bad_losses)
        what = "gradient norm" if bad_losses.item() == 0 else "loss"
        if self.policy == "stop":
            raise NonFiniteError(
                f"step {step}: the {what} is not finite (gradient norm {grad_norm}); the run stopped without "
                f"applying or saving it, and {last_checkpoint_text(self.output_dir)}. Resume from there with a lower "
                "learning rate, or pass --on_nonfinite skip to skip such steps"
            )
        self.skipped += 1
        if self.is_main:
            tqdm.write(f"warning: step {step}: skipped, the {what} is not finite ({self.skipped} skipped so far)")


def _local_values(parameter: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter: the local shard of an FSDP2 DTensor, the partition of a ZeRO-3 one."""
    from torch.distributed.tensor import DTensor

    if hasattr(parameter, "ds_tensor"):  # DeepSpeed ZeRO-3 keeps an empty placeholder in `.data`
        return parameter.ds_tensor
    if isinstance(parameter, DTensor):
        return parameter.to_local()
    return parameter


@torch.no_grad()
def check_finite_weights(model: torch.nn.Module, what: str):
    """Raise NonFiniteError on every rank when any rank holds a NaN or infinite weight, before `what` is saved."""
    bad = [name for name, parameter in model.named_parameters() if not torch.isfinite(_local_values(parameter)).all()]
    if _world_size() > 1:
        names = [None] * _world_size()
        dist.all_gather_object(names, bad)
        bad = sorted({name for rank_names in names for name in rank_names})
    if bad:
        raise NonFiniteError(
            f"{len(bad)} weight tensor(s) hold NaN or infinite values (first: {bad[0]}); not saving {what}"
        )


def _strict(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # 'nan', 'inf' or '-inf'
    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(item) for item in value]
    return value


def strict_json(record: dict) -> str:
    """One line of standard JSON: a NaN or infinite float is written as the string 'nan', 'inf' or '-inf'
    (bare NaN / Infinity are not JSON, and strict parsers reject the whole file)."""
    return json.dumps(_strict(record), allow_nan=False)


class OutputDirLock:
    """`output_dir/run.lock`, held by global rank 0 for the whole run, so that a second run started on the same
    folder stops at once instead of writing and rotating checkpoints beside the first.

    The lock is a `flock` on the file, which the kernel drops when its process dies, however it dies: a lock
    file left by a killed run is simply taken over. The file names the holder (pid, host, start time) for the
    message the second run prints, and is deleted when the run ends. On a shared filesystem this relies on
    the filesystem's support of file locks (NFSv4 has it).
    """

    def __init__(self, output_dir: str, is_main: bool):
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.is_main = is_main
        self.handle = None

    def __enter__(self):
        problem = self._acquire() if self.is_main else None
        if _world_size() > 1:
            shared = [problem]
            dist.broadcast_object_list(shared, src=0)
            problem = shared[0]
        if problem:
            raise OutputDirBusyError(problem)
        return self

    def _acquire(self) -> str | None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            handle = open(self.path, "a+", encoding="utf-8")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read()
                handle.close()
                return self._busy_message(holder)
            # The holder may have deleted the file between our open and our lock: then lock the new file.
            if os.path.exists(self.path) and os.path.samestat(os.fstat(handle.fileno()), os.stat(self.path)):
                break
            handle.close()
        handle.seek(0)
        handle.truncate()
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        handle.write(json.dumps(holder) + "\n")
        handle.flush()
        self.handle = handle
        return None

    def _busy_message(self, holder: str) -> str:
        try:
            holder = json.loads(holder)
            who = f"pid {holder['pid']} on host {holder['host']}, started {holder['started']}"
        except (ValueError, KeyError, TypeError):
            who = "a process that has not written its name yet"
        return (
            f"output_dir {os.path.dirname(self.path)!r} is in use by another run ({who}); wait for it to end or "
            "choose another --output_dir"
        )

    def __exit__(self, *exc_info):
        if self.handle is not None:
            os.remove(self.path)  # before unlocking, so that nobody can lock the file on its way out
            self.handle.close()
            self.handle = None
        return False


class StopSignals:
    """While active, SIGTERM (what SLURM, Kubernetes and torchrun send before killing) and SIGINT (Ctrl-C) ask
    the run to stop after the step in progress instead of ending it at once; a second signal ends the
    process at once (status 128 + its number), without a checkpoint.

    The handler only records the signal; the trainer asks `requested()` after every step, which every rank
    answers together (a maximum over ranks), so that all ranks stop after the same step even when only some
    received the signal. Outside the main thread (where Python cannot install handlers) it does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received = 0  # the first signal's number, 0 before any
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}
        return False

    def _handle(self, signum, frame):
        if self.received:
            # os.write: a print could re-enter a write the signal interrupted.
            os.write(2, f"error: second stop signal ({signal.Signals(signum).name}): stopping at once, without "
                        "saving a checkpoint\n".encode())
            os._exit(128 + signum)
        self.received = signum

    def requested(self, device: torch.device) -> int:
        """The number of the signal any rank has received, 0 if none. Collective: every rank calls it."""
        flag = torch.tensor([self.received], dtype=torch.int64, device=device)
        if _world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
