"""GRIT on QLoRA: a 4-bit NF4 base model (bitsandbytes) with fp32 LoRA adapters.

GRIT patches bitsandbytes ``Linear4bit`` LoRA layers like plain ones; nothing else changes. The tiny
224-module Llama is quantized on the fly here (bitsandbytes NF4 also runs on CPU). For a real
checkpoint::

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16))
    model = get_peft_model(prepare_model_for_kbit_training(model), LoraConfig(r=16, ...))

Runtime: 8 s wall on our idle 2-core CPU VM (torch's default threads) with GRIT's default optimizer (EigenAdamW); 24 s wall on it with about one other job running (one intra-op
thread); 171 s while ~9 other jobs shared it. ``--quick``: seconds.

    python python/qlora.py [--steps 6]
"""

import argparse

import torch

import grit_kernels as gk
from grit_kernels import data
from grit_kernels.models import build_lora_model, tiny_llama_config


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--no-fuse", action="store_true", help="keep PEFT's LoRA layers (no gk.fuse)")
    p.add_argument("--wrap", action="store_true", help="GRIT-preconditioned AdamW instead of gk.EigenAdamW")
    p.add_argument("--quick", action="store_true", help="smoke size: 2 layers, 2 steps (a few seconds)")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.steps = 2, 2

    torch.manual_seed(0)
    model = build_lora_model(tiny_llama_config(num_layers=args.layers), r=16, quantize_4bit=True)
    model.train()
    kinds = {type(m).__name__ for n, m in model.named_modules() if n.endswith("q_proj")}
    print(f"LoRA layer types: {sorted(kinds)}")
    if not args.no_fuse:  # the fused blocks run over NF4 base weights too
        print(gk.fuse(model))

    if args.wrap:
        pre = gk.GritPreconditioner(model, gk.GritConfig(warmup_steps=3))
        opt = gk.GritOptimizer(torch.optim.AdamW(model.parameters(), lr=args.lr), pre)
    else:  # the default: Adam in the eigenbasis of GRIT's factors
        pre = gk.GritPreconditioner(model, gk.GritConfig(kl_clip=None))
        opt = gk.GritOptimizer(gk.EigenAdamW(model.parameters(), pre, lr=args.lr), pre)
    print(pre)

    tok = data.ByteTokenizer()
    features = data.tokenize_alpaca(data.generate_alpaca_sample(8 * args.steps, seed=0), tok, max_length=192)
    collate = data.PackedCollator()  # padding-free: 4 samples per row, no pad tokens
    for step in range(args.steps):
        loss = model(**collate(features[4 * step : 4 * step + 4])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        print(f"step {step + 1:3d}  loss {loss.item():.4f}")
    return loss.item()


if __name__ == "__main__":
    main()
