"""Checkpoint folders: written under a temporary name and renamed when complete, so that a crash never leaves
a half-written `checkpoint-N` for `--resume` to pick up; verified against a manifest on resume; the last K are
kept; RNG state per rank.

Layout of `output_dir/checkpoint-N/`: the engine's sharded state (DCP `dcp/` + `scheduler.pt` for FSDP2,
DeepSpeed's own `deepspeed/` folder for ZeRO-3), `rng_state_<rank>.pt`, `trainer_state.json` (step, data
position, number of processes, settings, and the list of every file the save wrote) and `manifest.json` (size
and xxh3-64 hash of every other file), both written after every rank has finished. A resume refuses a
checkpoint unless the manifest lists, and matches, the trainer state and every file that it names. A save
that cannot be written (a full disk) is abandoned on every rank and its temporary folder removed.
`output_dir` must be visible to every node (a shared filesystem) for multi-node runs.
"""
import errno
import json
import os
import posixpath
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from .errors import CheckpointError
from .guard import check_finite_weights, last_checkpoint_text

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TEMPORARY_SUFFIX = ".tmp"
# A checkpoint being deleted is first renamed to this suffix, out of the set that --resume considers.
DELETING_SUFFIX = ".deleting"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
# The trainer state's list of every file the save wrote, which the manifest must vouch for on resume.
CHECKPOINT_FILES = "checkpoint_files"
HASH_BLOCK_BYTES = 1 << 24
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# torch.save's zip writer reports a write the disk could not take by the stream position it expected.
SHORT_WRITE = re.compile(r"unexpected pos \d+ vs \d+|file write failed|No space left on device|Disk quota exceeded")


def completed_checkpoints(output_dir: str) -> list[str]:
    """Checkpoint folders of output_dir that a save completed, oldest first: those holding a trainer state or a
    manifest (a save renames its folder into place only once both are written, so a `checkpoint-N` with only
    one of them is damaged, not half-written). Temporary and half-deleted folders are ignored."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_PATTERN.match(name)
        path = os.path.join(output_dir, name)
        if match and any(os.path.isfile(os.path.join(path, marker)) for marker in (TRAINER_STATE, MANIFEST)):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def resolve_resume(resume: str, output_dir: str) -> str:
    """The folder to resume from: the given one, or the newest complete one in output_dir for 'latest'. A
    damaged newest checkpoint is refused, never passed over for an older one."""
    if resume == "latest":
        checkpoints = completed_checkpoints(output_dir)
        if not checkpoints:
            raise CheckpointError(f"--resume latest: no complete checkpoint-N folder in {output_dir!r}")
        resume = checkpoints[-1]
    if not os.path.isfile(os.path.join(resume, TRAINER_STATE)):
        if os.path.isfile(os.path.join(resume, MANIFEST)):
            raise _damaged(resume, f"it has a {MANIFEST} but no {TRAINER_STATE} (deleted after the save)")
        raise CheckpointError(f"--resume {resume!r}: not a complete checkpoint folder (no {TRAINER_STATE})")
    return resume


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _gather(value) -> list:
    _, world = _rank_world()
    if world == 1:
        return [value]
    gathered = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


def file_digest(path: str) -> str:
    """xxh3-64 of a file's bytes: several GB/s, so hashing costs little next to writing the file."""
    import xxhash

    digest = xxhash.xxh3_64()
    with open(path, "rb") as handle:
        while block := handle.read(HASH_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: str) -> list[str]:
    """Every file under folder except the manifest, as sorted '/'-separated relative paths."""
    found = []
    for root, _, names in os.walk(folder):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if relative != MANIFEST:
                found.append(relative)
    return sorted(found)


def write_manifest(folder: str):
    """Every rank hashes a share of the folder's files; rank 0 writes manifest.json. Collective."""
    rank, world = _rank_world()
    mine = {}
    for name in _files(folder)[rank::world]:
        path = os.path.join(folder, name)
        mine[name] = {"bytes": os.path.getsize(path), "xxh3_64": file_digest(path)}
    entries = {name: entry for share in _gather(mine) for name, entry in share.items()}
    if rank == 0:
        with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as handle:
            json.dump({"files": dict(sorted(entries.items()))}, handle, indent=1)


