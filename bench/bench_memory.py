"""Peak memory of GRIT training vs AdamW training on the tiny 224-module Llama (CPU).

Each measurement runs in a **fresh Python process** (one per arm, model and repetition) so that one
arm's allocator state, caches and imports cannot leak into another's. Two methods:

1. **Peak RSS of the training phase** (the headline). After the model is built and the batch made, the
   process resets its peak-RSS mark (``/proc/self/clear_refs`` = 5, Linux) and reads ``VmHWM`` after
   ``--steps`` optimizer steps; the optimizer (and for GRIT the preconditioner and its bank) is created
   *after* the reset, so the number includes them. ``tracemalloc`` would be wrong here: it sees Python
   objects, not the C++ allocations behind torch tensors. Where ``clear_refs`` is unavailable the
   whole-process ``ru_maxrss`` is reported instead (the method is recorded).
2. **Tensor-level peak** (``--timeline``): one more step under ``torch.profiler`` with
   ``profile_memory=True``; ``MemoryProfileTimeline`` replays every CPU tensor allocation and free,
   categorised (parameter, optimizer state, activation, gradient, ...). Its peak is the live tensor
   bytes, free of allocator and library overhead. It is slow (~20 s per step at 224 modules).

Also reported: the GRIT bank's own size (``FactorBank.storage`` plus status flags), the part of the
difference that is GRIT's by construction.

    python bench/bench_memory.py                      # plain + NF4, 3 repetitions, timeline on
    python bench/bench_memory.py --models plain --reps 1 --no-timeline
    python bench/bench_memory.py --out /tmp/mem       # writes /tmp/mem/memory.json

Writes ``./grit-results/cpu/memory.json`` by default (device, versions, date, git commit, config,
raw numbers, medians); ``--out bench/results/cpu`` updates the tracked file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
from pathlib import Path

from grit_kernels.bench.harness import rss_mb

REPO_ROOT = Path(__file__).resolve().parent.parent
CATEGORIES = (
    "parameter",
    "optimizer_state",
    "input",
    "temporary",
    "activation",
    "gradient",
    "autograd_detail",
    "unknown",
)


# ----------------------------------------------------------------------------- the probe (child process)
def _probe(
    arm: str, model_kind: str, steps: int, batch: int, max_length: int, timeline: bool, threads: int
) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import gc

    import torch

    torch.set_num_threads(threads)
    import grit_kernels as gk
    from grit_kernels import data
    from grit_kernels.models import build_lora_model, tiny_llama_config

    model = build_lora_model(tiny_llama_config(), quantize_4bit=(model_kind == "nf4"), seed=0)
    tok = data.ByteTokenizer()
    features = data.tokenize_alpaca(data.generate_alpaca_sample(batch, seed=0), tok, max_length=max_length)
    inputs = data.DynamicPaddingCollator(tok.pad_token_id)(features)
    gc.collect()
    rss_after_build = rss_mb("VmRSS")
    method = "VmHWM after /proc/self/clear_refs reset (training phase incl. optimizer creation)"
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        method = "ru_maxrss (whole process, includes imports and model build)"

    params = [p for p in model.parameters() if p.requires_grad]
    inner = torch.optim.AdamW(params, lr=1e-4)
    pre = None
    if arm == "grit":
        # inversion and preconditioning at every measured step: GRIT's worst case
        pre = gk.GritPreconditioner(model, gk.GritConfig(warmup_steps=1, update_freq=1))
        opt = gk.GritOptimizer(inner, pre)
    else:
        opt = inner

    def step() -> float:
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    losses = [step() for _ in range(steps)]
    if method.startswith("VmHWM"):
        peak = rss_mb("VmHWM")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "arm": arm,
        "model": model_kind,
        "rss_after_build_mib": rss_after_build,
        "peak_rss_training_mib": peak,
        "training_increment_mib": None if rss_after_build is None else peak - rss_after_build,
        "rss_method": method,
        "losses": losses,
        "tokens_per_step": int(inputs["input_ids"].numel()),
        "real_tokens_per_step": int(inputs["attention_mask"].sum()),
        "trainable_parameters": sum(p.numel() for p in params),
    }
    if pre is not None:
        bank = pre.bank
        flags = sum(
            t.numel() * t.element_size()
            for t in (bank.status, bank.initialized, bank.inverse_valid, bank.ranks)
        )
        result["grit_bank_mib"] = (bank.storage.numel() * bank.storage.element_size() + flags) / 2**20
        result["grit_modules"] = pre.num_modules
    if timeline:
        result["tensor_timeline"] = _tensor_timeline(step)
    print(json.dumps(result))
    return result


def _tensor_timeline(step) -> dict:
    """Peak live CPU tensor bytes of one step, by category, from the profiler's memory timeline."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        step()
    times, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    totals = [sum(row) for row in sizes]
    at = max(range(len(totals)), key=totals.__getitem__)
    mib = 2**20
    return {
        "method": "torch.profiler MemoryProfileTimeline (profile_memory=True), CPU tensors, one step",
        "peak_mib": totals[at] / mib,
        "at_peak_mib": {c: sizes[at][i + 1] / mib for i, c in enumerate(CATEGORIES)},
        "max_per_category_mib": {c: max(row[i + 1] for row in sizes) / mib for i, c in enumerate(CATEGORIES)},
        "torch": torch.__version__,
    }


