"""Liger-Kernel's trunk kernels (RMSNorm, gated MLP, RoPE): a logged no-op on CPU; on a GPU, the same log-probs and
gradients as the stock modules for every family we patch (run by the GPU check, skipped elsewhere)."""
import copy
import importlib
import importlib.util

import pytest
import torch

from amapo_fast.data import PreferenceCollator, tokenize_preference_dataset
from amapo_fast.model import LIGER_PATCHES, PreferencePolicy, apply_liger_trunk_kernels, load_policy
from amapo_fast.toy import build_toy_tokenizer, make_toy_preference_dataset

GPU_AND_LIGER = torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour")
def test_cpu_run_is_unchanged_and_says_so():
    tokenizer = build_toy_tokenizer()
    policy = load_policy("toy", tokenizer=tokenizer)
    status = policy.causal_lm.liger_status
    assert status.startswith("Liger trunk kernels: not applied, no CUDA device")
    layer = policy.causal_lm.model.layers[0]
    assert type(layer.mlp).__name__ == "LlamaMLP" and type(layer.input_layernorm).__name__ == "LlamaRMSNorm"
    assert apply_liger_trunk_kernels(policy.causal_lm, enabled=False) == "Liger trunk kernels: off (switched off)"


def _config(model_type, vocab):
    from transformers import AutoConfig

    sizes = dict(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256)
    if model_type == "gemma":
        sizes["head_dim"] = 32
    return AutoConfig.for_model(model_type, **sizes)


@pytest.mark.skipif(not GPU_AND_LIGER, reason="Liger's kernels are Triton GPU kernels: needs CUDA and liger-kernel")
@pytest.mark.parametrize("model_type", sorted(LIGER_PATCHES))
def test_liger_trunk_keeps_log_probs_and_gradients(model_type, monkeypatch):
    from transformers import AutoModelForCausalLM

    # Liger patches the family's modeling module as well as the instance: restore it when the test ends.
    modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    for name in dir(modeling):
        if name == "apply_rotary_pos_emb" or name.endswith(("RMSNorm", "MLP")):
            monkeypatch.setattr(modeling, name, getattr(modeling, name))

    tokenizer = build_toy_tokenizer()
    rows = tokenize_preference_dataset(make_toy_preference_dataset(8, seed=4), tokenizer, 64, 32).to_list()
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(_config(model_type, len(tokenizer)), attn_implementation="sdpa").cuda()
    patched = copy.deepcopy(stock)
    status = apply_liger_trunk_kernels(patched)
    assert "applied to the" in status, status
    results = []
    for causal_lm in (stock, patched):
        policy = PreferencePolicy(causal_lm, beta=2.0)
        for packed, prefix_sharing in ((False, False), (True, True)):
            batch = PreferenceCollator(tokenizer.pad_token_id, packed=packed, prefix_sharing=prefix_sharing)(rows)
            batch = {key: value.cuda() for key, value in batch.items()}
            policy.zero_grad()
            loss, _ = policy(batch)
            loss.backward()
            sums, _ = policy.sequence_logps(batch)
            results.append((sums, [parameter.grad.clone() for parameter in policy.parameters()]))
    half = len(results) // 2
    for (stock_sums, stock_grads), (sums, grads) in zip(results[:half], results[half:]):
        torch.testing.assert_close(sums, stock_sums, rtol=1e-4, atol=1e-3)
        for grad, stock_grad in zip(grads, stock_grads):
            torch.testing.assert_close(grad, stock_grad, rtol=1e-3, atol=1e-3 * stock_grad.abs().max().item())