def _file_problem(folder: str, name: str, entry: dict) -> str | None:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return f"{path} is missing"
    size = os.path.getsize(path)
    if size != entry["bytes"]:
        return f"{path} has {size} bytes where {MANIFEST} records {entry['bytes']} (truncated or overwritten)"
    if file_digest(path) != entry["xxh3_64"]:
        return f"{path} differs from the hash {MANIFEST} records (its bytes changed after the save)"
    return None


def _damaged(folder: str, problem: str, more: int = 0) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {folder} is damaged: {problem}"
        + (f" ({more} more bad file(s))" if more else "")
        + "; resume from an earlier checkpoint with --resume PATH"
    )


def _is_entry(name, entry) -> bool:
    """A manifest entry: a relative path that stays inside the folder, with an integer size and a hash string."""
    return (
        isinstance(name, str) and name == posixpath.normpath(name) and not name.startswith(("/", "../"))
        and name != ".." and isinstance(entry, dict) and type(entry.get("bytes")) is int
        and isinstance(entry.get("xxh3_64"), str)
    )


def _manifest_entries(folder: str) -> dict:
    """The manifest's {file: {bytes, xxh3_64}}, refused in one line unless it has exactly that shape."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"checkpoint {folder} has no {MANIFEST}, so its files cannot be verified (damaged, or written by an "
            "older version of this trainer)"
        )
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError) as error:
        raise _damaged(folder, f"{path} cannot be read ({error})") from None
    entries = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(entries, dict):
        raise _damaged(folder, f"{path} holds no 'files' object mapping each file to its size and hash")
    for name, entry in entries.items():
        if not _is_entry(name, entry):
            raise _damaged(folder, f"{path}: entry {name!r} is not a file inside the checkpoint with its "
                                   "'bytes' and 'xxh3_64'")
    return entries


def _vouched_trainer_state(folder: str, entries: dict) -> dict:
    """trainer_state.json, once the manifest lists it and its size and hash match."""
    if TRAINER_STATE not in entries:
        raise _damaged(folder, f"{MANIFEST} does not list {TRAINER_STATE}, which every checkpoint needs")
    if problem := _file_problem(folder, TRAINER_STATE, entries[TRAINER_STATE]):
        raise _damaged(folder, problem)
    try:
        state = read_trainer_state(folder)
    except (OSError, ValueError) as error:
        raise _damaged(folder, f"{os.path.join(folder, TRAINER_STATE)} cannot be read ({error})") from None
    if not isinstance(state, dict):
        raise _damaged(folder, f"{os.path.join(folder, TRAINER_STATE)} holds no JSON object")
    return state


def verify_checkpoint(folder: str, check_state=None) -> dict:
    """The folder's trainer state, once every file the checkpoint needs is listed in its manifest and every
    listed file is there with its size and hash; otherwise CheckpointError on every rank, naming the first bad
    file. The files a checkpoint needs are trainer_state.json and those it names (everything the engine and the
    ranks wrote: shards, metadata, scheduler, RNG states), so an emptied or edited manifest vouches for
    nothing. `check_state(state)`, when given, runs as soon as the trainer state is vouched for, before the
    other files are hashed. Every rank hashes a share of the files. Collective."""
    rank, world = _rank_world()
    entries = _manifest_entries(folder)
    state = _vouched_trainer_state(folder, entries)
    if check_state is not None:
        check_state(state)
    needed = state.get(CHECKPOINT_FILES)
    if not (isinstance(needed, list) and all(isinstance(name, str) for name in needed)):
        raise _damaged(folder, f"{os.path.join(folder, TRAINER_STATE)} does not list the checkpoint's files "
                               f"('{CHECKPOINT_FILES}'; edited, or written by an older version of this trainer)")
    unlisted = [name for name in needed if name not in entries]
    if unlisted:
        raise _damaged(folder, f"{MANIFEST} does not list {os.path.join(folder, unlisted[0])}, which the "
                               "checkpoint needs", len(unlisted) - 1)
    problems = [problem for name, entry in sorted(entries.items())[rank::world]
                if (problem := _file_problem(folder, name, entry))]
    problems = sorted(problem for share in _gather(problems) for problem in share)
    if problems:
        raise _damaged(folder, problems[0], len(problems) - 1)
    return state


def _remove(folder: str):
    """Delete a checkpoint folder: renamed out of the complete set first, so that a crash halfway through the
    deletion never leaves a `checkpoint-N` that looks complete without its shards."""
    doomed = folder + DELETING_SUFFIX
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class _WriteFailed(Exception):
    """Some rank could not write its part of a save: per failure (rank, whether the disk was full, first line of
    the error); `local` is this rank's own error, if it had one."""

    def __init__(self, failures: list, local: BaseException | None):
        super().__init__(failures)
        self.failures, self.local = failures, local


