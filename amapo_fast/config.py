"""The trainer's settings: one dataclass, filled from defaults, then a YAML file (`--config`), then the command line.

`--help` lists every field with its default and help text; any field can be overridden as `--field value`.
"""
import argparse
import dataclasses
import importlib.util
import math
import sys
import types
import typing
from dataclasses import dataclass, field

from .cli import ArgumentParser, HelpFormatter, UserError, add_debug_flag, both_spellings
from .loss import IMPLS
from .losses import LOSSES
from .objective import LOSS_TYPES, MAX_BETA, STATS_SCOPES, resolve_loss_params
from .sft import SFT_DEFAULTS

BACKENDS = ("fsdp2", "deepspeed")
PRECISIONS = ("auto", "bf16", "fp32")
ATTN_IMPLEMENTATIONS = ("auto", "flash_attention_2", "sdpa", "eager", "flex_attention")
REPORT_TO = ("none", "tensorboard", "wandb")
NONFINITE_POLICIES = ("stop", "skip")
# Settings that need an optional package: (field, value) -> (module to import, setup.py extra that installs it).
OPTIONAL_PACKAGES = {
    ("report_to", "tensorboard"): ("tensorboard", "tensorboard"),
    ("report_to", "wandb"): ("wandb", "wandb"),
    ("backend", "deepspeed"): ("deepspeed", "deepspeed"),
    ("attn_implementation", "flash_attention_2"): ("flash_attn", "flash-attn"),
}
STAGES = ("preference", "sft")
# Per stage, the fields whose defaults differ from the ones below (values: defaults < stage < --config < flags).
STAGE_DEFAULTS = {"sft": SFT_DEFAULTS}
# The loss types' own keywords that are settings (KTO's kto_kl is estimated per batch by the trainer).
CONFIG_LOSS_PARAMS = ("slic_delta", "nll_weight", "desirable_weight", "undesirable_weight")


def _field(default, help_text, choices=None):
    return field(default=default, metadata={"help": help_text, "choices": choices})


