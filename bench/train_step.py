"""`python bench/train_step.py`: a full train step with the fused loss and with the reference loss.

The model is a random-init Llama-architecture causal LM wrapped as `amapo_fast.model.PreferencePolicy`
(backbone -> LinearPreferenceHead; the head's `impl` picks fused or reference), trained with AdamW:
  cpu   a tiny Llama (D=256, 2 layers, V=32000, seq 256), fp32;
  cuda  a ~1.2B Llama (the Llama-3.2-1B layout: D=2048, 16 layers, GQA 32/8, V=128256, tied embeddings,
        seq 2048), bf16 weights and AdamW states, gradient checkpointing, sdpa or flash-attention-2.
Reports the median step time and the step's peak memory at a fixed micro-batch, then (GPU only) the
largest micro-batch, in pairs, each loss fits: doubling until out of memory.
"""
import argparse
import datetime
import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from amapo_fast.model import PreferencePolicy, resolve_attn_implementation  # noqa: E402
from bench import report  # noqa: E402
from bench.worker import CpuPeakMemory  # noqa: E402
from bench.workloads import IGNORE_INDEX, Shape, check_workload, make_labels  # noqa: E402

MODELS = {
    "cpu": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=False),
    "cuda": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
}
DEFAULTS = {"cpu": dict(seq_len=256, pairs=2, dtype="fp32"), "cuda": dict(seq_len=2048, pairs=4, dtype="bf16")}
LOSSES = {"fused": "auto", "reference": "reference"}  # auto = Triton kernels on CUDA, chunked PyTorch on CPU
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_policy(device, dtype, impl, checkpointing):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**MODELS[device.type], max_position_embeddings=4096, attention_dropout=0.0)
    torch.manual_seed(0)
    with device:  # initialise on the device: a 1.2B model's random init on the host takes longer than its steps
        causal_lm = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=resolve_attn_implementation())
    if checkpointing:
        causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return PreferencePolicy(causal_lm, beta=2.0, loss_type="amapo", impl=impl)


def make_batch(pairs, seq_len, vocab, workload, device, seed):
    """input_ids / attention_mask / labels [2*pairs, seq_len]; attention covers prompt + response, not padding."""
    shape = Shape(tokens=2 * pairs * seq_len, seq_len=seq_len, hidden=1, vocab=vocab)
    labels = make_labels(workload, shape, seed)
    position = torch.arange(seq_len)
    response = labels != IGNORE_INDEX
    last = torch.where(response, position, torch.zeros_like(position)).amax(dim=1)
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, labels.shape, generator=generator)
    batch = {"input_ids": input_ids, "attention_mask": (position <= last[:, None]).long(), "labels": labels}
    return {key: value.to(device) for key, value in batch.items()}


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


