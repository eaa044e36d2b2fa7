"""Where GRIT's extra time goes in an end-to-end CPU step: the pieces GRIT adds to the PEFT and fused arms.

Builds the arms exactly as ``bench_e2e.py`` does (same model, seed, batches) plus two ablations of the GRIT
arms, runs them interleaved step by step (rotating who goes first), and records per step, in process CPU
seconds (``time.process_time``: all threads; robust to other processes on the machine, unlike wall time):

* the phases ``forward``, ``backward``, ``optimizer`` (step + zero_grad), as ``bench e2e`` splits them;
* inside them, GRIT's own pieces: ``flush`` (the end-of-backward statistics op), and in the optimizer step
  ``grad_check`` (the NaN/zero gradient check), ``snapshot`` (adapters before the inner step, for the
  KL-clip), ``fold`` (EMA), ``refresh`` (inversion, every step with update_freq=1), ``precondition``
  (grafted preconditioning of every LoRA gradient) and ``kl_clip`` (of the step taken);
* the same pieces *hot*: each run once more right after the step on the same data (bank state restored
  where a piece changes it), which separates the work from what the step's cold caches add.

Ablations (same model and batches): ``<arm>+nocapture`` patches the layers but records nothing (no hook
per module, no flush); ``<arm>+nostep`` captures but steps the inner AdamW only (no GRIT optimizer step).
Ratios between them are of medians of per-step CPU time.

Run: ``python bench/grit_overhead.py --threads 1 --steps 20 --out bench/results/cpu/grit-overhead-2x192``
(writes ``grit_overhead.json`` there; default ``./grit-results/cpu``, never a tracked file).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_e2e

PIECES = ("grad_check", "snapshot", "fold", "refresh", "precondition", "kl_clip")
DEFAULT_VARIANTS = (
    "peft-adamw",
    "peft-grit",
    "peft-grit+nocapture",
    "peft-grit+nostep",
    "fused-adamw",
    "fused-grit",
    "fused-grit+nostep",
)


class _NoCapture:
    """A capture slot that records nothing (the ``+nocapture`` ablation)."""

    def watch(self, h):
        return None


def build(variant: str, cfg) -> bench_e2e.Arm:
    base, *flags = variant.split("+")
    arm = bench_e2e.make_arm(base, cfg)
    if "nocapture" in flags:
        if base != "peft-grit":
            raise ValueError(
                "+nocapture applies to peft-grit (the fused Functions record inside their backward)"
            )
        for module in arm.model.modules():
            state = module.__dict__.get("_grit_state")
            if state is not None:
                state["slot"] = _NoCapture()
    if "nostep" in flags:
        if not base.endswith("grit"):
            raise ValueError("+nostep applies to the GRIT arms")
        arm.optimizer = arm.optimizer.optimizer  # the inner AdamW alone
    return arm


class Timers:
    """Process-CPU-time accumulators around GRIT's pieces (class-level wrappers, installed once)."""

    def __init__(self):
        self.acc: dict[str, float] = {}

    def wrap(self, owner, name: str, key: str) -> None:
        fn = getattr(owner, name)
        acc = self.acc

        def timed(*args, **kwargs):
            t = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                acc[key] = acc.get(key, 0.0) + time.process_time() - t

        setattr(owner, name, timed)

    def install(self) -> None:
        from grit_kernels import bank, layers, optim, preconditioner

        self.wrap(layers.StatsRecorder, "flush", "flush")
        self.wrap(optim.GritOptimizer, "_gradient_problem", "grad_check")
        self.wrap(preconditioner.GritPreconditioner, "snapshot_adapters", "snapshot")
        self.wrap(bank.FactorBank, "fold", "fold")
        self.wrap(bank.FactorBank, "refresh_inverses", "refresh")
        self.wrap(preconditioner.GritPreconditioner, "_precondition_grads", "precondition")
        self.wrap(preconditioner.GritPreconditioner, "clip_update_", "kl_clip")

    def take(self) -> dict[str, float]:
        out = dict(self.acc)
        self.acc.clear()  # in place: the wrappers hold this dict
        return out


def step(arm, micro_batches, timers: Timers) -> dict[str, float]:
    clock = time.process_time
    phases = {"forward": 0.0, "backward": 0.0}
    timers.take()
    for mb in micro_batches:
        t0 = clock()
        loss = arm.model(**mb).loss
        t1 = clock()
        (loss / len(micro_batches)).backward()
        phases["forward"] += t1 - t0
        phases["backward"] += clock() - t1
    t0 = clock()
    arm.optimizer.step()
    arm.optimizer.zero_grad(set_to_none=True)
    phases["optimizer"] = clock() - t0
    phases.update(timers.take())
    return phases