@dataclass
class TrainConfig:
    stage: str = _field(
        "preference", "preference pairs (AMaPO, SimPO, DPO) or supervised fine-tuning on chats (sft: packed batches, "
        "loss on assistant tokens)", STAGES,
    )
    # Model and data. "toy" selects the embedded default (see amapo_fast/toy.py).
    model_name_or_path: str = _field("toy", "hub name or local folder of a causal LM; 'toy' builds a tiny random-init Llama")
    tokenizer_name_or_path: str | None = _field(None, "tokenizer to load; default: the model's")
    ref_model_name_or_path: str | None = _field(None, "DPO's frozen reference model; default: model_name_or_path")
    dataset_name: str = _field("toy", "hub name, local json/jsonl/parquet file or folder; 'toy' generates string-edit pairs")
    dataset_config_name: str | None = _field(None, "hub dataset config (subset) name")
    train_split: str = _field("train", "split to train on")
    eval_split: str | None = _field(
        "test", "held-out split of a hub dataset or saved folder; empty or none to skip evaluation"
    )
    eval_fraction: float = _field(
        0.1, "a local file has no separate held-out split: this fraction of its rows (seeded) is held out instead"
    )
    max_train_samples: int | None = _field(None, "keep only the first N training rows")
    max_eval_samples: int | None = _field(None, "keep only the first N evaluation rows")
    toy_num_train: int = _field(1600, "rows generated for the toy training split")
    toy_num_eval: int = _field(256, "rows generated for the toy evaluation split")
    max_length: int = _field(128, "maximum prompt + response tokens of one sequence")
    max_prompt_length: int = _field(64, "prompts longer than this are truncated from the left")
    chat_template: str | None = _field(
        None, "replace the tokenizer's chat template: a Jinja template, or zephyr (base models ship none)"
    )
    dataset_num_proc: int | None = _field(None, "processes for tokenization (datasets' map)")
    packed: bool = _field(False, "padding-free batches: sequences concatenated, varlen attention via position_ids")
    prefix_sharing: bool = _field(
        True,
        "each pair as one sequence [prompt | chosen | rejected], its prompt computed once (exact; attention through "
        "sdpa with a mask, FlexAttention on GPU); combines with --packed",
    )

    # Loss (see the README for the exact formulas).
    loss_type: str = _field(
        "amapo", "AMaPO, an ablation of it, or a baseline: SimPO, DPO, SLiC, IPO, CPO, ORPO, KTO (docs/train.md)", LOSS_TYPES
    )
    beta: float = _field(2.0, "beta of the loss")
    label_smoothing: float = _field(0.0, "label smoothing eps in [0, 0.5]")
    gamma_beta_ratio: float = _field(0.0, "SimPO's target margin gamma/beta")
    slic_delta: float | None = _field(None, "SLiC's hinge margin on the summed log-prob gap; none: 1.0")
    nll_weight: float | None = _field(None, "weight of the chosen responses' NLL in SLiC and CPO; none: 0.1 (slic), 1.0 (cpo)")
    desirable_weight: float | None = _field(None, "KTO's weight of the chosen (desirable) term; none: 1.0")
    undesirable_weight: float | None = _field(None, "KTO's weight of the rejected (undesirable) term; none: 1.0")
    stats_scope: str = _field("global", "AMaPO statistics over every rank's pairs (global) or this rank's", STATS_SCOPES)
    loss_impl: str = _field("auto", "auto = triton on CUDA, chunked on CPU; reference materialises logits", IMPLS)

    # Model loading and scale.
    backend: str = _field("fsdp2", "distributed backend", BACKENDS)
    precision: str = _field("auto", "auto = bf16 on CUDA, fp32 on CPU", PRECISIONS)
    attn_implementation: str = _field(
        "auto", "auto = flash_attention_2 when installed, else sdpa; with prefix sharing flex_attention on GPU, sdpa elsewhere",
        ATTN_IMPLEMENTATIONS,
    )
    gradient_checkpointing: bool = _field(False, "recompute decoder layers in backward to save memory")
    liger_kernels: bool = _field(
        True, "Liger-Kernel's RMSNorm, SwiGLU/GeGLU and RoPE kernels (Llama, Mistral, Qwen2, Gemma) on CUDA when "
        "liger-kernel is installed; a no-op on CPU"
    )
    cpu_offload: bool = _field(False, "offload parameters and optimizer state to CPU (FSDP2 CPUOffloadPolicy / ZeRO-3)")

    # Adapters (peft): LoRA on the frozen model instead of training every weight.
    use_peft: bool = _field(False, "train LoRA adapters (peft); the base model and the lm_head stay frozen")
    lora_r: int = _field(16, "LoRA rank")
    lora_alpha: float = _field(32.0, "LoRA alpha (the adapters' output is scaled by alpha / r)")
    lora_dropout: float = _field(0.05, "dropout on the adapters' input, in [0, 1)")
    lora_target_modules: str = _field(
        "all-linear", "comma-separated names of the modules that get adapters; all-linear: every linear layer of the decoder"
    )
    load_in_4bit: bool = _field(False, "QLoRA: the frozen base in 4-bit NF4 through bitsandbytes (CUDA only; with --use_peft)")
    merge_adapters: bool = _field(False, "final/ holds the model with the adapters merged in, not an adapter folder")

    # Optimisation.
    learning_rate: float = _field(3e-3, "peak learning rate of AdamW")
    weight_decay: float = _field(0.0, "AdamW weight decay")
    adam_beta1: float = _field(0.9, "AdamW beta1")
    adam_beta2: float = _field(0.999, "AdamW beta2")
    adam_epsilon: float = _field(1e-8, "AdamW epsilon")
    warmup_ratio: float = _field(0.1, "fraction of the optimizer steps spent warming the learning rate up")
    num_train_epochs: float = _field(1.0, "epochs over the training split")
    max_steps: int = _field(-1, "optimizer steps; overrides num_train_epochs when > 0")
    per_device_train_batch_size: int = _field(16, "pairs per rank per micro-batch")
    per_device_eval_batch_size: int = _field(32, "pairs per rank per evaluation batch")
    gradient_accumulation_steps: int = _field(1, "micro-batches per optimizer step")
    max_grad_norm: float = _field(1.0, "gradient clipping norm; 0 disables clipping")
    seed: int = _field(42, "seed of model init (toy), data order and RNG")
    on_nonfinite: str = _field(
        "stop", "a step whose loss or gradient norm is NaN/inf is never applied; then stop the run or skip the step",
        NONFINITE_POLICIES,
    )

    # Logging, evaluation, checkpoints.
    output_dir: str = _field("outputs/amapo-toy", "checkpoints, final model and logs go here")
    overwrite_output_dir: bool = _field(
        False, "start afresh in an output_dir that holds an earlier run (its log, checkpoints and final/ are removed)"
    )
    logging_steps: int = _field(10, "log the averaged metrics every N optimizer steps")
    eval_steps: int = _field(0, "evaluate on the held-out split every N steps (0: only before and after training)")
    save_steps: int = _field(0, "write a sharded checkpoint every N steps (0: none)")
    save_total_limit: int = _field(2, "keep only the last K checkpoints (0 keeps all)")
    resume: str | None = _field(None, "resume from a checkpoint folder, or 'latest' in output_dir (bare --resume)")
    save_final: bool = _field(True, "write a from_pretrained folder to output_dir/final at the end")
    report_to: str = _field("none", "also log to TensorBoard or Weights & Biases", REPORT_TO)
    run_name: str | None = _field(None, "run name for TensorBoard / W&B")


