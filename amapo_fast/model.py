"""The policy: a causal LM whose lm_head is replaced, for training, by the fused preference loss.

`PreferencePolicy(batch)` runs the decoder backbone to the last hidden states and hands them to a
`LinearPreferenceHead` that shares the lm_head weight, so [tokens x vocab] logits never exist. Every
entry point goes through `forward` (the root module) and the head's own `forward`: FSDP2 unshards a
module's parameters, and ZeRO-3 gathers them, only when that module's forward runs.
"""
import importlib.util

import torch
from torch import nn

from .loss import LinearPreferenceHead

TOY = "toy"  # the embedded default's name for the model and tokenizer (see toy.py)


def resolve_attn_implementation(requested: str = "auto") -> str:
    """flash_attention_2 when it is installed and a GPU is present, else PyTorch's sdpa."""
    if requested != "auto":
        return requested
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
    name_or_path: str, *, tokenizer=None, dtype=torch.float32, attn_implementation="auto", empty=False
):
    """An `AutoModelForCausalLM` with dropout off; 'toy' builds the tiny random-init Llama of toy.py.

    `empty=True` builds the architecture on the meta device: no memory, no weights read. FSDP2's
    ranks other than 0 do so and receive their shards of rank 0's weights once the model is sharded.
    """
    from transformers import AutoModelForCausalLM

    config = _model_config(name_or_path, tokenizer)
    kwargs = dict(dtype=dtype, attn_implementation=resolve_attn_implementation(attn_implementation))
    if empty:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, **kwargs)
    if name_or_path == TOY:
        return _toy_causal_lm(config, **kwargs)
    return AutoModelForCausalLM.from_pretrained(name_or_path, config=config, **kwargs)


def _toy_causal_lm(config, **kwargs):
    """The toy's random init, handed to from_pretrained as a checkpoint would be: its values are then the same
    on every backend (under ZeRO-3, from_config would initialise inside zero.Init, drawing other numbers)."""
    from transformers import LlamaForCausalLM

    # A plain dict, as a safetensors file gives: transformers' ZeRO-3 loader fails on a state dict's `_metadata`.
    weights = dict(LlamaForCausalLM(config).state_dict())
    return LlamaForCausalLM.from_pretrained(None, config=config, state_dict=weights, **kwargs)


class PreferencePolicy(nn.Module):
    """Causal LM backbone + fused preference head: `policy(batch) -> (loss, metrics)`.

    `batch` is a `PreferenceCollator` batch: padded (`input_ids`, `attention_mask`, `labels` [2B, T]) or
    packed (`input_ids`, `position_ids`, `labels` [1, N], `cu_seqlens`), with `ref_logps` [2B] for DPO.
    The head shares the lm_head parameters (with tied embeddings, the input embedding's too).
    """

    def __init__(self, causal_lm, **loss_kwargs):
        super().__init__()
        self.causal_lm = causal_lm
        self.head = LinearPreferenceHead(causal_lm.get_output_embeddings(), **loss_kwargs)

    @property
    def backbone(self):
        return self.causal_lm.base_model

    def forward(self, batch, sequence_logps=False):
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
        return self.head(hidden, labels, ref_logps=batch.get("ref_logps"), cu_seqlens=cu_seqlens)

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
    **loss_kwargs,
) -> PreferencePolicy:
    """Load a causal LM and wrap it as a `PreferencePolicy`; loss_kwargs go to `linear_preference_loss`
    (beta, loss_type, label_smoothing, gamma_beta_ratio, stats_scope, impl). `empty`: see `load_causal_lm`."""
    causal_lm = load_causal_lm(
        name_or_path, tokenizer=tokenizer, dtype=dtype, attn_implementation=attn_implementation, empty=empty
    )
    if gradient_checkpointing:
        # Non-reentrant recomputation (works with FSDP2 and ZeRO-3); transformers 5 renamed the switch.
        if hasattr(causal_lm, "activation_checkpointing_enable"):
            causal_lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return PreferencePolicy(causal_lm, **loss_kwargs)


def decoder_layers(causal_lm) -> list[nn.Module]:
    """The repeated blocks to shard one by one (the classes a model declares it must not split)."""
    names = set(getattr(causal_lm, "_no_split_modules", None) or ())
    layers = [module for module in causal_lm.modules() if type(module).__name__ in names]
    if not layers:
        raise ValueError(f"{type(causal_lm).__name__} declares no decoder layer classes (_no_split_modules) to shard")
    return layers
