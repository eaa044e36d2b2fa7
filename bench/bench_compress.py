"""Fisher-guided compression and in-training rank adaptation, measured (DESIGN.md §8, issue 12).

Same pretrained base, data, batches, LoRA targets and schedule as ``bench/bench_convergence.py``
(imported, not copied: ``build_base``, ``load_finetune_data``, ``run_arm``, ``evaluate``, ...). Arms,
each on every seed (same batches within a seed), ``--steps`` optimizer steps:

* ``grit_full``: GRIT + AdamW at r=8 (the full-rank GRIT adapter; the reference).
* ``compress@E``: ``grit_full``'s trained adapter cut by ``gk.compress_adapter(energy=E)`` using its own
  factors, no further training (post-hoc export); ``compress_budget``: the same with a global budget of
  half the rank units (``budget=``), allocated by energy.
* ``grit_<schedule>``: GRIT + AdamW with rank adaptation during training (``reprojection="one_sided"``
  every ``REPROJECT_EVERY`` steps from ``REPROJECT_START``; ``rank_schedule`` linear / cosine /
  adaptive, k: r -> r/2 by ``SCHEDULE_END_FRACTION`` of the run; adaptive keeps ``rank_energy`` of the
  spectrum, never below the cosine k).
* ``adamw_r4``: AdamW-LoRA trained at r=4 from the start (the control: same parameter count as the
  cut adapters at r/2; alpha=8 so ``s = alpha/r`` matches r=8's alpha=16); ``adamw_r8``: AdamW-LoRA at r=8.

Learning rates: the GRIT family and the AdamW family each get the best lr of ``--lrs`` on the first seed
(GRIT chosen on ``grit_full``, AdamW on ``adamw_r4``); the sweep runs are reused as that seed's runs.
Reported: final held-out loss (mean, min, max over seeds), LoRA parameter count of the final / exported
adapter, and the two issue targets (>= 40% fewer parameters; held-out loss within 0.01 of ``grit_full``).

    python bench/bench_compress.py --out bench/results/cpu          # 3 seeds, 200 steps
    python bench/bench_compress.py --quick --out /tmp/compress      # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import bench_convergence as bc

import grit_kernels as gk
from grit_kernels.compress import lora_parameter_count

ENERGIES = (0.999, 0.99, 0.95, 0.9)
SCHEDULES = ("linear", "cosine", "adaptive")
REPROJECT_EVERY = 20
REPROJECT_START = 40
SCHEDULE_END_FRACTION = 0.7
RANK_ENERGY = 0.9
LOSS_TARGET = 0.01
PARAM_TARGET = 0.40


def schedule_arm(schedule: str, steps: int, lrs, optimizer_state: str = "reset") -> bc.Arm:
    grit = dict(
        reprojection_optimizer_state=optimizer_state,
        reprojection="one_sided",
        reprojection_freq=REPROJECT_EVERY,
        reprojection_start=min(REPROJECT_START, steps // 4),
        rank_schedule=schedule,
        rank_start=1.0,
        rank_end=0.5,
        rank_schedule_steps=max(int(steps * SCHEDULE_END_FRACTION), min(REPROJECT_START, steps // 4) + 1),
        rank_energy=RANK_ENERGY,
    )
    return bc.Arm("adamw", grit, tuple(lrs), f"GRIT + AdamW, rank schedule {schedule}")


def train(base, data, arm, lr, seed, rc) -> dict:
    """One run (bench_convergence.run_arm); adds the final LoRA parameter count and ranks."""
    result, model = bc.run_arm(base, data, arm, lr=lr, seed=seed, rc=rc, return_model=True)
    result["params"] = lora_parameter_count(model)
    pre = getattr(model.grit_bench_optimizer, "preconditioner", None)
    result["total_rank"] = sum(m.lora_A.shape[0] for m in pre.modules) if pre is not None else None
    result["final_loss"] = result["curve"][-1][1]
    result["lr"] = lr
    return result, model


def compressed(base, data, model, seed, rc, heldout) -> list[dict]:
    """``compress_adapter`` of the trained GRIT model at every energy and at half the rank budget."""
    pre = model.grit_bench_optimizer.preconditioner
    lora_state = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    factor, initialized = pre.bank.factor.clone(), pre.bank.initialized.clone()
    full_units = sum(m.lora_A.shape[0] for m in pre.modules)
    out = []
    for name, kwargs in [(f"compress@{e}", {"energy": e}) for e in ENERGIES] + [
        ("compress_budget", {"budget": full_units // 2})
    ]:
        copy = bc.lora_model(base, seed, rc.r, rc.alpha)
        missing = copy.load_state_dict(lora_state, strict=False)
        assert not missing.unexpected_keys
        copy_pre = gk.GritPreconditioner(copy, pre.config)
        copy_pre.bank.factor.copy_(factor)
        copy_pre.bank.initialized.copy_(initialized)
        t0 = time.perf_counter()
        ranks = gk.compress_adapter(copy, copy_pre, **kwargs)
        seconds = time.perf_counter() - t0
        out.append(
            {
                "arm": name,
                "seed": seed,
                "final_loss": bc.evaluate(copy, heldout),
                "params": lora_parameter_count(copy),
                "total_rank": sum(ranks.values()),
                "compress_s": seconds,
                "ranks": ranks,
            }
        )
        copy_pre.remove()
    return out


def summarise(runs: list[dict]) -> dict:
    by_arm: dict[str, list[dict]] = {}
    for r in runs:
        by_arm.setdefault(r["arm"], []).append(r)
    ref = by_arm["grit_full"]
    ref_loss = sum(r["final_loss"] for r in ref) / len(ref)
    ref_params = sum(r["params"] for r in ref) / len(ref)
    table = {}
    for arm, rs in by_arm.items():
        losses = [r["final_loss"] for r in rs]
        finite = [v for v in losses if math.isfinite(v)]
        mean = sum(finite) / len(finite) if finite else math.nan
        params = sum(r["params"] for r in rs) / len(rs)
        fewer = 1.0 - params / ref_params
        table[arm] = {
            "seeds": len(rs),
            "lr": rs[0].get("lr"),
            "loss_mean": mean,
            "loss_min": min(finite) if finite else math.nan,
            "loss_max": max(finite) if finite else math.nan,
            "loss_minus_grit_full": mean - ref_loss,
            "params_mean": params,
            "fewer_params_than_grit_full": fewer,
            "meets_param_target": fewer >= PARAM_TARGET,
            "meets_loss_target": (mean - ref_loss) <= LOSS_TARGET,
        }
    return table


def markdown(result: dict) -> str:
    lines = [
        f"Held-out loss (nats/byte) after {result['config']['steps']} steps, mean [min, max] over seeds "
        f"{result['config']['seeds']}; targets: >= {PARAM_TARGET:.0%} fewer LoRA parameters than grit_full and "
        f"loss within {LOSS_TARGET} of it.",
        "",
        "| arm | lr | LoRA params | fewer than grit_full | held-out loss | minus grit_full | both targets |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, row in result["summary"].items():
        lr = f"{row['lr']:g}" if row["lr"] is not None else "(post-hoc)"
        both = "yes" if row["meets_param_target"] and row["meets_loss_target"] else "no"
        lines.append(
            f"| {arm} | {lr} | {row['params_mean']:.0f} | {row['fewer_params_than_grit_full']:.0%} | "
            f"{row['loss_mean']:.4f} [{row['loss_min']:.4f}, {row['loss_max']:.4f}] | "
            f"{row['loss_minus_grit_full']:+.4f} | {both} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from grit_kernels._noise import silence_known_noise

    silence_known_noise()  # two harmless third-party messages (grit_kernels/_noise.py)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="./grit-results", help="output folder (default ./grit-results)")
    parser.add_argument("--name", default="compress")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--lrs", default="2e-3,4e-3,8e-3", help="lr grid for both families (first seed)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--heldout-windows", type=int, default=32,
        help="held-out windows of 128 bytes (pinned here: compress.json used 32, compress-rotate.json 24)",
    )
    parser.add_argument(
        "--optimizer-state", choices=("reset", "rotate"), default="reset",
        help="Adam state of re-based tensors in the schedule arms (GritConfig.reprojection_optimizer_state)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 30 steps, one lr")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.eval_every, args.lrs = 1, 30, 15, "4e-3"
    torch.set_num_threads(args.threads)
    lrs = tuple(float(x) for x in args.lrs.split(","))
    seeds = tuple(range(args.seeds))
    rc8 = dataclasses.replace(bc.RunConfig(), steps=args.steps, eval_every=args.eval_every, r=8, alpha=16.0)
    rc4 = dataclasses.replace(rc8, r=4, alpha=8.0)
    started = time.perf_counter()
    base, base_info = bc.build_base(progress=True)
    data = bc.load_finetune_data(seq_len=rc8.seq_len, max_heldout_windows=args.heldout_windows)
    heldout = bc.heldout_batches(data)
    runs: list[dict] = []

    def log(r):
        print(
            f"  {r['arm']:>18} seed {r['seed']} lr {r.get('lr', '-')}: held-out {r['final_loss']:.4f}, "
            f"{r['params']} LoRA params ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )

    # lr per family on the first seed
    sweep = {"grit_full": [], "adamw_r4": []}
    models = {}
    for lr in lrs:
        r, m = train(base, data, "grit_adamw", lr, seeds[0], rc8)
        r["arm"] = "grit_full"
        sweep["grit_full"].append(r)
        models[lr] = m
        log(r)
        r, _ = train(base, data, "adamw", lr, seeds[0], rc4)
        r["arm"] = "adamw_r4"
        sweep["adamw_r4"].append(r)
        log(r)

    def best(rs):
        finite = [r for r in rs if math.isfinite(r["final_loss"])]
        return min(finite, key=lambda r: r["final_loss"])

    grit_lr, adamw_lr = best(sweep["grit_full"])["lr"], best(sweep["adamw_r4"])["lr"]
    print(f"lr: GRIT family {grit_lr:g}, AdamW family {adamw_lr:g}", flush=True)
    for seed in seeds:
        if seed == seeds[0]:
            grit, model = best(sweep["grit_full"]), models[grit_lr]
            control = best(sweep["adamw_r4"])
        else:
            grit, model = train(base, data, "grit_adamw", grit_lr, seed, rc8)
            grit["arm"] = "grit_full"
            control, _ = train(base, data, "adamw", adamw_lr, seed, rc4)
            control["arm"] = "adamw_r4"
            log(grit)
            log(control)
        runs += [grit, control]
        for r in compressed(base, data, model, seed, rc8, heldout):
            runs.append(r)
            log(r)
        for schedule in SCHEDULES:
            r, _ = train(base, data, schedule_arm(schedule, args.steps, (grit_lr,), args.optimizer_state), grit_lr, seed, rc8)
            r["arm"] = f"grit_{schedule}"
            runs.append(r)
            log(r)
        r, _ = train(base, data, "adamw", adamw_lr, seed, rc8)
        r["arm"] = "adamw_r8"
        runs.append(r)
        log(r)
    summary = summarise(runs)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=BENCH_DIR, check=False
        ).stdout.strip()
    except OSError:
        commit = None
    import peft
    import transformers

    result = {
        "name": args.name,
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "python": platform.python_version(),
        },
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "config": {
            "steps": args.steps,
            "seeds": list(seeds),
            "lr_grid": list(lrs),
            "grit_lr": grit_lr,
            "adamw_lr": adamw_lr,
            "energies": list(ENERGIES),
            "schedules": list(SCHEDULES),
            "reproject_every": REPROJECT_EVERY,
            "reproject_start": REPROJECT_START,
            "schedule_end_fraction": SCHEDULE_END_FRACTION,
            "rank_energy": RANK_ENERGY,
            "optimizer_state": args.optimizer_state,
            "heldout_windows": int(data["heldout"].shape[0]),
            "run": dataclasses.asdict(rc8),
            "threads": args.threads,
        },
        "base": {k: v for k, v in base_info.items() if k != "pretrain_curve"},
        "lr_sweep": {
            k: [{"lr": r["lr"], "final_loss": r["final_loss"]} for r in v] for k, v in sweep.items()
        },
        "runs": runs,
        "summary": summary,
        "wall_s": time.perf_counter() - started,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1, default=str))
    table = markdown(result)
    (out / f"{args.name}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
