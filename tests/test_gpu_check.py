"""The GPU check's driver, rehearsed on the CPU: stages run in order, each writes its own log, a stage that
runs out of time is recorded and the next still runs, and the determinism stage compares two backward calls."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_rehearsal_runs_every_selected_stage_past_a_timeout(tmp_path):
    out, bundle = tmp_path / "check", tmp_path / "bundle"
    command = [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--rehearse", "--out", str(out),
               "--wheels", str(tmp_path / "no-wheels"), "--stages", "setup,versions,determinism",
               "--limit", "versions=0.2"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=REPO,
                              env={**os.environ, "OUT": str(bundle)})
    assert finished.returncode == 1, finished.stdout[-3000:] + finished.stderr[-3000:]  # versions timed out

    stages = {s["stage"]: s for s in json.loads((out / "summary.json").read_text())["stages"]}
    assert list(stages) == ["setup", "versions", "determinism"]
    assert stages["setup"]["status"] == "passed", (out / "setup.log").read_text()
    assert stages["versions"]["status"] == "timed out"
    assert stages["determinism"]["status"] == "passed", (out / "determinism.log").read_text()
    for name in stages:
        assert (out / f"{name}.log").exists()
    result = json.loads((out / "determinism.json").read_text())
    assert result["d_hidden_bit_identical"] and result["d_weight_bit_identical"]
    assert "| versions | timed out |" in (out / "summary.md").read_text()
    # With OUT set (a remote machine's collection folder) the summary and one archive of everything are copied out.
    assert sorted(p.name for p in bundle.iterdir()) == ["check.tar.gz", "summary.md"]


def test_stage_order_and_budget():
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_check

    assert gpu_check.STAGE_NAMES == ["setup", "versions", "determinism", "kernel-profile", "loss-bench", "gpu-tests",
                                     "kernel-tests", "trainer", "train-step"]
    stages = {stage.name: stage for stage in gpu_check.STAGES}
    assert sum(stage.limit_s for stage in gpu_check.STAGES) <= 8 * 60
    assert stages["kernel-profile"].limit_s <= 60
    assert stages["kernel-tests"].env == {"AMAPO_KERNEL_CONFIG": "first"}
    assert "-v" in gpu_check._kernel_tests(gpu_check.parse_args([]), Path("out"))


def test_a_stage_cut_at_its_limit_gets_sigint_first(tmp_path):
    """At the limit the stage's process gets SIGINT and a grace period (pytest writes its JUnit file then)."""
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_check

    marker = tmp_path / "interrupted"
    code = ("import time, pathlib\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
            f"    pathlib.Path({str(marker)!r}).write_text('cut')\n")
    with open(tmp_path / "log", "w") as log:
        _, timed_out = gpu_check.run_stage([sys.executable, "-c", code], dict(os.environ), log, gpu_check.GRACE_S + 2)
    assert timed_out and marker.read_text() == "cut"


def test_rehearsal_profiles_the_kernels_and_skips_train_step_with_a_reason(tmp_path):
    out = tmp_path / "check"
    command = [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--rehearse", "--out", str(out),
               "--wheels", str(tmp_path / "no-wheels"), "--stages", "kernel-profile,train-step"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    stages = {s["stage"]: s for s in json.loads((out / "summary.json").read_text())["stages"]}
    assert stages["kernel-profile"]["status"] == "passed"
    assert stages["train-step"]["status"] == "skipped" and "skipped:" in (out / "train-step.log").read_text()
    profile = json.loads((out / "kernel-profile.json").read_text())
    kernels = [row["kernel"] for shape in profile["shapes"] for row in shape["rows"]]
    for name in ("forward triton", "forward cublas", "forward triton +metrics", "dlogits chunk", "dH GEMM (into fp32)",
                 "dW GEMM"):
        assert name in kernels, name
    assert all(row["ms"] > 0 and row["cublas_same_shape_ms"] > 0 for shape in profile["shapes"] for row in shape["rows"])
    assert profile["profiler"] and "accumulate way (16-bit GEMM into fp32)" in profile["header"]
    assert (out / "kernel-profile.md").exists()