FIELDS = {spec.name: spec for spec in dataclasses.fields(TrainConfig)}
# The evaluation command's names of the same settings, accepted here too.
ALIASES = {"model_name_or_path": ("--model",), "dataset_name": ("--dataset",), "dataset_config_name": ("--dataset-config",),
           "tokenizer_name_or_path": ("--tokenizer",)}


def _parse_bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _base_type(annotation):
    """int for `int`, str for `str | None`, ... (the non-None member of an optional)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (member,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return member, True
    return annotation, False


def _optional(parse):
    def parse_optional(text):
        return None if str(text).lower() in ("", "none", "null") else parse(text)

    return parse_optional


def load_yaml(path: str) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
    except OSError as error:
        raise UserError(f"--config {path}: {error.strerror or error}") from error
    except yaml.YAMLError as error:
        raise UserError(f"--config {path}: not valid YAML ({' '.join(str(error).split())})") from error
    if not isinstance(values, dict):
        raise UserError(f"--config {path}: expected a mapping of field: value, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"--config {path}: unknown field(s) {unknown}; see --help for the fields")
    hints = typing.get_type_hints(TrainConfig)
    for name, value in values.items():
        if not _fits(value, *_base_type(hints[name])):
            expected = _base_type(hints[name])[0].__name__
            raise UserError(f"--config {path}: {name}: expected type {expected}, got {value!r}")
        # argparse checks the choices of command-line values only; the file's values arrive as defaults.
        choices = FIELDS[name].metadata["choices"]
        if choices and value not in choices:
            raise UserError(f"--config {path}: {name}: invalid choice {value!r} (choose from {', '.join(choices)})")
    return values


def _fits(value, base, optional: bool) -> bool:
    """Whether a YAML value can fill a field of type `base` (strings are parsed later, as flags are)."""
    if isinstance(value, str) or (value is None and optional):
        return True
    if isinstance(value, bool):
        return base is bool
    return isinstance(value, base) or (base is float and isinstance(value, int))


def build_parser(defaults: dict | None = None) -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="torchrun amapo_fast/train.py",
        description=(
            "Train a causal LM with AMaPO, an ablation or a baseline (SimPO, DPO, SLiC, IPO, CPO, ORPO, KTO). "
            "Values: defaults < --config YAML < flags."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--config", default=None, help="YAML file of field: value (see configs/)")
    add_debug_flag(parser)
    hints = typing.get_type_hints(TrainConfig)
    defaults = defaults or {}
    for spec in dataclasses.fields(TrainConfig):
        base, optional = _base_type(hints[spec.name])
        parse = _parse_bool if base is bool else base
        if optional:
            parse = _optional(parse)
        kwargs = dict(type=parse, default=defaults.get(spec.name, spec.default), help=spec.metadata["help"])
        if spec.metadata["choices"]:
            kwargs["choices"] = spec.metadata["choices"]
        if base is bool:
            kwargs.update(nargs="?", const=True)  # a bare --flag means true
        if spec.name == "resume":
            kwargs.update(nargs="?", const="latest")
        parser.add_argument(*both_spellings(f"--{spec.name}", *ALIASES.get(spec.name, ())), **kwargs)
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--stage", default=None)
    known, _ = pre.parse_known_args(argv)
    defaults = load_yaml(known.config) if known.config else {}
    defaults = {**STAGE_DEFAULTS.get(known.stage or defaults.get("stage"), {}), **defaults}
    args = vars(build_parser(defaults).parse_args(argv))
    args.pop("config")
    args.pop("debug")
    return validate(TrainConfig(**args))


def _refuse_unless(ok: bool, name: str, value, requirement: str):
    if not ok:
        raise UserError(f"--{name} {value}: {requirement}")


def validate(config: TrainConfig) -> TrainConfig:
    """Refuse settings that cannot work, before any model or data is loaded (comparisons are written so that
    NaN fails them)."""
    for name, spec in FIELDS.items():  # a config built in code, or from a file, meets the flags' choices too
        choices = spec.metadata["choices"]
        _refuse_unless(not choices or getattr(config, name) in choices, name, getattr(config, name),
                       f"invalid choice (choose from {', '.join(map(str, choices or ()))})")
    positive = ("max_length", "max_prompt_length", "per_device_train_batch_size", "per_device_eval_batch_size",
                "gradient_accumulation_steps", "logging_steps", "toy_num_train", "toy_num_eval", "learning_rate",
                "beta", "adam_epsilon")
    for name in positive:
        value = getattr(config, name)
        _refuse_unless(value > 0 and math.isfinite(value), name, value, "must be positive")
    for name in ("max_train_samples", "max_eval_samples", "dataset_num_proc"):
        value = getattr(config, name)
        _refuse_unless(value is None or value > 0, name, value, "must be positive (or none)")
    for name in ("eval_steps", "save_steps", "save_total_limit", "weight_decay", "max_grad_norm", "num_train_epochs"):
        value = getattr(config, name)
        _refuse_unless(0 <= value < math.inf, name, value, "must be >= 0")
    for name in ("adam_beta1", "adam_beta2", "warmup_ratio", "eval_fraction"):
        value = getattr(config, name)
        _refuse_unless(0 <= value < 1, name, value, "must lie in [0, 1)")
    _refuse_unless(0 <= config.label_smoothing <= 0.5, "label_smoothing", config.label_smoothing, "must lie in [0, 0.5]")
    _refuse_unless(math.isfinite(config.gamma_beta_ratio), "gamma_beta_ratio", config.gamma_beta_ratio, "must be finite")
    _refuse_unless(config.beta <= MAX_BETA, "beta", config.beta, f"must be at most {MAX_BETA:g}")
    loss_params = {name: getattr(config, name) for name in CONFIG_LOSS_PARAMS}
    if LOSSES[config.loss_type].needs_kl:
        loss_params["kto_kl"] = 0.0  # the trainer estimates it per batch
    try:
        resolve_loss_params(config.loss_type, config.label_smoothing, config.gamma_beta_ratio, loss_params)
    except ValueError as error:
        raise UserError(f"--loss_type {config.loss_type}: {error}") from error
    if LOSSES[config.loss_type].needs_kl and config.per_device_train_batch_size < 2:
        raise UserError(
            f"--loss_type {config.loss_type} pairs each prompt with another pair's response to estimate its KL term: "
            "--per_device_train_batch_size must be at least 2"
        )
    _refuse_unless(
        config.max_steps >= -1, "max_steps", config.max_steps,
        "must be a positive number of optimizer steps, or -1 to take num_train_epochs",
    )
    if config.max_steps <= 0 and config.num_train_epochs <= 0:
        raise UserError("set --max_steps > 0 or --num_train_epochs > 0")
    if config.max_prompt_length >= config.max_length:
        raise UserError(
            f"--max_prompt_length {config.max_prompt_length} must be smaller than --max_length {config.max_length}: "
            "a response needs room"
        )
    if config.prefix_sharing and config.attn_implementation == "flash_attention_2":
        raise UserError(
            "--attn_implementation flash_attention_2 cannot take prefix sharing's attention mask: use auto, sdpa, "
            "eager or flex_attention, or --prefix_sharing false"
        )
    if config.stage == "sft" and config.prefix_sharing:
        raise UserError("--prefix_sharing shares a pair's prompt between its two responses; --stage sft has no pairs")
    if config.resume and config.overwrite_output_dir:
        raise UserError("--resume continues the run in output_dir, --overwrite_output_dir deletes it: choose one")
    _validate_adapters(config)
    for (name, value), (module, extra) in OPTIONAL_PACKAGES.items():
        if getattr(config, name) == value and importlib.util.find_spec(module) is None:
            raise UserError(f"--{name} {value} needs the {module} package: pip install -e \".[{extra}]\" (or pip install {extra})")
    if config.eval_split in ("", "none"):
        config.eval_split = None
    return config


def _validate_adapters(config: TrainConfig):
    _refuse_unless(config.lora_r > 0, "lora_r", config.lora_r, "must be positive")
    _refuse_unless(0 < config.lora_alpha < math.inf, "lora_alpha", config.lora_alpha, "must be positive")
    _refuse_unless(0 <= config.lora_dropout < 1, "lora_dropout", config.lora_dropout, "must lie in [0, 1)")
    names = [name.strip() for name in config.lora_target_modules.split(",") if name.strip()]
    _refuse_unless(bool(names), "lora_target_modules", repr(config.lora_target_modules), "names no module")
    # The fused loss head reads the lm_head weight itself: an adapter there would be left out of the loss.
    _refuse_unless(
        "lm_head" not in names, "lora_target_modules", config.lora_target_modules,
        "the lm_head stays frozen (the fused loss head reads its weight); leave lm_head out",
    )
    for flag in ("load_in_4bit", "merge_adapters"):
        if getattr(config, flag) and not config.use_peft:
            raise UserError(f"--{flag} applies to adapter training: add --use_peft")
    if config.load_in_4bit and config.merge_adapters:
        raise UserError(
            "--merge_adapters cannot merge into a 4-bit base: keep the adapter folder and merge it onto the "
            "full-precision model with peft"
        )


# What a trained model's config.json records of its training (key TRAINING_RECORD), for evaluation's defaults.
TRAINING_RECORD = "amapo_fast_training"
RECORDED_FIELDS = ("max_length", "max_prompt_length", "loss_type", "beta", "dataset_name")


def training_record(config: TrainConfig) -> dict:
    return {name: getattr(config, name) for name in RECORDED_FIELDS}


# Settings a resumed run must share with the run that wrote the checkpoint: another model or other data would
# continue the optimizer state and the data position of a different run.
RESUME_MUST_MATCH = ("model_name_or_path", "dataset_name", "dataset_config_name", "train_split")


def check_resume_matches(config: TrainConfig, checkpoint: str):
    """Refuse resuming a checkpoint with another model or other data than its run's (its trainer_state.json
    records the run's settings; an unreadable one is left to the checkpoint's own checks)."""
    import json
    import os

    try:
        with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as handle:
            saved = json.load(handle)["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    for name in RESUME_MUST_MATCH:
        if name in saved and saved[name] != getattr(config, name):
            raise UserError(
                f"--resume {checkpoint}: its run used --{name} {saved[name]}, this one {getattr(config, name)}: pass "
                f"the same --{name} to continue it, or start a new run in another --output_dir"
            )
