"""Where gk.fuse's CPU speed comes from: ``peft-adamw`` against ``fused-adamw`` with parts of the fusion
switched off, interleaved step by step on the same batches (bench_e2e's model, data and train step).

Variants of ``fused-adamw``:

* ``lora-only``: block-level fused LoRA Functions only (the decoder blocks keep HF's forward: HF's
  RMSNorm, RoPE, residual adds and masked SDPA);
* ``no-varlen``: the fused base stack (RMSNorm / RoPE / residuals inside the Functions) but HF's SDPA
  over the whole packed row with its block-causal mask instead of one causal SDPA per packed sequence;
* ``full``: what ``gk.fuse`` does.

Writes JSON (``--out``; default ``./grit-results/ablate-fused.json``, never a tracked file) with the
commit, the load average and per-step times. Run: ``python bench/ablate_fused.py --batch-size 2 --max-length 192``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_e2e

VARIANTS = ("peft-adamw", "lora-only", "no-varlen", "full")


def build(variant: str, cfg):
    from grit_kernels.fused import patch

    if variant == "peft-adamw":
        return bench_e2e.make_arm("peft-adamw", cfg)
    saved = patch.BASE_STACK_DECODERS, patch.RMS_NORMS
    if variant == "lora-only":
        patch.BASE_STACK_DECODERS, patch.RMS_NORMS = (), ()
    try:
        return bench_e2e.make_arm("fused-adamw", cfg)
    finally:
        patch.BASE_STACK_DECODERS, patch.RMS_NORMS = saved


def main(argv=None) -> int:
    from grit_kernels.fused import patch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="grit-results/ablate-fused.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = bench_e2e.E2EConfig(
        batch_size=args.batch_size,
        max_length=args.max_length,
        steps=args.steps,
        warmup=args.warmup,
        arms=("peft-adamw",),
        progress=False,
        device="cpu",
    ).resolve()
    batches = bench_e2e._step_batches(cfg)
    arms = {v: build(v, cfg) for v in VARIANTS}
    segments = patch.packed_segments
    times: dict = {v: [] for v in VARIANTS}
    load_before = os.getloadavg()
    for i, step in enumerate(batches):
        for k in range(len(VARIANTS)):
            v = VARIANTS[(i + k) % len(VARIANTS)]  # rotate who goes first
            patch.packed_segments = (lambda mask, pos: None) if v == "no-varlen" else segments
            try:
                t0 = time.perf_counter()
                bench_e2e.train_step(arms[v], step, cfg)
                times[v].append(time.perf_counter() - t0)
            finally:
                patch.packed_segments = segments
    base = times["peft-adamw"][args.warmup :]
    result = {
        "config": vars(args),
        "commit": bench_e2e.git_commit(),
        "versions": bench_e2e.versions(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "arms": {},
    }
    print(f"{args.batch_size} x <= {args.max_length} tokens, packed; load average {os.getloadavg()[0]:.1f}")
    for v in VARIANTS:
        ts = times[v][args.warmup :]
        paired = statistics.median(t / b for t, b in zip(ts, base))
        result["arms"][v] = {
            "median_s": statistics.median(ts),
            "paired_ratio_to_peft_adamw": paired,
            "step_times_s": ts,
        }
        print(
            f"{v:12s} median {statistics.median(ts) * 1e3:7.1f} ms   paired ratio to peft-adamw {paired:.3f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
