"""`python bench/kernel_profile.py`: every kernel of the fused loss timed on its own, beside cuBLAS.

At the Llama-3-8B head (D=4096, V=128256, bf16) and N response tokens (default 4096 and 16384), the
median time and TFLOP/s of
  - each forward variant (`triton` tiles and `cublas` chunks + row reduction), lean and with metrics;
  - one dlogits chunk of the backward (the Triton kernel that recomputes the chunk's logits);
  - the dH GEMM (dlogits @ W_chunk into the fp32 accumulator) and the dW GEMM (dlogits^T @ H) of a chunk;
each next to a plain cuBLAS bf16 GEMM of the same shape (the roofline the kernel is judged against);
plus the config the autotuner chose for each Triton kernel with its registers, spills and shared
memory, the way 16-bit GEMMs accumulate into fp32 on this machine, a one-iteration torch.profiler
table of the whole loss (forward + backward), and the GPU's clocks and power from nvidia-smi.
Writes <out>/kernel-profile.json and .md.

`--rehearse` runs the same code on the CPU on a tiny head (Triton through its interpreter): the numbers
mean nothing there, the point is that every line of the script has run before a GPU sees it.

  python bench/kernel_profile.py --out bench/results/profile
"""
import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

HEAD = dict(dim=4096, vocab=128256)
TOKENS = (4096, 16384)
TINY_HEAD = dict(dim=64, vocab=512)
TINY_TOKENS = (32, 48)


