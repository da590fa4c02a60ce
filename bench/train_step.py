"""`python bench/train_step.py`: whole preference-training steps, ours against what users run today.

Every method trains the same random-init Llama-architecture model (same init) on the same preference pairs with
the same micro-batch, one AdamW step per micro-batch:
  ours padded            PreferencePolicy, fused head, one padded row per sequence
  ours packed            padding-free: every sequence in one row (varlen attention from position ids)
  ours prefix            prefix sharing, padded: each pair one row [prompt | chosen | rejected], prompt run once
  ours packed+prefix     prefix sharing and packing: every pair's block in one row
  ours DPO packed+prefix the same with DPO, whose frozen reference model runs the same layout under no-grad
  ours LoRA packed+prefix  packed+prefix with peft LoRA adapters (r 16, alpha 32, every linear layer of the
                         decoder) on the frozen model: only the adapters get gradients and AdamW state
  ours LoRA DPO packed+prefix  the same with DPO, its reference the same model with the adapters switched off
  TRL CPO simpo          trl's CPOTrainer(loss_type="simpo", cpo_alpha=0), its own collator and loss
  TRL DPO                trl's DPOTrainer (reference model copied from the policy)
  authors' style         padded, full [tokens x vocab] logits upcast to fp32, log_softmax over every position
                         (the way the paper's released trainer, built on TRL's DPOTrainer, computes its loss)
Ours and TRL CPO run SimPO (AMaPO costs the same in our head); the authors' style runs AMaPO.
TRL is optional (a bench-only dependency): its rows are skipped, with a line saying so, when it is not installed.

Workloads (pair lengths drawn per pair, see bench/workloads.py for where the UltraFeedback figures come from):
  ultrafeedback  prompt ~ 180 tokens mean, answers ~ 307, max_length 1024 / max_prompt 512 (the recipe's);
  long-prompt    multi-turn chat: the conversation so far is the prompt (~1000 tokens mean), answers ~ 240,
                 max_length 2048 / max_prompt 1800 (the Llama-3 recipe's).
Models: CPU a small Llama (D=256, 4 layers, GQA 4/2, V=8192, fp32: a step of 2-4 pairs takes about 1-3 s on two
cores); CUDA the Llama-3.2-1B layout (D=2048, 16 layers, GQA 32/8, V=128256, tied), bf16, gradient checkpointing.

Reported per method and workload: median step time, pairs/s, tokens/s (sequence tokens: a shared prompt counts
for both of its answers, so every method is credited the same tokens), the step's peak memory, and the largest
micro-batch that fits: on GPU doubling until out of memory (up to --max-pairs); on CPU, where nothing runs out
of memory first, doubling while the step's peak stays under --cpu-budget-gib (off unless --max-pairs is given).
Writes <name>.md, <name>.json and <name>.png under --out (rewritten after every phase).
"""
import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib.util
import json
import statistics
import string
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from amapo_fast import adapters  # noqa: E402
from amapo_fast.data import PreferenceCollator  # noqa: E402
from amapo_fast.model import PreferencePolicy, resolve_attn_implementation  # noqa: E402
from amapo_fast.toy import build_toy_tokenizer  # noqa: E402
from bench import report  # noqa: E402
from bench.worker import CpuPeakMemory  # noqa: E402
from bench.workloads import UltraFeedbackLengths  # noqa: E402

MODELS = {
    "cpu": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=8192, tie_word_embeddings=False),
    "cuda": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
}
DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}


@dataclass(frozen=True)
class Workload:
    lengths: UltraFeedbackLengths
    max_length: int
    pairs: dict  # default pairs per micro-batch, per device type


WORKLOADS = {
    "ultrafeedback": Workload(UltraFeedbackLengths(), 1024, {"cpu": 3, "cuda": 8}),
    # Multi-turn chat: our assumption, no published length statistics were reachable from here. The prompt is the
    # conversation so far (median 900 tokens, mean ~1000), answers like UltraFeedback's but a little shorter.
    "long-prompt": Workload(
        UltraFeedbackLengths(prompt_median=900.0, prompt_sigma=0.5, response_median=200.0, response_sigma=0.6,
                             max_prompt_fraction=1800 / 2048),
        2048, {"cpu": 2, "cuda": 4},
    ),
}
BETA, GAMMA_BETA_RATIO = 2.0, 0.5
LORA = adapters.AdapterSettings(r=16, alpha=32.0, dropout=0.0, target_modules=adapters.ALL_LINEAR)


