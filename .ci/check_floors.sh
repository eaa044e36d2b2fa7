#!/usr/bin/env bash
# Minimum-versions check: a fresh venv with exactly the floors declared in pyproject.toml
# (transformers, peft, accelerate, and bitsandbytes from the [qlora] extra) and the tests that
# exercise them. Run it after changing a floor or the code that talks to these packages:
#
#     bash .ci/check_floors.sh                       # the declared floors
#     FLOOR_PINS="peft==0.14.0" bash .ci/check_floors.sh   # try a lower candidate (overrides one pin)
#
# Last verified: torch 2.13.0, transformers 4.56.0, peft 0.15.0, accelerate 1.10.1, bitsandbytes
# 0.46.0: the default tests below, 56 passed; the whole script took 483 s (89 s of tests) on the
# 2-core CPU VM while other jobs shared it (load 4-7).
#
# Why not in .ci/run: it downloads old releases from the package index and builds a second 1.3 GB
# venv (minutes of pip on a 2-core CPU; over 10 min measured while the machine was shared) plus
# 3 min of tests, which would push the CI run (suite alone: several minutes, growing) towards its
# 15-minute budget, and make CI depend on the index serving old releases. Environment: FLOOR_VENV (default /tmp/grit-floors-venv,
# recreated), FLOOR_TESTS (default below), TORCH_SPEC (default torch==2.13.0; torch's own floor is
# not checked by this script).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FLOOR_VENV:-/tmp/grit-floors-venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TESTS=${FLOOR_TESTS:-tests/test_layers.py tests/test_state_dict.py tests/test_bad_input.py tests/test_trainer.py tests/test_readme.py tests/test_examples.py}

# "name>=X" in pyproject.toml -> "name==X", for the packages whose floors we promise
pins=$(python3 - <<'EOF'
import re
text = open("pyproject.toml").read()
pins = {}
for name in ("transformers", "peft", "accelerate", "bitsandbytes"):
    found = re.search(rf'"{name}>=([0-9][0-9a-z.]*)', text)
    if not found:
        raise SystemExit(f"check_floors: no {name}>= floor in pyproject.toml")
    pins[name] = found.group(1)
print(" ".join(f"{k}=={v}" for k, v in pins.items()))
EOF
)
for override in ${FLOOR_PINS:-}; do  # replace the pin of the same package
  name=${override%%[=<>]*}
  pins=$(echo "$pins" | tr ' ' '\n' | grep -v "^${name}==" | tr '\n' ' ')
  pins="$pins $override"
done
echo "check_floors: $TORCH_SPEC $pins"

rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "$TORCH_SPEC" $pins "pytest>=8" "pytest-benchmark>=4"
"$VENV/bin/pip" install -q --no-deps -e .
"$VENV/bin/python" -m pip list 2>/dev/null | grep -iE "^(torch|transformers|peft|accelerate|bitsandbytes) "
set +e
"$VENV/bin/python" -m pytest -q -p no:cacheprovider $TESTS
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "check_floors: pytest collected no tests (exit 5)" >&2
fi
exit "$rc"
