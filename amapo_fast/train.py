"""The trainer: `torchrun [--nproc_per_node N] amapo_fast/train.py [--config configs/X.yaml] [--field value ...]`.

With no arguments it trains the embedded default (a tiny Llama on generated string-edit pairs, see toy.py)
on CPU in well under a minute and prints held-out ranking accuracy before and after. The loop: tokenized
preference pairs -> PreferencePolicy (backbone + fused loss head) under FSDP2 or DeepSpeed ZeRO-3 ->
AdamW, cosine schedule, accumulation, clipping; metrics averaged over ranks to stdout, JSONL and
optionally TensorBoard / W&B; atomic sharded checkpoints; a from_pretrained folder at the end.
What differs between training stages (preference pairs, `--stage sft`) is one stage object: PreferenceStage
below, sft.SftStage.
"""
import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a script, Python puts amapo_fast/ itself first on sys.path, where evaluate.py, data.py, ... would
    # shadow top-level packages of the same names; the repository root goes there instead.
    _package_dir = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _package_dir]
    sys.path.insert(0, os.path.dirname(_package_dir))

import dataclasses  # noqa: E402
import functools  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import set_seed  # noqa: E402

from amapo_fast import adapters, prefix  # noqa: E402
from amapo_fast.batches import MicroBatches  # noqa: E402
from amapo_fast.checkpoint import (  # noqa: E402
    TEMPORARY_SUFFIX,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    save_pretrained,
)
from amapo_fast.cli import (  # noqa: E402
    UserError,
    check_model_folder,
    check_output_dir,
    exits_cleanly_on_user_errors,
    progress_bars,
    quiet_library_progress,
    require_existing_if_local,
    user_errors,
)
from amapo_fast.config import TrainConfig, check_resume_matches, parse_config, training_record  # noqa: E402
from amapo_fast.data import (  # noqa: E402
    REF_COLUMNS,
    SOURCE_ROW,
    PreferenceCollator,
    load_preference_dataset,
    tokenize_preference_dataset,
)
from amapo_fast.distributed import (  # noqa: E402
    ENGINES,
    DistEnv,
    OptimConfig,
    all_reduce_sum,
    init_distributed,
    local_main_first,
    peak_memory_gib,
)
from amapo_fast.evaluate import eval_dataloader, ranking_summary, score_pairs  # noqa: E402
from amapo_fast.loss import _resolve_impl as resolve_impl  # noqa: E402
from amapo_fast.guard import LOCK_FILE, NonFiniteSteps, OutputDirLock, StopSignals, strict_json  # noqa: E402
from amapo_fast.model import TOY, load_policy, load_tokenizer  # noqa: E402
from amapo_fast.config import CONFIG_LOSS_PARAMS  # noqa: E402
from amapo_fast.losses import LOSSES  # noqa: E402
from amapo_fast.losses.kto import KL_PREFIX, KLCompletions  # noqa: E402
from amapo_fast.objective import preference_objective  # noqa: E402
from amapo_fast.sft import CHAT_TEMPLATES, SftStage  # noqa: E402

LOG_FILE = "log.jsonl"
# What an earlier run leaves in output_dir; --overwrite_output_dir removes exactly these.
RUN_OUTPUTS = (LOG_FILE, LOG_FILE + TEMPORARY_SUFFIX, "checkpoint-*", "final", "final.partial", "tensorboard")
# A run of fewer optimizer steps than this gets a warning: it can hardly learn anything.
FEW_STEPS = 10


@dataclasses.dataclass
class PreferenceSplits:
    """The tokenized training and held-out sets, and where their rows came from (for the start-up summary)."""

    train: object
    held_out: object | None
    train_rows_read: int
    held_out_rows_read: int
    held_out_source: str


def _raw_splits(config: TrainConfig):
    """(train rows, held-out rows or None, where the held-out rows come from) before tokenization."""
    if config.dataset_name == TOY:
        make_toy_dataset = STAGES[config.stage].make_toy_dataset
        train = make_toy_dataset(config.toy_num_train, seed=config.seed)
        if not config.eval_split:
            return train, None, "none (--eval_split none)"
        return train, make_toy_dataset(config.toy_num_eval, seed=config.seed + 1), "generated"
    train = load_preference_dataset(
        config.dataset_name, config.train_split, config.dataset_config_name, split_flag="--train_split"
    )
    if not config.eval_split:
        return train, None, "none (--eval_split none)"
    if os.path.isfile(config.dataset_name):
        # One file holds one split: hold a seeded slice out instead of evaluating on the training rows.
        if config.eval_fraction == 0:
            return train, None, "none (a single file and --eval_fraction 0)"
        if len(train) * (1 - config.eval_fraction) < 1:
            raise UserError(
                f"dataset {config.dataset_name}: {len(train)} row(s) are too few to hold a fraction out; add rows, "
                "or pass --eval_fraction 0 to train on them without evaluation"
            )
        # Each row keeps its index in the file, so that a message about a row names the row a user can find.
        train = train.add_column(SOURCE_ROW, list(range(len(train))))
        parts = train.train_test_split(test_size=config.eval_fraction, seed=config.seed)
        source = (
            f"a seeded {config.eval_fraction:.0%} of the file's {len(train)} rows: --eval_fraction "
            f"{config.eval_fraction:g}; 0 trains on every row without evaluation"
        )
        return parts["train"], parts["test"], source
    held_out = load_preference_dataset(
        config.dataset_name, config.eval_split, config.dataset_config_name, split_flag="--eval_split"
    )
    return train, held_out, f"split {config.eval_split!r}"


