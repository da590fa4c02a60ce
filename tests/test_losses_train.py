"""The paper's other baselines train the embedded default through the trainer: in-process on one process, and KTO
(whose KL term is all-reduced over ranks) on two under torchrun."""
import math

import pytest

pytest.importorskip("datasets")  # the trainer's toy data

from test_train import _records, _run, _train_losses  # noqa: E402

TINY = ["--toy_num_train", "64", "--toy_num_eval", "16", "--max_steps", "3", "--per_device_train_batch_size", "8",
        "--logging_steps", "1", "--save_final", "false", "--beta", "0.1"]
# The first step's loss where it is known: the reference equals the initial policy (KTO's KL estimate is then 0).
FIRST_LOSS = {"ipo": (1 / (2 * 0.1)) ** 2, "kto": 0.5}


@pytest.mark.parametrize("loss_type, nproc", [("slic", 1), ("ipo", 1), ("cpo", 1), ("orpo", 1), ("kto", 1), ("kto", 2)])
def test_baselines_train_the_embedded_default(tmp_path, loss_type, nproc):
    output_dir = tmp_path / "out"
    args = TINY + ["--loss_type", loss_type, "--output_dir", str(output_dir)]
    if nproc == 1:
        from amapo_fast.train import main

        main(args)
    else:
        _run(nproc, args + ["--per_device_train_batch_size", "4"], tmp_path)
    losses = _train_losses(output_dir)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(value) for value in losses.values())
    if loss_type in FIRST_LOSS:
        assert losses[1] == pytest.approx(FIRST_LOSS[loss_type], abs=1e-5)
    assert losses[3] != pytest.approx(losses[1], abs=1e-6)  # the policy moved
    record = [r for r in _records(output_dir) if "loss" in r][-1]
    cases = sum(record[f"dynamics/case{k}"] for k in range(1, 5))
    assert cases == pytest.approx(1.0, abs=1e-6) and 0 <= record["dynamics/misranked_grad_share"] <= 1
    assert "eval/dynamics/case1" in [r for r in _records(output_dir) if "eval/ranking_accuracy" in r][-1]