def hot_pieces(arm, micro_batches, timers: Timers) -> dict[str, float]:
    """GRIT's optimizer-step pieces and the flush run twice in a row on one step's data; the second (hot) time."""
    from grit_kernels import layers

    opt = arm.optimizer
    pre = opt.preconditioner
    cfg = pre.config
    recorded: list[list] = []  # the pending records of every flush (one per micro-batch's backward)
    original = layers.StatsRecorder.flush

    def keep(self):
        recorded.append(list(self._pending))
        return original(self)

    layers.StatsRecorder.flush = keep
    try:
        for mb in micro_batches:
            (arm.model(**mb).loss / len(micro_batches)).backward()
    finally:
        layers.StatsRecorder.flush = original
    bank = pre.bank
    saved = bank.storage.clone(), bank.status.clone(), bank.initialized.clone(), bank.inverse_valid.clone()
    grads = [p.grad.clone() for p in pre.parameters()]
    params = [p.detach().clone() for p in pre.parameters()]

    def restore():
        for t, s in zip((bank.storage, bank.status, bank.initialized, bank.inverse_valid), saved):
            t.copy_(s)
        for p, g, v in zip(pre.parameters(), grads, params):
            p.grad.copy_(g)
            p.data.copy_(v)

    def flush_again():
        for records in recorded:
            layers.RECORDER._pending = list(records)
            layers.RECORDER.flush()

    actions = {
        "flush": flush_again,
        "grad_check": opt._gradient_problem,
        "snapshot": pre.snapshot_adapters,
        "fold": lambda: bank.fold(cfg.ema_decay, backend=pre.backend),
        "refresh": lambda: bank.refresh_inverses(
            cfg.damping,
            cfg.eps_abs,
            cfg.retry_damping_factor,
            backend=pre.backend,
            floor=pre._damping_floor(),
        ),
        "precondition": lambda: pre._precondition_grads(None),
        "kl_clip": lambda: pre.clip_update_(pre.snapshot_adapters()),
    }
    hot = {}
    for key, action in actions.items():
        times = []
        for _ in range(2):
            restore()
            timers.take()
            action()
            times.append(timers.take().get(key, 0.0))
        hot[key] = times[1]
    restore()
    opt.zero_grad(set_to_none=True)
    return hot


def run(args) -> dict:
    variants = tuple(args.variants.split(","))
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = bench_e2e.E2EConfig(
        batch_size=args.batch_size,
        max_length=args.max_length,
        grad_accum=args.grad_accum,
        warmup=args.warmup,
        steps=args.steps,
        seq=args.seq,
        layers=args.layers,
        model_path=args.model,
        progress=False,
        arms=tuple(dict.fromkeys(v.split("+")[0] for v in variants)),
    ).resolve()
    steps = bench_e2e._step_batches(cfg)
    load_before = os.getloadavg()[0]
    arms = {v: build(v, cfg) for v in variants}
    timers = Timers()
    timers.install()
    raw: dict[str, list] = {v: [] for v in variants}
    hot: dict[str, list] = {v: [] for v in variants if v.endswith("grit")}
    for i, micro_batches in enumerate(steps):
        for k in range(len(variants)):
            v = variants[(i + k) % len(variants)]
            times = step(arms[v], micro_batches, timers)
            if i >= cfg.warmup:
                raw[v].append(times)
        # hot re-runs on a few steps' data (they cost time, not the results)
        if i >= cfg.warmup and (i - cfg.warmup) % 4 == 0:
            for v, rows in hot.items():
                rows.append(hot_pieces(arms[v], micro_batches, timers))
    keys = ("forward", "backward", "optimizer", "flush", *PIECES)

    def med(rows, key):
        return statistics.median(r.get(key, 0.0) for r in rows)

    summary = {}
    base = statistics.median(
        sum(r[p] for p in ("forward", "backward", "optimizer")) for r in raw[variants[0]]
    )
    for v in variants:
        total = statistics.median(sum(r[p] for p in ("forward", "backward", "optimizer")) for r in raw[v])
        summary[v] = {"total_ms": 1e3 * total, "ratio_to_" + variants[0]: total / base}
        summary[v].update({f"{k}_ms": 1e3 * med(raw[v], k) for k in keys})
        if hot.get(v):
            summary[v]["hot_ms"] = {k: 1e3 * statistics.median(h[k] for h in hot[v]) for k in hot[v][0]}
    return {
        "benchmark": "grit_overhead",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_commit": bench_e2e.git_commit(),
        "command": sys.argv[1:],
        "clock": "time.process_time (CPU seconds of all threads of this process)",
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": {"before": load_before, "after": os.getloadavg()[0]},
        "config": {
            k: getattr(cfg, k)
            for k in ("batch_size", "grad_accum", "max_length", "seq", "warmup", "steps", "layers")
        },
        "variants": list(variants),
        "summary": summary,
        "raw": raw,
        "hot": hot,
    }


