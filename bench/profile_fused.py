"""Where the time of an end-to-end step goes, per arm (torch.profiler, CPU): the breakdown behind
``bench e2e``'s fused arms (issue #9).

Builds the arms exactly as ``bench_e2e.py`` does (same model, seed, batches), runs warm-up steps,
then profiles ``--steps`` steps of each arm and groups self CPU time by operator into buckets:
matmul (mm/addmm/bmm/linear), attention (SDPA), fused Functions (the custom LoRA and base-stack
Functions' own time: argument handling, Python glue), elementwise/norm/RoPE, optimizer,
copies/casts, other. Prints a table and writes JSON with the commit and the load average
(``--out``; default ``./grit-results/profile-fused.json``, never a tracked file).

Run: ``python bench/profile_fused.py --batch-size 2 --max-length 192``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_e2e

BUCKETS = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::linear", "aten::baddbmm")),
    ("attention", ("scaled_dot_product", "flash_attention")),
    (
        "fused Functions (own time)",
        ("FusedProjections", "FusedSwiGLU", "FusedQKV", "RMSNormFunction", "RotaryFunction"),
    ),
    (
        "optimizer",
        ("Optimizer.", "aten::lerp", "aten::_foreach", "aten::addcdiv", "aten::addcmul", "aten::sqrt"),
    ),
    (
        "copies / casts / cat",
        ("aten::copy_", "aten::_to_copy", "aten::cat", "aten::clone", "aten::contiguous"),
    ),
    (
        "elementwise / norm / RoPE / loss",
        (
            "aten::mul",
            "aten::add",
            "aten::pow",
            "aten::mean",
            "aten::rsqrt",
            "aten::silu",
            "aten::sigmoid",
            "aten::neg",
            "aten::div",
            "aten::sub",
            "log_softmax",
            "nll_loss",
            "aten::sum",
            "aten::fill_",
            "aten::zero_",
        ),
    ),
)


def bucket_of(name: str) -> str:
    for bucket, keys in BUCKETS:
        if any(k in name for k in keys):
            return bucket
    return "other"


def profile_arm(name: str, cfg, steps) -> dict:
    from torch.profiler import ProfilerActivity, profile

    arm = bench_e2e.make_arm(name, cfg)
    for s in steps[: cfg.warmup]:
        bench_e2e.train_step(arm, s, cfg)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for s in steps[cfg.warmup :]:
            bench_e2e.train_step(arm, s, cfg)
    per_step = len(steps) - cfg.warmup
    buckets: dict = defaultdict(float)
    ops = 0
    top = []
    for ev in prof.key_averages():
        ms = ev.self_cpu_time_total / 1e3 / per_step
        buckets[bucket_of(ev.key)] += ms
        if ev.key.startswith("aten::"):
            ops += ev.count
        top.append((ms, ev.key, ev.count / per_step))
    top.sort(reverse=True)
    if arm.cleanup:
        arm.cleanup()
    return {
        "self_cpu_ms_per_step": dict(sorted(buckets.items(), key=lambda kv: -kv[1])),
        "total_ms_per_step": sum(buckets.values()),
        "aten_ops_per_step": ops / per_step,
        "top_ops": [{"op": k, "self_ms_per_step": m, "calls_per_step": c} for m, k, c in top[:15]],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", default="peft-adamw,fused-adamw,fused-grit,peft-grit")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--layers", type=int)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--qlora", action="store_true")
    p.add_argument(
        "--seq", choices=bench_e2e.SEQ_POLICIES, default="packed", help="padding policy (bench e2e's --seq)"
    )  # bench/results/cpu/profile-fused.json predates this flag: it ran with "dynamic"
    p.add_argument("--out", default="grit-results/profile-fused.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = bench_e2e.E2EConfig(
        batch_size=args.batch_size,
        max_length=args.max_length,
        layers=args.layers,
        steps=args.steps,
        warmup=args.warmup,
        arms=tuple(args.arms.split(",")),
        qlora=args.qlora,
        seq=args.seq,
        progress=False,
        device="cpu",
    ).resolve()
    steps = bench_e2e._step_batches(cfg)
    result = {
        "config": {k: v for k, v in vars(args).items()},
        "commit": bench_e2e.git_commit(),
        "versions": bench_e2e.versions(),
        "load_average_before": os.getloadavg(),
        "arms": {},
    }
    for name in cfg.arms:
        result["arms"][name] = profile_arm(name, cfg, steps)
    result["load_average_after"] = os.getloadavg()
    names = list(result["arms"])
    keys = sorted(
        {k for a in result["arms"].values() for k in a["self_cpu_ms_per_step"]},
        key=lambda k: -result["arms"][names[0]]["self_cpu_ms_per_step"].get(k, 0),
    )
    load = result["load_average_after"][0]
    print(
        f"self CPU ms per step (profiled; {args.batch_size} x <= {args.max_length} tokens; load average {load:.1f})"
    )
    print(f"{'bucket':36s}" + "".join(f"{n:>13s}" for n in names))
    for k in keys + ["TOTAL"]:
        vals = [
            a["total_ms_per_step"] if k == "TOTAL" else a["self_cpu_ms_per_step"].get(k, 0.0)
            for a in result["arms"].values()
        ]
        print(f"{k:36s}" + "".join(f"{v:13.1f}" for v in vals))
    print(
        f"{'aten ops per step':36s}"
        + "".join(f"{a['aten_ops_per_step']:13.0f}" for a in result["arms"].values())
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
