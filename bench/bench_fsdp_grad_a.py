"""FSDP2: how should GRIT get the whole grad_A (r x d_in, sharded on r)? Measured on CPU with gloo.

Two designs, same model, same batches, two processes (``torchrun --nproc_per_node 2 bench/bench_fsdp_grad_a.py``):

* ``gather``: LoRA weights sharded by ``fully_shard`` with the rest (FSDP reduce-scatters their gradients in
  backward); at the step one ``all_gather_into_tensor`` of every module's local grad_A rows (packed).
* ``replicate``: LoRA weights kept out of the sharding (``fully_shard(..., ignored_params=...)``): FSDP does
  not reduce them, so one ``all_reduce`` of every LoRA gradient (A and B, packed) at the step.
* ``fsdp``: the first without the gather (plain FSDP2 LoRA): the floor.

Per design: median time of forward + backward + the design's collective (``step_ms``), of the collective alone
(``collective_ms``), and the bytes it moves. Writes ``bench/results/<device>/fsdp_grad_a.json`` from rank 0.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from grit_kernels.models import build_lora_model, tiny_llama_config

HIDDEN, LAYERS, RANK, ROWS, SEQ, STEPS, WARMUP = 512, 4, 16, 2, 128, 12, 3


def lora_params(model, which):
    return [p for n, p in model.named_parameters() if f".lora_{which}." in n]


def build(design):
    config = tiny_llama_config(num_layers=LAYERS, hidden=HIDDEN, vocab=1024)
    model = build_lora_model(config, r=RANK, seed=0)
    layers = model.base_model.model.model.layers
    for layer in layers:
        ignored = set(lora_params(layer, "A") + lora_params(layer, "B")) if design == "replicate" else None
        fully_shard(layer, ignored_params=ignored)
    fully_shard(model)
    return model


def run(design, batches):
    model = build(design)
    grads_a = lambda: [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in lora_params(model, "A")]
    step_ms, coll_ms, nbytes = [], [], 0
    for i, ids in enumerate(batches):
        dist.barrier()
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        t1 = time.perf_counter()
        if design == "gather":
            local = grads_a()
            flat = torch.cat([g.reshape(-1) for g in local])
            out = torch.empty(dist.get_world_size() * flat.numel())
            dist.all_gather_into_tensor(out, flat)
            nbytes = out.numel() * 4
        elif design == "replicate":
            grads = [p.grad for p in lora_params(model, "A") + lora_params(model, "B")]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            torch._foreach_copy_(grads, [c.view_as(g) for c, g in zip(flat.split([g.numel() for g in grads]), grads)])
            nbytes = flat.numel() * 4
        t2 = time.perf_counter()
        for p in model.parameters():
            p.grad = None
        if i >= WARMUP:
            step_ms.append(1e3 * (t2 - t0))
            coll_ms.append(1e3 * (t2 - t1))
    return {
        "step_ms": statistics.median(step_ms),
        "collective_ms": statistics.median(coll_ms),
        "collective_bytes": nbytes,
        "lora_elements_per_rank": sum(
            (p.to_local() if hasattr(p, "to_local") else p).numel()
            for p in lora_params(model, "A") + lora_params(model, "B")
        ),
    }


def main():
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(dist.get_rank())
    batches = [torch.randint(4, 1000, (ROWS, SEQ), generator=g) for _ in range(STEPS)]
    results = {}
    for rep in range(2):  # interleaved repeats: the machine is shared
        for design in ("fsdp", "gather", "replicate"):
            results.setdefault(design, []).append(run(design, batches))
    if dist.get_rank() == 0:
        summary = {d: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for d, runs in results.items()}
        out = {
            "device": f"cpu ({platform.processor() or platform.machine()}), gloo, {dist.get_world_size()} processes x 1 thread",
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
            "config": dict(hidden=HIDDEN, ffn=2 * HIDDEN, layers=LAYERS, r=RANK, rows_per_rank=ROWS, seq=SEQ,
                           steps=STEPS - WARMUP, lora_modules=7 * LAYERS),
            "raw": results,
            "median": summary,
        }
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu", "fsdp_grad_a.json")
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
        print(json.dumps(summary, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
