"""GRIT in your own training loop: two lines on top of PEFT.

    pre = gk.GritPreconditioner(peft_model, gk.GritConfig(kl_clip=None))
    opt = gk.GritOptimizer(gk.EigenAdamW(peft_model.parameters(), pre, lr=...), pre)   # Adam in the factors' eigenbasis
    ... loss.backward(); opt.step(); opt.zero_grad()

plus ``gk.fuse(peft_model)`` (fused LoRA blocks; ``--no-fuse`` to compare with PEFT's layers).

Runs on CPU with the tiny 224-module Llama (random weights) and synthetic Alpaca data.
Runtime: 16 s wall on our idle 2-core CPU VM (torch's default threads) with GRIT's default optimizer (EigenAdamW); 28 s wall on it with about one other job running (one intra-op
thread); 197 s while ~9 other jobs shared it. ``--quick``: seconds.
Swap in your own model (``AutoModelForCausalLM.from_pretrained`` + ``peft.get_peft_model``) and data
(``grit_kernels.data.load_alpaca_json``) and a real tokenizer.

    python python/custom_loop.py [--steps 8] [--grad-accum 2]
"""

import argparse

import torch

import grit_kernels as gk
from grit_kernels import data
from grit_kernels.models import build_lora_model, tiny_llama_config


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--no-fuse", action="store_true", help="keep PEFT's LoRA layers (no gk.fuse)")
    p.add_argument("--wrap", action="store_true", help="GRIT-preconditioned AdamW instead of gk.EigenAdamW")
    p.add_argument("--quick", action="store_true", help="smoke size: 2 layers, 2 steps (a few seconds)")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.steps = 2, 2

    torch.manual_seed(0)
    model = build_lora_model(tiny_llama_config(num_layers=args.layers), r=16)  # a PEFT LoRA model
    model.train()
    if not args.no_fuse:  # fused LoRA blocks (statistics inside): where the speed is; the report says what
        print(gk.fuse(model))  # was fused and why any part keeps PEFT's path

    # the two lines
    if args.wrap:  # precondition AdamW's gradients
        pre = gk.GritPreconditioner(model, gk.GritConfig(update_freq=10, damping=1e-3, warmup_steps=3))
        opt = gk.GritOptimizer(torch.optim.AdamW(model.parameters(), lr=args.lr), pre)
    else:  # the default: Adam in the eigenbasis of GRIT's factors (docs/benchmarks.md)
        pre = gk.GritPreconditioner(model, gk.GritConfig(kl_clip=None))
        opt = gk.GritOptimizer(gk.EigenAdamW(model.parameters(), pre, lr=args.lr), pre)
    print(pre)

    tok = data.ByteTokenizer()
    need = args.steps * args.grad_accum * args.batch_size
    features = data.tokenize_alpaca(data.generate_alpaca_sample(2 * need, seed=0), tok, args.max_length)[
        :need
    ]
    loader = torch.utils.data.DataLoader(
        features, batch_size=args.batch_size, collate_fn=data.DynamicPaddingCollator(tok.pad_token_id)
    )

    batches = iter(loader)
    for step in range(args.steps):
        total = 0.0
        for _ in range(args.grad_accum):  # gradient accumulation: statistics of all micro-batches count
            loss = model(**next(batches)).loss / args.grad_accum
            loss.backward()
            total += loss.item()
        opt.step()  # fold statistics, then EigenAdamW's step (--wrap: invert, precondition, AdamW)
        opt.zero_grad()
        print(f"step {step + 1:3d}  loss {total:.4f}")

    summary = {k: round(float(v), 4) for k, v in pre.curvature_summary().items()}
    print("curvature summary:", summary)
    gk.unfuse(model)  # no-op if not fused
    pre.remove()  # plain PEFT layers again; model.save_pretrained(...) saves ordinary adapters
    return total


if __name__ == "__main__":
    main()
