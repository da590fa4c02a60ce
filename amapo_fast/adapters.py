"""LoRA and QLoRA adapters through peft: the decoder's linear layers get low-rank adapters, everything else
(the base weights, the embeddings, the lm_head that the fused loss head reads) stays frozen.

`add_adapters` injects them into a loaded causal LM in place (peft's `get_peft_model`); the `PeftModel` it
returns shares every module with that causal LM. The policy keeps it beside the module tree, so the engines
shard one model; it serves three things:
  - `DisabledAdapters(model, peft_model)`: the policy with its adapters switched off (peft's
    `disable_adapter`), i.e. the base model, as the frozen reference of a loss that needs one, without a
    second copy of the model in memory;
  - `write_adapter_folder`: a peft adapter folder (`adapter_config.json`, `adapter_model.safetensors`) that
    `peft.AutoPeftModelForCausalLM` loads, or with `merge=True` a plain `from_pretrained` folder with the
    adapters merged into the weights; both from a whole state dict (gathered from a sharded model);
  - `load_adapter_folder`: the base model with an adapter folder merged in (the evaluation's way to read one).
peft and bitsandbytes are optional: `pip install 'amapo-fast[peft]'` (4-bit QLoRA: `[qlora]`, CUDA only).
"""
import copy
import dataclasses
import importlib.util
import json
import os

import torch

from .cli import UserError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ALL_LINEAR = "all-linear"  # peft's name for every linear layer except the output layer
# The embedded default has no hub name: its adapter folder carries the base model in this subfolder.
BASE_SUBFOLDER = "base_model"


@dataclasses.dataclass
class AdapterSettings:
    r: int
    alpha: float
    dropout: float
    target_modules: str  # "all-linear" or comma-separated module names
    load_in_4bit: bool = False


def settings_from(config) -> AdapterSettings | None:
    """The adapter settings of a TrainConfig (or of its saved dict), None unless it trains adapters."""
    values = config if isinstance(config, dict) else vars(config)
    if not values.get("use_peft"):
        return None
    return AdapterSettings(
        r=values["lora_r"], alpha=values["lora_alpha"], dropout=values["lora_dropout"],
        target_modules=values["lora_target_modules"], load_in_4bit=values["load_in_4bit"],
    )


def target_modules(text: str):
    """`all-linear`, or the list of module names of a comma-separated string."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    return ALL_LINEAR if names == [ALL_LINEAR] else names


def require_packages(settings: AdapterSettings, device: torch.device):
    """One line naming what is missing (peft, bitsandbytes) or impossible (4-bit off CUDA)."""
    if importlib.util.find_spec("peft") is None:
        raise UserError("--use_peft needs the peft package: pip install peft (or pip install 'amapo-fast[peft]')")
    if settings.load_in_4bit:
        if device.type != "cuda":
            raise UserError(f"--load_in_4bit (QLoRA) needs a CUDA device; this run is on {device.type}")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError(
                "--load_in_4bit needs the bitsandbytes package: pip install bitsandbytes (or 'amapo-fast[qlora]')"
            )


def quantization_config():
    """QLoRA's 4-bit NF4 weights with bf16 compute, stored as bf16 so that FSDP2 and ZeRO-3 can shard them."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16,
    )


def lora_config(settings: AdapterSettings):
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM", r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=target_modules(settings.target_modules), bias="none",
    )


def add_adapters(causal_lm, settings: AdapterSettings, gradient_checkpointing: bool = False):
    """Freeze `causal_lm` and inject LoRA adapters into it in place; returns the `PeftModel` around it.

    With gradient checkpointing the input embeddings' output is made to require grad (peft's usual hook):
    with every embedding frozen, a recomputed layer would otherwise see inputs that need no gradient."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if settings.load_in_4bit:
        causal_lm = prepare_model_for_kbit_training(
            causal_lm, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        causal_lm.enable_input_require_grads()
    return get_peft_model(causal_lm, lora_config(settings))


def has_adapters(weights: dict) -> bool:
    """Whether a state dict holds LoRA adapter weights."""
    return any(".lora_" in key for key in weights)


class DisabledAdapters:
    """The policy with its adapters switched off for the duration of each call: the base model, which is the
    frozen reference (DPO's) of adapter training, at no extra memory. Everything else (eval(), train(),
    parameters()) is the policy's."""

    def __init__(self, model, peft_model):
        self.model, self.peft_model = model, peft_model

    def __call__(self, *args, **kwargs):
        with self.peft_model.disable_adapter():
            return self.model(*args, **kwargs)

    @torch.no_grad()
    def sequence_logps(self, batch):
        return self(batch, sequence_logps=True)

    def __getattr__(self, name):
        return getattr(self.model, name)


def _rebuilt(peft_model, weights: dict):
    """A copy of `peft_model`'s architecture built on the meta device whose tensors are `weights` (assigned, not
    copied): a whole, unsharded model on rank 0 to save or merge, without a second allocation."""
    from peft import get_peft_model

    causal_lm = peft_model.get_base_model()
    with torch.device("meta"):
        fresh = type(causal_lm)(causal_lm.config)
    fresh = get_peft_model(fresh, copy.deepcopy(peft_model.peft_config[peft_model.active_adapter]))
    fresh.get_base_model().load_state_dict(weights, strict=False, assign=True)
    return fresh


def write_adapter_folder(peft_model, weights: dict, directory: str, base_model: str, merge: bool = False):
    """Write `directory` from `weights` (the causal LM's whole state dict, adapters included).

    merge=False: a peft adapter folder whose base is `base_model`; for the embedded default ('toy'), which no
    hub serves, the base model is written too (`base_model/` inside, recorded by its absolute path, so the
    folder must stay where it is written). merge=True: a from_pretrained folder with the adapters merged in.
    The tokenizer is the caller's to add."""
    from .model import TOY

    fresh = _rebuilt(peft_model, weights)
    if merge:
        merged = fresh.merge_and_unload()
        merged.save_pretrained(directory, state_dict=merged.state_dict(), safe_serialization=True)
        return
    final_place = os.path.abspath(directory.removesuffix(".partial"))
    peft_config = fresh.peft_config[fresh.active_adapter]
    peft_config.base_model_name_or_path = os.path.join(final_place, BASE_SUBFOLDER) if base_model == TOY else base_model
    # The vocabulary is never resized here: no full embedding layers to save beside the adapters.
    fresh.save_pretrained(directory, safe_serialization=True, save_embedding_layers=False)
    if base_model == TOY:
        base = fresh.unload()
        base.save_pretrained(os.path.join(directory, BASE_SUBFOLDER), state_dict=base.state_dict(),
                             safe_serialization=True)


def is_adapter_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def adapter_base(path: str) -> str:
    """The base model an adapter folder was trained on."""
    with open(os.path.join(path, ADAPTER_CONFIG), encoding="utf-8") as handle:
        return json.load(handle)["base_model_name_or_path"]


def load_adapter_folder(path: str, load_base):
    """`load_base(name)` -> the base causal LM; returns it with the adapters of the folder at `path` merged in."""
    if importlib.util.find_spec("peft") is None:
        raise UserError(f"{path} is a peft adapter folder: reading it needs the peft package (pip install peft)")
    from peft import PeftModel

    base = load_base(adapter_base(path))
    return PeftModel.from_pretrained(base, path).merge_and_unload()