def load_splits(config: TrainConfig, tokenizer) -> PreferenceSplits:
    """Tokenized training and held-out sets; tokenization runs once per node, the other ranks read the cache.

    Every data problem (a bad path or split, a missing column, an empty file, no usable row) is the user's
    to fix, so it ends the run with one line naming the dataset."""
    if config.dataset_name != TOY:
        require_existing_if_local(config.dataset_name, "--dataset_name")
    data_errors = functools.partial(user_errors, ValueError, OSError, KeyError, prefix=f"dataset {config.dataset_name}: ")
    with data_errors():
        train, held_out, held_out_source = _raw_splits(config)
    read, tokenized = [], []
    for dataset, limit in ((train, config.max_train_samples), (held_out, config.max_eval_samples)):
        if dataset is None:
            read.append(0)
            tokenized.append(None)
            continue
        if limit is not None:
            dataset = dataset.select(range(min(limit, len(dataset))))
        read.append(len(dataset))
        with local_main_first(), data_errors():
            tokenized.append(STAGES[config.stage].tokenize(dataset, tokenizer, config))
    return PreferenceSplits(tokenized[0], tokenized[1], read[0], read[1], held_out_source)


def to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def count_tokens(batch: dict) -> int:
    """The batch's sequence tokens (a shared prompt counted for both of its responses, so that tokens/s compares
    across layouts)."""
    if prefix.is_prefix_shared(batch):
        return prefix.unshared_token_count(batch)
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()


class MetricWindow:
    """Sums of the loss, the loss's metrics and token counts since the last log, reduced over ranks on demand.

    The metric names are whatever the loss returns (taken from its first call), so a metric added to the loss
    is logged without a change here. Tokens are also counted since the start of this process, for num_tokens.
    """

    def __init__(self, device):
        self.device = device
        self.keys = None
        self.run_tokens = 0  # this rank's non-padding tokens since this process started training
        self.reset()

    def reset(self):
        self.sums = None
        self.micro_batches, self.tokens, self.seconds = 0, 0, 0.0

    def add_time(self, seconds: float):
        """Training time only: evaluation and checkpointing do not dilute the throughput."""
        self.seconds += seconds

    def add(self, loss, metrics, tokens: int):
        if self.keys is None:
            self.keys = list(metrics)
        values = torch.stack([loss.detach().double()] + [metrics[key].double() for key in self.keys])
        self.sums = values.to(self.device) if self.sums is None else self.sums + values.to(self.device)
        self.micro_batches += 1
        self.tokens += tokens
        self.run_tokens += tokens

    def state(self) -> dict | None:
        """The window so far, summed over ranks, for a checkpoint (None when it is empty). Collective."""
        counts = torch.tensor([self.micro_batches, self.tokens], dtype=torch.float64, device=self.device)
        counts = all_reduce_sum(counts)
        if counts[0] == 0:
            return None
        return {"keys": self.keys, "sums": all_reduce_sum(self.sums).tolist(), "micro_batches": int(counts[0]),
                "tokens": int(counts[1]), "seconds": self.seconds}

    def restore(self, state: dict | None, is_main: bool):
        """Continue a checkpoint's window, so that the first record after a resume averages what an uninterrupted
        run's would. The sums are global: rank 0 carries them, the other ranks start empty."""
        if state is None or not is_main:
            return
        self.keys = state["keys"]
        self.sums = torch.tensor(state["sums"], dtype=torch.float64, device=self.device)
        self.micro_batches, self.tokens, self.seconds = state["micro_batches"], state["tokens"], state["seconds"]

    def global_run_tokens(self) -> int:
        """Every rank's tokens since this process started training (a collective: every rank calls it)."""
        return int(all_reduce_sum(torch.tensor([self.run_tokens], dtype=torch.float64, device=self.device)))

    def reduce(self) -> dict:
        counts = torch.tensor([self.micro_batches, self.tokens, self.run_tokens], dtype=torch.float64, device=self.device)
        sums, counts = all_reduce_sum(self.sums), all_reduce_sum(counts)
        means = (sums / counts[0]).tolist()
        # Ranks step in lockstep, so rank-local time is the window's time for the global token count.
        logs = {"loss": means[0], **dict(zip(self.keys, means[1:]))}
        logs["tokens_per_s"] = float(counts[1]) / max(self.seconds, 1e-9)
        logs["run_tokens"] = int(counts[2])
        return logs


