"""End-to-end speed comparison: AdamW-LoRA vs GRIT (our kernels) vs GRIT the prior way (vs Unsloth).

Every arm trains the same model (same seed: same base weights and LoRA init) on the same batches
(same synthetic Alpaca records, same tokenizer, same padding policy), and is timed in the same
process. Arms:

* ``peft-adamw`` -- plain PEFT LoRA with ``torch.optim.AdamW`` (the baseline of every ratio; alias ``adamw``);
* ``fused-adamw`` -- the same after :func:`grit_kernels.fuse` (block-level fused LoRA Functions and base
  stack: RMSNorm, RoPE, residual adds; with packed rows on CPU, attention per packed sequence where
  ``peft-adamw`` runs HF's SDPA over the whole row with a block-causal mask);
* ``fused-grit`` -- :func:`grit_kernels.fuse` + :class:`grit_kernels.GritPreconditioner` +
  :class:`grit_kernels.GritOptimizer` around the same AdamW (statistics formed inside the fused Functions);
* ``peft-grit``  -- GRIT on PEFT's own per-projection path (alias ``grit``), ``backend="auto"``
  (Triton on CUDA, torch on CPU);
* ``grit-prior`` -- the same math done the way published GRIT code does it
  (:mod:`grit_kernels.bench.prior_art`: per-module hooks, fp16 statistics, host inversion, ``.item()``);
* ``unsloth``    -- Unsloth's ``FastLanguageModel`` with AdamW, when ``unsloth`` imports (CUDA only);
  skipped with a message otherwise;
* ``peft-eigen``, ``fused-eigen`` (on request, not in the default set) -- :class:`grit_kernels.EigenAdamW` (Adam
  in the eigenbasis of GRIT's factors, KL-clip off) on PEFT's path / after :func:`grit_kernels.fuse`.

Defaults: on CPU the tiny 32-layer Llama (224 LoRA modules, r=16, fp32); on CUDA Llama-3-8B shapes
(random weights), QLoRA NF4, r=16, bf16, batch 2 x grad-accum 4. A step is ``grad_accum``
forward/backward passes plus the optimizer step; its time is wall-clock (CUDA synchronised).
Reported: median step time and its 20/80% quantiles after warm-up, real (non-padding) tokens/s,
peak memory, ratio to AdamW. Arms are interleaved step by step (rotating which goes first) on CPU
and run back to back on CUDA (so each arm's peak memory is its own).

Peak memory: CUDA ``torch.cuda.max_memory_allocated`` during the arm's steps. CPU: peak RSS
(``ru_maxrss``) of a fresh subprocess that builds the arm and runs a few steps, and its growth over
the RSS after building the model (``--no-memory`` skips this).

Size: the default is the quick run (2 warm-up + 6 measured steps per arm, no memory probe: about
a minute with the 5 CPU arms on a quiet 2-core CPU); ``--full`` is the reference run (5 + 20 steps
and the CPU memory probe). The expected time is printed before the run; one progress bar with a fixed
total covers all of it (model builds, steps, memory probes). On CPU the intra-op thread count
defaults to the cores left idle by other processes (a 2-thread run on a loaded 2-core machine
stalls 10-20x in OpenMP barriers; measured). The verdict uses per-step paired ratios (arms
interleaved on the same batches) and says when the machine was loaded.

Writes ``./grit-results/<device-slug>/e2e[-qlora].json`` (device, versions, date, config, raw
per-step times, CPU load) and a PNG plot beside it (when matplotlib is installed); ``--out DIR``
writes to DIR instead (``--out bench/results/cpu`` to update the tracked results).

Run: ``grit-kernels bench e2e`` from any directory (or ``python -m grit_kernels.bench.e2e``; in a checkout
``python bench/bench_e2e.py``); ``--help`` lists the options.

The rooms: :mod:`.e2e_config` (what runs), :mod:`.e2e_arms` (models, optimizers, data, one step),
:mod:`.e2e_timing` (running the arms, the memory probe), :mod:`.e2e_report` (statistics, table, plot),
this module (the run and its command line); :mod:`.harness` is shared with every benchmark.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import os
import sys
import time

import torch

from ..config import BACKENDS
from . import harness
from .e2e_arms import check_vocab, step_batches
from .e2e_config import ARMS, DEFAULT_ARMS, PRESETS, SEQ_POLICIES, E2EConfig, model_config
from .e2e_report import assemble, format_table, plot, report_text, result_path
from .e2e_timing import (
    PROBE_UNITS,
    expected_seconds,
    probe_memory,
    probed_arms,
    progress_bar,
    run_probe,
    time_arms,
    work_units,
)


def run(config: E2EConfig | None = None, out_dir: str | None = None, quick: bool = False, argv=None) -> dict:
    """Run the comparison, write JSON (+ PNG) and return the result dict.

    ``quick``: 2 layers, 1 warm-up + 3 measured steps, no memory probe (a smoke run for tests).
    """
    cfg = config or E2EConfig()
    if quick:
        cfg = dataclasses.replace(
            cfg, layers=cfg.layers or 2, steps=3, warmup=1, memory=False if cfg.memory is None else cfg.memory
        )
    cfg = cfg.resolve()
    cpu = not cfg.device.startswith("cuda")
    busy_before = harness.other_busy_cores() if cpu else None
    if cpu and not cfg.threads:
        cfg.threads = harness.auto_threads(torch.get_num_threads(), busy_before)
        cfg.notes.append(
            f"{cfg.threads} intra-op thread(s): {busy_before if busy_before is None else round(busy_before, 2)} "
            f"of {os.cpu_count()} cores busy with other processes at the start (--threads N to choose)"
        )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.device.startswith("cuda") and cfg.preset == "llama3-8b" and cfg.layers is None:
        cfg.notes.append("Llama-3-8B shapes with random weights (speed only)")
    hf = model_config(cfg)
    device = harness.device_info(cfg.device)
    check_vocab(cfg)
    steps = step_batches(cfg)
    bar = progress_bar(work_units(cfg, len(steps)), cfg, "bench e2e")
    started = _dt.datetime.now(_dt.timezone.utc)
    t_start = time.perf_counter()
    deadline = harness.PROCESS_START + cfg.time_budget if cfg.time_budget else None  # the imports count too
    load_before = os.getloadavg()
    path = result_path(cfg, device, out_dir)
    head = {
        "benchmark": "e2e",
        "date": started.isoformat(timespec="seconds"),
        "device": device,
        "versions": harness.versions(),
        "git_commit": harness.git_commit(),
        "command": argv,
        "config": dataclasses.asdict(cfg),
        "model": {
            "name": cfg.model_path or (f"{cfg.preset} Llama" if cfg.preset else "custom"),
            "num_layers": getattr(hf, "num_hidden_layers", None),
            "hidden_size": getattr(hf, "hidden_size", None),
        },
    }

    def write_partial(raw: dict) -> None:
        """After each sequential arm: the JSON with the arms finished so far (``"partial": true``)."""
        partial = assemble(cfg, head, raw, steps, t_start)
        partial["partial"] = True
        harness.write_json(path, partial)
        done = ", ".join(f"{n}: {raw[n]['status']}" for n in cfg.arms if n in raw)
        print(f"[bench e2e] arms done ({done}); wrote {path}", file=sys.stderr, flush=True)

    raw = time_arms(cfg, steps, bar=bar, on_arm_done=write_partial, deadline=deadline)
    load_after = os.getloadavg()
    busy_after = harness.other_busy_cores() if cpu else None
    result = assemble(cfg, head, raw, steps, t_start)
    # other processes on the machine skew CPU timings: the 1-minute load before/after the timing
    result["load_average_1m"] = {"before": load_before[0], "after": load_after[0]}
    result["machine_load"] = (
        harness.machine_load(busy_before, busy_after, load_after[0], cfg.threads or torch.get_num_threads()) if cpu else None
    )
    if cfg.memory and not cfg.device.startswith("cuda"):
        for name, entry in result["arms"].items():
            if name not in probed_arms(cfg):
                continue
            bar.set_postfix_str(f"memory probe {name}")
            if entry.get("status") != "ok":
                bar.update(PROBE_UNITS)
                continue
            probe = probe_memory(cfg, name)
            bar.update(PROBE_UNITS)
            entry["memory_probe"] = probe
            entry["peak_memory_mb"] = probe.get("peak_rss_mb")
            entry["memory_method"] = (
                "peak RSS of a fresh process during 1 warm-up + 3 steps after building the arm "
                f"({probe.get('method')}; model and Python/torch baseline included)"
            )
    elif not cfg.device.startswith("cuda"):
        for entry in result["arms"].values():
            if entry.get("status") == "ok":
                entry["memory_method"] = "not measured (--no-memory)"
    bar.close()
    result["table"] = format_table(result)
    harness.write_json(path, result)
    png = plot(result, path.with_suffix(".png")) if cfg.plot else None
    result["json_path"], result["png_path"] = str(path), str(png) if png else None
    return result


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="End-to-end step time of AdamW-LoRA vs GRIT (ours) vs GRIT the prior way (vs Unsloth), "
        "same data, same padding, same seed. Defaults: tiny 224-module Llama on CPU; "
        "Llama-3-8B shapes, QLoRA NF4, r=16, batch 2 x GA 4 on CUDA.",
    )
    model = p.add_mutually_exclusive_group()
    model.add_argument("--preset", choices=PRESETS, help="built-in model shapes (random weights)")
    model.add_argument("--model-config", metavar="JSON", help="HF config.json path or inline JSON (random weights)")
    model.add_argument("--model", dest="model_path", metavar="PATH", help="local HF model directory or .gguf file (real weights)")
    p.add_argument("--layers", type=int, help="override the number of decoder layers")
    p.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--qlora", dest="qlora", action="store_true", default=None, help="NF4 base weights")
    q.add_argument("--no-qlora", dest="qlora", action="store_false", help="plain LoRA base weights")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="base weight / autocast dtype")
    p.add_argument("--batch-size", type=int, help="samples per micro-batch (CPU 4, CUDA 2)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (CPU 1, CUDA 4)")
    p.add_argument(
        "--seq",
        choices=SEQ_POLICIES,
        default="packed",
        help="padding policy (default packed: padding-free rows, per-token losses equal to the unpadded run)",
    )
    p.add_argument("--max-length", type=int, help="truncation / pad length (CPU 512, CUDA 2048)")
    p.add_argument("--full", action="store_true", help="reference size: 5 warm-up + 20 measured steps, CPU memory probe")
    p.add_argument("--steps", type=int, help="measured optimizer steps per arm (default 6; --full 20)")
    p.add_argument("--warmup", type=int, help="warm-up steps per arm, not measured (default 2; --full 5)")
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("--order", choices=("interleave", "sequential"), help="CPU: interleave, CUDA: sequential")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="GRIT backend (auto: the fastest measured for the device)")
    m = p.add_mutually_exclusive_group()
    m.add_argument("--memory", dest="memory", action="store_true", default=None, help="CPU: probe peak RSS per arm")
    m.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument(
        "--threads", type=int, help="CPU: torch intra-op threads (default: the cores other processes leave idle)"
    )
    b = p.add_mutually_exclusive_group()
    b.add_argument(
        "--breakdown", dest="breakdown", action="store_true", default=None,
        help="time forward / backward / optimizer step separately (default on CPU; adds syncs on CUDA)",
    )
    b.add_argument("--no-breakdown", dest="breakdown", action="store_false")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--out", metavar="DIR", help="output directory (default ./grit-results/<device-slug>/)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 layers, 1 warm-up + 3 steps, no memory probe")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="no PNG beside the JSON")
    p.add_argument(
        "--time-budget", type=float, metavar="S",
        help="seconds for the whole run: an arm that would not finish in it (the longest arm so far) is not started; "
        "the JSON is rewritten after every arm of a sequential run",
    )
    sm = p.add_mutually_exclusive_group()
    sm.add_argument(
        "--share-model", dest="share_model", action="store_true", default=None,
        help="build the model once for every arm, LoRA weights reset per arm (default with --order sequential)",
    )
    sm.add_argument("--no-share-model", dest="share_model", action="store_false")
    p.add_argument("--probe-memory", help=argparse.SUPPRESS)
    p.add_argument("--probe-steps", type=int, default=3, help=argparse.SUPPRESS)
    return p


def main(argv=None, prog: str | None = None) -> int:
    from grit_kernels._noise import silence_known_noise

    silence_known_noise()
    args = build_parser(prog).parse_args(argv)
    if args.probe_memory:
        run_probe(args.probe_memory, args.probe_steps)
        return 0
    fields = {f.name for f in dataclasses.fields(E2EConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    values["arms"] = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    try:
        cfg = E2EConfig(**values)
        resolved = cfg.resolve()
    except ValueError as exc:
        print(f"{prog or 'grit-kernels bench e2e'}: error: {exc}", file=sys.stderr)
        return 2
    if not args.quick:
        print(_plan(resolved), flush=True)
    result = run(cfg, out_dir=args.out, quick=args.quick, argv=list(sys.argv if argv is None else argv))
    print(report_text(result))
    return 0


def _plan(cfg: E2EConfig) -> str:
    """What the run will do and how long it should take, printed before it starts."""
    arms = [a for a in cfg.arms if cfg.device.startswith("cuda") or a != "unsloth"]
    size = "full run" if cfg.full else "quick run"
    text = (
        f"bench e2e, {size}: {', '.join(arms)}; {cfg.warmup} warm-up + {cfg.steps} measured steps per arm"
        f"{', memory probe' if cfg.memory and not cfg.device.startswith('cuda') else ''}"
    )
    expected = expected_seconds(cfg)
    if expected is not None:
        text += f"; expected about {expected:.0f} s on a quiet 2-core CPU (longer while other work runs)"
        if not cfg.full:
            full = expected_seconds(dataclasses.replace(cfg, full=True, steps=None, warmup=None, memory=None).resolve())
            text += f".\nThe reference size is `--full` (about {full / 60:.1f} min)"
    return text + "."


if __name__ == "__main__":
    sys.exit(main())
