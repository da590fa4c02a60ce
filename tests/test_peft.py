"""LoRA adapters (peft) in the trainer on CPU: FSDP2 and DeepSpeed ZeRO-3 on 1 and 2 ranks train only the
adapters (the base weights stay bit for bit), checkpoints hold only the adapters and their optimizer state and
resume exactly, the adapter folder in final/ loads with peft and reproduces the trainer's log-probs, a merged
final/ loads with transformers, DPO's reference is the base with the adapters switched off, and the settings
are checked."""
import json

import pytest
import torch

pytest.importorskip("datasets")  # the trainer's toy data
pytest.importorskip("peft")

from test_export import _mean_logps  # noqa: E402
from test_train import _records, _run, _train_losses  # noqa: E402

from amapo_fast import adapters  # noqa: E402
from amapo_fast.cli import UserError  # noqa: E402
from amapo_fast.config import parse_config  # noqa: E402
from amapo_fast.data import PreferenceCollator, tokenize_preference_dataset  # noqa: E402
from amapo_fast.toy import build_toy_tokenizer, make_toy_preference_dataset  # noqa: E402

# 128 pairs / (2 ranks x 8 pairs) = 8 micro-batches per epoch; accumulation 2 -> 4 optimizer steps.
LORA_RUN = [
    "--use_peft", "--toy_num_train", "128", "--toy_num_eval", "32", "--max_steps", "4",
    "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2", "--logging_steps", "1",
    "--save_steps", "2", "--save_total_limit", "0",
]
# One process, in this process: 64 pairs, 3 steps of 8, no held-out evaluation.
TINY = ["--use_peft", "--lora_dropout", "0", "--toy_num_train", "64", "--toy_num_eval", "16", "--max_steps", "3",
        "--per_device_train_batch_size", "8", "--logging_steps", "1"]
SEED = parse_config([]).seed


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    """Per backend: a 2-rank LoRA run (checkpoints at steps 2 and 4) and a run resumed from its checkpoint-2."""
    pytest.importorskip("deepspeed")
    root = tmp_path_factory.mktemp("lora")
    runs = {}
    for backend in ("fsdp2", "deepspeed"):
        trained, resumed = root / backend, root / f"{backend}-resumed"
        _run(2, LORA_RUN + ["--backend", backend, "--output_dir", str(trained)], root)
        _run(2, LORA_RUN + ["--backend", backend, "--output_dir", str(resumed), "--resume",
                            str(trained / "checkpoint-2")], root)
        runs[backend] = trained, resumed
    return runs


def _initial_toy_weights() -> dict:
    """The toy model's weights as the trainer initialises them (same seed, same construction)."""
    from transformers import set_seed

    from amapo_fast.model import load_causal_lm

    set_seed(SEED)
    return load_causal_lm("toy", tokenizer=build_toy_tokenizer()).state_dict()


def _base_unchanged(final):
    from safetensors.torch import load_file

    saved = load_file(final / adapters.BASE_SUBFOLDER / "model.safetensors")
    initial = _initial_toy_weights()
    assert saved, "no base weights saved"
    for name, value in saved.items():
        assert torch.equal(value, initial[name]), f"base weight {name} changed"


def _adapters_trained(final):
    from safetensors.torch import load_file

    weights = load_file(final / adapters.ADAPTER_WEIGHTS)
    assert weights and all(".lora_" in name for name in weights), sorted(weights)[:4]
    # peft starts every lora_B at zero: a trained adapter has moved away from it.
    lora_b = [value for name, value in weights.items() if "lora_B" in name]
    assert lora_b and all(value.abs().max() > 0 for value in lora_b)


def _check_reproduces(model, final, output_dir, n_pairs):
    from transformers import AutoTokenizer

    chosen, rejected = _mean_logps(model.eval(), AutoTokenizer.from_pretrained(final), n_pairs)
    logged = [record for record in _records(output_dir) if "eval/logps/chosen" in record]
    assert logged[-1]["eval/logps/chosen"] == pytest.approx(chosen.mean().item(), abs=1e-5)
    assert logged[-1]["eval/logps/rejected"] == pytest.approx(rejected.mean().item(), abs=1e-5)
    assert logged[0]["eval/logps/chosen"] != pytest.approx(chosen.mean().item(), abs=1e-4)  # trained, not initial


