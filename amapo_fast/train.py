"""The trainer: `torchrun [--nproc_per_node N] amapo_fast/train.py [--config configs/X.yaml] [--field value ...]`.

With no arguments it trains the embedded default (a tiny Llama on generated string-edit pairs, see toy.py)
on CPU in about a minute and prints held-out ranking accuracy before and after. The loop: tokenized
preference pairs -> PreferencePolicy (backbone + fused loss head) under FSDP2 or DeepSpeed ZeRO-3 ->
AdamW, cosine schedule, accumulation, clipping; metrics averaged over ranks to stdout, JSONL and
optionally TensorBoard / W&B; atomic sharded checkpoints; a from_pretrained folder at the end.
"""
import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a script, Python puts amapo_fast/ itself first on sys.path, where evaluate.py, data.py, ... would
    # shadow top-level packages of the same names; the repository root goes there instead.
    _package_dir = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _package_dir]
    sys.path.insert(0, os.path.dirname(_package_dir))

import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import set_seed  # noqa: E402

from amapo_fast.checkpoint import load_checkpoint, resolve_resume, save_checkpoint, save_pretrained  # noqa: E402
from amapo_fast.config import TrainConfig, parse_config  # noqa: E402
from amapo_fast.data import (  # noqa: E402
    REF_COLUMNS,
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
from amapo_fast.model import TOY, load_policy, load_tokenizer  # noqa: E402
from amapo_fast.objective import METRIC_KEYS, preference_objective  # noqa: E402

LOG_FILE = "log.jsonl"


def load_splits(config: TrainConfig, tokenizer):
    """Tokenized (train, eval or None) datasets; tokenization runs once per node, the other ranks read the cache."""
    if config.dataset_name == TOY:
        from amapo_fast.toy import make_toy_preference_dataset

        train = make_toy_preference_dataset(config.toy_num_train, seed=config.seed)
        held_out = make_toy_preference_dataset(config.toy_num_eval, seed=config.seed + 1) if config.eval_split else None
    else:
        train = load_preference_dataset(config.dataset_name, config.train_split, config.dataset_config_name)
        held_out = None
        if config.eval_split:
            held_out = load_preference_dataset(config.dataset_name, config.eval_split, config.dataset_config_name)
    splits = []
    for dataset, limit in ((train, config.max_train_samples), (held_out, config.max_eval_samples)):
        if dataset is None:
            splits.append(None)
            continue
        if limit is not None:
            dataset = dataset.select(range(min(limit, len(dataset))))
        with local_main_first():
            splits.append(
                tokenize_preference_dataset(
                    dataset, tokenizer, config.max_length, config.max_prompt_length, num_proc=config.dataset_num_proc
                )
            )
    return splits


def to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def count_tokens(batch: dict) -> int:
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()


class MicroBatches:
    """This rank's micro-batches in order, from any position: epoch e is a DistributedSampler permutation
    seeded by (seed, e), so the data position after a resume is just the number of micro-batches consumed."""

    def __init__(self, dataset, collator, env: DistEnv, batch_size: int, seed: int, micro_per_epoch: int):
        self.dataset, self.collator, self.env = dataset, collator, env
        self.batch_size, self.seed, self.micro_per_epoch = batch_size, seed, micro_per_epoch

    def _epoch_indices(self, epoch: int) -> list[int]:
        from torch.utils.data import DistributedSampler

        sampler = DistributedSampler(
            self.dataset, num_replicas=self.env.world_size, rank=self.env.rank, shuffle=True, seed=self.seed,
            drop_last=True,
        )
        sampler.set_epoch(epoch)
        return list(sampler)

    def iterate(self, start: int):
        from torch.utils.data import DataLoader

        epoch, offset = divmod(start, self.micro_per_epoch)
        while True:
            indices = self._epoch_indices(epoch)[offset * self.batch_size : self.micro_per_epoch * self.batch_size]
            # A generator of its own: starting a DataLoader draws a seed from it, and a draw from the global RNG
            # here would shift the dropout stream of a resumed run against the uninterrupted one.
            loader = DataLoader(
                self.dataset, batch_size=self.batch_size, sampler=indices, collate_fn=self.collator,
                generator=torch.Generator(),
            )
            yield from loader
            epoch, offset = epoch + 1, 0


class MetricWindow:
    """Sums of the loss, the SPEC metrics and token counts since the last log, reduced over ranks on demand."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.sums = torch.zeros(len(METRIC_KEYS) + 1, dtype=torch.float64, device=self.device)
        self.micro_batches, self.tokens, self.seconds = 0, 0, 0.0

    def add_time(self, seconds: float):
        """Training time only: evaluation and checkpointing do not dilute the throughput."""
        self.seconds += seconds

    def add(self, loss, metrics, tokens: int):
        values = torch.stack([loss.detach().double()] + [metrics[key].double() for key in METRIC_KEYS])
        self.sums += values.to(self.device)
        self.micro_batches += 1
        self.tokens += tokens

    def reduce(self) -> dict:
        counts = torch.tensor([self.micro_batches, self.tokens], dtype=torch.float64, device=self.device)
        sums, counts = all_reduce_sum(self.sums), all_reduce_sum(counts)
        means = (sums / counts[0]).tolist()
        # Ranks step in lockstep, so rank-local time is the window's time for the global token count.
        logs = {"loss": means[0], **dict(zip(METRIC_KEYS, means[1:]))}
        logs["tokens_per_s"] = float(counts[1]) / max(self.seconds, 1e-9)
        return logs


class Loggers:
    """Rank 0's sinks: stdout (through tqdm), output_dir/log.jsonl, and TensorBoard or W&B when asked."""

    def __init__(self, config: TrainConfig, env: DistEnv):
        self.enabled = env.is_main
        self.writer = self.wandb = None
        if not self.enabled:
            return
        os.makedirs(config.output_dir, exist_ok=True)
        self.jsonl = open(os.path.join(config.output_dir, LOG_FILE), "a", encoding="utf-8")
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
        tqdm.write(" ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}" for key, value in record.items()))
        self.jsonl.write(json.dumps(record) + "\n")
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


