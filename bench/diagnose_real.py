"""Diagnostics of GRIT on the real-model convergence task, step by step, beside AdamW.

Runs single (not interleaved) runs of the real-model task of ``bench_convergence.py --model`` (same data,
batches, LoRA init and schedule; seed 0) and records per optimizer step:

* ``clip``: the KL-clip factor ``|step after clip| / |step before clip|`` (1: inactive), GRIT arms with a clip;
* ``step_norm``: ``|Delta|`` of all LoRA parameters (A and B apart), every arm;
* ``cos_pre_raw``: per module, the cosine between the preconditioned and the raw gradient (A and B apart;
  median and 10% quantile over modules), GRIT arms;
* every ``--spectrum-every`` steps, the spectrum of the factors: median and max over modules of the
  condition number of ``H`` and ``D`` (undamped, eigenvalues clamped at 1e-30) and of the damped factors.

    python bench/diagnose_real.py --model SmolLM2-135M-Instruct.Q4_1.gguf --steps 30 --out DIR

Writes ``<out>/diagnose_real.json``. Instrumentation wraps methods in-process (an experiment, not a feature).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _quantile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", default="./grit-results")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--spectrum-every", type=int, default=10)
    p.add_argument("--arm", action="append", default=[],
                   help='name=inner:{json GritConfig overrides or "none"}:lr (repeatable); default: AdamW 4e-3, '
                        "GRIT default 1.6e-2 and 4e-3, GRIT without clip 1.6e-2")
    args = p.parse_args(argv)
    from grit_kernels._noise import silence_known_noise

    silence_known_noise()
    import bench_convergence as bc
    import convergence_real as cr
    from bench_e2e import device_info, git_commit, versions

    from grit_kernels.bank import BACKWARD, FORWARD
    from grit_kernels.preconditioner import GritPreconditioner

    torch.set_num_threads(args.threads)
    specs = args.arm or ["adamw=adamw:none:4e-3", "grit=adamw:{}:1.6e-2", "grit_lr4e-3=adamw:{}:4e-3",
                         "grit_noclip=adamw:{\"kl_clip\": null}:1.6e-2"]
    rc = bc.RunConfig(model=args.model, **{**bc.REAL_DEFAULTS, "steps": args.steps, "eval_every": args.steps,
                                           "threads": args.threads})
    base, tok, info = cr.load_real_model(args.model)
    data = cr.load_real_data(tok, rc.max_length, rc.heldout_examples)
    heldout = bc.task_heldout(data, rc)
    start_loss = bc.evaluate(base, heldout)
    batches = bc.task_batches(data, rc, 0)

    records: dict[str, dict] = {}
    current: dict = {}
    clip_update, pre_step = GritPreconditioner.clip_update_, GritPreconditioner.step

    def lora_norms(pre, before=None):
        params = pre.parameters()
        out = []
        for side in (0, 1):
            ps = params[side::2]
            bs = before[side::2] if before is not None else [torch.zeros_like(x) for x in ps]
            out.append(sum(float((x.detach() - b).norm()) ** 2 for x, b in zip(ps, bs)) ** 0.5)
        return out

    def recording_clip(self, before):
        pre_norm = sum(lora_norms(self, before))
        clip_update(self, before)
        current["clip"].append(sum(lora_norms(self, before)) / max(pre_norm, 1e-30))

    def recording_step(self, *a, **k):
        raw = [(m.lora_A.grad.detach().clone(), m.lora_B.grad.detach().clone()) for m in self.modules]
        out = pre_step(self, *a, **k)
        cos = {"A": [], "B": []}
        for (ga, gb), m in zip(raw, self.modules):
            for side, g0, g1 in (("A", ga, m.lora_A.grad), ("B", gb, m.lora_B.grad)):
                den = float(g0.norm() * g1.norm())
                if den > 0:
                    cos[side].append(float((g0 * g1).sum()) / den)
        current["cos"].append({s: {"median": statistics.median(v) if v else None, "q10": _quantile(v, 0.1)}
                               for s, v in cos.items()})
        return out

    def spectrum(pre):
        bank = pre.bank
        cfg = pre.config
        lam = bank.damping_values(cfg.damping, cfg.eps_abs, None)
        out = {}
        for name, side in (("H", FORWARD), ("D", BACKWARD)):
            eig = torch.linalg.eigvalsh(bank.factor[side].double())
            ok = bank.initialized[side]
            top, low = eig.max(dim=1).values, eig.clamp_min(1e-30).min(dim=1).values
            cond = (top / low)[ok]
            damped = ((top + lam[side]) / (eig.clamp_min(0).min(dim=1).values + lam[side]))[ok]
            out[name] = {"cond_median": float(cond.median()) if cond.numel() else None,
                         "cond_max": float(cond.max()) if cond.numel() else None,
                         "damped_cond_median": float(damped.median()) if damped.numel() else None,
                         "damped_cond_max": float(damped.max()) if damped.numel() else None,
                         "trace_median": float(torch.diagonal(bank.factor[side], dim1=1, dim2=2).sum(1)[ok].median())
                         if ok.any() else None}
        return out

    GritPreconditioner.clip_update_ = recording_clip
    GritPreconditioner.step = recording_step
    try:
        for spec in specs:
            name, _, rest = spec.partition("=")
            inner, _, rest = rest.partition(":")
            overrides, _, lr = rest.rpartition(":")
            grit = None if overrides == "none" else json.loads(overrides)
            arm = bc.Arm(inner, grit, (float(lr),), name)
            model = bc.lora_model(base, 0, rc.r, rc.alpha, rc.fuse)
            opt, inner_opt = bc.make_optimizer(model, arm, float(lr), rc)
            sched = bc._schedule(inner_opt, rc.steps, rc.warmup)
            pre = getattr(opt, "preconditioner", None)
            current.clear()
            current.update(clip=[], cos=[], step_norm=[], spectrum={}, train_loss=[])
            params = [q for q in model.parameters() if q.requires_grad]
            t0 = time.perf_counter()
            for i, batch in enumerate(batches, 1):
                before = [q.detach().clone() for q in params]
                loss = bc.batch_loss(model, batch)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sched.step()
                current["train_loss"].append(float(loss))
                names = [n for n, q in model.named_parameters() if q.requires_grad]
                sides = {"A": 0.0, "B": 0.0}
                for n, q, b in zip(names, params, before):
                    sides["A" if "lora_A" in n else "B"] += float((q.detach() - b).norm()) ** 2
                current["step_norm"].append({k: v**0.5 for k, v in sides.items()})
                if pre is not None and (i % args.spectrum_every == 0 or i == 1):
                    current["spectrum"][i] = spectrum(pre)
                print(f"[{name}] step {i} loss {float(loss):.3f} |dA| {current['step_norm'][-1]['A']:.3g} "
                      f"|dB| {current['step_norm'][-1]['B']:.3g}"
                      + (f" clip {current['clip'][-1]:.3f}" if current["clip"] else ""), flush=True)
            records[name] = {"arm": dataclasses.asdict(arm), **{k: v for k, v in current.items()},
                             "heldout_final": bc.evaluate(model, heldout), "train_s": time.perf_counter() - t0}
            print(f"[{name}] held-out after {rc.steps} steps: {records[name]['heldout_final']:.4f}", flush=True)
            del model, opt, inner_opt
    finally:
        GritPreconditioner.clip_update_, GritPreconditioner.step = clip_update, pre_step
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "diagnose_real", "device": device_info("cpu"), "versions": versions(),
              "git_commit": git_commit(), "command": sys.argv[1:] if argv is None else argv, "model": info,
              "config": dataclasses.asdict(rc), "start_loss": start_loss, "arms": records}
    (out / "diagnose_real.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out / 'diagnose_real.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
