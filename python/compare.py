"""AdamW-LoRA vs GRIT on the same model, data and seed: held-out loss and step time.

A small version of ``grit-kernels bench convergence`` (pretrained base, lr sweeps, seeds) and of
``grit-kernels bench e2e`` (which measures step time carefully). 20 steps are far too few to tell
which optimizer trains better: it shows the API of an A/B run, not a result.
Runtime: 11 s wall on our idle 2-core CPU VM (torch's default threads) with GRIT's default optimizer (EigenAdamW); 24 s wall on it with about one other job running (one intra-op
thread); 160 s while ~9 other jobs shared it. ``--quick``: seconds.

    python python/compare.py [--steps 20] [--layers 8]
"""

import argparse
import time

import torch

import grit_kernels as gk
from grit_kernels import data
from grit_kernels.models import build_lora_model, tiny_llama_config


def evaluate(model, batches):
    model.eval()
    with torch.no_grad():
        losses = [model(**b).loss.item() for b in batches]
    model.train()
    return sum(losses) / len(losses)


def train(kind, args, train_batches, val_batches):
    model = build_lora_model(tiny_llama_config(num_layers=args.layers), r=16, seed=0)
    model.train()
    if not args.no_fuse:  # both arms on the fused blocks: like for like
        gk.fuse(model)
    if kind == "grit":  # GRIT's default: Adam in the eigenbasis of its factors
        pre = gk.GritPreconditioner(model, gk.GritConfig(kl_clip=None))
        opt = gk.GritOptimizer(gk.EigenAdamW(model.parameters(), pre, lr=args.lr), pre)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    times = []
    for batch in train_batches:
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    measured = sorted(times[3:] or times)  # the first steps warm up
    return evaluate(model, val_batches), measured[len(measured) // 2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--no-fuse", action="store_true", help="both arms on PEFT's LoRA layers (no gk.fuse)")
    p.add_argument("--quick", action="store_true", help="smoke size: 2 layers, 2 steps (a few seconds)")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.steps = 2, 2

    tok = data.ByteTokenizer()
    features = data.tokenize_alpaca(
        data.generate_alpaca_sample(8 * args.steps + 64, seed=0), tok, max_length=256
    )
    collate = data.DynamicPaddingCollator(tok.pad_token_id)
    val = [collate(features[i : i + 8]) for i in range(0, 32, 8)]
    train_batches = [collate(features[32 + 4 * s : 36 + 4 * s]) for s in range(args.steps)]

    results = {}
    for kind in ("adamw", "grit"):
        results[kind] = train(kind, args, train_batches, val)
        print(
            f"{kind:6s} held-out loss {results[kind][0]:.4f}   median step {1000 * results[kind][1]:.1f} ms"
        )
    ratio = results["grit"][1] / results["adamw"][1]
    print(f"GRIT / AdamW step time: {ratio:.3f} (single run, not interleaved; see `grit-kernels bench e2e`)")
    return results


if __name__ == "__main__":
    main()