@torch.no_grad()
def evaluate_held_out(model, ref_model, dataset, collator, config: TrainConfig) -> dict:
    """Held-out ranking accuracy (paper eq. 4: mean log-prob of chosen > rejected) and the SPEC metrics.

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
        ref_logps = torch.tensor(dataset[REF_COLUMNS[0]] + dataset[REF_COLUMNS[1]], dtype=torch.float64)
    loss, metrics = preference_objective(
        sums, lengths, beta=config.beta, loss_type=config.loss_type, label_smoothing=config.label_smoothing,
        gamma_beta_ratio=config.gamma_beta_ratio, ref_logps=ref_logps, stats_scope="local",
    )
    results = {"eval/ranking_accuracy": ranking_summary(scores, config.beta)["ranking_accuracy"], "eval/loss": float(loss)}
    results.update({f"eval/{key}": float(value) for key, value in metrics.items()})
    return results


def use_bf16(config: TrainConfig, env: DistEnv) -> bool:
    """Whether to compute in bf16 ('auto': on CUDA only; CPUs run fp32 faster and exactly)."""
    if config.precision == "auto":
        return env.device.type == "cuda"
    return config.precision == "bf16"


class Trainer:
    """One training run: data, policy (and DPO reference) on the chosen engine, the loop, evaluation, saving."""

    def __init__(self, config: TrainConfig, env: DistEnv):
        self.config, self.env = config, env
        set_seed(config.seed)
        self.tokenizer = load_tokenizer(config.tokenizer_name_or_path or config.model_name_or_path)
        self.train_set, self.eval_set = load_splits(config, self.tokenizer)
        self.collator = PreferenceCollator(self.tokenizer.pad_token_id, packed=config.packed)
        self._plan_steps()
        self.bf16 = use_bf16(config, env)
        self._build_models()
        self.loggers = Loggers(config, env)

    def _plan_steps(self):
        config = self.config
        accumulation = config.gradient_accumulation_steps
        world_batch = self.env.world_size * config.per_device_train_batch_size
        # Micro-batches per epoch, whole optimizer steps only, so that epochs and steps line up.
        self.micro_per_epoch = len(self.train_set) // world_batch // accumulation * accumulation
        self.steps_per_epoch = self.micro_per_epoch // accumulation
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(self.train_set)} training pairs do not fill one optimizer step of {world_batch} pairs x "
                f"{accumulation} accumulation steps"
            )
        epochs_steps = math.ceil(config.num_train_epochs * self.steps_per_epoch)
        self.total_steps = config.max_steps if config.max_steps > 0 else epochs_steps

    def _build_models(self):
        config = self.config
        if config.cpu_offload and self.env.device.type != "cuda":
            raise ValueError("cpu_offload moves GPU state to the CPU; on a CPU-only machine everything is there already")
        loss_kwargs = dict(
            beta=config.beta, loss_type=config.loss_type, label_smoothing=config.label_smoothing,
            gamma_beta_ratio=config.gamma_beta_ratio, stats_scope=config.stats_scope, impl=config.loss_impl,
        )
        # fp32 master weights; bf16 compute comes from FSDP2's mixed precision or DeepSpeed's bf16 mode.
        model_kwargs = dict(tokenizer=self.tokenizer, dtype=torch.float32, attn_implementation=config.attn_implementation)
        optim = OptimConfig(
            learning_rate=config.learning_rate, weight_decay=config.weight_decay,
            betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
            warmup_steps=math.ceil(config.warmup_ratio * self.total_steps), total_steps=self.total_steps,
            max_grad_norm=config.max_grad_norm, gradient_accumulation_steps=config.gradient_accumulation_steps,
            micro_batch_size=config.per_device_train_batch_size, bf16=self.bf16, cpu_offload=config.cpu_offload,
        )
        # The engine calls the loader itself, so that no rank holds a whole model it does not need.
        load = functools.partial(load_policy, **model_kwargs, **loss_kwargs)
        set_seed(config.seed)  # the toy model's random init is the same in every run
        self.engine = ENGINES[config.backend](
            functools.partial(load, config.model_name_or_path, gradient_checkpointing=config.gradient_checkpointing),
            self.env, optim,
        )
        self.policy = self.engine.policy
        self.model = self.engine.model  # what to call: FSDP2's root module or the DeepSpeed engine
        self.ref_model = None
        if config.loss_type == "dpo" and REF_COLUMNS[0] not in self.train_set.column_names:
            # DPO without precomputed log-probs: the frozen reference model, sharded like the policy, under no-grad.
            set_seed(config.seed)
            reference_name = config.ref_model_name_or_path or config.model_name_or_path
            self.ref_model = self.engine.frozen(functools.partial(load, reference_name))

    def evaluate(self) -> dict:
        return evaluate_held_out(self.model, self.ref_model, self.eval_set, self.collator, self.config)

    def resume(self) -> int:
        path = resolve_resume(self.config.resume, self.config.output_dir)
        step = load_checkpoint(self.engine, path, self.env.rank)["global_step"]
        if self.env.is_main:
            tqdm.write(f"resumed from {path} at step {step}")
        return step

    def train_step(self, stream, window: MetricWindow) -> float:
        """One optimizer step over gradient_accumulation_steps micro-batches; returns the gradient norm."""
        accumulation = self.config.gradient_accumulation_steps
        started = time.perf_counter()
        for micro in range(accumulation):
            batch = next(stream)
            tokens = count_tokens(batch)
            batch = to_device(batch, self.env.device)
            if self.ref_model is not None:
                with torch.no_grad():
                    batch["ref_logps"], _ = self.ref_model(batch, sequence_logps=True)
            loss, metrics = self.model(batch)
            self.engine.backward(loss, last_micro_batch=micro == accumulation - 1)
            window.add(loss, metrics, tokens)
        grad_norm = self.engine.step()
        window.add_time(time.perf_counter() - started)
        return grad_norm

    def fit(self) -> dict:
        config = self.config
        start_step = self.resume() if config.resume else 0
        results = {"train_pairs": len(self.train_set), "total_steps": self.total_steps}
        if self.eval_set is not None and start_step == 0:
            before = self.evaluate()
            self.loggers.log(0, before)
            results["ranking_accuracy_before"] = before["eval/ranking_accuracy"]

        batches = MicroBatches(
            self.train_set, self.collator, self.env, config.per_device_train_batch_size, config.seed,
            self.micro_per_epoch,
        )
        stream = batches.iterate(start_step * config.gradient_accumulation_steps)
        window = MetricWindow(self.env.device)
        self.model.train()
        progress = tqdm(
            total=self.total_steps, initial=start_step, desc="training", disable=not self.env.is_main,
            dynamic_ncols=True,
        )
        for step in range(start_step + 1, self.total_steps + 1):
            grad_norm = self.train_step(stream, window)
            progress.update(1)
            if step % config.logging_steps == 0 or step == self.total_steps:
                logs = window.reduce()
                logs.update(grad_norm=grad_norm, lr=self.engine.lr, epoch=step / self.steps_per_epoch)
                logs["memory/peak_gib"] = peak_memory_gib(self.env.device)
                progress.set_postfix(loss=f"{logs['loss']:.4f}", tok_s=f"{logs['tokens_per_s']:.0f}")
                self.loggers.log(step, logs)
                window.reset()
            if self.eval_set is not None and config.eval_steps and step % config.eval_steps == 0 and step != self.total_steps:
                self.loggers.log(step, self.evaluate())
            if config.save_steps and step % config.save_steps == 0:
                save_checkpoint(
                    self.engine, config.output_dir, step, {"global_step": step, "config": vars(config)},
                    config.save_total_limit, self.env.rank,
                )
        progress.close()

        if self.eval_set is not None:
            after = self.evaluate()
            self.loggers.log(self.total_steps, after)
            results.update(after, ranking_accuracy_after=after["eval/ranking_accuracy"])
            if self.env.is_main:
                before = results.get("ranking_accuracy_before")
                shown = f"{before:.3f} -> " if before is not None else ""
                print(f"held-out ranking accuracy: {shown}{after['eval/ranking_accuracy']:.3f} ({len(self.eval_set)} pairs)")
        if config.save_final:
            self.save_final()
        self.loggers.close()
        return results

    def save_final(self):
        final_dir = os.path.join(self.config.output_dir, "final")
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        save_pretrained(self.engine, self.policy, self.tokenizer, final_dir, dtype, self.env.rank)
        if self.env.is_main:
            print(f"saved the trained model to {final_dir} (AutoModelForCausalLM.from_pretrained loads it)")


def main(argv: list[str] | None = None) -> dict:
    """Parse the settings, join the process group, train; returns the final results (ranking accuracy, eval metrics)."""
    config = parse_config(argv)
    env = init_distributed()
    try:
        return Trainer(config, env).fit()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
