"""The policy: a causal LM whose lm_head is replaced, for training, by the fused preference loss.

`PreferencePolicy(batch)` runs the decoder backbone to the last hidden states and hands them to a
`LinearPreferenceHead` that shares the lm_head weight, so [tokens x vocab] logits never exist. Every
entry point goes through `forward` (the root module) and the head's own `forward`: FSDP2 unshards a
module's parameters, and ZeRO-3 gathers them, only when that module's forward runs.
"""
import functools
import importlib
import importlib.util
import logging

import torch
from torch import nn

from . import adapters, prefix
from .loss import LinearPreferenceHead

TOY = "toy"  # the embedded default's name for the model and tokenizer (see toy.py)
logger = logging.getLogger(__name__)
# Liger-Kernel's patch function per model family, and the name of its gated-MLP switch there. Only the trunk
# kernels (RMSNorm, gated MLP, RoPE): its cross-entropy losses would compute what our fused head replaces.
LIGER_PATCHES = {
    "llama": ("apply_liger_kernel_to_llama", "swiglu"),
    "mistral": ("apply_liger_kernel_to_mistral", "swiglu"),
    "qwen2": ("apply_liger_kernel_to_qwen2", "swiglu"),
    "gemma": ("apply_liger_kernel_to_gemma", "geglu"),
}


def resolve_attn_implementation(requested: str = "auto", prefix_sharing: bool = False) -> str:
    """flash_attention_2 when it is installed and a GPU is present, else PyTorch's sdpa. With prefix sharing,
    which needs a mask that flash-attention-2 cannot take: FlexAttention on a GPU (it skips the mask's empty
    blocks), sdpa with a boolean mask elsewhere."""
    if requested != "auto":
        if prefix_sharing and requested not in prefix.ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"attn_implementation={requested!r} cannot take prefix sharing's attention mask: use one of "
                f"{', '.join(prefix.ATTN_IMPLEMENTATIONS)} (or auto), or turn prefix sharing off"
            )
        return requested
    if prefix_sharing:
        return "flex_attention" if torch.cuda.is_available() else "sdpa"
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_tokenizer(name_or_path: str):
    """The model's tokenizer (the toy one for 'toy'); a missing pad token falls back to EOS."""
    if name_or_path == TOY:
        from .toy import build_toy_tokenizer

        return build_toy_tokenizer()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and labels, so any id serves.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _without_dropout(config):
    """Preference training runs with dropout off (as the authors do): every *dropout* probability set to 0."""
    for name, value in config.to_dict().items():
        if "dropout" in name and isinstance(value, float):
            setattr(config, name, 0.0)
    return config


def _model_config(name_or_path: str, tokenizer=None):
    """The architecture's config with dropout off; 'toy' is the tiny Llama of toy.py."""
    if name_or_path == TOY:
        from .toy import build_toy_tokenizer, tiny_llama_config

        return _without_dropout(tiny_llama_config(tokenizer or build_toy_tokenizer()))
    from transformers import AutoConfig

    config = _without_dropout(AutoConfig.from_pretrained(name_or_path))
    if getattr(config, "final_logit_softcapping", None):
        raise ValueError(f"{name_or_path}: final logit soft-capping is not supported by the fused preference loss")
    return config


