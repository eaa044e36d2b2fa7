#!/usr/bin/env bash
# The whole first GPU run in ONE command with ONE deadline (default 540 s), for a GPU machine lent for
# 15 minutes in all (10 per command, 8 result files, 64 MiB carried, no package index). From the repo root:
#
#   bash bench/run_gpu_all.sh --preflight   # HERE, before the call: .whl/, sizes, the carry list, the command
#   bash bench/run_gpu_all.sh               # THERE (OUT=dir; the device tool sets it)
#   bash bench/run_gpu_all.sh --dry-run     # anywhere: the plan, each phase replaced by a stub
#   bash bench/run_gpu_all.sh --collect DIR # HERE, after: copy DIR's files into bench/results/<gpu-slug>/
#
# Phases, in order, each under `timeout` (cap at the default deadline; with --deadline D they scale by
# (D - 10) / 530):
#   setup    20 s  carried wheels (.whl/*.whl: bitsandbytes) -> /tmp/site, put on PYTHONPATH
#   env      25 s  GPU, driver, CUDA, torch/triton/transformers/peft/bitsandbytes versions, commit -> env.json
#   build   100 s  the CUDA C++ extension (csrc/) JIT-built for sm_90, build time recorded
#   tests   150 s  GPU correctness tests, one pytest process per file, --timeout per test
#   kernels  70 s  microbenchmarks, Llama-3-8B bank (224 modules, r=16): triton, cuda, torch, per-module loop;
#                  gram, fold, inversion, preconditioning; host-side launch cost apart
#   e2e     165 s  Llama-3-8B shapes, QLoRA NF4, r=16, bf16, batch 2 x GA 4, packed rows; arms peft-adamw,
#                  peft-grit, fused-adamw, fused-grit (1 warm-up + 4 steps), peak memory per arm
# A phase's timeout is what the deadline leaves after reserving the caps of the later phases (and 10 s for
# the report): time an early phase does not use goes to the later ones, and the total never passes the
# deadline. A phase that fails or times out is recorded as such and the next one still runs (without CUDA
# nothing after `env` can run: exit 2). Results are written as each phase ends, at most 8 files in $OUT:
#   summary.txt summary.json env.json build.log tests.log kernels.json e2e-qlora.json bench.log
# Exit status: 0 every phase passed, 1 some phase failed or timed out, 2 no CUDA device, 3 bad arguments.
#
# Environment: OUT, DEADLINE_S, CAP_<phase> (seconds, overrides one cap), KILL_GRACE_S (5), PYTHON
# (python3), GRIT_COMMIT (the commit, when .git does not travel; --preflight puts it in the command).
# Dry run only: STUB_RC_<phase> (exit status of the stub), STUB_SLEEP_<phase> (seconds it sleeps).
set -uo pipefail
SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
cd "$(dirname "$SELF")/.."
ROOT=$PWD

PHASES=(setup env build tests kernels e2e)
DEFAULT_DEADLINE_S=540
declare -A DEFAULT_CAP=([setup]=20 [env]=25 [build]=100 [tests]=150 [kernels]=70 [e2e]=165)
REPORT_RESERVE_S=${REPORT_RESERVE_S:-10}
MAX_FILES=8
#: the files each phase writes under $OUT (the report writes summary.txt and summary.json)
declare -A PHASE_FILES=([setup]="build.log" [env]="env.json build.log" [build]="build.log" [tests]="tests.log"
  [kernels]="kernels.json bench.log" [e2e]="e2e-qlora.json bench.log")
#: GPU test files, each in its own pytest process (a sticky CUDA error or a hang stays in its file), and weights
#: for sharing the phase's time between them
TEST_FILES=(tests/test_cpp_backend.py tests/test_gpu_kernels.py tests/test_gpu_training.py)
declare -A TEST_WEIGHT=([tests/test_cpp_backend.py]=2 [tests/test_gpu_kernels.py]=3 [tests/test_gpu_training.py]=2)
PER_TEST_TIMEOUT_S=${PER_TEST_TIMEOUT_S:-90}
E2E_ARMS=${E2E_ARMS:-peft-adamw,peft-grit,fused-adamw,fused-grit}
SITE=${SITE:-/tmp/site}
PY=${PYTHON:-python3}

