"""Checkpoint folders: written under a temporary name and renamed when complete, so that a crash never leaves
a half-written `checkpoint-N` for `--resume` to pick up; the last K are kept; RNG state per rank.

Layout of `output_dir/checkpoint-N/`: the engine's sharded state (DCP `dcp/` + `scheduler.pt` for FSDP2,
DeepSpeed's own `deepspeed/` folder for ZeRO-3), `rng_state_<rank>.pt` and `trainer_state.json` (written
last). `output_dir` must be visible to every node (a shared filesystem) for multi-node runs.
"""
import json
import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TEMPORARY_SUFFIX = ".tmp"
TRAINER_STATE = "trainer_state.json"


def completed_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoint folders of output_dir, oldest first (temporary folders are ignored)."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_PATTERN.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(path, TRAINER_STATE)):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def resolve_resume(resume: str, output_dir: str) -> str:
    """The folder to resume from: the given one, or the newest complete one in output_dir for 'latest'."""
    if resume == "latest":
        checkpoints = completed_checkpoints(output_dir)
        if not checkpoints:
            raise FileNotFoundError(f"--resume latest: no complete checkpoint-N folder in {output_dir!r}")
        return checkpoints[-1]
    if not os.path.isfile(os.path.join(resume, TRAINER_STATE)):
        raise FileNotFoundError(f"--resume {resume!r}: not a complete checkpoint folder (no {TRAINER_STATE})")
    return resume


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


def save_checkpoint(engine, output_dir: str, step: int, trainer_state: dict, keep_last: int, rank: int) -> str:
    """Every rank writes its part into checkpoint-N.tmp; rank 0 marks it complete and renames it."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    temporary = final + TEMPORARY_SUFFIX
    if rank == 0:
        shutil.rmtree(temporary, ignore_errors=True)  # left over from a crash at this very step
        os.makedirs(temporary)
    dist.barrier()
    engine.save(temporary)
    torch.save(rng_state(), os.path.join(temporary, f"rng_state_{rank}.pt"))
    dist.barrier()
    if rank == 0:
        with open(os.path.join(temporary, TRAINER_STATE), "w", encoding="utf-8") as handle:
            json.dump(trainer_state, handle, indent=2)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        for stale in completed_checkpoints(output_dir)[:-keep_last] if keep_last else []:
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(engine, path: str, rank: int) -> dict:
    """Restore the engine (model, optimizer, scheduler) and this rank's RNG; returns the trainer state."""
    engine.load(path)
    rng_file = os.path.join(path, f"rng_state_{rank}.pt")
    if os.path.isfile(rng_file):  # absent when resuming on more ranks than saved: those keep their seed
        set_rng_state(torch.load(rng_file, weights_only=False))
    with open(os.path.join(path, TRAINER_STATE), encoding="utf-8") as handle:
        return json.load(handle)


def save_pretrained(engine, policy, tokenizer, directory: str, dtype: torch.dtype, rank: int):
    """A Hugging Face folder (safetensors weights, config, tokenizer) that from_pretrained loads."""
    state = engine.full_state_dict()  # collective: every rank takes part
    if rank == 0:
        prefix = "causal_lm."
        weights = {key[len(prefix):]: value.to(dtype) for key, value in state.items() if key.startswith(prefix)}
        causal_lm = policy.causal_lm
        causal_lm.config.dtype = dtype
        causal_lm.save_pretrained(directory, state_dict=weights, safe_serialization=True)
        tokenizer.save_pretrained(directory)
    dist.barrier()
