"""The end-to-end comparison's result: per-arm statistics and ratios (:func:`summarise`, :func:`assemble`),
the table, the plot, the printed report and the result file's path."""

from __future__ import annotations

import time
from pathlib import Path

from . import harness
from .e2e_arms import token_counts
from .e2e_config import BASELINE_ARM, CPU_TARGET_RATIO, FUSED_TARGETS, E2EConfig


def summarise(cfg: E2EConfig, raw: dict, steps: list[list[dict]]) -> dict:
    counts = [token_counts(s) for s in steps]
    measured = counts[cfg.warmup :]
    arms = {}
    base = None
    for name in cfg.arms:
        r = raw.get(name, {"status": "not run", "reason": "the run ended before this arm (partial result)"})
        if r["status"] != "ok":
            arms[name] = r
            continue
        times = r["times"][cfg.warmup :]
        real = sum(c[0] for c in measured)
        entry = {
            "status": "ok",
            "lora_modules": r["lora_modules"],
            "build_s": r.get("build_s"),
            "shared_model": r.get("shared_model"),
            **harness.quantiles(times),
            "tokens_per_s": real / sum(times),
            "step_times_s": times,
            "warmup_times_s": r["times"][: cfg.warmup],
            "losses": r["losses"],
            "peak_memory_mb": r.get("peak_memory_mb"),
            "memory_method": r.get("memory_method"),
        }
        for key in ("memory_after_build_mb", "shared_model_build_s"):
            if key in r:
                entry[key] = r[key]
        if r["phases"]:
            measured_phases = r["phases"][cfg.warmup :]
            entry["phase_median_s"] = {
                k: harness.quantiles([ph[k] for ph in measured_phases])["median_s"] for k in measured_phases[0]
            }
            entry["phase_times_s"] = measured_phases
        arms[name] = entry
        if name == BASELINE_ARM:
            base = entry["median_s"]
    base_times = arms[BASELINE_ARM]["step_times_s"] if base else None
    for entry in arms.values():
        if entry.get("status") == "ok":
            entry["ratio_to_adamw"] = entry["median_s"] / base if base else None
            if base_times:  # step i of every arm trains on the same batch: per-step ratios cancel length noise
                q = harness.quantiles([t / b for t, b in zip(entry["step_times_s"], base_times)])
                entry["paired_ratio_to_adamw"] = {"median": q["median_s"], "p20": q["p20_s"], "p80": q["p80_s"]}
    real = [c[0] for c in measured]
    padded = [c[1] for c in measured]
    return {
        "arms": arms,
        "tokens": {
            "real_tokens_per_step_mean": sum(real) / len(real),
            "padded_tokens_per_step_mean": sum(padded) / len(padded),
            "padding_fraction": 1 - sum(real) / sum(padded),
            "real_tokens_per_step": real,
        },
    }


