"""``python bench/bench_kernels.py [options]``: the kernel microbenchmarks, run from a checkout.

The benchmark ships with the package (:mod:`grit_kernels.bench.kernels` and
:mod:`grit_kernels.bench.kernel_cases`; ``grit-kernels bench kernels`` runs it from any directory). This file is
the checkout's runnable script (bench/run_gpu_all.sh calls it) and the library bench/bench_cpu_backends.py
imports (``import bench_kernels as bk``): it re-exports the names used there.
"""

from __future__ import annotations

import sys
from pathlib import Path

_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:  # the package of this checkout, also without an install
    sys.path.insert(0, _REPO)

from grit_kernels.bench.kernel_cases import (  # noqa: E402
    BANKS,
    IMPLS,
    OPS,
    Bank,
    BenchConfig,
    bench_case,
    cases,
    prior_art_fold,
    prior_art_invert,
    prior_art_precondition,
    prior_art_stats,
)
from grit_kernels.bench.kernels import build_parser, format_table, main, run  # noqa: E402

_cases = cases  # the name bench/bench_cpu_backends.py uses

__all__ = [
    "BANKS", "Bank", "BenchConfig", "IMPLS", "OPS", "bench_case", "build_parser", "cases", "format_table", "main",
    "prior_art_fold", "prior_art_invert", "prior_art_precondition", "prior_art_stats", "run",
]

if __name__ == "__main__":
    sys.exit(main())