COMMAND="bash bench/run_gpu_all.sh${*:+ $*}"
mode=run
phase_to_run=""
collect_dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) mode=dry-run ;;
    --preflight) mode=preflight ;;
    --collect) mode=collect; collect_dir=${2:?--collect DIR}; shift ;;
    --deadline) DEADLINE_S=${2:?--deadline SECONDS}; shift ;;
    --out) OUT=${2:?--out DIR}; shift ;;
    --run-phase) phase_to_run=${2:?}; shift ;;  # internal: one phase, in its own process under `timeout`
    -h|--help) sed -n '2,/^set -uo/p' "$SELF" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "run_gpu_all.sh: unknown argument $1 (see --help)" >&2; exit 3 ;;
  esac
  shift
done
DEADLINE_S=${DEADLINE_S:-$DEFAULT_DEADLINE_S}
KILL_GRACE_S=${KILL_GRACE_S:-5}

# ------------------------------------------------------------------------------------- phase bodies
phase_setup() {
  shopt -s nullglob
  local wheels=(.whl/*.whl)
  if [ ${#wheels[@]} -eq 0 ]; then
    echo "setup: no carried wheels (.whl/ empty or absent): bitsandbytes must already be installed for e2e"
    return 0
  fi
  echo "setup: installing ${#wheels[@]} carried wheel(s) into $SITE: ${wheels[*]}"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
}

phase_env() {
  "$PY" "$ROOT/bench/gpu_env.py" --out "$OUT/env.json" --deadline "$DEADLINE_S" --plan "$PLAN_TEXT"
}

phase_build() {
  # JIT build of csrc/ (grit_cpu.cpp + grit_cuda.cu) for sm_90 only, cached under TORCH_EXTENSIONS_DIR for
  # the later phases (they load it with GRIT_KERNELS_JIT=1 when this phase passed).
  GRIT_KERNELS_JIT_VERBOSE=1 "$PY" - <<'PY'
import json, time
import torch
from grit_kernels import _ext
t0 = time.perf_counter()
loaded = _ext.load(jit=True)
seconds = time.perf_counter() - t0
cuda = loaded and _ext.cuda_available()
print("build:", json.dumps({"loaded": loaded, "cuda_kernels": cuda, "build_s": round(seconds, 1), "error": _ext.load_error(),
                             "arch_list": __import__("os").environ.get("TORCH_CUDA_ARCH_LIST"), "torch": torch.__version__}))
raise SystemExit(0 if cuda else 1)
PY
}

phase_tests() {
  # one pytest per file, the phase's time shared by weight among the files still to run
  local budget=$1 start=$SECONDS status=0 f left weights w t rc log
  log=$(mktemp)
  local timeout_opt=()
  if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    timeout_opt=(--timeout="$PER_TEST_TIMEOUT_S")
  else
    echo "tests: pytest-timeout missing: no per-test timeout (a hang ends the file at its budget)"
  fi
  local i n=${#TEST_FILES[@]}
  for ((i = 0; i < n; i++)); do
    f=${TEST_FILES[$i]}
    weights=0
    for ((j = i; j < n; j++)); do weights=$((weights + TEST_WEIGHT[${TEST_FILES[$j]}])); done
    left=$((budget - (SECONDS - start)))
    w=${TEST_WEIGHT[$f]}
    t=$((left * w / weights - KILL_GRACE_S))
    [ "$t" -lt 1 ] && t=1
    echo "===== $f (budget ${t} s) ====="
    timeout -k "$KILL_GRACE_S" "$t" "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider "${timeout_opt[@]}" "$f" \
      > "$log" 2>&1
    rc=$?
    cat "$log"
    case $rc in
      0) if grep -Eq '[0-9]+ passed' "$log"; then echo "===== $f: passed ($(tail -1 "$log" | tr -d '='))"
         else echo "===== $f: FAILED: no test passed (all skipped?)"; status=1; fi ;;
      5) echo "===== $f: no GPU test collected (exit 5)"; status=1 ;;
      124|137) echo "===== $f: TIMED OUT after ${t} s"; status=1 ;;
      *) echo "===== $f: FAILED (exit $rc; $(tail -1 "$log" | tr -d '='))"; status=1 ;;
    esac
  done
  rm -f "$log"
  return $status
}

phase_kernels() {
  local budget=$1
  "$PY" bench/bench_kernels.py --device cuda --banks llama3-8b-r16 --impls triton,cuda,torch,prior-art --host-launch \
    --out "$OUT" --time-budget $((budget - 5))
}

phase_e2e() {
  local budget=$1
  "$PY" bench/bench_e2e.py --preset llama3-8b --qlora --dtype bfloat16 --batch-size 2 --grad-accum 4 --r 16 \
    --seq packed --arms "$E2E_ARMS" --warmup 1 --steps 4 --device cuda --no-progress --no-plot \
    --time-budget $((budget - 10)) --out "$OUT"
}

# the stub that replaces every phase in --dry-run: writes the phase's files, sleeps, exits as told
phase_stub() {
  local name=$1 rc_var="STUB_RC_$1" sleep_var="STUB_SLEEP_$1" f
  echo "[dry-run] phase $name: stub (exit ${!rc_var:-0} after ${!sleep_var:-0} s)"
  for f in ${PHASE_FILES[$name]}; do
    case $f in
      *.json) [ -e "$OUT/$f" ] || echo "{\"stub\": \"$name\"}" > "$OUT/$f" ;;
      *) echo "[dry-run] $name" >> "$OUT/$f" ;;
    esac
  done
  sleep "${!sleep_var:-0}"
  return "${!rc_var:-0}"
}

if [ -n "$phase_to_run" ]; then  # inside `timeout`: run one phase and exit with its status
  if [ "${DRY_RUN:-0}" = 1 ]; then phase_stub "$phase_to_run"; exit $?; fi
  "phase_$phase_to_run" "${PHASE_BUDGET_S:-0}"
  exit $?
fi

# ------------------------------------------------------------------------------------------ the plan
cap_of() {  # the cap of a phase: CAP_<phase>, else the default scaled to the deadline
  local var="CAP_$1"
  if [ -n "${!var:-}" ]; then echo "${!var}"; return; fi
  echo $(( DEFAULT_CAP[$1] * (DEADLINE_S - REPORT_RESERVE_S) / (DEFAULT_DEADLINE_S - 10) ))  # floors: the sum fits
}
declare -A CAP
caps_sum=0
for p in "${PHASES[@]}"; do
  CAP[$p]=$(cap_of "$p")
  caps_sum=$((caps_sum + CAP[$p]))
done
plan() {
  echo "run_gpu_all.sh plan: deadline ${DEADLINE_S} s, at most ${MAX_FILES} files under \$OUT"
  local p
  for p in "${PHASES[@]}"; do printf '  %-8s cap %4s s  -> %s\n' "$p" "${CAP[$p]}" "${PHASE_FILES[$p]}"; done
  printf '  %-8s      %4s s  -> summary.txt summary.json\n' report "$REPORT_RESERVE_S"
  local total=$((caps_sum + REPORT_RESERVE_S))
  echo "  caps ${caps_sum} s + report ${REPORT_RESERVE_S} s = ${total} s $([ "$total" -le "$DEADLINE_S" ] && echo '<=' || echo '>') deadline ${DEADLINE_S} s"
}
if [ $((caps_sum + REPORT_RESERVE_S)) -gt "$DEADLINE_S" ]; then
  plan >&2
  echo "run_gpu_all.sh: the caps (${caps_sum} s) and the report (${REPORT_RESERVE_S} s) exceed the deadline (${DEADLINE_S} s)" >&2
  exit 3
fi
for p in "${PHASES[@]}"; do
  if [ "${CAP[$p]}" -le "$KILL_GRACE_S" ]; then
    echo "run_gpu_all.sh: phase $p's cap (${CAP[$p]} s) must exceed the kill grace (${KILL_GRACE_S} s)" >&2
    exit 3
  fi
done
PLAN_TEXT=$(plan)

if [ "$mode" = preflight ]; then exec "$PY" "$ROOT/bench/gpu_preflight.py" --deadline "$DEADLINE_S"; fi
if [ "$mode" = collect ]; then exec "$PY" "$ROOT/bench/gpu_env.py" --collect "$collect_dir"; fi

# -------------------------------------------------------------------------------------------- run
if [ "$mode" = dry-run ]; then
  OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/run_gpu_all-dry-run.XXXXXX")}
  export DRY_RUN=1
else
  OUT=${OUT:-$ROOT/grit-results/gpu-all}
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export OUT ROOT PY SITE DEADLINE_S KILL_GRACE_S PLAN_TEXT E2E_ARMS PER_TEST_TIMEOUT_S
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/grit-torch-extensions}
export GRIT_KERNELS_JIT=0  # until the build phase has passed: no JIT attempt (minutes) in every later process
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${GRIT_COMMIT:-}" ]; then
  GRIT_COMMIT=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
fi
export GRIT_COMMIT

: > "$OUT/summary.txt"
say() { echo "$*" | tee -a "$OUT/summary.txt"; }
declare -A STATUS RC SECS GIVEN STARTED
write_summary_json() {
  local p first=1
  {
    printf '{"script": "bench/run_gpu_all.sh", "command": "%s", "mode": "%s", "deadline_s": %s, "kill_grace_s": %s, "report_reserve_s": %s, "commit": "%s", "elapsed_s": %s, "phases": [' \
      "$COMMAND" "$mode" "$DEADLINE_S" "$KILL_GRACE_S" "$REPORT_RESERVE_S" "$GRIT_COMMIT" "$SECONDS"
    for p in "${PHASES[@]}"; do
      [ $first = 1 ] || printf ', '
      first=0
      printf '{"name": "%s", "cap_s": %s, "start_s": %s, "timeout_s": %s, "status": "%s", "exit": %s, "seconds": %s}' \
        "$p" "${CAP[$p]}" "${STARTED[$p]:-null}" "${GIVEN[$p]:-null}" "${STATUS[$p]:-pending}" "${RC[$p]:-null}" "${SECS[$p]:-null}"
    done
    printf ']}\n'
  } > "$OUT/summary.json.tmp" && mv "$OUT/summary.json.tmp" "$OUT/summary.json"
}

SECONDS=0
say "$PLAN_TEXT"
say "mode $mode, commit $GRIT_COMMIT, OUT=$OUT"
no_cuda=0
for i in "${!PHASES[@]}"; do
  p=${PHASES[$i]}
  later=0
  for q in "${PHASES[@]:$((i + 1))}"; do later=$((later + CAP[$q])); done
  slot=$((DEADLINE_S - SECONDS - later - REPORT_RESERVE_S))
  t=$((slot - KILL_GRACE_S))
  if [ "$no_cuda" = 1 ]; then
    STATUS[$p]="skipped (no CUDA device)"
    say "$(printf '%-8s skipped: no CUDA device' "$p")"
    write_summary_json
    continue
  fi
  if [ "$t" -lt 1 ]; then
    STATUS[$p]="skipped (no time left)"
    say "$(printf '%-8s skipped: no time left before the deadline' "$p")"
    write_summary_json
    continue
  fi
  GIVEN[$p]=$t
  STARTED[$p]=$SECONDS
  log=$OUT/build.log
  case $p in tests) log=$OUT/tests.log ;; kernels|e2e) log=$OUT/bench.log ;; esac
  echo "===== phase $p: timeout ${t} s (cap ${CAP[$p]} s), $(date -u +%H:%M:%S) UTC =====" >> "$log"
  start=$SECONDS
  PHASE_BUDGET_S=$t timeout -k "$KILL_GRACE_S" "$t" bash "$SELF" --run-phase "$p" >> "$log" 2>&1
  rc=$?
  SECS[$p]=$((SECONDS - start))
  RC[$p]=$rc
  case $rc in
    0) STATUS[$p]=ok ;;
    124|137) STATUS[$p]=timeout ;;
    *) STATUS[$p]=failed ;;
  esac
  extra=""
  case $p in
    setup) [ "$rc" = 0 ] && [ -d "$SITE" ] && export PYTHONPATH="$SITE:$PYTHONPATH" ;;
    env)
      if [ "$rc" = 2 ]; then no_cuda=1; STATUS[$p]="failed (no CUDA device)"; extra=" -- no CUDA device: nothing else can run"; fi ;;
    build)
      if [ "$rc" = 0 ]; then export GRIT_KERNELS_JIT=1; extra=" -- $(grep -Eo '"build_s": [0-9.]+' "$log" | tail -1)"
      else extra=" -- the cuda backend is left out of the later phases"; fi ;;
    tests) extra=" -- $(grep -E '^===== tests/.*: ' "$log" | sed 's/^===== //' | tr '\n' ';' | sed 's/;$//')" ;;
  esac
  say "$(printf '%-8s %-8s exit %3s  %4s s of %4s s%s' "$p" "${STATUS[$p]}" "$rc" "${SECS[$p]}" "$t" "$extra")"
  write_summary_json
done

# ----------------------------------------------------------------------------------------- report
n_files=$(find "$OUT" -type f | wc -l)
say "files under \$OUT: $n_files (limit $MAX_FILES): $(cd "$OUT" && find . -type f | sed 's|^\./||' | sort | tr '\n' ' ')"
if [ "$n_files" -gt "$MAX_FILES" ]; then say "WARNING: more than $MAX_FILES files: some will not come back"; fi
failed=0
for p in "${PHASES[@]}"; do [ "${STATUS[$p]:-}" = ok ] || failed=1; done
say "total ${SECONDS} s of the ${DEADLINE_S} s deadline; $([ $failed = 0 ] && echo 'every phase passed' || echo 'some phase did not pass')"
[ "$mode" = run ] && say "keep the results: bash bench/run_gpu_all.sh --collect <the folder the files came back to>"
write_summary_json
if [ "$no_cuda" = 1 ]; then exit 2; fi
exit $failed