def format_table(result: dict) -> str:
    rows = [("arm", "median s", "p20-p80 s", "tokens/s", "peak MB", "vs AdamW")]
    for name, a in result["arms"].items():
        if a.get("status") != "ok":
            rows.append((name, a.get("status", "?"), a.get("reason", "")[:60], "", "", ""))
            continue
        mem = a.get("peak_memory_mb")
        ratio = a.get("ratio_to_adamw")
        rows.append(
            (
                name,
                f"{a['median_s']:.4f}",
                f"{a['p20_s']:.4f}-{a['p80_s']:.4f}",
                f"{a['tokens_per_s']:.0f}",
                f"{mem:.0f}" if mem is not None else "-",
                f"{ratio:.3f}x" if ratio is not None else "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path | None:
    """Bar chart of median step times (p20-p80 whiskers) and per-step times; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[bench e2e] matplotlib is not installed: skipping the PNG (pip install 'grit-kernels[plot]')")
        return None
    arms = {n: a for n, a in result["arms"].items() if a.get("status") == "ok"}
    if not arms:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(arms)
    med = [arms[n]["median_s"] for n in names]
    err = [[arms[n]["median_s"] - arms[n]["p20_s"] for n in names], [arms[n]["p80_s"] - arms[n]["median_s"] for n in names]]
    bars = left.bar(names, med, yerr=err, capsize=4, color=["#777777", "#2a7ab0", "#d0893a", "#5a9e4b"][: len(names)])
    for bar, n in zip(bars, names):
        ratio = arms[n].get("ratio_to_adamw")
        if ratio is not None:
            left.annotate(f"{ratio:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
    left.set_ylabel("step time, median (s); whiskers p20-p80")
    cfg = result["config"]
    left.set_title(f"{result['model']['name']}, {result['model']['lora_modules']} LoRA modules, r={cfg['r']}", fontsize=9)
    for n in names:
        right.plot(arms[n]["step_times_s"], marker=".", label=n)
    right.set_xlabel("measured step")
    right.set_ylabel("step time (s)")
    right.legend()
    right.set_title(
        f"{result['device']['name']} | batch {cfg['batch_size']} x GA {cfg['grad_accum']}, seq={cfg['seq']}"
        + (" | QLoRA NF4" if cfg["qlora"] else ""),
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def result_path(cfg: E2EConfig, device: dict, out_dir: str | None) -> Path:
    """``out_dir`` if given, else ``./grit-results/<device-slug>/`` (never the tracked bench/results)."""
    return harness.result_dir(out_dir, device["slug"]) / ("e2e-qlora.json" if cfg.qlora else "e2e.json")


def assemble(cfg: E2EConfig, head: dict, raw: dict, steps: list[list[dict]], t_start: float) -> dict:
    """The result dict of the arms in ``raw`` (all of them, or those finished so far)."""
    result = {**head, "wall_s": time.perf_counter() - t_start}
    result["model"] = {
        **head["model"],
        "lora_modules": next((a["lora_modules"] for a in raw.values() if a.get("status") == "ok"), None),
    }
    result.update(summarise(cfg, raw, steps))
    grit, prior = result["arms"].get("peft-grit", {}), result["arms"].get("grit-prior", {})
    result["summary"] = {
        "grit_over_adamw": grit.get("ratio_to_adamw"),
        "grit_over_adamw_paired": grit.get("paired_ratio_to_adamw"),
        "grit_prior_over_adamw": prior.get("ratio_to_adamw"),
        "grit_prior_over_grit": (prior["median_s"] / grit["median_s"]) if "median_s" in grit and "median_s" in prior else None,
    }
    fused_grit, fused_adamw = result["arms"].get("fused-grit", {}), result["arms"].get("fused-adamw", {})
    if "median_s" in fused_grit:
        targets = FUSED_TARGETS["cuda" if cfg.device.startswith("cuda") else "cpu"]
        over_fused = fused_grit["median_s"] / fused_adamw["median_s"] if "median_s" in fused_adamw else None
        result["summary"].update(
            fused_grit_over_peft_adamw=fused_grit.get("ratio_to_adamw"),
            fused_grit_over_peft_adamw_paired=fused_grit.get("paired_ratio_to_adamw"),
            fused_grit_over_fused_adamw=over_fused,
            fused_adamw_over_peft_adamw=fused_adamw.get("ratio_to_adamw"),
            fused_targets={"fused_grit_over_peft_adamw": targets[0], "fused_grit_over_fused_adamw": targets[1]},
        )
    if not cfg.device.startswith("cuda") and cfg.preset == "tiny" and cfg.layers in (None, 32):
        ratio = result["summary"]["grit_over_adamw"]
        result["summary"]["cpu_target_ratio"] = CPU_TARGET_RATIO
        result["summary"]["cpu_target_met"] = None if ratio is None else ratio <= CPU_TARGET_RATIO
        paired = result["summary"]["grit_over_adamw_paired"]
        if paired:  # robust to load: the interval of per-step paired ratios against the target
            result["summary"]["cpu_target_verdict"] = (
                "met" if paired["p80"] <= CPU_TARGET_RATIO else "NOT met" if paired["p20"] > CPU_TARGET_RATIO
                else "inconclusive"
            )
    result["mode"] = "full" if cfg.full else "quick"
    return result


def report_text(result: dict) -> str:
    cfg, model, tokens = result["config"], result["model"], result["tokens"]
    head = (
        f"End-to-end: {model['name']} ({model['num_layers']} layers, {model['lora_modules']} LoRA modules, r={cfg['r']}"
        f"{', QLoRA NF4' if cfg['qlora'] else ''}, {cfg['dtype']}) on {result['device']['name']} [{cfg['device']}]\n"
        f"batch {cfg['batch_size']} x GA {cfg['grad_accum']}, seq={cfg['seq']} (max {cfg['max_length']}), "
        f"{tokens['real_tokens_per_step_mean']:.0f} real tokens/step ({100 * tokens['padding_fraction']:.1f}% padding), "
        f"{cfg['warmup']} warm-up + {cfg['steps']} measured steps, order={cfg['order']}"
    )
    lines = [head, "", result["table"], ""]
    s = result["summary"]
    if s.get("grit_over_adamw") is not None:
        line = f"GRIT / AdamW step time: {s['grit_over_adamw']:.3f} (ratio of medians)"
        paired = s.get("grit_over_adamw_paired")
        if paired:
            line += f"; per-step paired ratio median {paired['median']:.3f} (p20-p80 {paired['p20']:.3f}-{paired['p80']:.3f})"
        lines.append(line)
        if "cpu_target_verdict" in s:
            lines.append(
                f"CPU target GRIT/AdamW <= {s['cpu_target_ratio']}: {s['cpu_target_verdict']} "
                "(met: 80% of the paired per-step ratios are below it; NOT met: 80% above; else inconclusive)"
            )
    load = result.get("machine_load")
    if load and load["loaded"]:
        lines.append(
            f"note: the machine was loaded (other processes: about {load['other_busy_cores_max']:.1f} busy or "
            f"runnable on {result['device'].get('cpu_count')} cores): absolute times are inflated and noisy; the "
            "paired ratios compare arms on the same batches, one right after the other, and stay usable"
        )
    if s.get("grit_prior_over_grit") is not None:
        lines.append(f"GRIT prior way / GRIT ours: {s['grit_prior_over_grit']:.3f}")
    if s.get("fused_grit_over_peft_adamw") is not None:
        t = s["fused_targets"]
        over_fused = s.get("fused_grit_over_fused_adamw")
        lines.append(
            f"fused-grit / peft-adamw: {s['fused_grit_over_peft_adamw']:.3f} (target <= {t['fused_grit_over_peft_adamw']})"
            + (f"; fused-grit / fused-adamw: {over_fused:.3f} (target <= {t['fused_grit_over_fused_adamw']})"
               if over_fused is not None else "")
        )
    phased = {n: a["phase_median_s"] for n, a in result["arms"].items() if a.get("phase_median_s")}
    if phased:
        lines.append("")
        lines.append("phase medians (ms):   forward   backward  optimizer")
        for name, ph in phased.items():
            lines.append(
                f"  {name:18s}{1e3 * ph['forward']:9.1f}  {1e3 * ph['backward']:9.1f}  {1e3 * ph['optimizer']:9.1f}"
            )
        if BASELINE_ARM in phased:
            for name in (n for n in phased if n != BASELINE_ARM):
                extra = {k: 1e3 * (phased[name][k] - phased[BASELINE_ARM][k]) for k in phased[BASELINE_ARM]}
                lines.append(
                    f"  {name} - {BASELINE_ARM}: forward {extra['forward']:+.1f} ms, backward {extra['backward']:+.1f} ms, "
                    f"optimizer {extra['optimizer']:+.1f} ms"
                )
    for note in cfg.get("notes", []):
        lines.append(f"note: {note}")
    lines.append(f"wrote {result['json_path']}" + (f" and {result['png_path']}" if result["png_path"] else ""))
    return "\n".join(lines)