def train_step(policy, optimizer, batch):
    loss, _ = policy(batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(policy, optimizer, batch, device, steps):
    train_step(policy, optimizer, batch)  # warm-up: optimizer state, kernel compilation, autotuning
    times = []
    for _ in range(steps):
        synchronize(device)
        begin = time.perf_counter()
        train_step(policy, optimizer, batch)
        synchronize(device)
        times.append(time.perf_counter() - begin)
    return {"step_s": statistics.median(times), "step_samples_s": times}


def step_memory(policy, optimizer, batch, device, memory):
    train_step(policy, optimizer, batch)  # the optimizer state exists before the measured step, as in training
    memory.start()
    train_step(policy, optimizer, batch)
    return memory.read()


def largest_micro_batch(policy, optimizer, seq_len, vocab, workload, device, limit):
    """Largest power-of-two pairs per micro-batch (<= limit) whose train step runs without OOM."""
    fits, pairs = 0, 1
    while pairs <= limit:
        try:
            train_step(policy, optimizer, make_batch(pairs, seq_len, vocab, workload, device, seed=pairs))
            synchronize(device)
            fits = pairs
            pairs *= 2
        except torch.OutOfMemoryError:
            break
        finally:
            optimizer.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
    return {"largest_pairs": fits, "search_limit_pairs": limit, "hit_limit": fits == limit}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pairs", type=int, help="pairs per micro-batch for the timed steps")
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--workload", default="realistic", help="dense, realistic or promptXX (see workloads.py)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per loss")
    parser.add_argument("--max-pairs", type=int, default=64, help="GPU micro-batch search stops here (0: no search)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--name", help="file stem (default train-step-<device>-<date>)")
    return parser.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    defaults = DEFAULTS[device.type]
    seq_len, pairs = args.seq_len or defaults["seq_len"], args.pairs or defaults["pairs"]
    dtype = DTYPES[defaults["dtype"]]
    workload = check_workload(args.workload)
    vocab = MODELS[device.type]["vocab_size"]
    batch = make_batch(pairs, seq_len, vocab, workload, device, seed=0)
    results = {name: {"impl": impl} for name, impl in LOSSES.items()}

    def each_loss(phase, measure_one):
        # A fresh model and optimizer per loss and phase; the phases run in order over both losses because
        # the memory phase changes the host allocator (see StepMemory).
        for name, row in results.items():
            policy = build_policy(device, dtype, row["impl"], checkpointing=device.type == "cuda")
            optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
            row["parameters"] = sum(p.numel() for p in policy.causal_lm.parameters())
            try:
                row.update(measure_one(policy, optimizer))
            except torch.OutOfMemoryError:
                row.setdefault("error", f"{phase}: out of memory at {pairs} pairs")
            print(f"{phase} {name}: {json.dumps({k: v for k, v in row.items() if not k.endswith('samples_s')})}", flush=True)
            del policy, optimizer
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    setup = {"model": MODELS[device.type], "seq_len": seq_len, "pairs": pairs, "workload": workload,
             "gradient_checkpointing": device.type == "cuda", "optimizer": "AdamW"}
    stem = args.name or f"train-step-{device.type}-{datetime.date.today().isoformat()}"
    args.out.mkdir(parents=True, exist_ok=True)
    env = report.environment(device, defaults["dtype"], ["bench/train_step.py"] + list(argv))

    def save():  # after every phase, so a run stopped from outside still leaves what it measured
        text = render({**env, **report.machine_load()}, setup, results)
        (args.out / f"{stem}.json").write_text(json.dumps({"environment": env, "setup": setup, "results": results}, indent=1))
        (args.out / f"{stem}.md").write_text(text)
        return text

    each_loss("time", lambda policy, optimizer: time_steps(policy, optimizer, batch, device, args.steps))
    save()
    memory = StepMemory(device)
    each_loss("memory", lambda policy, optimizer: step_memory(policy, optimizer, batch, device, memory))
    save()
    if device.type == "cuda" and args.max_pairs:
        each_loss("search", lambda policy, optimizer: largest_micro_batch(
            policy, optimizer, seq_len, vocab, workload, device, args.max_pairs))
    print(save())
    return results


def _mib(row, key):
    return "—" if key not in row else f"{row[key] / 2**20:.0f}"


def render(env, setup, results):
    lines = [
        f"# Train-step benchmark: {env['device_name']} ({env['device']}), {env['dtype']}\n",
        f"- date (UTC): {env['date_utc']}\n- command: `{env['command']}`\n- device: {env['device_detail']}\n"
        f"- setup: {json.dumps(setup)}\n",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v) + "\n",
        f"- load average (1/5/15 min, when written): {' / '.join(map(str, env['load_average']))}\n\n",
        "| loss | params | step s (median) | step peak above start MiB | peak allocated MiB | largest micro-batch (pairs) |\n",
        "|---|---|---|---|---|---|\n",
    ]
    for name, row in results.items():
        largest = "— (GPU only)" if "largest_pairs" not in row else f"{row['largest_pairs']}{'+' if row['hit_limit'] else ''}"
        step = f"{row['step_s']:.3f}" if "step_s" in row else row.get("error", "—")
        lines.append(
            f"| {name} | {row.get('parameters', 0) / 1e6:.0f}M | {step} | {_mib(row, 'step_peak_above_start_bytes')} "
            f"| {_mib(row, 'peak_allocated_bytes')} | {largest} |\n"
        )
    if any("error" in row for row in results.values()):
        lines.append("\n" + "".join(f"- {name}: {row['error']}\n" for name, row in results.items() if "error" in row))
    return "".join(lines)


if __name__ == "__main__":
    main()