# ----------------------------------------------------------------------------- the driver
def _run_probe(arm: str, model_kind: str, args, timeline: bool) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--probe",
        arm,
        "--probe-model",
        model_kind,
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--max-length",
        str(args.max_length),
        "--threads",
        str(args.threads),
    ] + (["--timeline"] if timeline else ["--no-timeline"])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO_ROOT), env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(
            f"memory probe {arm}/{model_kind} failed (exit {proc.returncode}):\n" + "\n".join(tail)
        )
    return json.loads(lines[-1])


def _versions() -> dict:
    from importlib.metadata import version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "grit-kernels"):
        try:
            out[name] = version(name)
        except Exception:
            out[name] = None
    return out


def _git_commit() -> str | None:
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        return proc.stdout.strip() or None
    except Exception:
        return None


def run(args) -> dict:
    raw, summary = [], {}
    for model_kind in args.models:
        for arm in ("adamw", "grit"):
            reps = []
            for rep in range(args.reps):
                res = _run_probe(arm, model_kind, args, timeline=args.timeline and rep == 0)
                res["rep"] = rep
                reps.append(res)
                print(
                    f"{model_kind:5s} {arm:5s} rep {rep}: peak RSS {res['peak_rss_training_mib']:.1f} MiB, "
                    f"training increment {res['training_increment_mib']:.1f} MiB",
                    file=sys.stderr,
                )
            raw += reps
            entry = {
                "peak_rss_training_mib_median": statistics.median(r["peak_rss_training_mib"] for r in reps),
                "training_increment_mib_median": statistics.median(r["training_increment_mib"] for r in reps),
                "rss_after_build_mib_median": statistics.median(r["rss_after_build_mib"] for r in reps),
            }
            if "tensor_timeline" in reps[0]:
                entry["tensor_peak_mib"] = reps[0]["tensor_timeline"]["peak_mib"]
            if "grit_bank_mib" in reps[0]:
                entry["grit_bank_mib"] = reps[0]["grit_bank_mib"]
            summary[f"{model_kind}/{arm}"] = entry
        a, g = summary[f"{model_kind}/adamw"], summary[f"{model_kind}/grit"]
        diff = {
            "peak_rss_training_mib": g["peak_rss_training_mib_median"] - a["peak_rss_training_mib_median"],
            "training_increment_mib": g["training_increment_mib_median"] - a["training_increment_mib_median"],
        }
        if "tensor_peak_mib" in a and "tensor_peak_mib" in g:
            diff["tensor_peak_mib"] = g["tensor_peak_mib"] - a["tensor_peak_mib"]
        summary[f"{model_kind}/grit_minus_adamw"] = diff
    return {
        "name": "memory",
        "description": "peak memory of GRIT (GritOptimizer over AdamW) vs AdamW LoRA training, "
        "tiny 224-module Llama",
        "device": {
            "type": "cpu",
            "name": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": args.threads,
        },
        "versions": _versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "config": {
            "model": "tiny_llama_config(): 32 layers x 7 targets = 224 LoRA modules, hidden 64, "
            "vocab 512, r=16",
            "models": list(args.models),
            "steps": args.steps,
            "batch": args.batch,
            "max_length": args.max_length,
            "data": "generate_alpaca_sample(batch, seed=0) -> ByteTokenizer -> DynamicPaddingCollator",
            "grit_config": "GritConfig(warmup_steps=1, update_freq=1): inversion + preconditioning "
            "every step",
            "reps": args.reps,
            "timeline": args.timeline,
        },
        "summary": summary,
        "raw": raw,
    }


def format_table(result: dict) -> str:
    lines = [
        "| model | arm | peak RSS, training (MiB) | RSS increment over built model (MiB) "
        "| tensor peak, 1 step (MiB) | GRIT bank (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for key, e in result["summary"].items():
        model_kind, arm = key.split("/")
        if arm == "grit_minus_adamw":
            tensor = f"{e['tensor_peak_mib']:+.2f}" if "tensor_peak_mib" in e else "-"
            lines.append(
                f"| {model_kind} | GRIT - AdamW | {e['peak_rss_training_mib']:+.1f} | "
                f"{e['training_increment_mib']:+.1f} | {tensor} | |"
            )
            continue
        tensor = f"{e['tensor_peak_mib']:.2f}" if "tensor_peak_mib" in e else "-"
        bank = f"{e['grit_bank_mib']:.2f}" if "grit_bank_mib" in e else "-"
        lines.append(
            f"| {model_kind} | {arm} | {e['peak_rss_training_mib_median']:.1f} | "
            f"{e['training_increment_mib_median']:.1f} | {tensor} | {bank} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    from grit_kernels._noise import silence_known_noise

    silence_known_noise()  # two harmless third-party messages (grit_kernels/_noise.py)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="plain,nf4", type=lambda s: [m for m in s.split(",") if m])
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per probe")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--reps", type=int, default=3, help="fresh processes per arm and model")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads in the probes")
    p.add_argument("--timeline", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", default=str(Path("grit-results") / "cpu"), help="output directory (default ./grit-results/cpu)")
    p.add_argument("--probe", choices=("adamw", "grit"), help=argparse.SUPPRESS)
    p.add_argument("--probe-model", choices=("plain", "nf4"), default="plain", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        _probe(
            args.probe, args.probe_model, args.steps, args.batch, args.max_length, args.timeline, args.threads
        )
        return 0
    bad = [m for m in args.models if m not in ("plain", "nf4")]
    if bad:
        p.error(f"--models: unknown {bad}; use plain and/or nf4")
    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "memory.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
