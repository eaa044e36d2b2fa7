"""Kernel microbenchmarks: our Triton kernels vs torch batched ops vs the per-module prior-art loop.

For each bank of LoRA modules (Llama-3-8B r=16: 224 modules / 448 factors / 41.9M LoRA parameters;
the same at r=64; Llama-3-70B-sized r=16: 560 modules, d_model 8192, kv 1024, mlp 28672) and each op
of a GRIT step, three implementations are timed side by side in one run:

* ``triton``    -- ``grit_kernels.ops`` with ``backend="triton"`` (CUDA only; interpreter timings
  are meaningless, so the CPU run skips it);
* ``torch``     -- ``grit_kernels.ops`` with ``backend="torch"`` (batched ``cholesky_ex`` +
  ``cholesky_inverse``, grouped ``bmm``, ``addmm``);
* ``prior-art`` -- a per-module Python loop the way published GRIT code does it (``prior_art_*``
  below): host inversion with a device->host->device copy per factor, ``.item()`` per module, one
  or two small matmuls per module.

Ops: ``stats`` (``accumulate_gram_`` of every factor over ``tokens`` rows, 2 per module),
``fold`` (EMA fold of all factors), ``invert`` (damped inversion of all factors), ``precondition``
(all lora_A/lora_B gradients in place, with the KL-clip dot product).

GPU: ``triton.testing.do_bench`` (median and 20/80% quantiles, L2 flushed between calls). CPU:
``time.perf_counter`` medians and quantiles over ``reps`` calls after one warm-up call. Reported:
times, ratios to ours (to torch on CPU), achieved GB/s of the memory-bound ops against the measured
device copy bandwidth (``dst.copy_(src)`` of 1 GiB), the bandwidth floor (bytes / copy bandwidth),
and the docs/design.md §8 floors.

Writes ``./grit-results/<device-slug>/kernels.json`` (``--out DIR`` or the ``OUT`` environment
variable to choose; ``--out bench/results/<device-slug>`` updates the tracked results) and prints
a table. Run: ``grit-kernels bench kernels`` from any directory (or ``python -m grit_kernels.bench.kernels``;
in a checkout ``python bench/bench_kernels.py``); ``--help`` lists the options. ``run(out_dir=None,
quick=False) -> dict`` is the entry point for scripts. The cases, banks and the per-module loop live in
:mod:`.kernel_cases`; timing and the machine's description in :mod:`.harness`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from . import harness
from .kernel_cases import (
    BANKS,
    DESIGN_FLOORS_MS,
    IMPLS,
    OPS,
    BenchConfig,
    bench_case,
    measure_copy_bandwidth,
    triton_host_path,
)


def _fmt_ms(t: dict | None) -> str:
    if t is None:
        return "-"
    m = t["median_ms"]
    s = f"{m * 1e3:.1f} us" if m < 1 else f"{m:.2f} ms"
    return s + ("*" if "extrapolated_from_modules" in t else "")


def format_table(result: dict) -> str:
    impls = [i for i in IMPLS if i in result["config"]["impls"]]
    base = "triton" if "triton" in impls else "torch"
    head = ["bank", "op"] + impls + [f"{i}/{base}" for i in impls if i != base] + ["GB/s (ours)", "floor"]
    rows = []
    for row in result["results"]:
        t = row["timings"]
        ours = base if base in t else None
        cells = [row["bank"], row["op"]] + [_fmt_ms(t.get(i)) for i in impls]
        ratios = row.get("ratios_to_" + row["baseline"], {})
        cells += [(f"{ratios[i]:.1f}x" if ratios[i] >= 0.1 else f"{ratios[i]:.3f}x") if i in ratios else "-" for i in impls if i != base]
        gbps = row.get("achieved_gbps", {}).get(ours) if ours else None
        frac = row.get("fraction_of_copy_bandwidth", {}).get(ours) if ours else None
        if gbps is not None:
            cells.append((f"{gbps:.0f}" if gbps >= 10 else f"{gbps:.2f}") + (f" ({100 * frac:.0f}% copy)" if frac else ""))
        else:
            cells.append("-")
        floors = []
        if "bandwidth_floor_ms" in row:
            floors.append(f"bw {_fmt_ms({'median_ms': row['bandwidth_floor_ms']})}")
        if "design_floor_ms" in row:
            floors.append(f"§3 {_fmt_ms({'median_ms': row['design_floor_ms']})}")
        cells.append(", ".join(floors) or "-")
        rows.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    line = lambda cells: " | ".join(str(c).ljust(w) for c, w in zip(cells, widths))
    out = [line(head), "-+-".join("-" * w for w in widths)] + [line(c) for c in rows]
    return "\n".join(out)


def report_text(result: dict) -> str:
    cfg, dev = result["config"], result["device"]
    bw = result.get("copy_bandwidth")
    lines = [
        f"Kernel microbenchmarks on {dev['name']} ({cfg['device']}), torch {result['versions']['torch']}, "
        f"triton {result['versions']['triton']}; tokens/factor {cfg['tokens']}, grads {cfg['grad_dtype']}, "
        f"stats {cfg['stats_dtype']}",
        (f"measured copy bandwidth: {bw['gbps']:.0f} GB/s" if bw else "copy bandwidth: not measured")
        + f"; host load average {result['host_load_average_1_5_15min']['start'][0]:.1f} at start",
        "",
        format_table(result),
        "",
    ]
    if any("extrapolated_from_modules" in t for row in result["results"] for t in row["timings"].values()):
        lines.append("* per-module loop timed on fewer modules and scaled linearly to the whole bank")
    for note in result["notes"]:
        lines.append(f"note: {note}")
    lines.append(f"wrote {result['json_path']}")
    return "\n".join(lines)


def result_path(device: dict, out_dir: str | None) -> Path:
    """``out_dir``, else ``$OUT``, else ``./grit-results/<device-slug>/`` (never the tracked files)."""
    return harness.result_dir(out_dir or os.environ.get("OUT"), device["slug"]) / "kernels.json"


def run(out_dir: str | None = None, quick: bool = False, config: BenchConfig | None = None, argv=None) -> dict:
    """Run the microbenchmarks, write ``kernels.json`` and return the result dict.

    ``quick``: the Llama-3-8B r=16 bank only, fewer repetitions (a smoke run).
    """
    cfg = config or BenchConfig(device="cuda" if torch.cuda.is_available() else "cpu")
    if quick:
        cfg.quick = True
        cfg.banks = ("llama3-8b-r16",)
        cfg.reps = cfg.reps or 3
    cfg.resolve()
    device = harness.device_info(cfg.device)
    if device["type"] == "cpu":  # CPU kernel timings depend on the model and the cores: both in the slug
        device["slug"] = harness.cpu_slug()
    notes = []
    if not cfg.device.startswith("cuda"):
        notes.append("CPU run: Triton kernels skipped (interpreter timings are meaningless); torch backend is the baseline")
    if cfg.prior_art_max_modules is not None and not cfg.device.startswith("cuda"):
        notes.append(f"per-module loop timed on at most {cfg.prior_art_max_modules} modules and scaled linearly")
    notes.extend(cfg.notes or [])
    torch.manual_seed(0)
    load_start = os.getloadavg()
    bw = measure_copy_bandwidth(cfg.device, cfg)
    rows = []
    result = {
        "benchmark": "kernels",
        "device": device,
        "versions": harness.versions(),
        "git_commit": harness.git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": argv,
        "config": {**asdict(cfg), "banks_detail": {b: {**asdict(BANKS[b]), "modules": BANKS[b].modules, "lora_params": BANKS[b].lora_params} for b in cfg.banks}},
        "host_load_average_1_5_15min": {"start": load_start, "end": None},
        "copy_bandwidth": bw,
        "design_floors_ms": DESIGN_FLOORS_MS,
        "triton_precondition_host_path": triton_host_path(BANKS[cfg.banks[0]]) if cfg.banks else None,
        "results": rows,
        "notes": notes,
    }
    path = result_path(device, out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    result["json_path"] = str(path)

    def write(partial: bool) -> None:
        result["partial"] = partial
        result["host_load_average_1_5_15min"]["end"] = os.getloadavg()
        with open(path, "w") as f:
            json.dump(result, f, indent=1)

    cases = [(b, op) for b in cfg.banks for op in cfg.ops]
    for k, (bank_name, op) in enumerate(cases):
        if cfg.time_budget is not None and time.perf_counter() - harness.PROCESS_START > cfg.time_budget:
            notes.append(f"time budget of {cfg.time_budget:.0f} s spent: not run: " + ", ".join(f"{b}/{o}" for b, o in cases[k:]))
            break
        rows.append(bench_case(BANKS[bank_name], op, cfg, bw["gbps"] if bw else None))
        print(f"  {bank_name:15s} {op:13s} " + "  ".join(f"{k}={_fmt_ms(v)}" for k, v in rows[-1]["timings"].items()), file=sys.stderr, flush=True)
        write(partial=True)  # a run cut short keeps the finished cases
        if cfg.device.startswith("cuda"):
            torch.cuda.empty_cache()
    write(partial=False)
    result["table"] = format_table(result)
    return result


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--banks", default=",".join(BANKS), help=f"comma-separated subset of {','.join(BANKS)}")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--tokens", type=int, help="rows per Gram matrix (CUDA 32768, CPU 4096)")
    p.add_argument("--grad-dtype", choices=("float32", "bfloat16", "float16"), help="default float32 (PEFT LoRA grads)")
    p.add_argument("--stats-dtype", choices=("float32", "bfloat16", "float16"), help="CUDA bfloat16, CPU float32")
    p.add_argument("--reps", type=int, help="CPU: timed calls per measurement (default 7)")
    p.add_argument("--prior-art-max-modules", type=int, help="CPU: time the per-module loop on fewer modules, scale up")
    p.add_argument("--threads", type=int, help="CPU: torch threads (default: torch's choice)")
    p.add_argument("--out", metavar="DIR", help="output directory (default $OUT, else ./grit-results/<device-slug>/)")
    p.add_argument("--quick", action="store_true", help="smoke run: Llama-3-8B r=16 bank only")
    p.add_argument("--host-launch", action="store_true", help="CUDA: also time the host side of each call (queue empty)")
    p.add_argument("--time-budget", type=float, metavar="S", help="seconds: later cases are not started past it")
    return p


def main(argv=None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    split = lambda s: tuple(x.strip() for x in s.split(",") if x.strip())
    cfg = BenchConfig(
        banks=split(args.banks),
        ops=split(args.ops),
        impls=split(args.impls),
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        tokens=args.tokens,
        grad_dtype=args.grad_dtype,
        stats_dtype=args.stats_dtype,
        reps=args.reps,
        prior_art_max_modules=args.prior_art_max_modules,
        threads=args.threads,
        host_launch=args.host_launch,
        time_budget=args.time_budget,
    )
    try:
        result = run(out_dir=args.out, quick=args.quick, config=cfg, argv=list(sys.argv if argv is None else argv))
    except ValueError as exc:
        print(f"{prog or 'grit-kernels bench kernels'}: error: {exc}", file=sys.stderr)
        return 2
    print(report_text(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