def median_ms(fn, reps, device):
    """Median wall time of fn() in ms over reps runs after one warm-up run (compiles and tunes)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def compiled_kernels(tuned):
    """What Triton compiled for a tuned kernel: registers, spills, shared memory, warps, stages (GPU only)."""
    found = []
    for cache in getattr(tuned.fn, "device_caches", {}).values():
        kernels = cache[0] if isinstance(cache, tuple) else cache
        for kernel in getattr(kernels, "values", lambda: [])():
            metadata = getattr(kernel, "metadata", None)
            found.append({
                "registers": getattr(kernel, "n_regs", None),
                "spills": getattr(kernel, "n_spills", None),
                "shared_bytes": getattr(metadata, "shared", None),
                "num_warps": getattr(metadata, "num_warps", None),
                "num_stages": getattr(metadata, "num_stages", None),
            })
    return found


def accumulate_way(device):
    """How a 16-bit GEMM accumulates into an fp32 tensor here (the fallback would be a slow fp32 SGEMM)."""
    from amapo_fast import vocab_chunks

    way = getattr(vocab_chunks, "accumulate_way", None)
    if callable(way):
        return str(way(device))
    acc = torch.zeros(32, 16, device=device)
    a = torch.randn(32, 48, device=device).bfloat16()
    b = torch.randn(48, 16, device=device).bfloat16()
    try:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        return "torch.addmm(out_dtype=torch.float32) works"
    except (RuntimeError, TypeError) as error:
        return f"torch.addmm(out_dtype=torch.float32) raises {type(error).__name__}: {str(error)[:120]}"


def gemm_row(name, flops, ms, roofline_ms):
    return {
        "kernel": name,
        "ms": round(ms, 4),
        "tflops": round(flops / ms / 1e9, 1),
        "cublas_same_shape_ms": None if roofline_ms is None else round(roofline_ms, 4),
        "fraction_of_cublas": None if roofline_ms is None else round(roofline_ms / ms, 3),
    }


def profile_shape(num_tokens, dim, vocab, device, dtype, reps):
    from amapo_fast.kernels import dlogits_backward, forward, lse_forward
    from amapo_fast.vocab_chunks import _accumulate, chunk_columns

    generator = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(num_tokens, dim, device=device, generator=generator).to(dtype)
    weight = (torch.randn(vocab, dim, device=device, generator=generator) * dim**-0.5).to(dtype)
    targets = torch.randint(0, vocab, (num_tokens,), device=device, generator=generator)
    flops_forward = 2 * num_tokens * dim * vocab
    roofline_forward = median_ms(lambda: torch.mm(hidden, weight.T), reps, device)
    rows = []
    for variant in forward.forward_variants():
        for metrics in (False, True):
            ms = median_ms(lambda: forward.token_logprobs(hidden, weight, None, targets, metrics, variant), reps, device)
            rows.append(gemm_row(f"forward {variant}{' +metrics' if metrics else ''}", flops_forward, ms, roofline_forward))

    lse = lse_forward.token_logprobs(hidden, weight, None, targets, token_metrics=False).lse
    coef = torch.randn(num_tokens, device=device, generator=generator) * 1e-3
    columns = chunk_columns(num_tokens, vocab, hidden.element_size())
    scratch = torch.empty(num_tokens, columns, device=device, dtype=dtype)
    chunk = weight[:columns]
    write = dlogits_backward.dlogits_chunk_writer(hidden, None, targets, lse, coef)
    flops_chunk = 2 * num_tokens * dim * columns
    rows.append(gemm_row("dlogits chunk", flops_chunk, median_ms(lambda: write(0, columns, chunk, scratch), reps, device),
                         median_ms(lambda: torch.mm(hidden, chunk.T), reps, device)))
    d_hidden = torch.zeros(num_tokens, dim, device=device)
    rows.append(gemm_row("dH GEMM (into fp32)", flops_chunk,
                         median_ms(lambda: _accumulate(d_hidden, scratch, chunk), reps, device),
                         median_ms(lambda: torch.mm(scratch, chunk), reps, device)))
    d_weight = torch.empty_like(chunk)
    rows.append(gemm_row("dW GEMM", flops_chunk, median_ms(lambda: torch.mm(scratch.T, hidden, out=d_weight), reps, device),
                         median_ms(lambda: torch.mm(scratch.T, hidden), reps, device)))
    from amapo_fast.kernels import tuning

    kernels = {
        "chosen (tuning key -> config, how)": tuning.chosen_configs(),
        "compiled lse_forward": compiled_kernels(lse_forward._lse_partials_kernel),
        "compiled dlogits_backward": compiled_kernels(dlogits_backward._dlogits_kernel),
    }
    return {"tokens": num_tokens, "dim": dim, "vocab": vocab, "chunk_columns": columns,
            "chunks": -(-vocab // columns), "rows": rows, "kernels": kernels}


def profiler_table(num_tokens, dim, vocab, device, dtype):
    """One forward + backward of the fused loss under torch.profiler: the top operators by device time."""
    from amapo_fast import linear_preference_loss

    hidden = torch.randn(2, num_tokens // 2, dim, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, device=device) * dim**-0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (2, num_tokens // 2), device=device)

    def step():
        loss, _ = linear_preference_loss(hidden, weight, labels, beta=2.0, impl="triton", token_metrics=False)
        loss.backward()

    step()  # compiled and tuned before the profiled iteration
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return profile.key_averages().table(sort_by=sort, row_limit=15)


def nvidia_smi():
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return "nvidia-smi not found"
    query = "name,clocks.sm,clocks.mem,clocks.max.sm,power.draw,power.limit,temperature.gpu,pstate"
    done = subprocess.run([tool, f"--query-gpu={query}", "--format=csv"], capture_output=True, text=True, timeout=10)
    return (done.stdout or done.stderr).strip()


def render(result):
    lines = ["# Kernels one by one\n\n"]
    lines += [f"- {key}: {value}\n" for key, value in result["header"].items()]
    for shape in result["shapes"]:
        lines.append(f"\n## N = {shape['tokens']}, D = {shape['dim']}, V = {shape['vocab']} "
                     f"(backward chunks of {shape['chunk_columns']} columns, {shape['chunks']} per pass)\n\n")
        lines.append("| kernel | ms | TFLOP/s | cuBLAS bf16 GEMM, same shape, ms | fraction of cuBLAS |\n"
                     "|---|---|---|---|---|\n")
        for row in shape["rows"]:
            lines.append(f"| {row['kernel']} | {row['ms']} | {row['tflops']} | {row['cublas_same_shape_ms']} "
                         f"| {row['fraction_of_cublas']} |\n")
        lines.append("\nChosen configs and what they compiled to:\n\n```\n"
                     + json.dumps(shape["kernels"], indent=1) + "\n```\n")
    lines.append("\n## One iteration of the whole loss under torch.profiler\n\n```\n" + result["profiler"] + "\n```\n")
    lines.append("\n## nvidia-smi\n\n```\n" + result["nvidia_smi"] + "\n```\n")
    return "".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for kernel-profile.json and .md")
    parser.add_argument("--rehearse", action="store_true", help="the CPU, a tiny head, Triton interpreted")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.rehearse else "cuda")
    dtype = torch.bfloat16
    head, token_counts = (TINY_HEAD, TINY_TOKENS) if args.rehearse else (HEAD, TOKENS)
    reps = 1 if args.rehearse else args.reps
    import triton

    header = {
        "date (UTC)": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/kernel_profile.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (rehearsal: numbers mean nothing)",
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda, "dtype": "bf16",
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "accumulate way (16-bit GEMM into fp32)": accumulate_way(device),
        "timing": f"median of {reps} runs after one warm-up run (CUDA events on GPU)",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"header": header, "shapes": [], "profiler": "(not reached)", "nvidia_smi": "(not reached)"}

    def write():  # after every part: a run cut by its time limit keeps what it measured
        (args.out / "kernel-profile.json").write_text(json.dumps(result, indent=1))
        (args.out / "kernel-profile.md").write_text(render(result))

    for num_tokens in token_counts:
        result["shapes"].append(profile_shape(num_tokens, head["dim"], head["vocab"], device, dtype, reps))
        print(json.dumps(result["shapes"][-1]["rows"], indent=1), flush=True)
        write()
    result["nvidia_smi"] = nvidia_smi()
    result["profiler"] = profiler_table(token_counts[0], head["dim"], head["vocab"], device, dtype)
    write()
    print(f"wrote {args.out / 'kernel-profile'}.json and .md")


if __name__ == "__main__":
    main()