# Stdout gets one short line per record; these keys (when present) and their labels, in this order.
STEP_LINE = (("loss", "loss"), ("rewards/accuracies", "acc"), ("rewards/margins", "margin"),
             ("grad_norm", "grad_norm"), ("lr", "lr"), ("tokens_per_s", "tok/s"))
EVAL_LINE = (("eval/ranking_accuracy", "ranking accuracy"), ("eval/loss", "loss"),
             ("eval/rewards/margins", "margin"), ("eval/mean_token_accuracy", "token acc"))


def _short_line(step: int, total_steps: int, values: dict) -> str:
    """`step 10/100  loss 1.46  acc 0.688 ...`: a few figures that fit a terminal line; log.jsonl has them all."""
    fields = EVAL_LINE if any(key.startswith("eval/") for key in values) else STEP_LINE
    parts = [f"step {step}/{total_steps}" + (" eval" if fields is EVAL_LINE else "")]
    for key, label in fields:
        if key in values:
            value = values[key]
            parts.append(f"{label} {value:.3g}" if key not in ("loss", "eval/loss") else f"{label} {value:.4f}")
    return "  ".join(parts)


class Loggers:
    """Rank 0's sinks: a short line on stdout (through tqdm), every value in output_dir/log.jsonl, and
    TensorBoard or W&B when asked.

    A fresh run starts log.jsonl empty; a resumed run keeps the records up to the step it resumes from and
    drops the later ones (written after that checkpoint by the interrupted run), so every step appears once.
    """

    def __init__(self, config: TrainConfig, env: DistEnv, total_steps: int, start_step: int):
        self.enabled = env.is_main
        self.total_steps = total_steps
        self.writer = self.wandb = None
        if not self.enabled:
            return
        os.makedirs(config.output_dir, exist_ok=True)
        path = os.path.join(config.output_dir, LOG_FILE)
        if start_step > 0:
            _replace_lines(path, _records_up_to(path, start_step))
        self.jsonl = open(path, "a" if start_step > 0 else "w", encoding="utf-8")
        if config.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package

            self.writer = SummaryWriter(os.path.join(config.output_dir, "tensorboard", config.run_name or ""))
        elif config.report_to == "wandb":
            import wandb

            self.wandb = wandb.init(name=config.run_name, config=vars(config))

    def log(self, step: int, values: dict):
        if not self.enabled:
            return
        record = {"step": step, **values}
        tqdm.write(_short_line(step, self.total_steps, values))
        self.jsonl.write(strict_json(record) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self):
        if not self.enabled:
            return
        self.jsonl.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def _replace_lines(path: str, lines: list[str]):
    """Replace a file's lines atomically: written to a temporary file beside it, then renamed over it, so that a
    kill or a full disk midway leaves the old file whole."""
    temporary = path + TEMPORARY_SUFFIX
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.writelines(lines)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError:
        os.remove(temporary)
        raise
    os.replace(temporary, path)


def _records_up_to(path: str, step: int) -> list[str]:
    """The lines of a log.jsonl whose step is at most `step` (an unreadable last line, cut by a kill, is dropped)."""
    if not os.path.isfile(path):
        return []
    kept = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
    return kept