@pytest.mark.parametrize("backend", ["fsdp2", "deepspeed"])
def test_two_rank_lora_trains_adapters_only_and_final_loads_with_peft(lora_runs, backend):
    from peft import AutoPeftModelForCausalLM

    trained, _ = lora_runs[backend]
    assert sorted(_train_losses(trained)) == [1, 2, 3, 4]
    final = trained / "final"
    _base_unchanged(final)
    _adapters_trained(final)
    _check_reproduces(AutoPeftModelForCausalLM.from_pretrained(final), final, trained, 32)


@pytest.mark.parametrize("backend", ["fsdp2", "deepspeed"])
def test_lora_checkpoints_resume_exactly(lora_runs, backend):
    trained, resumed = lora_runs[backend]
    uninterrupted, continued = _train_losses(trained), _train_losses(resumed)
    assert sorted(continued) == [3, 4]
    for step in (3, 4):
        assert continued[step] == pytest.approx(uninterrupted[step], rel=1e-6), f"step {step}"


def test_lora_checkpoints_hold_only_adapters(lora_runs):
    """The frozen base is not saved again: DCP's model entries and DeepSpeed's fp32 partitions are adapters."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from torch.distributed.checkpoint import FileSystemReader

    dcp_keys = FileSystemReader(str(lora_runs["fsdp2"][0] / "checkpoint-2" / "dcp")).read_metadata().state_dict_metadata
    model_keys = [key for key in dcp_keys if key.startswith("model.")]
    assert model_keys and all(".lora_" in key for key in model_keys), [k for k in model_keys if ".lora_" not in k][:4]
    assert any(key.startswith("optimizer.state.") and ".lora_" in key for key in dcp_keys)
    weights = get_fp32_state_dict_from_zero_checkpoint(str(lora_runs["deepspeed"][0] / "checkpoint-2"), tag="deepspeed")
    assert weights and all(".lora_" in key for key in weights), [k for k in weights if ".lora_" not in k][:4]


def test_one_process_lora_packed_and_checkpointed_train_like_padded(tmp_path):
    """Padding-free batches and gradient checkpointing (with peft's input-embedding hook) change nothing."""
    from amapo_fast.train import main

    main(TINY + ["--eval_split", "none", "--output_dir", str(tmp_path / "padded")])
    padded = _train_losses(tmp_path / "padded")
    assert len(set(padded.values())) > 1
    _base_unchanged(tmp_path / "padded" / "final")
    _adapters_trained(tmp_path / "padded" / "final")
    _evaluation_reads_adapter_folder(tmp_path / "padded" / "final", tmp_path / "eval")
    for variant in (["--packed"], ["--gradient_checkpointing"], ["--prefix_sharing", "false"]):
        output_dir = tmp_path / variant[0].strip("-")
        main(TINY + variant + ["--eval_split", "none", "--save_final", "false", "--output_dir", str(output_dir)])
        losses = _train_losses(output_dir)
        for step in padded:
            assert losses[step] == pytest.approx(padded[step], rel=1e-4), f"{variant}, step {step}"


def _evaluation_reads_adapter_folder(final, output_dir):
    """`python -m amapo_fast.evaluate --model <adapter folder>` scores what peft's loader scores."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    from amapo_fast.evaluate import main as evaluate_main

    report = evaluate_main(["--model", str(final), "--dataset", "toy", "--output-dir", str(output_dir)])
    overall = report["models"][str(final)]["overall"]
    model = AutoPeftModelForCausalLM.from_pretrained(final).eval()
    chosen, rejected = _mean_logps(model, AutoTokenizer.from_pretrained(final), overall["num_pairs"])
    assert overall["logps_chosen_mean"] == pytest.approx(chosen.mean().item(), abs=1e-5)
    assert overall["ranking_accuracy"] == pytest.approx((chosen > rejected).float().mean().item(), abs=1e-9)


def test_merged_final_loads_with_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    from amapo_fast.train import main

    main(TINY + ["--merge_adapters", "--output_dir", str(tmp_path / "out")])
    final = tmp_path / "out" / "final"
    assert not (final / adapters.ADAPTER_CONFIG).exists()
    _check_reproduces(AutoModelForCausalLM.from_pretrained(final), final, tmp_path / "out", 16)


def test_dpo_reference_is_the_base_with_adapters_off(tmp_path):
    """DPO with adapters and no reference model: the first loss is log 2 (reference = initial policy), and
    the loss then moves (the reference stays the base while the adapters train)."""
    from amapo_fast.train import main

    main(TINY + ["--loss_type", "dpo", "--beta", "0.1", "--eval_split", "none", "--save_final", "false",
                 "--output_dir", str(tmp_path / "dpo")])
    losses = _train_losses(tmp_path / "dpo")
    assert losses[1] == pytest.approx(0.6931472, abs=1e-6)
    assert losses[3] != pytest.approx(losses[1], abs=1e-5)


def test_disabled_adapters_score_the_base_model():
    from transformers import set_seed

    from amapo_fast.model import load_policy

    tokenizer = build_toy_tokenizer()
    rows = tokenize_preference_dataset(make_toy_preference_dataset(4, seed=3), tokenizer, 128, 64).to_list()
    batch = PreferenceCollator(tokenizer.pad_token_id)(rows)
    set_seed(0)
    base = load_policy("toy", tokenizer=tokenizer, beta=2.0)
    set_seed(0)
    settings = adapters.AdapterSettings(r=4, alpha=8.0, dropout=0.0, target_modules="q_proj,down_proj")
    policy = load_policy("toy", tokenizer=tokenizer, beta=2.0, adapter_settings=settings)
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in name for name in trainable)
    assert not policy.head.weight.requires_grad
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    base_logps, _ = base.sequence_logps(batch)
    with_adapters, _ = policy.sequence_logps(batch)
    without, _ = adapters.DisabledAdapters(policy, policy.peft_model)(batch, sequence_logps=True)
    torch.testing.assert_close(without, base_logps, rtol=0, atol=0)
    assert (with_adapters - base_logps).abs().max() > 1e-3
    again, _ = policy.sequence_logps(batch)  # the adapters are back on afterwards
    torch.testing.assert_close(again, with_adapters, rtol=0, atol=0)


def test_adapter_settings_are_checked(tmp_path, monkeypatch):
    config_file = tmp_path / "lora.yaml"
    config_file.write_text("use_peft: true\nlora_r: 8\nlora_alpha: 16\nlora_target_modules: q_proj,v_proj\n")
    config = parse_config(["--config", str(config_file)])
    assert (config.use_peft, config.lora_r, config.lora_alpha) == (True, 8, 16.0)
    assert adapters.target_modules(config.lora_target_modules) == ["q_proj", "v_proj"]
    assert adapters.target_modules(parse_config([]).lora_target_modules) == "all-linear"
    config_file.write_text("lora_r: eight\n")
    with pytest.raises(UserError, match="lora_r"):
        parse_config(["--config", str(config_file)])
    refusals = {
        ("--use_peft", "--lora_r", "0"): "--lora_r 0: must be positive",
        ("--use_peft", "--lora_alpha", "nan"): "--lora_alpha nan: must be positive",
        ("--use_peft", "--lora_dropout", "1"): r"--lora_dropout 1.0: must lie in \[0, 1\)",
        ("--use_peft", "--lora_target_modules", "q_proj,lm_head"): "lm_head stays frozen",
        ("--use_peft", "--lora_target_modules", " , "): "names no module",
        ("--load_in_4bit",): "--load_in_4bit applies to adapter training: add --use_peft",
        ("--merge_adapters",): "--merge_adapters applies to adapter training",
        ("--use_peft", "--load_in_4bit", "--merge_adapters"): "cannot merge into a 4-bit base",
    }
    for argv, message in refusals.items():
        with pytest.raises(UserError, match=message):
            parse_config(list(argv))
    settings = adapters.settings_from(parse_config(["--use_peft", "--load_in_4bit"]))
    with pytest.raises(UserError, match="--load_in_4bit \\(QLoRA\\) needs a CUDA device; this run is on cpu"):
        adapters.require_packages(settings, torch.device("cpu"))
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real_find_spec(name, *a))
    with pytest.raises(UserError, match="--use_peft needs the peft package: pip install peft"):
        adapters.require_packages(settings, torch.device("cpu"))


def test_deepspeed_one_process_lora_dpo(tmp_path):
    """ZeRO-3 on one process: DPO against the adapter-free base, only adapters trained, base unchanged."""
    pytest.importorskip("deepspeed")
    _run(1, TINY + ["--backend", "deepspeed", "--loss_type", "dpo", "--beta", "0.1", "--output_dir",
                    str(tmp_path / "out")], tmp_path)
    losses = _train_losses(tmp_path / "out")
    assert losses[1] == pytest.approx(0.6931472, abs=1e-6)
    assert losses[3] != pytest.approx(losses[1], abs=1e-5)
    _base_unchanged(tmp_path / "out" / "final")
    _adapters_trained(tmp_path / "out" / "final")
    assert json.loads((tmp_path / "out" / "final" / adapters.ADAPTER_CONFIG).read_text())["r"] == 16
