"""`python -m amapo_fast.export`: an intermediate checkpoint of either backend, full fine-tuning or adapters,
becomes a folder that transformers (or peft) loads and that scores the held-out pairs as the trainer did at
that step."""
import pytest

pytest.importorskip("datasets")  # the trainer's toy data

from test_train import _mean_logps, _records, _run  # noqa: E402

from amapo_fast.export import main as export_main  # noqa: E402

# Evaluation and a checkpoint at step 2 of 3: the export of checkpoint-2 must score what the trainer logged there.
RUN = ["--toy_num_train", "64", "--toy_num_eval", "16", "--max_steps", "3", "--per_device_train_batch_size", "8",
       "--logging_steps", "1", "--eval_steps", "2", "--save_steps", "2", "--save_final", "false"]


def _logged_at(output_dir, step: int) -> dict:
    return [r for r in _records(output_dir) if r["step"] == step and "eval/logps/chosen" in r][-1]


def _check_export(output_dir, folder, adapter: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export_main([str(output_dir / "checkpoint-2"), str(folder)])
    assert (folder / "adapter_config.json").exists() == adapter
    if adapter:
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(folder)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder)
    chosen, rejected = _mean_logps(model.eval(), AutoTokenizer.from_pretrained(folder), 16)
    logged, initial = _logged_at(output_dir, 2), _logged_at(output_dir, 0)
    assert logged["eval/logps/chosen"] == pytest.approx(chosen.mean().item(), abs=1e-5)
    assert logged["eval/logps/rejected"] == pytest.approx(rejected.mean().item(), abs=1e-5)
    assert initial["eval/logps/chosen"] != pytest.approx(chosen.mean().item(), abs=1e-4)  # step 2, not the start


@pytest.mark.parametrize("adapter", [False, True], ids=["full", "lora"])
def test_fsdp2_checkpoint_exports(tmp_path, adapter):
    if adapter:
        pytest.importorskip("peft")
    from amapo_fast.train import main

    main(RUN + ["--use_peft"] * adapter + ["--output_dir", str(tmp_path / "out")])
    _check_export(tmp_path / "out", tmp_path / "exported", adapter)


@pytest.mark.parametrize("adapter", [False, True], ids=["full", "lora"])
def test_deepspeed_checkpoint_exports(tmp_path, adapter):
    pytest.importorskip("deepspeed")
    if adapter:
        pytest.importorskip("peft")
    _run(1, RUN + ["--backend", "deepspeed"] + ["--use_peft"] * adapter + ["--output_dir", str(tmp_path / "out")],
         tmp_path)
    _check_export(tmp_path / "out", tmp_path / "exported", adapter)


def test_export_refusals(tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    (tmp_path / "checkpoint-2").mkdir()
    for argv, message in (
        ([str(tmp_path / "missing"), str(tmp_path / "exported")], "missing: no such folder"),
        ([str(tmp_path / "checkpoint-2"), str(tmp_path / "busy")], "busy: holds files"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            export_main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
