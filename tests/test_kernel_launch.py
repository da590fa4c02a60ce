"""Launch policy of the Triton kernels, on CPU in seconds: tuning keys, the tuning cache, pinned configs.

The response-token count of a preference batch changes every training step. A tuning key that depends on
it (or on anything derived from it, such as the width of a backward chunk) re-tunes during training:
every new key benchmarks every config, on every rank, and ranks may settle on different configs. These
tests drive the real launchers (`token_logprobs`, `token_grads`) over the token counts of a simulated
training run at the Llama-3-8B head, on meta tensors (shapes only, no data, no arithmetic), with the
kernel launches and the benchmark replaced by recorders.
"""
import json

import pytest
import torch
import triton

from amapo_fast import vocab_chunks
from amapo_fast.kernels import dlogits_backward, lse_forward, token_dots, tuning
from bench.workloads import ULTRAFEEDBACK

DIM, VOCAB = 4096, 128256  # Llama-3-8B's head
STEPS = 300
PAIRS_PER_STEP = 16  # one rank's share of a 128-pair step on 8 GPUs: ~10k response tokens
MAX_LEN = 2048  # the Llama-3 recipe's max_len
# Several configs per kernel (the GPU lists' shapes), so that a new key really benchmarks.
CONFIGS = [
    triton.Config({"BLOCK_V": v, "BLOCK_D": d, "GROUP_N": 8}, num_warps=8, num_stages=s)
    for v, d, s in [(128, 64, 3), (128, 32, 4), (64, 64, 3), (64, 32, 4)]
]
KERNELS = (lse_forward._lse_partials_kernel, dlogits_backward._dlogits_kernel)


def response_token_counts(steps, seed=0):
    """Response tokens (chosen + rejected) of each step's micro-batch, UltraFeedback-like lengths."""
    generator = torch.Generator().manual_seed(seed)
    counts = []
    for _ in range(steps):
        _, chosen, rejected = ULTRAFEEDBACK.sample(PAIRS_PER_STEP, MAX_LEN, generator)
        counts.append(int(chosen.sum() + rejected.sum()))
    return counts


@pytest.fixture
def launches(monkeypatch, tmp_path):
    """Fresh tuning state and disk cache; several configs per kernel; launches and benchmarks recorded.

    Yields a dict: "launches" (kernel, config) per launch outside benchmarking, "tunings" (kernel, bucket,
    dtype) per tuning run.
    """
    monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path / "kernel-configs.json"))
    monkeypatch.delenv(tuning.PIN_ENV, raising=False)
    monkeypatch.setattr(tuning, "_chosen", {})
    monkeypatch.setattr(tuning, "_disk", {"path": None, "table": {}})
    monkeypatch.setitem(vocab_chunks._ACCUMULATE_WAY, "meta", vocab_chunks.MM_OUT_DTYPE)
    for kernel in KERNELS:
        monkeypatch.setattr(kernel, "configs", CONFIGS)
    record = {"launches": [], "tunings": [], "step": None}

    def launch(self, config, grid, args, kwargs):
        record["launches"].append((self.kernel, config_record(config)))

    original_choose = tuning.Tuned.choose

    def choose(self, key, grid, args, kwargs, named):
        config, how = original_choose(self, key, grid, args, kwargs, named)
        if how.startswith("tuned"):
            record["tunings"].append((self.kernel, record["step"], str(named["hidden_ptr"].dtype)))
        return config, how

    benchmarked = iter(range(10**9))  # made-up times, different per config: the "fastest" varies by key
    monkeypatch.setattr(tuning.Tuned, "launch", launch)
    # The forward's gather-dots (target and mean logit) are a plain launch outside tuning: shapes only here.
    monkeypatch.setattr(token_dots, "token_dots", lambda hidden, weight, bias, targets, mean: (
        hidden.new_empty(hidden.shape[0], dtype=torch.float32),
        hidden.new_empty(hidden.shape[0], dtype=torch.float32) if mean else None,
    ))
    monkeypatch.setattr(tuning.Tuned, "choose", choose)
    monkeypatch.setattr(tuning, "benchmark", lambda call: 1.0 + next(benchmarked) % 7 / 10)
    yield record


def config_record(config):
    return tuning.config_record(config)


def training_step(num_tokens, dtype=torch.bfloat16, with_bias=False):
    """Both passes of the fused head for num_tokens response tokens, on meta tensors."""
    meta = dict(device="meta", dtype=dtype)
    hidden, weight = torch.empty(num_tokens, DIM, **meta), torch.empty(VOCAB, DIM, **meta)
    bias = torch.empty(VOCAB, **meta) if with_bias else None
    targets = torch.empty(num_tokens, device="meta", dtype=torch.long)
    pass1 = lse_forward.token_logprobs(hidden, weight, bias, targets)
    grads = dlogits_backward.token_grads(hidden, weight, bias, targets, pass1.lse, torch.empty_like(pass1.lse))
    assert grads[0].shape == hidden.shape and grads[1].shape == weight.shape