def _disk_full(error: BaseException) -> BaseException | None:
    """The error in `error`'s chain (or among DCP's per-rank failures) that says the disk is full, if any."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return current
        if isinstance(current, RuntimeError) and SHORT_WRITE.search(str(current)):
            return current
        if isinstance(current, CheckpointException):
            failures = current.failures.values()
            pending.extend(failure[0] if isinstance(failure, tuple) else failure for failure in failures)
        pending.extend((current.__cause__, current.__context__))
    return None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _agreed(write):
    """Run this rank's share of a save's writing; raise _WriteFailed on every rank if any rank failed (instead
    of leaving the others waiting at the next collective). Collective."""
    rank, _ = _rank_world()
    try:
        write()
        failure = None
    except (Exception, CheckpointException) as error:  # DCP's CheckpointException is a BaseException
        failure = error
    report = None
    if failure is not None:
        full = _disk_full(failure)
        report = (rank, full is not None, _first_line(full or failure))
    failures = [item for item in _gather(report) if item is not None]
    if failures:
        raise _WriteFailed(failures, failure)


def _abandoned(failed: _WriteFailed, what: str, output_dir: str) -> BaseException:
    """The error every rank raises for a save that failed: one line when the disk is full; otherwise this rank's
    own error, or a RuntimeError naming the rank that failed."""
    full = [detail for _, is_full, detail in failed.failures if is_full]
    if full:
        return CheckpointError(
            f"{what} abandoned: the disk holding {output_dir} is full ({full[0]}); its partial files were removed, "
            f"and the earlier checkpoints and the log are untouched ({last_checkpoint_text(output_dir)}). Free "
            "some space (or lower --save_total_limit), then continue with --resume"
        )
    if failed.local is not None:
        return failed.local
    rank, _, detail = failed.failures[0]
    return RuntimeError(f"rank {rank} could not write {what}: {detail}")


def _write_trainer_state(temporary: str, trainer_state: dict):
    trainer_state = {**trainer_state, CHECKPOINT_FILES: _files(temporary)}
    with open(os.path.join(temporary, TRAINER_STATE), "w", encoding="utf-8") as handle:
        json.dump(trainer_state, handle, indent=2)


def save_checkpoint(engine, output_dir: str, step: int, trainer_state: dict, keep_last: int, rank: int) -> str:
    """Every rank writes its part into checkpoint-N.tmp; rank 0 writes the trainer state, every rank hashes a
    share of the files for the manifest, and rank 0 renames the folder to checkpoint-N, then rotates. When a
    rank cannot write (a full disk), every rank stops, the temporary folder is removed, and nothing older is
    touched."""
    check_finite_weights(engine.policy, f"checkpoint-{step}")
    final = os.path.join(output_dir, f"checkpoint-{step}")
    temporary = final + TEMPORARY_SUFFIX
    if rank == 0:
        shutil.rmtree(temporary, ignore_errors=True)  # left over from a crash at this very step
        for name in os.listdir(output_dir):  # left over from a crash during a rotation
            if CHECKPOINT_PATTERN.match(name.removesuffix(DELETING_SUFFIX)) and name.endswith(DELETING_SUFFIX):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    try:
        _agreed(lambda: os.makedirs(temporary) if rank == 0 else None)
        _agreed(lambda: (engine.save(temporary),
                         torch.save(rng_state(), os.path.join(temporary, f"rng_state_{rank}.pt"))))
        _agreed(lambda: _write_trainer_state(temporary, trainer_state) if rank == 0 else None)
        _agreed(lambda: write_manifest(temporary))
    except _WriteFailed as failed:
        if rank == 0:
            shutil.rmtree(temporary, ignore_errors=True)
        raise _abandoned(failed, f"checkpoint-{step}", output_dir) from failed.local
    if rank == 0:
        if os.path.exists(final):  # a checkpoint of the same step from before a resume
            _remove(final)
        os.replace(temporary, final)
        for stale in completed_checkpoints(output_dir)[:-keep_last] if keep_last else []:
            _remove(stale)
    dist.barrier()
    return final


def read_trainer_state(path: str) -> dict:
    with open(os.path.join(path, TRAINER_STATE), encoding="utf-8") as handle:
        return json.load(handle)


def _processes(count: int) -> str:
    return f"{count} process" if count == 1 else f"{count} processes"


def _check_compatible(path: str, state: dict, backend: str, world_size: int):
    """One-line refusals for checkpoints this run's engine cannot load."""
    saved_backend = state["config"]["backend"]
    if saved_backend != backend:
        raise CheckpointError(
            f"checkpoint {path} was written by --backend {saved_backend}; resume it with --backend {saved_backend}"
        )
    saved_world = state["world_size"]
    if backend == "deepspeed" and saved_world != world_size:
        raise CheckpointError(
            f"checkpoint {path} was written by {_processes(saved_world)} and this run has {world_size}: DeepSpeed "
            f"ZeRO-3 checkpoints load only on the same number, so relaunch with {_processes(saved_world)} in total "
            "(--backend fsdp2 checkpoints reshard to any number)"
        )