@torch.no_grad()
def evaluate_held_out(model, ref_model, dataset, collator, config: TrainConfig) -> dict:
    """Held-out ranking accuracy (paper eq. 4: mean log-prob of chosen > rejected) and the loss's metrics.

    Scores come from the evaluate module (every rank scores its share, gathered in dataset order); the
    metrics' AMaPO statistics are taken over the whole held-out set.
    """
    loader = eval_dataloader(dataset, collator, config.per_device_eval_batch_size)
    scores = score_pairs(model, loader, desc="evaluating")
    sums = torch.cat([scores.chosen_logps, scores.rejected_logps])
    lengths = torch.cat([scores.chosen_tokens, scores.rejected_tokens])
    ref_logps = None
    if ref_model is not None:
        reference = score_pairs(ref_model, loader, desc="evaluating the reference")
        ref_logps = torch.cat([reference.chosen_logps, reference.rejected_logps])
    elif REF_COLUMNS[0] in dataset.column_names:
        # list(): datasets 4+ returns a column as a lazy Column, which does not concatenate with +.
        ref_logps = torch.tensor(list(dataset[REF_COLUMNS[0]]) + list(dataset[REF_COLUMNS[1]]), dtype=torch.float64)
    if not LOSSES[config.loss_type].needs_reference:
        ref_logps = None
    # KTO's KL estimate is a training-batch quantity: the held-out loss is reported with KL = 0.
    kl = {"kto_kl": 0.0} if LOSSES[config.loss_type].needs_kl else {}
    loss, metrics = preference_objective(
        sums, lengths, beta=config.beta, loss_type=config.loss_type, label_smoothing=config.label_smoothing,
        gamma_beta_ratio=config.gamma_beta_ratio, ref_logps=ref_logps, stats_scope="local",
        **{name: getattr(config, name) for name in CONFIG_LOSS_PARAMS}, **kl,
    )
    results = {"eval/ranking_accuracy": ranking_summary(scores, config.beta)["ranking_accuracy"], "eval/loss": float(loss)}
    results.update({f"eval/{key}": float(value) for key, value in metrics.items()})
    return results


class PreferenceStage:
    """What preference training (AMaPO, its ablations, SimPO, DPO) supplies to the trainer; sft.SftStage is SFT's."""

    name = "preference"
    unit = "pairs"
    headline = ("eval/ranking_accuracy", "ranking_accuracy")  # the held-out figure printed before -> after

    def make_toy_dataset(self, num_rows: int, seed: int):
        from amapo_fast.toy import make_toy_preference_dataset

        return make_toy_preference_dataset(num_rows, seed=seed)

    def tokenize(self, dataset, tokenizer, config):
        return tokenize_preference_dataset(
            dataset, tokenizer, config.max_length, config.max_prompt_length, num_proc=config.dataset_num_proc
        )

    def collator(self, tokenizer, config):
        return PreferenceCollator(tokenizer.pad_token_id, packed=config.packed, prefix_sharing=config.prefix_sharing)

    def policy_kwargs(self, config) -> dict:
        return dict(
            beta=config.beta, loss_type=config.loss_type, label_smoothing=config.label_smoothing,
            gamma_beta_ratio=config.gamma_beta_ratio, stats_scope=config.stats_scope, impl=config.loss_impl,
            **{name: getattr(config, name) for name in CONFIG_LOSS_PARAMS},
        )

    def needs_reference_model(self, config, train_set) -> bool:
        """A loss with a reference (DPO, IPO, KTO) scores with a reference model unless the data holds its
        log-probs precomputed; KTO always, for its mismatched completions."""
        loss = LOSSES[config.loss_type]
        return loss.needs_reference and (loss.needs_kl or REF_COLUMNS[0] not in train_set.column_names)

    def describe_loss(self, config, impl: str) -> str:
        return f"{config.loss_type}, beta {config.beta:g}, implementation {impl}"

    def evaluate(self, model, ref_model, dataset, collator, config) -> dict:
        return evaluate_held_out(model, ref_model, dataset, collator, config)


STAGES = {"preference": PreferenceStage(), "sft": SftStage()}


def use_bf16(config: TrainConfig, env: DistEnv) -> bool:
    """Whether to compute in bf16 ('auto': on CUDA only; CPUs run fp32 faster and exactly)."""
    if config.precision == "auto":
        return env.device.type == "cuda"
    return config.precision == "bf16"


