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
