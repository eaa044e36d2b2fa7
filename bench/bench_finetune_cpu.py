"""A real (small) fine-tuning comparison on CPU: held-out loss of AdamW-LoRA vs GRIT at equal steps.

Setup: the tiny Llama (random base weights of std ``--init-std`` = 0.1, ``--layers`` decoder layers x 7
LoRA modules, r=16; with the Hugging Face default std 0.02 the frozen random ``lm_head`` caps the
logits so low that every optimizer and lr plateaus at the same loss near uniform),
synthetic Alpaca records (:func:`grit_kernels.data.generate_alpaca_sample`, byte tokenizer,
prompt tokens masked) split into a training set and a held-out set. For each optimizer and each
learning rate of a small sweep, the model is trained from the same initialisation on the same
batches in the same order for ``--steps`` optimizer steps (linear LR warm-up then constant), and the
held-out loss is evaluated every ``--eval-every`` steps. GRIT is ``GritOptimizer(AdamW)`` with the
default :class:`~grit_kernels.GritConfig` (update_freq 10, damping 1e-3, EMA 0.95, 10 warm-up
steps, KL-clip 1e-3).

What the comparison can and cannot say: the base model is random, not pretrained, so this measures
how fast each optimizer fits a new, simple distribution with LoRA, not instruction-following
quality. Each configuration runs once (one seed); differences smaller than the spread across lrs
are noise.

Writes ``./grit-results/cpu/finetune_cpu.json`` (every curve, raw) and ``finetune_cpu.png``
(``--out bench/results/cpu`` updates the tracked files).

    python bench/bench_finetune_cpu.py [--steps 200] [--layers 8] [--lrs 1e-3,3e-3,1e-2] [--init-std 0.1]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from bench_e2e import device_info, git_commit, versions


def make_data(args):
    from grit_kernels import data

    tok = data.ByteTokenizer()
    n_train = args.steps * args.batch_size
    records = data.generate_alpaca_sample(2 * (n_train + args.val_samples) + 64, seed=args.seed)
    features = data.tokenize_alpaca(records, tok, max_length=args.max_length)
    val, train = features[: args.val_samples], features[args.val_samples :][:n_train]
    if len(train) < n_train:
        raise ValueError("not enough supervised samples; raise --max-length")
    collate = data.DynamicPaddingCollator(tok.pad_token_id)
    train_batches = [collate(train[i : i + args.batch_size]) for i in range(0, n_train, args.batch_size)]
    val_batches = [collate(val[i : i + 16]) for i in range(0, len(val), 16)]
    return train_batches, val_batches


@torch.no_grad()
def evaluate(model, batches) -> float:
    """Token-weighted mean held-out loss (labels != -100)."""
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        n = int((b["labels"][:, 1:] != -100).sum())
        total += model(**b).loss.item() * n
        count += n
    model.train()
    return total / count


def train_one(kind: str, lr: float, args, train_batches, val_batches) -> dict:
    import grit_kernels as gk
    from grit_kernels.models import build_lora_model, tiny_llama_config

    config = tiny_llama_config(num_layers=args.layers)
    config.initializer_range = args.init_std
    model = build_lora_model(config, r=args.r, seed=args.seed)
    model.train()
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    opt = gk.GritOptimizer(inner, gk.GritPreconditioner(model, gk.GritConfig())) if kind == "grit" else inner
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(inner, lambda s: min(1.0, (s + 1) / warmup))
    curve = [(0, evaluate(model, val_batches))]
    train_losses, times = [], []
    for step, batch in enumerate(train_batches, start=1):
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        times.append(time.perf_counter() - t0)
        train_losses.append(loss.item())
        if step % args.eval_every == 0 or step == len(train_batches):
            curve.append((step, evaluate(model, val_batches)))
    skipped = getattr(opt, "skipped_steps", 0)
    return {
        "optimizer": kind,
        "lr": lr,
        "val_curve": curve,
        "final_val_loss": curve[-1][1],
        "best_val_loss": min(v for _, v in curve),
        "train_losses": train_losses,
        "step_time_median_s": sorted(times)[len(times) // 2],
        "skipped_steps": skipped,
    }


def plot(result: dict, path: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the PNG (pip install 'grit-kernels[plot]')")
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"adamw": "#777777", "grit": "#2a7ab0"}
    for kind in ("adamw", "grit"):
        runs = [r for r in result["runs"] if r["optimizer"] == kind]
        left.plot([r["lr"] for r in runs], [r["final_val_loss"] for r in runs], "o-", color=colors[kind], label=kind)
        best = min(runs, key=lambda r: r["final_val_loss"])
        steps, vals = zip(*best["val_curve"])
        right.plot(steps, vals, "-", color=colors[kind], label=f"{kind}, lr {best['lr']:g}")
    left.set_xscale("log")
    left.set_xlabel("learning rate")
    left.set_ylabel(f"held-out loss after {result['config']['steps']} steps")
    left.legend()
    right.set_xlabel("optimizer step")
    right.set_ylabel("held-out loss (best lr of each)")
    right.legend()
    cfg = result["config"]
    fig.suptitle(
        f"tiny Llama ({cfg['layers']} layers, {result['lora_modules']} LoRA modules, r={cfg['r']}), "
        f"base init std {cfg['init_std']}, synthetic Alpaca, batch {cfg['batch_size']}, CPU",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="AdamW-LoRA vs GRIT held-out loss on CPU over a small lr sweep.")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--val-samples", type=int, default=96)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="comma-separated, used for both optimizers")
    p.add_argument(
        "--init-std", type=float, default=0.1,
        help="std of the random base weights (HF default 0.02 leaves the frozen lm_head unable to express a "
        "byte distribution: every run plateaus near the uniform loss)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path("grit-results") / "cpu"), help="output directory (default ./grit-results/cpu)")
    p.add_argument("--name", default="finetune_cpu", help="output file stem")
    p.add_argument("--quick", action="store_true", help="2 layers, 6 steps, 2 lrs (smoke run)")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.steps, args.eval_every, args.val_samples, args.lrs = 2, 6, 3, 16, "1e-3,3e-3"
    lrs = [float(x) for x in args.lrs.split(",")]
    train_batches, val_batches = make_data(args)
    runs = []
    started = time.perf_counter()
    from tqdm.auto import tqdm

    plan = [(kind, lr) for lr in lrs for kind in ("adamw", "grit")]
    for kind, lr in tqdm(plan, desc="finetune sweep", unit="run"):
        run = train_one(kind, lr, args, train_batches, val_batches)
        runs.append(run)
        tqdm.write(f"{kind:6s} lr {lr:<8g} held-out loss {run['val_curve'][0][1]:.4f} -> {run['final_val_loss']:.4f}")
    from grit_kernels.models import tiny_llama_config

    best = {k: min((r for r in runs if r["optimizer"] == k), key=lambda r: r["final_val_loss"]) for k in ("adamw", "grit")}
    gap = best["adamw"]["final_val_loss"] - best["grit"]["final_val_loss"]
    winner = "tie" if abs(gap) < 1e-4 else ("grit" if gap > 0 else "adamw")
    real_tokens = sum(int((b["attention_mask"]).sum()) for b in train_batches)
    result = {
        "benchmark": "finetune_cpu",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - started,
        "device": device_info("cpu"),
        "load_average_1m_end": os.getloadavg()[0],
        "versions": versions(),
        "git_commit": git_commit(),
        "command": list(sys.argv if argv is None else argv),
        "config": vars(args),
        "lora_modules": 7 * args.layers,
        "model": f"tiny Llama, random base weights (std {args.init_std}), hidden {tiny_llama_config().hidden_size}",
        "data": {
            "train_samples": args.steps * args.batch_size,
            "val_samples": sum(b["input_ids"].shape[0] for b in val_batches),
            "train_real_tokens": real_tokens,
        },
        "runs": runs,
        "summary": {
            "best_adamw": {"lr": best["adamw"]["lr"], "final_val_loss": best["adamw"]["final_val_loss"]},
            "best_grit": {"lr": best["grit"]["lr"], "final_val_loss": best["grit"]["final_val_loss"]},
            "lower_final_val_loss": winner,
            "adamw_minus_grit": gap,
        },
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / (f"{args.name}_quick.json" if args.quick else f"{args.name}.json")
    path.write_text(json.dumps(result, indent=1) + "\n")
    png = plot(result, path.with_suffix(".png"))
    print("\noptimizer  lr        held-out loss (start -> end)   best   median step s")
    for r in runs:
        print(
            f"{r['optimizer']:9s}  {r['lr']:<8g}  {r['val_curve'][0][1]:.4f} -> {r['final_val_loss']:.4f}"
            f"              {r['best_val_loss']:.4f} {r['step_time_median_s']:.3f}"
        )
    s = result["summary"]
    print(
        f"best AdamW {s['best_adamw']['final_val_loss']:.4f} (lr {s['best_adamw']['lr']:g}), best GRIT "
        f"{s['best_grit']['final_val_loss']:.4f} (lr {s['best_grit']['lr']:g}): lower held-out loss: {winner}"
    )
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