def make_rows(workload: Workload, pairs: int, seed: int):
    """Text pairs for TRL (prompt, chosen, rejected strings) and the same pairs tokenized for ours.

    The toy character-level tokenizer gives one token per character, so the drawn lengths are exact. BOS opens
    the prompt text and EOS closes each answer, so that neither TRL trainer adds one of its own.
    """
    tokenizer = build_toy_tokenizer()
    generator = torch.Generator().manual_seed(seed)
    prompt, chosen, rejected = workload.lengths.sample(pairs, workload.max_length, generator)
    alphabet = string.ascii_letters + string.digits + " "

    def text(length):
        picks = torch.randint(0, len(alphabet), (length,), generator=generator).tolist()
        return "".join(alphabet[i] for i in picks)

    texts, tokenized = [], []
    for p, c, r in zip(prompt.tolist(), chosen.tolist(), rejected.tolist()):
        row = {"prompt": tokenizer.bos_token + text(p - 1), "chosen": text(c - 1) + tokenizer.eos_token,
               "rejected": text(r - 1) + tokenizer.eos_token}
        texts.append(row)
        ids = {key: tokenizer(value, add_special_tokens=False).input_ids for key, value in row.items()}
        tokenized.append({f"{key}_input_ids": value for key, value in ids.items()})
    return texts, tokenized


def sequence_tokens(rows) -> int:
    """Tokens of the batch's 2B sequences (prompt + answer - 1 each: the last answer token is only a target)."""
    return sum(2 * len(r["prompt_input_ids"]) + len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) - 2
               for r in rows)


def build_causal_lm(device):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**MODELS[device.type], max_position_embeddings=4096, attention_dropout=0.0)
    torch.manual_seed(0)  # every method starts from the same weights
    with device:  # a 1.2B model's random init on the host takes longer than its steps
        return AutoModelForCausalLM.from_config(config, dtype=DTYPES[device.type], attn_implementation="sdpa")


