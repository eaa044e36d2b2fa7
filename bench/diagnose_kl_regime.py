"""Diagnostic: how much does the KL-clip on the step taken shrink each step, per arm?

Runs single (not interleaved) fine-tuning runs of ``bench_convergence.py`` (same base, data and protocol,
150 steps, seed 0) and records, per optimizer step, the clip factor ``|step after clip| / |step before clip|``
of ``GritPreconditioner.clip_update_`` (1: inactive) and the inner AdamW's mean ``|Delta p| / lr``. Arms:
``fisher="kfac_full"`` at its best lr 0.256, GRIT + AdamW defaults at its best lr 8e-3 and at 0.256.

    python bench/diagnose_kl_regime.py --out bench/results/cpu     # ~2 min on a quiet 2-core CPU

Writes ``<out>/diagnose_kl_regime.json``. It wraps two methods in-process (an experiment, not a feature).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

ARMS = (("kfac_full", {"fisher": "kfac_full"}, 0.256), ("grit_defaults", {}, 8e-3), ("grit_defaults_lr0.256", {}, 0.256))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="./grit-results", help="output folder (default ./grit-results)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    from grit_kernels._noise import silence_known_noise

    silence_known_noise()
    import bench_convergence as bc
    from bench_e2e import device_info, git_commit, versions

    from grit_kernels.preconditioner import GritPreconditioner

    torch.set_num_threads(args.threads)
    clip_factors: list[float] = []
    moves: list[float] = []
    clip_update, adamw_step = GritPreconditioner.clip_update_, torch.optim.AdamW.step

    def norm(ps, before):
        return sum(float((p.detach() - b).norm()) ** 2 for p, b in zip(ps, before)) ** 0.5

    def recording_clip(self, before):
        ps = self.parameters()
        unclipped = norm(ps, before)
        clip_update(self, before)
        clip_factors.append(norm(ps, before) / unclipped if unclipped > 0 else 1.0)

    def recording_step(self, *a, **k):
        ps = [q for g in self.param_groups for q in g["params"] if q.grad is not None]
        before = [q.detach().clone() for q in ps]
        out = adamw_step(self, *a, **k)
        lr = self.param_groups[0]["lr"]
        moved = torch.cat([(q.detach() - b).abs().flatten() for q, b in zip(ps, before)]).mean()
        moves.append(float(moved) / lr if lr > 0 else 0.0)
        return out

    GritPreconditioner.clip_update_, torch.optim.AdamW.step = recording_clip, recording_step
    base = bc.build_base(progress=False)[0]
    data = bc.load_finetune_data()
    results, started = {}, time.time()
    for name, grit, lr in ARMS:
        clip_factors.clear()
        moves.clear()
        res = bc.run_arm(base, data, bc.Arm("adamw", grit, (lr,)), lr=lr, seed=0, steps=args.steps)
        results[name] = {
            "grit_overrides": grit,
            "lr": lr,
            "heldout_curve": res["curve"],
            "clip_factor": list(clip_factors),
            "clip_factor_median": statistics.median(clip_factors),
            "adamw_mean_move_over_lr": list(moves),
            "adamw_mean_move_over_lr_median": statistics.median(moves),
        }
        print(f"{name} lr {lr}: held-out {res['curve'][-1][1]:.4f}, clip factor median "
              f"{results[name]['clip_factor_median']:.3f}, AdamW mean |dp|/lr median "
              f"{results[name]['adamw_mean_move_over_lr_median']:.3f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "diagnose_kl_regime", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_s": time.time() - started, "device": device_info("cpu"), "versions": versions(),
        "git_commit": git_commit(), "command": sys.argv[1:] if argv is None else argv, "steps": args.steps,
        "arms": results,
    }
    (out / "diagnose_kl_regime.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {out / 'diagnose_kl_regime.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
