"""The benchmarks that ship with the package: ``grit-kernels bench e2e`` and ``grit-kernels bench kernels`` run
from any directory after ``pip install grit-kernels`` (no checkout needed).

The rooms::

    harness.py       shared by every benchmark: device, versions and commit, CPU load and threads, peak RSS,
                     timing statistics, interleaving, where results are written
    e2e.py           the end-to-end comparison: the run and its command line
    e2e_config.py    ... what it runs (E2EConfig: arms, model, data policy, size)
    e2e_arms.py      ... the model, data and optimizer of each arm, one training step
    e2e_timing.py    ... running the arms (interleaved or back to back), the CPU memory probe
    e2e_report.py    ... statistics, ratios, table, plot, result path
    prior_art.py     GRIT done the way published code does it (the e2e ``grit-prior`` arm)
    kernels.py       the kernel microbenchmarks: the run, report and command line
    kernel_cases.py  ... banks, the per-module prior-art loop, the cases of each op, one timed case

The repository's ``bench/`` directory keeps runnable scripts (``bench/bench_e2e.py`` and
``bench/bench_kernels.py`` are thin wrappers of these modules), the research benchmarks that need a checkout
(convergence, compression, ...) and the measured results.
"""

#: ``grit-kernels bench <name>`` -> the module whose ``main(argv, prog=...)`` runs it
PACKAGED = {"e2e": "grit_kernels.bench.e2e", "kernels": "grit_kernels.bench.kernels"}
