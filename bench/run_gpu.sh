#!/usr/bin/env bash
# The single command for a GPU machine: the GPU tests, then the kernel microbenchmarks.
# Installs nothing (torch and triton must be present). Everything it writes goes under $OUT
# (default: bench/results/gpu-run/): pytest-gpu.txt, bench-kernels.txt, nvidia-smi.txt and
# <device-slug>/kernels.json -- copy the latter to bench/results/<device-slug>/ to commit it.
# Exit status: that of pytest (the benchmark still runs when a test fails).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/bench/results/gpu-run}"
mkdir -p "$OUT"
export TRITON_INTERPRET=0            # tests/conftest.py defaults it to 1 (the CPU interpreter)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

if python -c "import pytest" 2>/dev/null; then
  # --continue-on-collection-errors: a test module whose optional dependency is missing on this
  # machine (bitsandbytes, ...) must not stop the GPU tests of the other modules.
  python -m pytest -m gpu -q -rs --continue-on-collection-errors tests/ 2>&1 | tee "$OUT/pytest-gpu.txt"
  tests_status=${PIPESTATUS[0]}
else
  echo "pytest is not installed: GPU tests not run" | tee "$OUT/pytest-gpu.txt"
  tests_status=1
fi

slug=$(python -c 'import re, torch; print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-"))')
python bench/bench_kernels.py --out "$OUT/$slug" 2>&1 | tee "$OUT/bench-kernels.txt"
exit "$tests_status"