class Trainer:
    """One training run: data, policy (and DPO reference) on the chosen engine, the loop, evaluation, saving."""

    def __init__(self, config: TrainConfig, env: DistEnv):
        self.config, self.env = config, env
        self.stage = STAGES[config.stage]
        set_seed(config.seed)
        # Resolved before anything loads, so that a wrong --resume is one line at once.
        self.resume_path = None
        if config.resume:
            self.resume_path = resolve_resume(config.resume, config.output_dir)
            check_resume_matches(config, self.resume_path)
        # The loss path this device will run ('auto' resolved); an impossible choice is refused before loading.
        with user_errors(ValueError, prefix="--loss_impl: "):
            self.loss_impl = resolve_impl(config.loss_impl, env.device)
        self.adapter_settings = adapters.settings_from(config)
        if self.adapter_settings is not None:
            adapters.require_packages(self.adapter_settings, env.device)
        tokenizer_name = config.tokenizer_name_or_path or config.model_name_or_path
        for flag in ("model_name_or_path", "tokenizer_name_or_path", "ref_model_name_or_path"):
            if getattr(config, flag) not in (None, TOY):
                require_existing_if_local(getattr(config, flag), f"--{flag}")
                if flag != "tokenizer_name_or_path":
                    check_model_folder(getattr(config, flag), f"--{flag}")
        with user_errors(OSError, ValueError, prefix=f"tokenizer {tokenizer_name}: "):
            self.tokenizer = load_tokenizer(tokenizer_name)
        if config.chat_template:
            self.tokenizer.chat_template = CHAT_TEMPLATES.get(config.chat_template, config.chat_template)
        self.splits = load_splits(config, self.tokenizer)
        self.train_set, self.eval_set = self.splits.train, self.splits.held_out
        self.collator = self.stage.collator(self.tokenizer, config)
        self._plan_steps()
        self.bf16 = use_bf16(config, env)
        self._build_models()
        if self.loss_impl == "triton":
            self._tune_kernels()
        self.nonfinite = NonFiniteSteps(config.on_nonfinite, config.output_dir, env.is_main)
        if env.is_main:
            self._print_summary()

    def _plan_steps(self):
        config = self.config
        accumulation = config.gradient_accumulation_steps
        self.world_batch = self.env.world_size * config.per_device_train_batch_size
        self.step_pairs = self.world_batch * accumulation
        # Micro-batches per epoch, whole optimizer steps only, so that epochs and steps line up.
        self.micro_per_epoch = len(self.train_set) // self.world_batch // accumulation * accumulation
        self.steps_per_epoch = self.micro_per_epoch // accumulation
        if self.steps_per_epoch == 0:
            raise UserError(
                f"{len(self.train_set)} training pairs do not fill one optimizer step of {self.step_pairs} pairs "
                f"({config.per_device_train_batch_size} per device x {self.env.world_size} process(es) x "
                f"{accumulation} accumulation steps): lower --per_device_train_batch_size or "
                "--gradient_accumulation_steps"
            )
        epochs_steps = math.ceil(config.num_train_epochs * self.steps_per_epoch)
        self.total_steps = config.max_steps if config.max_steps > 0 else epochs_steps
        # At least the last step runs at the peak rate: a 1-step run is not spent warming up.
        self.warmup_steps = min(math.ceil(config.warmup_ratio * self.total_steps), self.total_steps - 1)
        self.pairs_left_out = len(self.train_set) - self.steps_per_epoch * self.step_pairs

    def _build_models(self):
        config = self.config
        if config.cpu_offload and self.env.device.type != "cuda":
            raise UserError("--cpu_offload moves GPU state to the CPU; on a CPU-only machine everything is there already")
        loss_kwargs = self.stage.policy_kwargs(config)
        # fp32 master weights; bf16 compute comes from FSDP2's mixed precision or DeepSpeed's bf16 mode.
        model_kwargs = dict(
            tokenizer=self.tokenizer, dtype=torch.float32, attn_implementation=config.attn_implementation,
            prefix_sharing=config.prefix_sharing, liger_kernels=config.liger_kernels,
        )
        optim = OptimConfig(
            learning_rate=config.learning_rate, weight_decay=config.weight_decay,
            betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
            warmup_steps=self.warmup_steps, total_steps=self.total_steps,
            max_grad_norm=config.max_grad_norm, gradient_accumulation_steps=config.gradient_accumulation_steps,
            micro_batch_size=config.per_device_train_batch_size, bf16=self.bf16, cpu_offload=config.cpu_offload,
        )
        # The engine calls the loader itself, so that no rank holds a whole model it does not need.
        load = functools.partial(load_policy, **model_kwargs, **loss_kwargs)
        set_seed(config.seed)  # the toy model's random init is the same in every run
        self.engine = ENGINES[config.backend](
            functools.partial(load, config.model_name_or_path, gradient_checkpointing=config.gradient_checkpointing,
                              adapter_settings=self.adapter_settings),
            self.env, optim,
        )
        self.policy = self.engine.policy
        self.model = self.engine.model  # what to call: FSDP2's root module or the DeepSpeed engine
        self.ref_model = self._reference(load)

    def _reference(self, load):
        """What scores the reference log-probs of a loss that needs them (DPO) when the data has none
        precomputed, called under no-grad: the policy with its adapters switched off when it trains adapters
        (no second model), else the frozen reference model, sharded like the policy. None otherwise."""
        config = self.config
        if not self.stage.needs_reference_model(config, self.train_set):
            return None
        if self.policy.peft_model is not None and not config.ref_model_name_or_path:
            return adapters.DisabledAdapters(self.model, self.policy.peft_model)
        set_seed(config.seed)
        reference_name = config.ref_model_name_or_path or config.model_name_or_path
        return self.engine.frozen(functools.partial(load, reference_name))

    def _tune_kernels(self):
        """Kernel configs for this head at every batch size the run can meet: chosen once on rank 0 (from its
        disk cache, else by benchmarking) and launched by every rank (see kernels/tuning.py)."""
        from amapo_fast.kernels.tuning import tune_head

        weight = self.policy.head.weight
        vocab, dim = getattr(weight, "ds_shape", weight.shape)  # ZeRO-3 keeps the full shape in ds_shape
        pairs = max(self.config.per_device_train_batch_size, self.config.per_device_eval_batch_size)
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        tune_head(vocab, dim, dtype, self.env.device, max_tokens=2 * pairs * self.config.max_length)

    # --- start-up summary and warnings (rank 0) ---------------------------------------------------------

    def _print_summary(self):
        config, splits = self.config, self.splits
        # ZeRO-3 partitions parameters in place; ds_numel is a parameter's whole size. FSDP2's DTensors report it.
        parameters = sum(getattr(p, "ds_numel", p.numel()) for p in self.policy.parameters())
        train_dropped = splits.train_rows_read - len(self.train_set)
        held_out = "none" if self.eval_set is None else (
            f"{len(self.eval_set)} {self.stage.unit} ({splits.held_out_source}"
            + (f", {splits.held_out_rows_read - len(self.eval_set)} unusable rows dropped)"
               if splits.held_out_rows_read > len(self.eval_set) else ")")
        )
        epochs = self.total_steps / self.steps_per_epoch
        lines = [
            ("model", f"{config.model_name_or_path} ({type(self.policy.causal_lm).__name__}, "
                      f"{parameters / 1e6:.2f} M parameters)"),
            ("training data", f"{config.dataset_name}: {len(self.train_set)} {self.stage.unit} ({train_dropped} "
                              "unusable rows dropped)"),
            ("held-out data", held_out),
            ("loss", self.stage.describe_loss(config, self.loss_impl)),
            ("layout", f"{'prefix-shared' if config.prefix_sharing else 'unshared'} pairs, "
                       f"{'packed' if config.packed else 'padded'}, attention "
                       f"{self.policy.causal_lm.config._attn_implementation}"),
            ("trunk kernels", self.policy.causal_lm.liger_status),
            ("adapters", self._adapter_line()),
            ("processes", f"{self.env.world_size} on {self.env.device.type}, {config.backend}, "
                          f"{'bf16' if self.bf16 else 'fp32'}"),
            ("batch", f"{self.step_pairs} {self.stage.unit} per optimizer step ({config.per_device_train_batch_size} per device "
                      f"x {self.env.world_size} process(es) x {config.gradient_accumulation_steps} accumulation)"),
            ("steps", f"{self.total_steps} ({epochs:.3g} epoch(s) of {self.steps_per_epoch}), warmup "
                      f"{self.warmup_steps}, peak lr {config.learning_rate:g}, cosine decay"),
            ("output", config.output_dir + (f" (resuming from {self.resume_path})" if self.resume_path else "")),
        ]
        width = max(len(name) for name, _ in lines)
        print("\n".join(f"{name:<{width}}  {text}" for name, text in lines), flush=True)
        for warning in self._small_run_warnings():
            print(f"warning: {warning}", flush=True)

    def _adapter_line(self) -> str:
        settings = self.adapter_settings
        if settings is None:
            return "none (every weight trains)"
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in self.policy.parameters() if p.requires_grad)
        return (f"LoRA r {settings.r}, alpha {settings.alpha:g}, dropout {settings.dropout:g} on "
                f"{settings.target_modules}{', 4-bit base' if settings.load_in_4bit else ''}: "
                f"{trainable / 1e6:.3f} M trainable parameters")

    def _small_run_warnings(self) -> list[str]:
        config, warnings = self.config, []
        if self.pairs_left_out:
            warnings.append(
                f"{self.pairs_left_out} of {len(self.train_set)} training pairs are left out of each epoch (a "
                f"different random {self.pairs_left_out} each time): an epoch is made of whole optimizer steps "
                f"of {self.step_pairs} pairs"
            )
        if self.total_steps < FEW_STEPS:
            warnings.append(
                f"this run has only {self.total_steps} optimizer step(s), too few to learn much: lower "
                f"--per_device_train_batch_size (now {config.per_device_train_batch_size}) or raise "
                "--num_train_epochs or --max_steps"
            )
        return warnings

    # --- the loop -----------------------------------------------------------------------------------------

    def evaluate(self) -> dict:
        return self.stage.evaluate(self.model, self.ref_model, self.eval_set, self.collator, self.config)

    def resume(self) -> dict:
        """Load the checkpoint found at start-up; returns its trainer state (global_step, data_position, ...)."""
        state = load_checkpoint(self.engine, self.resume_path, self.env.rank, self.config.backend)
        if self.env.is_main:
            tqdm.write(f"resumed from {self.resume_path} at step {state['global_step']}")
        return state

    def train_step(self, stream, window: MetricWindow) -> tuple[float, float]:
        """One optimizer step over gradient_accumulation_steps micro-batches; returns the gradient norm and the
        learning rate this step used."""
        accumulation = self.config.gradient_accumulation_steps
        started = time.perf_counter()
        lr = self.engine.lr  # the engine's step advances the schedule: read the rate this step applies first
        for micro in range(accumulation):
            batch = next(stream)
            tokens = count_tokens(batch)
            batch = to_device(batch, self.env.device)
            kl_batch = {key[len(KL_PREFIX):]: batch.pop(key) for key in list(batch) if key.startswith(KL_PREFIX)}
            if kl_batch:  # KTO's mismatched completions (see KLCompletions)
                batch["kto_kl"] = self.kl_estimate(kl_batch)
            if self.ref_model is not None and "ref_logps" not in batch:
                with torch.no_grad():
                    batch["ref_logps"], _ = self.ref_model(batch, sequence_logps=True)
            loss, metrics = self.model(batch)
            self.engine.backward(self.nonfinite.observe(loss), last_micro_batch=micro == accumulation - 1)
            window.add(loss, metrics, tokens)
        grad_norm = self.engine.step()
        window.add_time(time.perf_counter() - started)
        return grad_norm, lr

    @torch.no_grad()
    def kl_estimate(self, kl_batch: dict) -> torch.Tensor:
        """KTO's KL term: max(0, mean over every rank's mismatched completions of policy minus reference summed
        log-prob), detached."""
        policy, _ = self.model(kl_batch, sequence_logps=True)
        reference, _ = self.ref_model(kl_batch, sequence_logps=True)
        gap = policy.double() - reference.double()
        totals = all_reduce_sum(torch.stack([gap.sum(), gap.new_tensor(gap.numel())]))
        return (totals[0] / totals[1]).clamp(min=0)

    def fit(self, stop: StopSignals | None = None) -> dict:
        """Train to the last step; with `stop`, a stop signal ends the run after the step in progress, with a
        checkpoint of it."""
        config = self.config
        state = self.resume() if self.resume_path else {"global_step": 0, "data_position": (0, 0)}
        start_step, start_position = state["global_step"], tuple(state["data_position"])
        # Tokens processed before this process started (TRL's num_tokens: every rank's non-padding tokens).
        tokens_before = state.get("num_tokens", 0)
        self.loggers = Loggers(config, self.env, self.total_steps, start_step)
        results = {"train_pairs": len(self.train_set), "total_steps": self.total_steps}
        headline_key, headline = self.stage.headline
        if self.eval_set is not None and start_step == 0:
            before = self.evaluate()
            self.loggers.log(0, before)
            results[f"{headline}_before"] = before[headline_key]

        collator = self.collator
        if self.stage.name == "preference" and LOSSES[config.loss_type].needs_kl:
            collator = KLCompletions(collator, config.max_length)  # KTO: training batches carry mismatched completions
        batches = MicroBatches(
            self.train_set, collator, self.env.rank, self.env.world_size, config.per_device_train_batch_size,
            config.seed, self.micro_per_epoch,
        )
        stream = batches.iterate(start_position)

        def checkpoint_position(step: int) -> tuple[int, int]:
            return batches.advance(start_position, (step - start_step) * config.gradient_accumulation_steps)

        window = MetricWindow(self.env.device)
        window.restore(state.get("metric_window"), self.env.is_main)

        def save(step: int) -> str:
            num_tokens = tokens_before + window.global_run_tokens()
            return self._save(step, checkpoint_position(step), num_tokens, window.state())

        self.model.train()
        progress = tqdm(
            total=self.total_steps, initial=start_step, desc="training", disable=not (self.env.is_main and progress_bars()),
            dynamic_ncols=True,
        )
        for step in range(start_step + 1, self.total_steps + 1):
            grad_norm, lr = self.train_step(stream, window)
            self.nonfinite.after_step(step, grad_norm)
            progress.update(1)
            if step % config.logging_steps == 0 or step == self.total_steps:
                logs = window.reduce()
                logs["num_tokens"] = tokens_before + logs.pop("run_tokens")
                epoch, offset = batches.advance(start_position, (step - start_step) * config.gradient_accumulation_steps)
                # From the data position, which a resume on another number of processes keeps (step counts don't).
                logs.update(grad_norm=grad_norm, lr=lr, epoch=epoch + offset / batches.pairs_per_epoch)
                if config.on_nonfinite == "skip":
                    logs["skipped_steps"] = self.nonfinite.skipped
                logs["memory/peak_gib"] = peak_memory_gib(self.env.device)
                progress.set_postfix(loss=f"{logs['loss']:.4f}", tok_s=f"{logs['tokens_per_s']:.0f}")
                self.loggers.log(step, logs)
                window.reset()
            if self.eval_set is not None and config.eval_steps and step % config.eval_steps == 0 and step != self.total_steps:
                self.loggers.log(step, self.evaluate())
            saved = None
            if config.save_steps and step % config.save_steps == 0:
                saved = save(step)
            if stop is not None and step < self.total_steps and (signum := stop.requested(self.env.device)):
                progress.close()
                self._stop(signum, step, saved or save(step))
        progress.close()

        if self.eval_set is not None:
            after = self.evaluate()
            self.loggers.log(self.total_steps, after)
            results.update(after, **{f"{headline}_after": after[headline_key]})
            if self.env.is_main:
                before = results.get(f"{headline}_before")
                shown = f"{before:.3f} -> " if before is not None else ""
                print(
                    f"held-out {headline.replace('_', ' ')}: {shown}{after[headline_key]:.3f} "
                    f"({len(self.eval_set)} {self.stage.unit})"
                )
        if config.save_final:
            self.save_final()
        self.loggers.close()
        return results

    def _save(self, step: int, position: tuple, num_tokens: int, metric_window: dict | None) -> str:
        """checkpoint-<step>, complete and verified, the oldest rotated out. Collective."""
        config = self.config
        trainer_state = {
            "global_step": step, "data_position": position, "world_size": self.env.world_size,
            "num_tokens": num_tokens, "metric_window": metric_window, "config": vars(config),
        }
        return save_checkpoint(self.engine, config.output_dir, step, trainer_state, config.save_total_limit, self.env.rank)

    def _stop(self, signum: int, step: int, checkpoint: str):
        """After a stop signal: one line naming the checkpoint just saved, then exit with 128 + the signal."""
        self.loggers.close()
        if self.env.is_main:
            tqdm.write(
                f"stopped by {signal.Signals(signum).name} after step {step}/{self.total_steps}: saved {checkpoint}; "
                "the same command with --resume continues from it exactly", file=sys.stderr,
            )
        raise SystemExit(128 + signum)

    def save_final(self):
        final_dir = os.path.join(self.config.output_dir, "final")
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        # In config.json, so that evaluation scores the model with the truncation it was trained with.
        self.policy.causal_lm.config.amapo_fast_training = training_record(self.config)
        save_pretrained(self.engine, self.policy, self.tokenizer, final_dir, dtype, self.env.rank,
                        base_model=self.config.model_name_or_path, merge_adapters=self.config.merge_adapters)
        if self.env.is_main:
            loader = "peft.AutoPeftModelForCausalLM" if self.policy.peft_model is not None and not \
                self.config.merge_adapters else "AutoModelForCausalLM"
            print(f"saved the trained model to {final_dir} ({loader}.from_pretrained loads it)")


