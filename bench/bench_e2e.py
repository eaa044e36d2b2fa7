"""``python bench/bench_e2e.py [options]``: the end-to-end speed comparison, run from a checkout.

The benchmark ships with the package (:mod:`grit_kernels.bench.e2e` and its rooms; ``grit-kernels bench e2e``
runs it from any directory). This file is the checkout's runnable script (bench/run_gpu_all.sh calls it) and
the library other bench/ scripts import (``import bench_e2e``): it re-exports the names they use.
"""

from __future__ import annotations

import sys
from pathlib import Path

_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:  # the package of this checkout, also without an install
    sys.path.insert(0, _REPO)

from grit_kernels.bench.e2e import build_parser, main, run  # noqa: E402
from grit_kernels.bench.e2e_arms import (  # noqa: E402
    Arm,
    ArmUnavailable,
    SharedModel,
    build_model,
    make_arm,
    make_batches,
    step_batches,
    train_step,
)
from grit_kernels.bench.e2e_config import (  # noqa: E402
    ARM_ALIASES,
    ARMS,
    BASELINE_ARM,
    DEFAULT_ARMS,
    PRESETS,
    SEQ_POLICIES,
    E2EConfig,
    model_config,
)
from grit_kernels.bench.e2e_report import format_table, summarise  # noqa: E402
from grit_kernels.bench.e2e_timing import time_arms  # noqa: E402
from grit_kernels.bench.harness import device_info, git_commit, versions  # noqa: E402

_step_batches = step_batches  # the name bench/grit_overhead.py, ablate_fused.py and profile_fused.py use
_Skip = ArmUnavailable

__all__ = [
    "ARMS", "ARM_ALIASES", "Arm", "ArmUnavailable", "BASELINE_ARM", "DEFAULT_ARMS", "E2EConfig", "PRESETS",
    "SEQ_POLICIES", "SharedModel", "build_model", "build_parser", "device_info", "format_table", "git_commit",
    "main", "make_arm", "make_batches", "model_config", "run", "step_batches", "summarise", "time_arms",
    "train_step", "versions",
]

if __name__ == "__main__":
    sys.exit(main())