def _checkpointing(causal_lm, device):
    if device.type == "cuda":
        causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class OursStep:
    """One AdamW step of PreferencePolicy on a PreferenceCollator batch (and DPO's reference forward)."""

    def __init__(self, device, rows, *, packed, prefix_sharing, loss_type="simpo", impl="auto", lora=False):
        causal_lm = build_causal_lm(device)
        attn = resolve_attn_implementation("auto", prefix_sharing)
        causal_lm.set_attn_implementation(attn)
        _checkpointing(causal_lm, device)
        peft_model = adapters.add_adapters(causal_lm, LORA, device.type == "cuda") if lora else None
        self.policy = PreferencePolicy(causal_lm, peft_model, beta=BETA, loss_type=loss_type, impl=impl,
                                       gamma_beta_ratio=GAMMA_BETA_RATIO)
        self.reference = None
        if loss_type == "dpo" and lora:
            self.reference = adapters.DisabledAdapters(self.policy, peft_model)
        elif loss_type == "dpo":
            reference = build_causal_lm(device)
            reference.set_attn_implementation(attn)
            self.reference = PreferencePolicy(reference.requires_grad_(False), beta=BETA).eval()
        self.optimizer = torch.optim.AdamW([p for p in self.policy.parameters() if p.requires_grad], lr=1e-6)
        collator = PreferenceCollator(build_toy_tokenizer().pad_token_id, packed=packed, prefix_sharing=prefix_sharing)
        self.batch = {key: value.to(device) for key, value in collator(rows).items()}
        self.parameters = sum(p.numel() for p in causal_lm.parameters())
        self.input_tokens = int((self.batch["input_ids"] != collator.pad_token_id).sum())  # what the trunk runs

    def __call__(self):
        batch = self.batch
        if self.reference is not None:
            with torch.no_grad():
                batch = {**batch, "ref_logps": self.reference(batch, sequence_logps=True)[0]}
        loss, _ = self.policy(batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class TrlStep:
    """One step of a TRL trainer as its `train()` runs it: `training_step` (forward, loss, backward) then AdamW."""

    def __init__(self, device, texts, trainer_name):
        from datasets import Dataset

        causal_lm = build_causal_lm(device)
        self.output_dir = tempfile.TemporaryDirectory(prefix="trl-bench-")
        common = dict(output_dir=self.output_dir.name, per_device_train_batch_size=len(texts), learning_rate=1e-6,
                      report_to=[], use_cpu=device.type == "cpu", bf16=device.type == "cuda", max_length=4096,
                      gradient_checkpointing=device.type == "cuda", dataloader_num_workers=0, save_strategy="no")
        if trainer_name == "cpo":
            from trl.experimental.cpo import CPOConfig, CPOTrainer

            args = CPOConfig(**common, loss_type="simpo", cpo_alpha=0.0, beta=BETA, simpo_gamma=BETA * GAMMA_BETA_RATIO,
                             max_completion_length=4096)
            trainer_class, reference = CPOTrainer, {}
        else:
            from trl import DPOConfig, DPOTrainer

            # The frozen reference: the same initial weights (DPOTrainer would otherwise reload the policy by name).
            reference = {"ref_model": build_causal_lm(device)}
            args, trainer_class = DPOConfig(**common, beta=0.1), DPOTrainer
        with contextlib.redirect_stdout(sys.stderr):
            self.trainer = trainer_class(model=causal_lm, args=args, train_dataset=Dataset.from_list(texts),
                                         processing_class=build_toy_tokenizer(), **reference)
        self.trainer.create_optimizer_and_scheduler(num_training_steps=1000)
        self.trainer.current_gradient_accumulation_steps = 1  # set by train() before its first training_step
        self.batch = next(iter(self.trainer.get_train_dataloader()))
        self.parameters = sum(p.numel() for p in causal_lm.parameters())
        # TRL's sequences keep their last token (its logits are unused), one more per sequence than ours.
        self.input_tokens = sum(int(value.sum()) for key, value in self.batch.items()
                                if key.endswith("attention_mask") and not key.startswith("prompt"))

    def __call__(self):
        self.trainer.model.train()
        self.trainer.training_step(self.trainer.model, self.batch)
        self.trainer.optimizer.step()
        self.trainer.optimizer.zero_grad(set_to_none=True)


def _trl_missing():
    return None if importlib.util.find_spec("trl") else "trl is not installed (pip install trl: a bench-only dependency)"


# name -> (builder(device, texts, rows), reason it cannot run or None)
METHODS = {
    "ours padded": (lambda d, t, r: OursStep(d, r, packed=False, prefix_sharing=False), lambda: None),
    "ours packed": (lambda d, t, r: OursStep(d, r, packed=True, prefix_sharing=False), lambda: None),
    "ours prefix": (lambda d, t, r: OursStep(d, r, packed=False, prefix_sharing=True), lambda: None),
    "ours packed+prefix": (lambda d, t, r: OursStep(d, r, packed=True, prefix_sharing=True), lambda: None),
    "ours DPO packed+prefix": (
        lambda d, t, r: OursStep(d, r, packed=True, prefix_sharing=True, loss_type="dpo"), lambda: None),
    "ours LoRA packed+prefix": (
        lambda d, t, r: OursStep(d, r, packed=True, prefix_sharing=True, lora=True), lambda: _missing("peft")),
    "ours LoRA DPO packed+prefix": (
        lambda d, t, r: OursStep(d, r, packed=True, prefix_sharing=True, loss_type="dpo", lora=True),
        lambda: _missing("peft")),
    "TRL CPO simpo": (lambda d, t, r: TrlStep(d, t, "cpo"), _trl_missing),
    "TRL DPO": (lambda d, t, r: TrlStep(d, t, "dpo"), _trl_missing),
    "authors' style": (
        lambda d, t, r: OursStep(d, r, packed=False, prefix_sharing=False, loss_type="amapo", impl="reference"),
        lambda: None),
}


def _missing(package):
    return None if importlib.util.find_spec(package) else f"{package} is not installed"


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class StepMemory:
    """Peak memory of one step: on GPU the allocator's peak (absolute, and above the resident model +
    optimizer state); on CPU the resident-set peak above the level before the step (creating it switches
    the host allocator to one mapping per large buffer, see bench/worker.py, so time steps before)."""

    def __init__(self, device):
        self.cpu = CpuPeakMemory() if device.type == "cpu" else None

    def start(self):
        gc.collect()
        if self.cpu:
            self.cpu.start()
        else:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()

    def read(self):
        if self.cpu:
            return {"step_peak_above_start_bytes": self.cpu.peak_bytes()}
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"peak_allocated_bytes": peak, "step_peak_above_start_bytes": peak - self.base}