def simulate(record, counts, **kwargs):
    for num_tokens in counts:
        record["step"] = vocab_chunks.token_bucket(num_tokens)
        training_step(num_tokens, **kwargs)


def test_simulated_training_run_tunes_once_per_bucket(launches):
    counts = response_token_counts(STEPS)
    assert len(set(counts)) > 200  # the exact count changes almost every step
    buckets = {vocab_chunks.token_bucket(n) for n in counts}
    simulate(launches, counts)
    tunings = launches["tunings"]
    # At most one tuning run per (kernel, bucket, head shape, dtype); the head and dtype are fixed here.
    assert len(tunings) == len(set(tunings)), sorted(t for t in tunings if tunings.count(t) > 1)[:5]
    assert {bucket for _, bucket, _ in tunings} == buckets
    assert {kernel for kernel, _, _ in tunings} == {"lse_forward", "dlogits_backward"}
    # Every launch of a kernel within a bucket runs one config: the partial last chunk is no new key.
    kernels_launched = {kernel for kernel, _ in launches["launches"]}
    assert kernels_launched == {"lse_forward", "dlogits_backward"}


def test_chunk_width_depends_on_the_bucket_not_the_count():
    for element_size in (2, 4):
        for bucket in (1024, 4096, 16384):
            widths = {vocab_chunks.chunk_columns(n, VOCAB, element_size) for n in range(bucket // 2 + 1, bucket + 1, 97)}
            assert len(widths) == 1, (element_size, bucket, widths)


@pytest.mark.parametrize("vocab", [32000, 128256, 256000])
@pytest.mark.parametrize("element_size", [2, 4])
def test_scratch_is_bounded_by_a_fraction_of_the_logits_and_by_bytes(vocab, element_size):
    """Below the 2,048-column floor neither bound applies; above it, both do (with the token bucket, at
    most twice the count, standing in for the count)."""
    floor = vocab_chunks.MIN_CHUNK_COLUMNS
    for num_tokens in (1, 100, 3072, 4097, 16384, 65536):
        columns = vocab_chunks.chunk_columns(num_tokens, vocab, element_size)
        assert columns % vocab_chunks.CHUNK_ALIGN == 0 or columns == vocab
        assert min(floor, vocab) <= columns <= vocab
        scratch = num_tokens * columns * element_size
        if columns > floor:
            assert scratch <= vocab_chunks.SCRATCH_FRACTION * num_tokens * vocab * 4
            assert scratch <= vocab_chunks.SCRATCH_BYTES
    # Llama-3-8B's head in bf16: 15,872 columns up to 8k tokens, then the byte budget takes over.
    assert vocab_chunks.chunk_columns(4096, 128256, 2) == 15872
    assert vocab_chunks.chunk_columns(16384, 128256, 2) == 8192


def test_a_restart_and_other_processes_reuse_the_disk_cache(launches, monkeypatch):
    counts = response_token_counts(40, seed=1)
    simulate(launches, counts)
    first = launches["launches"][:]
    tuned = len(launches["tunings"])
    assert tuned > 0
    table = json.loads(open(tuning._disk_path()).read())
    assert len(table) == tuned
    # A new process: nothing chosen yet, the cache file is read afresh.
    monkeypatch.setattr(tuning, "_chosen", {})
    monkeypatch.setattr(tuning, "_disk", {"path": None, "table": {}})
    launches["launches"].clear()
    simulate(launches, counts)
    assert len(launches["tunings"]) == tuned  # no new tuning run
    assert launches["launches"] == first  # the same configs, launch by launch
    assert {c["how"] for c in tuning.chosen_configs().values()} == {"disk cache"}


@pytest.mark.parametrize(
    "pin, expected",
    [
        ("first", {"lse_forward": CONFIGS[0], "dlogits_backward": CONFIGS[0]}),
        (
            "dlogits_backward:BLOCK_V=64,BLOCK_D=32,GROUP_N=8,num_warps=8,num_stages=4;lse_forward:BLOCK_V=64,"
            "BLOCK_D=64,GROUP_N=8,num_warps=8,num_stages=3",
            {"lse_forward": CONFIGS[2], "dlogits_backward": CONFIGS[3]},
        ),
    ],
)
def test_a_pinned_config_is_launched_without_tuning(launches, monkeypatch, pin, expected):
    monkeypatch.setenv(tuning.PIN_ENV, pin)
    simulate(launches, response_token_counts(20, seed=2))
    assert launches["tunings"] == []
    assert {kernel: config for kernel, config in launches["launches"]} == {
        kernel: config_record(config) for kernel, config in expected.items()
    }


@pytest.mark.parametrize("pin", ["fastest", "lse_forward:BLOCK_V=64", "lse_forward:BLOCK_V=x,BLOCK_D=1"])
def test_a_bad_pin_names_the_variable(launches, monkeypatch, pin):
    monkeypatch.setenv(tuning.PIN_ENV, pin)
    with pytest.raises(ValueError, match=tuning.PIN_ENV):
        training_step(1000)


def test_ranks_of_a_multi_rank_run_never_benchmark_inside_a_launch(launches, monkeypatch):
    """Untuned keys on a multi-rank run: the first fitting config, identical on every rank, no benchmark."""
    monkeypatch.setattr(tuning, "_multi_rank", lambda: True)
    simulate(launches, response_token_counts(20, seed=3))
    assert launches["tunings"] == []
    assert launches["launches"] and all(config == config_record(CONFIGS[0]) for _, config in launches["launches"])


def test_tuning_key_separates_dtype_and_specialisation(launches):
    """bf16 and fp16 heads, with and without bias, are tuned apart: different code, different best config."""
    simulate(launches, [3000], dtype=torch.bfloat16)
    simulate(launches, [3000], dtype=torch.float16)
    simulate(launches, [3000], dtype=torch.bfloat16, with_bias=True)
    assert len(launches["tunings"]) == 6


SYNCING_METHODS = ("__bool__", "__int__", "__float__", "item", "tolist", "nonzero")


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_host_syncs_of_the_loss_hot_path(monkeypatch, layout):
    """The loss itself (outside the two passes, which have none) reads device values at three points:
    the response tokens' positions, one read of the label and row checks, and the margin's branch on a
    degenerate group; the packed layout adds one for its boundaries. The backward reads none."""
    from types import SimpleNamespace

    from amapo_fast import chunked, linear_preference_loss
    from amapo_fast import loss as loss_module
    from test_loss import make_batch

    reads, inside_backend = [], [False]
    for name in SYNCING_METHODS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            if not inside_backend[0]:
                reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def outside_count(fn):
        def call(*args, **kwargs):
            inside_backend[0] = True
            try:
                return fn(*args, **kwargs)
            finally:
                inside_backend[0] = False

        return call

    backend = SimpleNamespace(token_logprobs=outside_count(chunked.token_logprobs), token_grads=outside_count(chunked.token_grads))
    monkeypatch.setattr(loss_module, "_backend", lambda impl: backend)
    hidden, weight, labels, _ = make_batch(pairs=3, dim=16, vocab=50)
    cu_seqlens = None
    if layout == "packed":
        hidden, labels = hidden.reshape(-1, 16), labels.reshape(-1)
        cu_seqlens = torch.arange(0, labels.numel() + 1, labels.numel() // 6)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)  # a trained head: both passes (a frozen head takes another pass 1)
    reads.clear()
    loss, _ = linear_preference_loss(hidden, weight, labels, beta=2.0, impl="chunked", cu_seqlens=cu_seqlens)
    forward_reads = reads[:]
    reads.clear()
    loss.backward()
    expected = ["nonzero", "tolist", "__bool__"] + (["tolist"] if layout == "packed" else [])
    assert sorted(forward_reads) == sorted(expected)
    assert reads == []


def test_tune_head_tunes_on_rank_0_and_every_rank_launches_its_choices(launches, monkeypatch):
    """Two ranks of a run, one after the other: rank 0 tunes every bucket and broadcasts; rank 1 tunes
    nothing and launches exactly rank 0's configs over the same token counts."""
    counts = response_token_counts(30, seed=4)
    broadcast = {}

    def broadcast_object_list(objects, src):
        assert src == 0
        if "table" in broadcast:  # a receiving rank
            objects[0] = broadcast["table"]
        else:
            broadcast["table"] = json.loads(json.dumps(objects[0]))  # what travels is a copy

    monkeypatch.setattr(tuning, "_multi_rank", lambda: True)
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", broadcast_object_list)
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda rank=rank: rank)
        monkeypatch.setattr(tuning, "_chosen", {})
        monkeypatch.setenv(tuning.CACHE_ENV, "off")  # nothing shared through the disk
        launches["tunings"].clear()
        tuning.tune_head(VOCAB, DIM, torch.bfloat16, "meta", max_tokens=max(counts))
        tuned = len(launches["tunings"])
        launches["launches"].clear()
        simulate(launches, counts)
        per_rank.append((tuned, len(launches["tunings"]), launches["launches"][:]))
    buckets = vocab_chunks.token_bucket(max(counts)).bit_length()  # 1, 2, 4, ..., the largest bucket
    # Every bucket: the forward's lean and metrics variants and the backward, and nothing more.
    assert per_rank[0][:2] == (3 * buckets, 3 * buckets)
    assert per_rank[1][:2] == (0, 0)
    assert per_rank[0][2] == per_rank[1][2]