def load_checkpoint(engine, path: str, rank: int, backend: str) -> dict:
    """Verify the folder against its manifest, then restore the engine (model, optimizer, scheduler) and this
    rank's RNG; returns the trainer state. Collective."""
    state = verify_checkpoint(path, lambda state: _check_compatible(path, state, backend, _rank_world()[1]))
    engine.load(path)
    rng_file = os.path.join(path, f"rng_state_{rank}.pt")
    if os.path.isfile(rng_file):  # absent when resuming on more ranks than saved: those keep their seed
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def _readable_like_new_files(directory: str):
    """Give the saved files the permissions of any new file (0666 less the umask): transformers writes the
    weights through a private temporary file, which leaves them readable by their owner only."""
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            os.chmod(path, 0o666 & ~umask)


def save_pretrained(engine, policy, tokenizer, directory: str, dtype: torch.dtype, rank: int, base_model: str = "",
                    merge_adapters: bool = False):
    """A Hugging Face folder (safetensors weights, config, tokenizer) that from_pretrained loads; for a policy
    with adapters a peft adapter folder on `base_model`, or with `merge_adapters` the merged model's folder.

    Written beside `directory` and renamed into place once complete, so a run killed while saving leaves
    no folder that looks finished (an older `directory` stays until the new one replaces it)."""
    check_finite_weights(engine.policy, directory)
    state = engine.full_state_dict()  # collective: every rank takes part
    partial = directory.rstrip(os.sep) + ".partial"

    def write():
        prefix = "causal_lm."
        weights = {key[len(prefix):]: value.to(dtype) for key, value in state.items() if key.startswith(prefix)}
        causal_lm = policy.causal_lm
        causal_lm.config.dtype = dtype
        shutil.rmtree(partial, ignore_errors=True)
        if policy.peft_model is not None:
            from .adapters import write_adapter_folder

            write_adapter_folder(policy.peft_model, weights, partial, base_model, merge=merge_adapters)
        else:
            causal_lm.save_pretrained(partial, state_dict=weights, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        _readable_like_new_files(partial)

    try:
        _agreed(write if rank == 0 else lambda: None)
    except _WriteFailed as failed:
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise _abandoned(failed, directory, os.path.dirname(directory.rstrip(os.sep)) or ".") from failed.local
    if rank == 0:
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(partial, directory)
    dist.barrier()
