"""Lean loading on 2 ranks (CPU, gloo): FSDP2 reads the weights on rank 0 only and broadcasts them into the other
ranks' shards; ZeRO-3 partitions the parameters as they load. Either way every rank ends with exactly the
weights and buffers (rotary `inv_freq` included) of a plain single-process `from_pretrained`, tied embeddings stay
tied, the first loss is the plain model's, and rank 1 never holds the whole model."""
import os
import socket

import pytest
import torch

pytest.importorskip("datasets")  # the toy data

from amapo_fast.data import PreferenceCollator, tokenize_preference_dataset
from amapo_fast.model import load_policy
from amapo_fast.toy import build_toy_tokenizer, make_toy_preference_dataset, tiny_llama_config
from spawn_guard import spawn

WORLD_SIZE = 2
# Both ranks score the same batch, so with rank-local statistics the loss is the plain model's.
LOSS = dict(beta=2.0, stats_scope="local")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny random Llama with tied embeddings (the hardest case to keep right) and its tokenizer, saved."""
    from transformers import AutoModelForCausalLM

    directory = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_toy_tokenizer()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_llama_config(tokenizer, tie_embeddings=True)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _batch(tokenizer):
    rows = tokenize_preference_dataset(make_toy_preference_dataset(4, seed=0), tokenizer, 128, 64).to_list()
    return PreferenceCollator(tokenizer.pad_token_id)(rows)


def _full_weights(engine, backend) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the sharded policy, whole, on this rank."""
    policy = engine.policy
    if backend == "fsdp2":
        weights = {name: param.full_tensor().detach().clone() for name, param in policy.named_parameters()}
    else:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(policy.parameters())):
            weights = {name: param.detach().clone() for name, param in policy.named_parameters()}
    weights.update({name: buffer.clone() for name, buffer in policy.named_buffers()})
    return weights


def _worker(rank, backend, port, model_dir, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch.distributed as dist

    from amapo_fast.distributed import ENGINES, OptimConfig, init_distributed

    env = init_distributed()
    optim = OptimConfig(learning_rate=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, warmup_steps=0,
                        total_steps=1, max_grad_norm=1.0, gradient_accumulation_steps=1, micro_batch_size=4,
                        bf16=False, cpu_offload=False)
    constructed = {}

    def load(**kwargs):
        # What this rank holds right after construction, before the engine shards or fills anything.
        policy = load_policy(model_dir, **LOSS, **kwargs)
        constructed["devices"] = sorted({param.device.type for param in policy.parameters()})
        constructed["max_numel"] = max(param.numel() for param in policy.parameters())
        return policy

    engine = ENGINES[backend](load, env, optim)
    weights = _full_weights(engine, backend)
    causal_lm = engine.policy.causal_lm
    # One parameter for the input embedding, the lm_head and the loss head, as in the plain model.
    tied = causal_lm.model.embed_tokens.weight is causal_lm.lm_head.weight is engine.policy.head.weight
    loss, _ = engine.model(_batch(build_toy_tokenizer()))
    torch.save({"weights": weights, "tied": tied, "loss": loss.item(), **constructed}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module", params=["fsdp2", "deepspeed"])
def lean_load(request, saved_model, tmp_path_factory):
    """(backend, per-rank results) of loading `saved_model` with the engine on 2 ranks."""
    if request.param == "deepspeed":
        pytest.importorskip("deepspeed")
    out_dir = tmp_path_factory.mktemp(request.param)
    spawn(_worker, args=(request.param, _free_port(), str(saved_model), str(out_dir)), nprocs=WORLD_SIZE)
    return request.param, [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


def test_every_rank_gets_exactly_the_checkpoint(lean_load, saved_model):
    backend, results = lean_load
    plain = load_policy(str(saved_model), **LOSS)
    expected = {**dict(plain.named_parameters()), **dict(plain.named_buffers())}
    assert any("inv_freq" in name for name in expected)
    for rank, result in enumerate(results):
        assert result["weights"].keys() == expected.keys(), f"{backend} rank {rank}"
        for name, value in expected.items():
            assert torch.equal(result["weights"][name], value), f"{backend} rank {rank}: {name}"
        assert result["tied"], f"{backend} rank {rank}: embedding, lm_head and loss head no longer share one weight"
        with torch.no_grad():
            plain_loss, _ = plain(_batch(build_toy_tokenizer()))
        assert result["loss"] == pytest.approx(plain_loss.item(), rel=1e-6), f"{backend} rank {rank}"


def test_rank_1_never_holds_the_whole_model(lean_load):
    backend, (rank0, rank1) = lean_load
    assert rank0["devices"] == ["cpu"]
    if backend == "fsdp2":
        assert rank1["devices"] == ["meta"]  # built without memory; its shards are filled from rank 0
    else:
        assert rank0["max_numel"] == rank1["max_numel"] == 0  # zero.Init: only partitions, on every rank
