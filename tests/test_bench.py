"""Smoke test of the benchmark: `bench/run.py --quick` on a tiny CPU shape writes its table, JSON and plot.

Also checks the properties the benchmark's honesty rests on: every path gets the same inputs (ours and
the reference agree on the loss), chosen and rejected rows share their prompt, and bad shapes are refused.
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from amapo_fast import vocab_chunks

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.workloads import IGNORE_INDEX, Shape, make_labels, parse_shapes  # noqa: E402


def test_quick_run_writes_table_json_and_plot(tmp_path):
    command = [
        sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--device", "cpu",
        "--paths", "reference,chunked,liger,triton", "--workloads", "realistic",
        "--isolate", "path", "--out", str(tmp_path), "--name", "quick",
    ]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert finished.returncode == 0, finished.stderr[-3000:]

    result = json.loads((tmp_path / "quick.json").read_text())
    cases = result["cases"]
    liger = ["liger"] if importlib.util.find_spec("liger_kernel") else []
    assert sorted(c["path"] for c in cases) == sorted(["chunked", "reference"] + liger)
    for case in cases:
        assert "error" not in case, case
        assert case["fwd_bwd_ms"] > 0 and case["fwd_ms"] > 0 and case["peak_bytes"] > 0
        assert case["tokens_per_s"] > 0 and case["tflops"] > 0
    assert "Triton kernels are timed on CUDA only" in result["skipped_paths"]["triton"]
    env = result["environment"]
    assert env["versions"]["torch"] == torch.__version__ and "--quick" in env["command"]
    assert env["accumulate_way"] == vocab_chunks.accumulate_way("cpu")  # how pass 2 adds 16-bit GEMMs into fp32

    # Same inputs for every path: our chunked AMaPO and the reference's agree on the loss value.
    by_path = {c["path"]: c for c in cases}
    ours, reference = by_path["chunked"], by_path["reference"]
    assert ours["loss"] == pytest.approx(reference["loss"], rel=1e-4, abs=1e-5)
    assert ours["response_tokens"] == reference["response_tokens"]
    assert 0 < ours["response_fraction"] < 1
    # The memory measurement sees real allocations: the reference materialises fp32 logits [N, V] at least once.
    shape = reference["shape"]
    assert reference["peak_bytes"] >= shape["tokens"] * shape["vocab"] * 4

    table = (tmp_path / "quick.md").read_text()
    assert table.count("| chunked |") == 1 and "fwd+bwd ms" in table and env["command"] in table
    assert (tmp_path / "quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_realistic_pairs_share_prompt_and_pad_at_the_end():
    shape = Shape(tokens=16 * 512, seq_len=512, hidden=8, vocab=1000)
    labels = make_labels("realistic", shape, seed=torch.randint(0, 2**31, ()).item())
    response = labels != IGNORE_INDEX
    first = response.int().argmax(dim=1)
    pairs = shape.rows // 2
    assert torch.equal(first[:pairs], first[pairs:])  # chosen i and rejected i: same prompt length
    assert bool(response.any(dim=1).all())
    # One contiguous response span per row: prompt before it, padding after it.
    assert torch.equal(response.int().diff(dim=1).abs().sum(dim=1) <= 2, torch.ones(shape.rows, dtype=torch.bool))
    assert (first <= shape.seq_len // 2).all()  # prompt truncated to max_prompt = T / 2


def test_bad_shapes_are_refused_with_the_field_named():
    default = Shape(tokens=1024, seq_len=256, hidden=64, vocab=512)
    assert parse_shapes("N=2048;N=512,V=1000", default)[1] == Shape(512, 256, 64, 1000)
    with pytest.raises(ValueError, match="even number"):
        parse_shapes("N=768", default)  # 3 rows
    with pytest.raises(ValueError, match="KEY=INT"):
        parse_shapes("X=4", default)


def test_train_step_bench_runs_methods_on_the_same_pairs(tmp_path):
    """The step benchmark: every method gets the same pairs (same sequence tokens), prefix sharing runs fewer
    tokens through the trunk, an absent optional method is skipped with a line, and the report files appear."""
    command = [
        sys.executable, str(REPO / "bench" / "train_step.py"), "--device", "cpu", "--workloads", "ultrafeedback",
        "--methods", "ours padded,ours packed+prefix,TRL CPO simpo", "--pairs", "2", "--steps", "1",
        "--out", str(tmp_path), "--name", "step",
    ]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert finished.returncode == 0, finished.stderr[-3000:]
    rows = {row["method"]: row for row in json.loads((tmp_path / "step.json").read_text())["results"]}
    ours = [rows["ours padded"], rows["ours packed+prefix"]]
    assert ours[0]["sequence_tokens"] == ours[1]["sequence_tokens"] == ours[0]["input_tokens"]
    assert ours[1]["input_tokens"] < ours[0]["input_tokens"]  # each prompt once
    for row in ours:
        assert row["step_s"] > 0 and row["pairs_per_s"] > 0 and row["step_peak_above_start_bytes"] > 0
    if importlib.util.find_spec("trl") is None:
        assert "skipping TRL CPO simpo: trl is not installed" in finished.stdout
    assert (tmp_path / "step.md").exists() and (tmp_path / "step.png").exists()


@pytest.mark.parametrize("token_counts", [(4096,), (1024, 4096, 16384)])
def test_plot_names_what_was_measured_and_labels_ticks_as_plain_numbers(token_counts):
    from bench import report

    cases = [
        {"workload": "realistic", "path": path, "shape": {"tokens": n, "seq_len": 512, "hidden": 256, "vocab": 32000},
         "fwd_bwd_ms": 3.0 * n / 1024 * (2 if path == "reference" else 1), "peak_bytes": 2**20 * n / 512}
        for path in ("reference", "chunked") for n in token_counts
    ]
    env = {"device": "cpu", "device_name": "x86_64", "dtype": "fp32"}
    figure = report.figure(cases, env)
    figure.canvas.draw()
    title = figure._suptitle.get_text()
    assert "x86_64 (cpu)" in title and "fp32" in title
    for axis in figure.axes:
        assert "D=256, V=32000" in axis.get_title()
        labels = [tick.get_text() for tick in axis.get_xticklabels() + axis.get_yticklabels() if tick.get_text()]
        assert labels and not [label for label in labels if "times" in label or "^" in label or "$" in label], labels
        if len(token_counts) > 1:
            assert {str(n) for n in token_counts} <= {tick.get_text() for tick in axis.get_xticklabels()}
        else:  # one N: labelled bars, one per path
            assert {tick.get_text() for tick in axis.get_yticklabels()} == {"reference", "chunked"}
            assert f"N={token_counts[0]}" in axis.get_title()
    import matplotlib.pyplot as plt

    plt.close(figure)


def test_frozen_head_and_cross_entropy_paths_agree_and_compare_with_their_peers():
    """In-process, on one tiny case: the frozen-head path trains hidden only and gives the loss of the two-pass
    path; ours and eager cross-entropy agree; cross-entropy ratios divide by the cross-entropy peers."""
    from bench.paths import PATHS
    from bench.report import derived_metrics
    from bench.worker import Case

    shape = Shape(tokens=128, seq_len=32, hidden=16, vocab=300)
    spec = {"workload": "realistic", "shape": shape.to_dict(), "seed": torch.randint(0, 2**31, ()).item()}
    losses = {}
    for name in ("chunked", "chunked-frozen", "ce-eager", "ce-chunked"):
        case = Case(PATHS[name].build(torch.device("cpu")), spec, torch.device("cpu"), torch.float32, PATHS[name].frozen_head)
        case.forward_backward()
        losses[name] = case.losses[-1]
        assert case.hidden.grad is not None and (case.weight.grad is None) == PATHS[name].frozen_head
    torch.testing.assert_close(losses["chunked-frozen"], losses["chunked"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["ce-chunked"], losses["ce-eager"], rtol=1e-5, atol=1e-6)

    timed = [
        {"path": path, "workload": "dense", "shape": shape.to_dict(), "fwd_bwd_ms": ms, "peak_bytes": peak,
         "response_tokens": shape.tokens}
        for path, ms, peak in (("reference", 10.0, 100), ("ce-eager", 4.0, 80), ("ce-chunked", 2.0, 20))
    ]
    by_path = {case["path"]: case for case in derived_metrics(timed)}
    assert by_path["ce-chunked"]["speedup_vs_reference"] == 2.0 and by_path["ce-chunked"]["memory_vs_reference"] == 0.25
    assert by_path["ce-eager"]["speedup_vs_reference"] == 1.0  # its own peer