def time_round_robin(steps_by_name, device, rounds):
    """Step times per method: one warm-up step each (optimizer state, compilation, autotuning), then `rounds`
    rounds that time one step of every method in turn, so that a shared machine's changing load falls on all
    methods alike rather than on whichever ran during a busy minute."""
    times = {name: [] for name in steps_by_name}
    cpu_times = {name: [] for name in steps_by_name}
    for step in steps_by_name.values():
        step()
    for _ in range(rounds):
        for name, step in steps_by_name.items():
            synchronize(device)
            begin, cpu_begin = time.perf_counter(), time.process_time()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - begin)
            cpu_times[name].append(time.process_time() - cpu_begin)
    # Process CPU time (all threads) is the steadier figure on a shared CPU: waiting for a core is not counted.
    return {
        name: {"step_s": statistics.median(times[name]), "step_samples_s": times[name],
               "cpu_s": statistics.median(cpu_times[name]), "cpu_samples_s": cpu_times[name]}
        for name in times
    }


def step_memory(step, memory):
    step()  # the optimizer state exists before the measured step, as in training
    memory.start()
    step()
    return memory.read()


def largest_micro_batch(build, workload, device, limit, memory, budget_bytes):
    """Largest power-of-two pairs per micro-batch (<= limit) whose step runs: without running out of memory on
    GPU, with a step peak under the budget on CPU."""
    fits, pairs = 0, 1
    while pairs <= limit:
        try:
            texts, rows = make_rows(workload, pairs, seed=pairs)
            step = build(device, texts, rows)
            used = step_memory(step, memory)["step_peak_above_start_bytes"]
            del step
            if budget_bytes and used > budget_bytes:
                break
            fits = pairs
            pairs *= 2
        except torch.OutOfMemoryError:
            break
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"largest_pairs": fits, "search_limit_pairs": limit, "hit_limit": fits == limit}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {', '.join(WORKLOADS)}")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated method names (see above)")
    parser.add_argument("--pairs", type=int, help="pairs per micro-batch for every workload (default: per workload)")
    parser.add_argument("--seq-len", type=int, help="cap every workload's max_length (prompt + answer) at this")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method")
    parser.add_argument("--max-pairs", type=int, help="micro-batch search stops here; 0: no search "
                        "(default: 64 on GPU, no search on CPU)")
    parser.add_argument("--cpu-budget-gib", type=float, default=2.0, help="CPU search: largest step peak that 'fits'")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--name", help="file stem (default train-step-<device>-<date>)")
    return parser.parse_args(argv)