def load_causal_lm(
    name_or_path: str,
    *,
    tokenizer=None,
    dtype=torch.float32,
    attn_implementation="auto",
    empty=False,
    prefix_sharing=False,
    liger_kernels=True,
    load_in_4bit=False,
):
    """An `AutoModelForCausalLM` with dropout off; 'toy' builds the tiny random-init Llama of toy.py; a peft
    adapter folder is its base model with the adapters merged in.

    `empty=True` builds the architecture on the meta device: no memory, no weights read. FSDP2's
    ranks other than 0 do so and receive their shards of rank 0's weights once the model is sharded.
    `prefix_sharing=True` picks an attention implementation that takes prefix sharing's mask.
    `liger_kernels`: Liger-Kernel's trunk kernels on CUDA when installed (`apply_liger_trunk_kernels`); the
    account of what was applied is the model's `liger_status` attribute. `load_in_4bit`: QLoRA's 4-bit base.
    """
    from transformers import AutoModelForCausalLM

    if name_or_path != TOY and adapters.is_adapter_folder(name_or_path):
        load_base = functools.partial(
            load_causal_lm, tokenizer=tokenizer, dtype=dtype, attn_implementation=attn_implementation, empty=empty,
            prefix_sharing=prefix_sharing, liger_kernels=liger_kernels,
        )
        return adapters.load_adapter_folder(name_or_path, load_base)
    config = _model_config(name_or_path, tokenizer)
    kwargs = dict(dtype=dtype, attn_implementation=resolve_attn_implementation(attn_implementation, prefix_sharing))
    if load_in_4bit:
        kwargs["quantization_config"] = adapters.quantization_config()
    if empty:
        with torch.device("meta"):
            causal_lm = AutoModelForCausalLM.from_config(config, **kwargs)
    elif name_or_path == TOY:
        causal_lm = _toy_causal_lm(config, **kwargs)
    else:
        causal_lm = AutoModelForCausalLM.from_pretrained(name_or_path, config=config, **kwargs)
    causal_lm.liger_status = apply_liger_trunk_kernels(causal_lm, liger_kernels)
    return causal_lm


def apply_liger_trunk_kernels(causal_lm, enabled: bool = True) -> str:
    """Swap the model's RMSNorm, gated MLP and rotary embedding for Liger-Kernel's Triton kernels (GPU only), in
    place. Returns a one-line account of what was done, also logged. Liger patches the family's modeling module
    too, so later models of that family in this process get the kernels as well."""
    model_type = getattr(causal_lm.config, "model_type", None)
    if not enabled:
        status = "Liger trunk kernels: off (switched off)"
    elif not torch.cuda.is_available():
        status = "Liger trunk kernels: not applied, no CUDA device (they are GPU kernels; the CPU run is unchanged)"
    elif importlib.util.find_spec("liger_kernel") is None:
        status = "Liger trunk kernels: not applied, liger-kernel is not installed (pip install liger-kernel)"
    elif model_type not in LIGER_PATCHES:
        status = f"Liger trunk kernels: not applied, none for model type {model_type!r} (have: {', '.join(LIGER_PATCHES)})"
    else:
        function, mlp_switch = LIGER_PATCHES[model_type]
        patch = getattr(importlib.import_module("liger_kernel.transformers"), function)
        patch(rope=True, rms_norm=True, cross_entropy=False, fused_linear_cross_entropy=False, model=causal_lm,
              **{mlp_switch: True})
        status = f"Liger trunk kernels: RMSNorm, {mlp_switch.upper()} and RoPE applied to the {model_type} model"
    logger.info(status)
    return status


def _toy_causal_lm(config, **kwargs):
    """The toy's random init, handed to from_pretrained as a checkpoint would be: its values are then the same
    on every backend (under ZeRO-3, from_config would initialise inside zero.Init, drawing other numbers)."""
    from transformers import LlamaForCausalLM

    # A plain dict, as a safetensors file gives: transformers' ZeRO-3 loader fails on a state dict's `_metadata`.
    weights = dict(LlamaForCausalLM(config).state_dict())
    return LlamaForCausalLM.from_pretrained(None, config=config, state_dict=weights, **kwargs)


