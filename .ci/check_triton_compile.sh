#!/usr/bin/env bash
# Our Triton kernels compile for Hopper (sm_90) without register spills under another triton release: the
# GPU machines this project borrows run triton 3.6, this machine 3.9. A venv on top of the system site
# packages gets `triton==$TRITON_VERSION` (default 3.6.0) and runs tests/test_triton_compile.py's
# ahead-of-time compile check (ptxas + cuobjdump from that wheel; no GPU needed):
#
#     bash .ci/check_triton_compile.sh                        # triton 3.6.0
#     TRITON_VERSION=3.5.0 bash .ci/check_triton_compile.sh
#
# Last verified: triton 3.6.0, every kernel family compiled and the hot configurations spill-free (16 s of
# compiling on the 2-core CPU VM; the wheel download comes first). Not in .ci/run: it downloads a second
# triton wheel (hundreds of MB). Environment: TRITON_VENV (default /tmp/grit-triton-venv, recreated).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${TRITON_VERSION:-3.6.0}
VENV=${TRITON_VENV:-/tmp/grit-triton-venv}
rm -rf "$VENV"
python3 -m venv --system-site-packages "$VENV"
"$VENV/bin/python" -m pip install -q "triton==$VERSION"
"$VENV/bin/python" -c "import triton; assert triton.__version__ == '$VERSION', triton.__version__; print('triton', triton.__version__)"
TRITON_CACHE_DIR="$VENV/triton-cache" PYTHONPATH="$PWD" \
  "$VENV/bin/python" -m pytest -q tests/test_triton_compile.py -k test_kernels_compile_for_sm90 -p no:cacheprovider
