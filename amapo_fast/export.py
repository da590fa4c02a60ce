"""Export a training checkpoint: `python -m amapo_fast.export <output_dir>/checkpoint-N <folder>`.

Writes a `from_pretrained` folder (safetensors weights, config, tokenizer) from the sharded checkpoint of
either backend, on one process with no process group: FSDP2's DCP shards are read whole
(`torch.distributed.checkpoint`, `no_dist`), DeepSpeed ZeRO-3's fp32 partitions are merged by DeepSpeed's
own `zero_to_fp32`. A checkpoint of an adapter run holds only the adapters; its export is a peft adapter
folder on the run's base model (loadable with `peft.AutoPeftModelForCausalLM`), or with `--merge_adapters`
the base model with the adapters merged in (the base is then read as the run read it).
"""
import os

import torch

from . import adapters
from .checkpoint import read_trainer_state, verify_checkpoint
from .cli import ArgumentParser, HelpFormatter, UserError, add_debug_flag, check_output_dir, exits_cleanly_on_user_errors
from .errors import CheckpointError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODEL_PREFIX = "causal_lm."  # the policy's name for the causal LM it wraps


def _dcp_weights(directory: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(directory).read_metadata().state_dict_metadata
    prefix = "model."
    template = {
        key[len(prefix):]: torch.empty(entry.size, dtype=entry.properties.dtype)
        for key, entry in metadata.items() if key.startswith(prefix) and hasattr(entry, "size")
    }
    state = {"model": template}
    dcp.load(state, checkpoint_id=directory, no_dist=True)
    return state["model"]


def checkpoint_weights(path: str) -> dict:
    """The policy's weights that a checkpoint holds (fp32, on CPU), by the policy's parameter names: every
    weight for a full fine-tuning run, the adapters only for an adapter run."""
    backend = read_trainer_state(path)["config"]["backend"]
    if backend == "fsdp2":
        return _dcp_weights(os.path.join(path, "dcp"))
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(path, tag="deepspeed"))


def export_checkpoint(path: str, folder: str, dtype: torch.dtype = torch.float32, merge_adapters: bool = False):
    """Write `folder` from the checkpoint at `path` (see the module docstring)."""
    from transformers import set_seed

    from .model import load_causal_lm, load_tokenizer

    verify_checkpoint(path)
    config = read_trainer_state(path)["config"]
    weights = {key[len(MODEL_PREFIX):]: value for key, value in checkpoint_weights(path).items()
               if key.startswith(MODEL_PREFIX)}
    name = config["model_name_or_path"]
    tokenizer = load_tokenizer(config.get("tokenizer_name_or_path") or name)
    settings = adapters.settings_from(config)
    if settings is None:
        if merge_adapters:
            raise UserError(f"--merge_adapters: checkpoint {path} is of a full fine-tuning run, it has no adapters")
        # Every weight is in the checkpoint: the architecture is built on the meta device, nothing else is read.
        causal_lm = load_causal_lm(name, tokenizer=tokenizer, empty=True, liger_kernels=False)
        _check_names(path, weights, causal_lm.state_dict())
        causal_lm.config.dtype = dtype
        causal_lm.save_pretrained(folder, state_dict={k: v.to(dtype) for k, v in weights.items()},
                                  safe_serialization=True)
    else:
        set_seed(config["seed"])  # the embedded default's base is the run's random init
        causal_lm = load_causal_lm(name, tokenizer=tokenizer, dtype=dtype, liger_kernels=False)
        peft_model = adapters.add_adapters(causal_lm, settings)
        state = causal_lm.state_dict()
        _check_names(path, weights, {key: value for key, value in state.items() if ".lora_" in key})
        state.update(weights)
        causal_lm.config.dtype = dtype
        adapters.write_adapter_folder(
            peft_model, {k: v.to(dtype) for k, v in state.items()}, folder, name, merge=merge_adapters
        )
    tokenizer.save_pretrained(folder)


def _check_names(path: str, weights: dict, expected: dict):
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        problem = f"lacks {missing[0]}" if missing else f"holds {unexpected[0]}, which the model has not"
        raise CheckpointError(
            f"checkpoint {path} {problem} ({len(missing)} missing, {len(unexpected)} unexpected weight(s)): it does "
            "not match the model its trainer_state.json names"
        )


def parse_args(argv=None):
    parser = ArgumentParser(
        prog="python -m amapo_fast.export", formatter_class=HelpFormatter,
        description="Write a from_pretrained folder (or, for an adapter run, a peft adapter folder) from a "
                    "training checkpoint of either backend, with the tokenizer.",
    )
    parser.add_argument("checkpoint", help="a checkpoint folder, <output_dir>/checkpoint-N")
    parser.add_argument("folder", help="the folder to write (must not exist or be empty)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the written weights")
    parser.add_argument("--merge_adapters", action="store_true",
                        help="adapter runs: write the base model with the adapters merged in, not an adapter folder")
    add_debug_flag(parser)
    return parser.parse_args(argv)


@exits_cleanly_on_user_errors
def main(argv=None):
    args = parse_args(argv)
    if not os.path.isdir(args.checkpoint):
        raise UserError(f"checkpoint {args.checkpoint}: no such folder")
    check_output_dir(args.folder, "folder", must_be_empty=True)
    export_checkpoint(args.checkpoint, args.folder, DTYPES[args.dtype], args.merge_adapters)
    print(f"wrote {args.folder}")


if __name__ == "__main__":
    main()
