#!/usr/bin/env bash
# The GPU check: one call of under 8 minutes on a lent H100/H200 (see docs/bench.md for the device-tool call).
#   1. versions of the machine's torch / triton / CUDA (nothing is downloaded: the box has no internet);
#   2. installs the wheels carried in .wheels/ (liger-kernel, cut-cross-entropy, ...) and this repo, no deps;
#   3. the test suite, compiled (TRITON_INTERPRET unset);
#   4. `bench/run.py --device cuda` at the Llama-3-8B head (D=4096, V=128256, bf16), N = 2k..32k;
#   5. the GPU train-step benchmark (~1.2B Llama, seq 2048).
# Results land in bench/results/gpu-check-<date>/ and, when $OUT is set (the device tool), are bundled
# into few files there: gpu_check.log, the two Markdown reports and one .tar.gz with everything.
# Every stage has its own time limit, so a hang in one still leaves the others' results.
set -u
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
STAMP="$(date -u +%Y-%m-%d)"
WORK="bench/results/gpu-check-${STAMP}"
mkdir -p "$WORK"
LOG="$WORK/gpu_check.log"
exec > >(tee "$LOG") 2>&1
unset TRITON_INTERPRET
stage() { echo; echo "== $1 ($(date -u +%T))"; }

stage "versions"
"$PYTHON" - <<'PY'
import platform, torch, triton
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| triton", triton.__version__)
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

stage "install carried wheels and the repo (no index, no deps)"
WHEELS="${WHEELS:-.wheels}"
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  # Into a side folder, not the image's environment (the device notes' recipe); workers inherit PYTHONPATH.
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no wheels in $WHEELS/: Liger and cut-cross-entropy are reported as not installed"
fi
"$PYTHON" -m pip install --quiet --no-deps --no-build-isolation --no-index -e . \
  || echo "editable install failed: amapo_fast.kernels (the Triton path) will be missing"
"$PYTHON" -c "import amapo_fast.kernels" && echo "amapo_fast.kernels importable"
"$PYTHON" -m pip list 2>/dev/null | grep -i -E "^(torch|triton|liger.kernel|cut.cross.entropy|transformers|datasets|amapo.fast) " || true

stage "pytest, compiled kernels"
timeout 120 "$PYTHON" -m pytest -q -p no:cacheprovider --durations=8 tests > "$WORK/pytest.log" 2>&1
echo "pytest exit: $? (124: timed out); last lines of $WORK/pytest.log:"
tail -30 "$WORK/pytest.log"

stage "loss-layer benchmark, Llama-3-8B head"
# Paths in order of importance for the goals; each worker is cut at 55 s and the report is rewritten after
# each one, so torch.compile (last: it compiles several graphs) gets what time is left.
timeout 200 "$PYTHON" bench/run.py --device cuda --paths triton,reference,liger,cce,compile \
  --reps 3 --budget-s 1 --group-timeout 55 --out "$WORK" --name gpu-bench
echo "bench exit: $?"

stage "chunked PyTorch path on the GPU (informative, small N only: it is the CPU path)"
timeout 35 "$PYTHON" bench/run.py --device cuda --paths chunked --shapes "N=2048;N=8192" \
  --reps 3 --budget-s 1 --group-timeout 30 --out "$WORK" --name gpu-bench-chunked
echo "chunked exit: $?"

stage "train-step benchmark, ~1.2B Llama, seq 2048"
timeout 90 "$PYTHON" bench/train_step.py --device cuda --steps 2 --max-pairs 32 --out "$WORK" --name gpu-train-step
echo "train-step exit: $?"

stage "bundle"
if [ -n "${OUT:-}" ]; then
  cp "$WORK"/gpu-bench.md "$WORK"/gpu-train-step.md "$OUT"/ 2>/dev/null
  tar czf "$OUT/gpu-check-${STAMP}.tar.gz" -C bench/results "gpu-check-${STAMP}"
  cp "$LOG" "$OUT/gpu_check.log"
  ls -la "$OUT"
fi
echo "results: $WORK"