def _names(text, known, what):
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise SystemExit(f"--{what}: unknown {unknown or text!r}; choose from {', '.join(known)}")
    return names


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    workloads = _names(args.workloads, WORKLOADS, "workloads")
    methods = _names(args.methods, METHODS, "methods")
    max_pairs = args.max_pairs if args.max_pairs is not None else (64 if device.type == "cuda" else 0)
    skipped = {name: reason for name in methods if (reason := METHODS[name][1]())}
    for name, reason in skipped.items():
        print(f"skipping {name}: {reason}", flush=True)
    methods = [name for name in methods if name not in skipped]

    cases = {}  # (workload, method) -> row
    data, effective = {}, {}  # per workload: the fixed batch's pairs, and the workload after --seq-len
    for workload_name in workloads:
        workload = WORKLOADS[workload_name]
        if args.seq_len:
            workload = dataclasses.replace(workload, max_length=min(workload.max_length, args.seq_len))
        effective[workload_name] = workload
        pairs = args.pairs or workload.pairs[device.type]
        texts, rows = make_rows(workload, pairs, seed=0)
        data[workload_name] = (texts, rows)
        prompt = sum(len(r["prompt_input_ids"]) for r in rows)
        tokens = sequence_tokens(rows)
        for name in methods:
            cases[workload_name, name] = {
                "workload": workload_name, "method": name, "pairs": pairs, "sequence_tokens": tokens,
                "prompt_fraction": 2 * prompt / (tokens + 2 * len(rows)),
            }

    setup = {"model": MODELS[device.type], "dtype": str(DTYPES[device.type]), "optimizer": "AdamW",
             "gradient_checkpointing": device.type == "cuda", "beta": BETA, "gamma_beta_ratio": GAMMA_BETA_RATIO,
             "max_length": {name: min(WORKLOADS[name].max_length, args.seq_len or 10**9) for name in workloads},
             "skipped": skipped}
    stem = args.name or f"train-step-{device.type}-{datetime.date.today().isoformat()}"
    args.out.mkdir(parents=True, exist_ok=True)
    env = report.environment(device, "bf16" if device.type == "cuda" else "fp32", ["bench/train_step.py"] + list(argv))

    def save():  # after every phase, so a run stopped from outside still leaves what it measured
        rows_out = list(cases.values())
        text = render({**env, **report.machine_load()}, setup, rows_out)
        (args.out / f"{stem}.json").write_text(json.dumps({"environment": env, "setup": setup, "results": rows_out}, indent=1))
        (args.out / f"{stem}.md").write_text(text)
        model = setup["model"]
        plot(rows_out, args.out / f"{stem}.png",
             f"One training step per method: Llama D={model['hidden_size']}, {model['num_hidden_layers']} layers, "
             f"V={model['vocab_size']}, {setup['dtype']}, {env['device_name']} ({env['device']})")
        return text

    def each(phase, measure):
        """measure(row, build) for every case; build() makes the method's step on the workload's fixed batch."""
        for (workload_name, name), row in cases.items():
            if "error" in row:
                continue
            texts, rows = data[workload_name]
            try:
                row.update(measure(row, lambda: METHODS[name][0](device, texts, rows)))
            except torch.OutOfMemoryError:
                row["error"] = f"{phase}: out of memory at {row['pairs']} pairs"
            except Exception as error:  # one method failing must not lose the others' rows
                row["error"] = f"{phase}: {type(error).__name__}: {str(error)[:300]}"
            shown = {k: v for k, v in row.items() if not k.endswith("samples_s")}
            print(f"{phase} {workload_name} / {name}: {json.dumps(shown)}", flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        save()

    # Timing: on CPU every method of a workload is built first and timed in turns (see time_round_robin); on GPU
    # one method at a time, since a 1B model's weights and optimizer state for every method would not fit.
    for workload_name in workloads:
        texts, rows = data[workload_name]
        groups = [methods] if device.type == "cpu" else [[name] for name in methods]
        for group in groups:
            steps_by_name = {}
            for name in group:
                row = cases[workload_name, name]
                try:
                    steps_by_name[name] = METHODS[name][0](device, texts, rows)
                    row.update(parameters=steps_by_name[name].parameters, input_tokens=steps_by_name[name].input_tokens)
                except Exception as error:  # one method failing must not lose the others' rows
                    row["error"] = f"build: {type(error).__name__}: {str(error)[:300]}"
            try:
                timings = time_round_robin(steps_by_name, device, args.steps)
            except torch.OutOfMemoryError:
                timings = {}
                for name in steps_by_name:
                    cases[workload_name, name]["error"] = f"time: out of memory at {cases[workload_name, name]['pairs']} pairs"
            for name, timing in timings.items():
                row = cases[workload_name, name]
                row.update(timing, pairs_per_s=row["pairs"] / timing["step_s"],
                           tokens_per_s=row["sequence_tokens"] / timing["step_s"])
                print(f"time {workload_name} / {name}: {timing['step_s']:.3f} s", flush=True)
            del steps_by_name
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            save()
    memory = StepMemory(device)
    each("memory", lambda row, build: step_memory(build(), memory))
    if max_pairs:
        budget = int(args.cpu_budget_gib * 2**30) if device.type == "cpu" else 0
        setup["micro_batch_search"] = {"limit_pairs": max_pairs, "cpu_budget_gib": args.cpu_budget_gib if budget else None}
        each("search", lambda row, build: largest_micro_batch(
            METHODS[row["method"]][0], effective[row["workload"]], device, max_pairs, memory, budget))
    print(save())
    return cases


def _mib(row, key):
    return "—" if key not in row else f"{row[key] / 2**20:.0f}"


def render(env, setup, rows):
    lines = [
        f"# Train-step benchmark: {env['device_name']} ({env['device']}), {env['dtype']}\n",
        f"- date (UTC): {env['date_utc']}\n- command: `{env['command']}`\n- device: {env['device_detail']}\n"
        f"- setup: {json.dumps(setup)}\n",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v) + "\n",
        f"- load average (1/5/15 min, when written): {' / '.join(map(str, env['load_average']))}\n",
        "- tokens run: positions the model's trunk runs, padding excluded (prefix sharing runs each prompt once; "
        "TRL keeps each sequence's last token). pairs/s and tokens/s credit every method with the same sequence "
        "tokens. CPU s: process CPU time of the step, all threads (on a shared machine the steadier figure: time "
        "spent waiting for a core is not in it); \"CPU time vs X\" = X's CPU s / this method's.\n",
    ]
    for workload in dict.fromkeys(row["workload"] for row in rows):
        members = [row for row in rows if row["workload"] == workload]
        first = members[0]
        baseline = {name: next((r for r in members if r["method"] == name and "pairs_per_s" in r), None)
                    for name in ("ours packed", "TRL CPO simpo")}
        lines += [
            f"\n## {workload}: {first['pairs']} pairs per micro-batch, {first['sequence_tokens']} sequence tokens, "
            f"prompt fraction {first['prompt_fraction']:.2f}\n\n",
            "| method | tokens run | step s (median) | CPU s | pairs/s | tokens/s | vs ours packed | vs TRL CPO simpo "
            "| CPU time vs ours packed | CPU time vs TRL CPO simpo | step peak above start MiB | peak allocated MiB "
            "| largest micro-batch (pairs) |\n",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        ]
        for row in members:
            if "pairs_per_s" not in row:
                lines.append(f"| {row['method']} | | {row.get('error', '—')} |" + " |" * 10 + "\n")
                continue
            ratios = [f"{row['pairs_per_s'] / base['pairs_per_s']:.2f}x" if base else "—" for base in baseline.values()]
            ratios += [f"{base['cpu_s'] / row['cpu_s']:.2f}x" if base and "cpu_s" in base else "—" for base in baseline.values()]
            largest = "—" if "largest_pairs" not in row else f"{row['largest_pairs']}{'+' if row['hit_limit'] else ''}"
            lines.append(
                f"| {row['method']} | {row['input_tokens']} | {row['step_s']:.3f} | {row.get('cpu_s', float('nan')):.2f} "
                f"| {row['pairs_per_s']:.2f} | {row['tokens_per_s']:.0f} | {' | '.join(ratios)} "
                f"| {_mib(row, 'step_peak_above_start_bytes')} "
                f"| {_mib(row, 'peak_allocated_bytes')} | {largest} |\n"
            )
        errors = [row for row in members if "error" in row]
        if errors:
            lines.append("\n" + "".join(f"- {row['method']}: {row['error']}\n" for row in errors))
    if setup["skipped"]:
        lines.append("\nNot run: " + "; ".join(f"{name}: {reason}" for name, reason in setup["skipped"].items()) + "\n")
    return "".join(lines)


def plot(rows, path: Path, title: str):
    """pairs/s and step peak memory per method, one column per workload, under `title` (what was measured where)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(row["workload"] for row in rows))
    figure, axes = plt.subplots(2, len(workloads), figsize=(6 * len(workloads), 7), squeeze=False)
    for column, workload in enumerate(workloads):
        members = [row for row in rows if row["workload"] == workload]
        names = [row["method"] for row in members]
        for line, (key, label, scale) in enumerate((("pairs_per_s", "pairs/s", 1), ("step_peak_above_start_bytes", "step peak MiB", 2**20))):
            values = [row.get(key, 0) / scale for row in members]
            axis = axes[line][column]
            axis.barh(names, values, color=["tab:blue" if name.startswith("ours") else "tab:gray" for name in names])
            axis.invert_yaxis()
            axis.set_xlabel(label)
            if line == 0:
                axis.set_title(workload)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    main()
