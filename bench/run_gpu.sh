#!/usr/bin/env bash
# The single command for a GPU machine (fits one 10-minute device call): the GPU tests, then the kernel
# microbenchmarks. Usage, from the repo root:   bash bench/run_gpu.sh        (OUT=dir to choose the output)
#
# 1. Installs the wheels carried in .whl/ (bash ../shared/tools/gpu-wheels.sh [pytest==... pluggy==...
#    iniconfig==...] fetches them; bitsandbytes by default) into /tmp/site (--no-deps, put on PYTHONPATH).
# 2. Aborts (exit 2) when torch sees no CUDA device, and (exit 3) when pytest is missing.
# 3. tests: `pytest -m gpu` (TRITON_INTERPRET=0); fails when any test fails or none passed.
# 4. bench: bench/bench_kernels.py (fp32 gradients, like PEFT); fails when it fails.
# Each phase runs under `timeout` (PHASE_*_S below; 570 s in all). Files under $OUT (at most 8):
# env.txt, nvidia-smi.txt, pytest-gpu.txt, bench-kernels.txt, summary.txt, kernels/kernels.json.
# Copy kernels/kernels.json to bench/results/<device-slug>/ to commit it. Exit status: 0 only when
# every phase passed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/grit-results/gpu-run}"
mkdir -p "$OUT"
PHASE_INSTALL_S=${PHASE_INSTALL_S:-60}
PHASE_TESTS_S=${PHASE_TESTS_S:-300}
PHASE_BENCH_S=${PHASE_BENCH_S:-210}
PY=$(command -v python3 || command -v python) || { echo "run_gpu.sh: no python3 on PATH" >&2; exit 2; }
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1  # tests/conftest.py defaults TRITON_INTERPRET to 1 (the CPU interpreter)
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
: > "$OUT/summary.txt"

# ---- 1. carried wheels
shopt -s nullglob
wheels=(.whl/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
  timeout "$PHASE_INSTALL_S" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "${wheels[@]}" || { summary "install: FAILED (pip, ${#wheels[@]} wheels)"; exit 4; }
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
  summary "install: ${#wheels[@]} wheels from .whl/ into /tmp/site"
fi

# ---- 2. environment
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
if ! timeout 120 "$PY" - > "$OUT/env.txt" 2>&1 <<'PY'
import sys, torch
import triton
print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
print("device", torch.cuda.get_device_name())
PY
then
  cat "$OUT/env.txt" >&2
  summary "env: FAILED -- no CUDA device (or torch/triton missing): nothing run"
  exit 2
fi
summary "env: $(tr '\n' ' ' < "$OUT/env.txt")"
if ! "$PY" -c "import pytest" 2>/dev/null; then
  summary "tests: pytest missing -- fetch it with: bash ../shared/tools/gpu-wheels.sh bitsandbytes==0.50.2 pytest==8.3.4 pluggy==1.5.0 iniconfig==2.0.0 (carry .whl)"
  exit 3
fi

# ---- 3. GPU tests
# --continue-on-collection-errors: a test module whose optional dependency is missing (bitsandbytes...)
# must not stop the GPU tests of the other modules.
timeout "$PHASE_TESTS_S" "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider --continue-on-collection-errors tests/ \
  > "$OUT/pytest-gpu.txt" 2>&1
tests_status=$?
passed=$(grep -Eo '[0-9]+ passed' "$OUT/pytest-gpu.txt" | tail -1 | grep -Eo '[0-9]+' || echo 0)
tests_ok=0
if [ "$tests_status" -eq 0 ] && [ "${passed:-0}" -gt 0 ]; then tests_ok=1; fi
summary "tests: exit $tests_status, ${passed:-0} passed$([ "$tests_status" -eq 124 ] && echo ', TIMED OUT') -- $(tail -1 "$OUT/pytest-gpu.txt")"

# ---- 4. kernel benchmarks (fp32 gradients by default, like PEFT LoRA)
timeout "$PHASE_BENCH_S" "$PY" bench/bench_kernels.py --out "$OUT/kernels" > "$OUT/bench-kernels.txt" 2>&1
bench_status=$?
summary "bench: exit $bench_status$([ "$bench_status" -eq 124 ] && echo ' (TIMED OUT)')"

if [ "$tests_ok" -eq 1 ] && [ "$bench_status" -eq 0 ]; then
  summary "run_gpu.sh: PASSED"
  exit 0
fi
summary "run_gpu.sh: FAILED"
exit 1
