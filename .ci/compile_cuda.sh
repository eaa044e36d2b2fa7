#!/usr/bin/env bash
# Compile csrc/grit_cuda.cu for sm_90 to an object file against the installed torch's headers, so a
# broken .cu fails CI on a machine without a GPU. Nothing is linked or run.
# The CPU wheel of torch ships the c10/ATen CUDA headers but not the generated
# c10/cuda/impl/cuda_cmake_macros.h: C10_USING_CUSTOM_GENERATED_MACROS skips that include (it only
# sets the shared-library export macros, which an object file does not need).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null 2>&1; then
  echo "compile_cuda: nvcc not found, CUDA sources not compiled" >&2
  exit 0
fi
TORCH_DIR=$(python -c "import os, torch; print(os.path.dirname(torch.__file__))")
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
start=$(date +%s)
nvcc -c -std=c++20 -O3 --expt-relaxed-constexpr -arch=sm_90 -Xcompiler -fPIC \
  -DC10_USING_CUSTOM_GENERATED_MACROS \
  -I"$TORCH_DIR/include" -I"$TORCH_DIR/include/torch/csrc/api/include" \
  -diag-suppress 20013,20015 \
  csrc/grit_cuda.cu -o "$OUT/grit_cuda.o"
echo "compile_cuda: csrc/grit_cuda.cu -> sm_90 object OK ($(( $(date +%s) - start )) s, $(nvcc --version | tail -1))"
