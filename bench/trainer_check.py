"""`python bench/trainer_check.py --out DIR`: the trainer itself, end to end, on one GPU.

`torchrun --nproc_per_node 1 amapo_fast/train.py` with FSDP2 (NCCL on CUDA), bf16 mixed precision, the
fused Triton head, packed and prefix-shared batches (sdpa with a mask), on a random ~1.2B Llama-3.2-1B-shaped model built
here and saved as a local folder (vocabulary 128,256, so the head has the Llama-3 shape; the embedded
character-level tokenizer uses only its first ids). Run 1 trains STEPS steps and saves a checkpoint
halfway; run 2 resumes from that checkpoint into a fresh folder. Writes <out>/trainer.json: tokens/s
and peak memory per run (from the trainer's own log), and whether the resumed run's losses equal the
uninterrupted run's, step by step.

`--rehearse`: the CPU, gloo, the embedded tiny model ("toy"), the chunked head.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEPS = 4
LLAMA_1B = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=2048, rope_theta=500000.0, tie_word_embeddings=True,
)


def build_model(folder: Path) -> str:
    """A random-init Llama of LLAMA_1B's shape in bf16, saved with save_pretrained; returns the folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B)).to(torch.bfloat16)
    model.save_pretrained(folder)
    return str(folder)


def records(output_dir: Path) -> list:
    path = output_dir / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def train(args_list, log_path, timeout_s):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--standalone",
               str(REPO / "amapo_fast" / "train.py"), *args_list]
    begin = time.monotonic()
    with open(log_path, "w") as log:
        print("$ " + " ".join(command), file=log, flush=True)
        code = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
    return code, time.monotonic() - begin


def summary(output_dir: Path) -> dict:
    logged = [r for r in records(output_dir) if "loss" in r]
    return {
        "losses": {r["step"]: r["loss"] for r in logged},
        "tokens_per_s": [r.get("tokens_per_s") for r in logged],
        "peak_memory_gib": max((r.get("memory/peak_gib") or 0 for r in logged), default=None),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rehearse", action="store_true")
    parser.add_argument("--timeout-s", type=float, default=120, help="per training run")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    begin = time.monotonic()
    model = "toy" if args.rehearse else build_model(args.out / "trainer-model")
    result = {"model": "toy (embedded tiny Llama)" if args.rehearse else f"random Llama {LLAMA_1B}",
              "build_s": round(time.monotonic() - begin, 1)}
    common = [
        "--model_name_or_path", model, "--tokenizer_name_or_path", "toy", "--dataset_name", "toy",
        "--toy_num_train", "256", "--eval_split", "none", "--max_steps", str(STEPS), "--save_steps", str(STEPS // 2),
        "--logging_steps", "1", "--per_device_train_batch_size", "8", "--packed", "true", "--prefix_sharing", "true",
        "--save_final", "false", "--warmup_ratio", "0", "--learning_rate", "1e-5", "--seed", "0", "--backend", "fsdp2",
    ]
    if not args.rehearse:
        # sdpa with prefix sharing's mask: FlexAttention's compile alone would take most of the stage's minute
        # and a half (it is the trainer's GPU default; bench/train_step.py measures it).
        common += ["--loss_impl", "triton", "--precision", "bf16", "--attn_implementation", "sdpa"]
    first, second = args.out / "trainer-run", args.out / "trainer-resumed"
    code, seconds = train(common + ["--output_dir", str(first)], args.out / "trainer-run.log", args.timeout_s)
    result["run"] = {"exit_code": code, "seconds": round(seconds, 1), **summary(first)}
    checkpoint = first / f"checkpoint-{STEPS // 2}"
    code, seconds = train(common + ["--output_dir", str(second), "--resume", str(checkpoint)],
                          args.out / "trainer-resumed.log", args.timeout_s)
    result["resumed"] = {"exit_code": code, "seconds": round(seconds, 1), "from": str(checkpoint), **summary(second)}
    uninterrupted, resumed = result["run"]["losses"], result["resumed"]["losses"]
    compared = [step for step in range(STEPS // 2 + 1, STEPS + 1)]
    result["resumed_losses_equal"] = bool(compared) and all(
        step in uninterrupted and step in resumed and uninterrupted[step] == resumed[step] for step in compared
    )
    (args.out / "trainer.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    ok = result["run"]["exit_code"] == 0 and result["resumed"]["exit_code"] == 0 and result["resumed_losses_equal"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
