"""AdamW-LoRA vs GRIT on the same model, data and seed: held-out loss and step time.

A small version of ``bench/bench_finetune_cpu.py`` (which sweeps learning rates) and of
``grit-kernels bench e2e`` (which measures step time carefully). Runs on CPU in under a minute.

    python python/compare.py [--steps 30] [--layers 8]
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
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    if kind == "grit":
        opt = gk.GritOptimizer(opt, gk.GritPreconditioner(model, gk.GritConfig(warmup_steps=5)))
    times = []
    for batch in train_batches:
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return evaluate(model, val_batches), sorted(times[3:])[len(times[3:]) // 2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args(argv)

    tok = data.ByteTokenizer()
    features = data.tokenize_alpaca(data.generate_alpaca_sample(8 * args.steps + 64, seed=0), tok, max_length=256)
    collate = data.DynamicPaddingCollator(tok.pad_token_id)
    val = [collate(features[i : i + 8]) for i in range(0, 32, 8)]
    train_batches = [collate(features[32 + 4 * s : 36 + 4 * s]) for s in range(args.steps)]

    results = {}
    for kind in ("adamw", "grit"):
        results[kind] = train(kind, args, train_batches, val)
        print(f"{kind:6s} held-out loss {results[kind][0]:.4f}   median step {1000 * results[kind][1]:.1f} ms")
    ratio = results["grit"][1] / results["adamw"][1]
    print(f"GRIT / AdamW step time: {ratio:.3f} (single run, not interleaved; see `grit-kernels bench e2e`)")
    return results


if __name__ == "__main__":
    main()
