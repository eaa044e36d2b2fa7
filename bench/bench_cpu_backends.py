"""CPU backends side by side: the C++ kernels (``cpp``) vs the ``torch`` backend vs the per-module loop.

For one bank (default Llama-3-8B r=16: 224 modules, 448 factors, 41.9M LoRA parameters) and each op,
every arm is timed at every thread count in ONE interleaved loop (rep -> threads -> arm), so machine
load hits all arms alike. The cases (inputs, prior-art loop) are those of ``bench_kernels.py``.

    python bench/bench_cpu_backends.py --threads 1 2 --reps 7 --out bench/results/cpu

Prints medians and the ratios ``prior-art / cpp`` and ``torch / cpp``; with ``--out DIR`` writes
``DIR/kernels-cpp.json`` (nothing is written without ``--out``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))
sys.path.insert(0, str(BENCH_DIR))

import bench_kernels as bk

from grit_kernels import _ext

ARMS = ("cpp", "torch", "prior-art")


def run(bank_name: str, ops: list[str], threads: list[int], reps: int, tokens: int) -> dict:
    if not _ext.cpu_available():
        raise SystemExit(f"C++ extension not available: {_ext.load_error()}")
    cfg = bk.BenchConfig(banks=(bank_name,), device="cpu", impls=ARMS, reps=reps, tokens=tokens).resolve()
    bank = bk.BANKS[bank_name]
    results = []
    for op in ops:
        impls, facts = bk._cases(bank, op, cfg)
        times = {(t, a): [] for t in threads for a in impls}
        for t in threads:  # warm-up per thread count
            torch.set_num_threads(t)
            for fn in impls.values():
                fn()
        for _ in range(reps):
            for t in threads:
                torch.set_num_threads(t)
                for arm, fn in impls.items():
                    t0 = time.perf_counter()
                    fn()
                    times[(t, arm)].append((time.perf_counter() - t0) * 1e3)
        for t in threads:
            med = {a: statistics.median(times[(t, a)]) for a in impls}
            row = {
                "bank": bank_name,
                "op": op,
                "threads": t,
                **facts,
                "median_ms": med,
                "raw_ms": {a: times[(t, a)] for a in impls},
                "ratio_prior_art_over_cpp": med["prior-art"] / med["cpp"],
                "ratio_torch_over_cpp": med["torch"] / med["cpp"],
            }
            results.append(row)
            print(
                f"{op:13s} threads={t}  "
                + "  ".join(f"{a}={m:9.3f} ms" for a, m in med.items())
                + f"  loop/cpp={row['ratio_prior_art_over_cpp']:6.2f}x  torch/cpp={row['ratio_torch_over_cpp']:6.2f}x",
                flush=True,
            )
        del impls
    return {
        "benchmark": "bench_cpu_backends",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "device": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "host_load_average_1_5_15min": os.getloadavg(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "config": {
            "bank": bank_name,
            "ops": ops,
            "threads": threads,
            "reps": reps,
            "tokens": tokens,
            "grad_dtype": cfg.grad_dtype,
            "method": "time.perf_counter, arms interleaved per rep, median",
        },
        "results": results,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bank", default="llama3-8b-r16", choices=sorted(bk.BANKS))
    p.add_argument("--ops", nargs="+", default=["invert", "precondition", "stats", "fold"], choices=bk.OPS)
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--tokens", type=int, default=4096, help="rows per Gram matrix (stats)")
    p.add_argument("--out", default=None, help="directory for kernels-cpp.json (default: print only)")
    args = p.parse_args(argv)
    result = run(args.bank, args.ops, args.threads, args.reps, args.tokens)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "kernels-cpp.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out / 'kernels-cpp.json'}")
    return result


if __name__ == "__main__":
    main()