class PreferencePolicy(nn.Module):
    """Causal LM backbone + fused preference head: `policy(batch) -> (loss, metrics)`.

    `batch` is a `PreferenceCollator` batch: padded (`input_ids`, `attention_mask`, `labels` [2B, T]),
    packed (`input_ids`, `position_ids`, `labels` [1, N], `cu_seqlens`) or prefix-shared (keys of
    prefix.py: the attention mask is built here, on the model's device), with `ref_logps` [2B] for DPO.
    The head shares the lm_head parameters (with tied embeddings, the input embedding's too). `peft_model`: the
    peft wrapper of `causal_lm` when it carries adapters (kept out of the module tree: it holds the same
    modules), else None.
    """

    def __init__(self, causal_lm, peft_model=None, **loss_kwargs):
        super().__init__()
        self.causal_lm = causal_lm
        object.__setattr__(self, "peft_model", peft_model)
        self.head = LinearPreferenceHead(causal_lm.get_output_embeddings(), **loss_kwargs)

    @property
    def backbone(self):
        return self.causal_lm.base_model

    def forward(self, batch, sequence_logps=False):
        if prefix.is_prefix_shared(batch):
            return self._prefix_shared_forward(batch, sequence_logps)
        hidden = self.backbone(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            use_cache=False,
        ).last_hidden_state
        labels, cu_seqlens = batch["labels"], batch.get("cu_seqlens")
        if cu_seqlens is not None:  # packed: one row of N tokens -> the loss's [N, D] / [N] layout
            hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
        if sequence_logps:
            return self.head(hidden, labels, cu_seqlens=cu_seqlens, sequence_logps=True)
        return self.head(
            hidden, labels, ref_logps=batch.get("ref_logps"), cu_seqlens=cu_seqlens, kto_kl=batch.get("kto_kl")
        )

    def _prefix_shared_forward(self, batch, sequence_logps):
        config = self.causal_lm.config
        prefix.check_sliding_window(config, batch)
        mask = prefix.attention_mask(batch, config._attn_implementation, self.causal_lm.dtype)
        hidden = self.backbone(
            input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"], use_cache=False
        ).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1])
        tokens = prefix.response_tokens(batch, hidden.shape[0])
        if sequence_logps:
            return self.head(hidden, None, sequence_logps=True, token_index=tokens)
        return self.head(
            hidden, None, ref_logps=batch.get("ref_logps"), token_index=tokens, kto_kl=batch.get("kto_kl")
        )

    @torch.no_grad()
    def sequence_logps(self, batch):
        """Per-row summed response log-probs [2B] (fp32) and response-token counts [2B], without grad."""
        return self(batch, sequence_logps=True)


def load_policy(
    name_or_path: str,
    *,
    tokenizer=None,
    dtype=torch.float32,
    attn_implementation="auto",
    gradient_checkpointing=False,
    empty=False,
    prefix_sharing=False,
    liger_kernels=True,
    adapter_settings=None,
    policy_class=None,
    **loss_kwargs,
) -> PreferencePolicy:
    """Load a causal LM and wrap it as a `PreferencePolicy`; loss_kwargs go to `linear_preference_loss`
    (beta, loss_type, label_smoothing, gamma_beta_ratio, stats_scope, impl). `empty`, `prefix_sharing`,
    `liger_kernels`: see `load_causal_lm`. `policy_class` replaces PreferencePolicy (the SFT stage's SftPolicy takes
    `impl` only). `adapter_settings` (adapters.AdapterSettings): LoRA adapters on the frozen model."""
    causal_lm = load_causal_lm(
        name_or_path, tokenizer=tokenizer, dtype=dtype, attn_implementation=attn_implementation, empty=empty,
        prefix_sharing=prefix_sharing, liger_kernels=liger_kernels,
        load_in_4bit=adapter_settings is not None and adapter_settings.load_in_4bit,
    )
    if gradient_checkpointing:
        # Non-reentrant recomputation (works with FSDP2 and ZeRO-3); transformers 5 renamed the switch.
        if hasattr(causal_lm, "activation_checkpointing_enable"):
            causal_lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = None
    if adapter_settings is not None:
        peft_model = adapters.add_adapters(causal_lm, adapter_settings, gradient_checkpointing)
    policy = (policy_class or PreferencePolicy)(causal_lm, **loss_kwargs)
    # The peft wrapper of causal_lm when it carries adapters, kept out of the module tree (it holds the same modules).
    object.__setattr__(policy, "peft_model", peft_model)
    return policy


def decoder_layers(causal_lm) -> list[nn.Module]:
    """The repeated blocks to shard one by one (the classes a model declares it must not split)."""
    names = set(getattr(causal_lm, "_no_split_modules", None) or ())
    layers = [module for module in causal_lm.modules() if type(module).__name__ in names]
    if not layers:
        raise ValueError(f"{type(causal_lm).__name__} declares no decoder layer classes (_no_split_modules) to shard")
    return layers
