#!/usr/bin/env bash
# End-to-end speed comparison on a GPU machine, in its own 10-minute device call (after bench/run_gpu.sh):
# Llama-3-8B shapes (random weights, built on the GPU), QLoRA NF4, bf16, batch 2 x grad-accum 4, r 16,
# dynamic padding; arms from bench/bench_e2e.py (ARMS=... to choose, default peft-adamw,peft-grit,fused-grit;
# fused-adamw for the fused-grit/fused-adamw target, fused-eigen for EigenAdamW on request).
# Usage, from the repo root:   bash bench/run_gpu_e2e.sh        (OUT=dir to choose the output)
# Needs bitsandbytes: carry .whl/ (bash ../shared/tools/gpu-wheels.sh fetches it); installed into /tmp/site.
# Files under $OUT (at most 8): env.txt, nvidia-smi.txt, bench-e2e.txt, summary.txt, e2e/e2e-qlora.{json,png}.
# Exit status: 2 without CUDA, 3 without bitsandbytes, that of the benchmark otherwise (124: timed out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/grit-results/gpu-e2e}"
mkdir -p "$OUT"
E2E_TIMEOUT_S=${E2E_TIMEOUT_S:-540}
ARMS=${ARMS:-peft-adamw,peft-grit,fused-grit}
PY=$(command -v python3 || command -v python) || { echo "run_gpu_e2e.sh: no python3 on PATH" >&2; exit 2; }
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
: > "$OUT/summary.txt"

shopt -s nullglob
wheels=(.whl/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
  timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "${wheels[@]}" || { summary "install: FAILED"; exit 4; }
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
if ! timeout 120 "$PY" - > "$OUT/env.txt" 2>&1 <<'PY'
import torch
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name())
PY
then
  cat "$OUT/env.txt" >&2
  summary "env: FAILED -- no CUDA device: nothing run"
  exit 2
fi
if ! "$PY" -c "import bitsandbytes" > /dev/null 2>&1; then
  summary "env: bitsandbytes missing (QLoRA NF4): bash ../shared/tools/gpu-wheels.sh, carry .whl"
  exit 3
fi
summary "env: $(tr '\n' ' ' < "$OUT/env.txt")"

timeout "$E2E_TIMEOUT_S" "$PY" bench/bench_e2e.py --preset llama3-8b --qlora --dtype bfloat16 --batch-size 2 \
  --grad-accum 4 --r 16 --arms "$ARMS" --device cuda --no-progress --out "$OUT/e2e" > "$OUT/bench-e2e.txt" 2>&1
status=$?
summary "e2e: exit $status$([ "$status" -eq 124 ] && echo ' (TIMED OUT)') -- $(tail -1 "$OUT/bench-e2e.txt")"
exit "$status"