# --- command line: settings and the output folder are checked before anything loads ------------------------


def remove_earlier_run(output_dir: str):
    """--overwrite_output_dir: remove what an earlier run left (log, checkpoints, final model, TensorBoard files);
    other files in the folder stay."""
    for pattern in RUN_OUTPUTS:
        for path in glob.glob(os.path.join(output_dir, pattern)):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def check_settings(argv: list[str] | None = None) -> TrainConfig:
    """The settings, refused (a `UserError`) if they or the output folder cannot work; nothing is loaded.
    `amapo-train` runs this once before it starts the workers."""
    config = parse_config(argv)
    check_output_dir(
        config.output_dir, "--output_dir", must_be_empty=not (config.resume or config.overwrite_output_dir),
        empty_hint="; pass --overwrite_output_dir to replace it, --resume to continue it, or another --output_dir",
        # A run killed before its first checkpoint leaves only its lock, which the next run takes over (a
        # live run's lock still refuses it, with that run's pid and host).
        ignore=(LOCK_FILE,),
    )
    return config


@exits_cleanly_on_user_errors
def main(argv: list[str] | None = None) -> dict:
    """Parse the settings, join the process group, train; returns the final results (ranking accuracy, eval metrics)."""
    config = check_settings(argv)
    quiet_library_progress()
    if config.backend == "deepspeed":
        # DeepSpeed calls collectives that torch has deprecated; the FutureWarning would come back every step.
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if not torch.cuda.is_available():
        # transformers' save_pretrained imports DeepSpeed whenever it is installed, whatever the backend; without
        # a GPU, DeepSpeed then warns that it falls back to the CPU. Name the CPU up front: it is expected here.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    env = init_distributed()
    try:
        # The lock comes first: --overwrite_output_dir must not remove the files of a run that is still going.
        with OutputDirLock(config.output_dir, env.is_main), StopSignals() as stop:
            if config.overwrite_output_dir and env.is_main:
                remove_earlier_run(config.output_dir)
            dist.barrier()
            return Trainer(config, env).fit(stop)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