def micro_benchmarks(reps: int = 3000) -> dict:
    """Two one-thread microbenchmarks behind the breakdown (process CPU time; medians over 3 rounds):

    * ``hook_us``: one ``lora_A``-shaped ``nn.Linear(64, 16)`` forward on ``[1, 384, 64]`` plus a backward, with
      nothing on ``h``, a tensor hook (``h.register_hook``), a pre-hook on ``h.grad_fn``, or ``h.retain_grad()``;
      the differences are what each way of reaching ``dL/dh`` costs per module and micro-batch.
    * ``read_ms``: summing 2 MiB held in 320 tensors (the LoRA gradients' size here) right after they were
      written (cached) and after 600 MB of other memory traffic (evicted), as the step reads them.
    """
    import functools

    torch.set_num_threads(1)
    layer = torch.nn.Linear(64, 16, bias=False)
    x = torch.randn(1, 384, 64)

    def noop(*args):
        return None

    def attach(kind, h):
        if kind == "tensor_hook":
            h.register_hook(functools.partial(noop, h.detach()))
        elif kind == "node_prehook":
            h.grad_fn.register_prehook(functools.partial(noop, h.detach()))
        elif kind == "retain_grad":
            h.retain_grad()

    hook_us = {}
    for kind in ("none", "tensor_hook", "node_prehook", "retain_grad"):
        rounds = []
        for _ in range(3):
            t = time.process_time()
            for _ in range(reps):
                h = layer(x)
                attach(kind, h)
                h.sum().backward()
            rounds.append((time.process_time() - t) / reps * 1e6)
        hook_us[kind] = statistics.median(rounds)
    tensors = [torch.randn(2048) for _ in range(256)] + [torch.randn(4096) for _ in range(64)]
    traffic = torch.zeros(150_000_000)
    cached, evicted = [], []
    for _ in range(5):
        traffic.add_(1.0)
        t = time.perf_counter()
        torch._foreach_norm(tensors)
        evicted.append(time.perf_counter() - t)
        t = time.perf_counter()
        torch._foreach_norm(tensors)
        cached.append(time.perf_counter() - t)
    del traffic
    return {
        "hook_us": hook_us,
        "read_ms": {"cached": 1e3 * statistics.median(cached), "evicted": 1e3 * statistics.median(evicted)},
    }


def format_table(result: dict) -> str:
    cols = ("total", "forward", "backward", "optimizer", "flush", *PIECES)
    lines = ["variant                  " + " ".join(f"{c[:9]:>9s}" for c in cols) + "     ratio"]
    for v, s in result["summary"].items():
        ratio = next(val for key, val in s.items() if key.startswith("ratio_to_"))
        lines.append(f"{v:24s} " + " ".join(f"{s[c + '_ms']:9.1f}" for c in cols) + f"  {ratio:8.3f}")
        if "hot_ms" in s:
            hot = s["hot_ms"]
            lines.append(
                f"{'  (same pieces, hot)':24s} "
                + " " * 40
                + " ".join(f"{hot.get(c, 0.0):9.1f}" for c in cols[4:])
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq", default="packed")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--layers", type=int, default=None, help="decoder layers of the tiny model (default 32)")
    p.add_argument("--model", default=None, help="a local HF model directory or .gguf file (default: the tiny model)")
    p.add_argument(
        "--out", default=None, help="directory for grit_overhead.json (default ./grit-results/cpu)"
    )
    p.add_argument(
        "--micro", action="store_true", help="also run micro_benchmarks() (hook costs, cold reads)"
    )
    args = p.parse_args(argv)
    result = run(args)
    print(format_table(result))
    if args.micro:
        result["micro"] = micro_benchmarks()
        print("micro-benchmarks (1 thread):", json.dumps(result["micro"]))
    out = Path(args.out or "grit-results/cpu")
    out.mkdir(parents=True, exist_ok=True)
    (out / "grit_overhead.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'grit_overhead.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
