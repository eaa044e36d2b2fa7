"""Step cost of K-FAC's large factors vs model width: AdamW-LoRA, GRIT (rank-space K-FAC), ``fisher="kfac_lowrank"``
and ``fisher="kfac_full"``, side by side.

``fisher="kfac_lowrank"`` adds ``O(N d m)`` work per LoRA layer (its sketches) to a step whose base cost is
``O(N d^2)``, so its overhead should shrink like ``m / d``; ``kfac_full``'s ``O(N d^2 + d^3)`` does not. This
measures it: for each hidden size, a randomly initialised 2-layer byte-level Llama (FFN ``2.6875 x hidden``, as
the convergence benchmark's base), LoRA r=8 on all 7 projections, batch 8 x 128 tokens, AdamW inside every
GRIT arm. The arms of one width are stepped round-robin (one step each in turn) after a warm-up, so a shared
machine slows them alike; the ratio to AdamW-LoRA's median step is the figure, with the medians of the
forward+backward and optimizer phases beside it. Random weights are fine for
speed. Writes ``<out>/large_factor_cost.json`` and prints a table::

    python bench/bench_large_factor_cost.py --out bench/results/cpu     # ~3 min on 2 cores
    python bench/bench_large_factor_cost.py --fuse ...                  # every arm on gk.fuse's blocks
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ARMS = {
    "adamw": None,
    "grit": {},
    "kfac_lowrank": {"fisher": "kfac_lowrank"},
    "kfac_full": {"fisher": "kfac_full"},
}


def build(hidden: int, grit: dict | None, seed: int = 0, fuse: bool = False):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import grit_kernels as gk

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=int(2.6875 * hidden), num_hidden_layers=2,
        num_attention_heads=max(1, hidden // 32), num_key_value_heads=max(1, hidden // 32),
        max_position_embeddings=128, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, lora)
    if fuse:
        gk.fuse(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if grit is not None:
        opt = gk.GritOptimizer(opt, gk.GritPreconditioner(model, gk.GritConfig(warmup_steps=0, **grit)))
    return model, opt


def step(model, opt, ids) -> tuple[float, float]:
    """Seconds of (forward + backward, optimizer step) of one training step."""
    t0 = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    t1 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return t1 - t0, time.perf_counter() - t1


def measure(hidden: int, arms: list[str], steps: int, warmup: int, batch: int, seq: int, fuse: bool = False) -> dict:
    runs = {arm: build(hidden, ARMS[arm], fuse=fuse) for arm in arms}
    gen = torch.Generator().manual_seed(0)
    phases: dict[str, list[tuple[float, float]]] = {arm: [] for arm in arms}
    for i in range(warmup + steps):
        ids = torch.randint(0, 256, (batch, seq), generator=gen)
        for arm in arms:
            t = step(*runs[arm], ids)
            if i >= warmup:
                phases[arm].append(t)
    med = lambda values: 1e3 * statistics.median(values)
    base = med([a + b for a, b in phases["adamw"]])
    return {
        arm: {"median_ms": med([a + b for a, b in ts]), "ratio_to_adamw": med([a + b for a, b in ts]) / base,
              "forward_backward_ms": med([a for a, _ in ts]), "optimizer_ms": med([b for _, b in ts]),
              "times_ms": [1e3 * (a + b) for a, b in ts]}
        for arm, ts in phases.items()
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", default="128,512,1024", help="comma-separated hidden sizes")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {list(ARMS)} (adamw required)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--full-max-hidden", type=int, default=512, help="skip kfac_full above this width (d^3 per step)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fuse", action="store_true", help="every arm on gk.fuse's blocks (default: PEFT's layers)")
    p.add_argument("--out", default="grit-results", help="output directory (default ./grit-results)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    arms = args.arms.split(",")
    if "adamw" not in arms:
        p.error("--arms must include adamw (the baseline of every ratio)")
    result = {"benchmark": "large_factor_cost", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "config": vars(args), "torch": torch.__version__, "widths": {}}
    print("| hidden | " + " | ".join(f"{a} ms (x AdamW)" for a in arms) + " |")
    print("|---" * (len(arms) + 1) + "|")
    for hidden in (int(h) for h in args.hidden.split(",")):
        use = [a for a in arms if a != "kfac_full" or hidden <= args.full_max_hidden]
        res = measure(hidden, use, args.steps, args.warmup, args.batch_size, args.seq_len, fuse=args.fuse)
        result["widths"][str(hidden)] = res
        cells = [f"{res[a]['median_ms']:.1f} ({res[a]['ratio_to_adamw']:.2f}x)" if a in res else "skipped" for a in arms]
        print(f"| {hidden} | " + " | ".join(cells) + " |", flush=True)
    result["load_average_1m_end"] = __import__("os").getloadavg()[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "large_factor_cost_fused.json" if args.fuse else "large_factor_cost.json"
    (out / name).write_text(json.dumps(result, indent=1))
    print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
