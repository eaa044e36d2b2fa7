"""The convergence benchmark's summary: per-arm statistics at each arm's best lr, the verdict against the
better of AdamW-LoRA and LoRA+, the break-even step cost, the markdown table and the plot.

Inputs are the raw runs of ``bench_convergence.py`` (``{"arm", "lr", "seed", "curve": [(step, loss, seconds)],
"train_s", ...}``); nothing here trains.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def _nanmean(values):
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if len(finite) == len(values) else math.inf


def _interp(curve, t: float) -> float:
    """Held-out loss at cumulative train time ``t`` (linear between evaluations; inf if not reached)."""
    for (s0, l0, t0), (s1, l1, t1) in zip(curve, curve[1:]):
        if t0 <= t <= t1:
            return l0 if t1 == t0 else l0 + (l1 - l0) * (t - t0) / (t1 - t0)
    return math.inf


def summarise(runs: list[dict], arms: dict, rc) -> dict:
    """Per arm: mean final loss per lr, best lr (lowest mean final held-out loss), its curve statistics."""
    out = {}
    evals = [s for s, _, _ in runs[0]["curve"]] if runs else [rc.steps]
    checkpoints = sorted({min(evals, key=lambda s: (abs(s - rc.steps / 2), s)), rc.steps})  # mid-run and final
    for name in arms:
        # runs of a cut-short benchmark (a .partial.json) that did not reach the last step are left out
        mine = [r for r in runs if r["arm"] == name and r["curve"][-1][0] == rc.steps]
        if not mine:
            continue
        by_lr, n_seeds = {}, {}
        for lr in sorted({r["lr"] for r in mine}):
            finals = [r["curve"][-1][1] for r in mine if r["lr"] == lr]
            by_lr[lr], n_seeds[lr] = _nanmean([v if math.isfinite(v) else math.nan for v in finals]), len(finals)
        # the lr run on the most seeds (the one the sweep selected), else the lowest mean final loss
        best_lr = min(by_lr, key=lambda k: (-n_seeds[k], by_lr[k], k))
        grid = sorted(by_lr)
        best = sorted((r for r in mine if r["lr"] == best_lr), key=lambda r: r["seed"])
        steps = [s for s, _, _ in best[0]["curve"]]
        losses = [[r["curve"][k][1] for r in best] for k in range(len(steps))]
        times = [[r["curve"][k][2] for r in best] for k in range(len(steps))]
        out[name] = {
            "label": arms[name].label or name,
            "lr_grid": grid,
            "mean_final_loss_by_lr": {f"{k:g}": v for k, v in by_lr.items()},
            "seeds_by_lr": {f"{k:g}": v for k, v in n_seeds.items()},
            "best_lr": best_lr,
            "best_at_edge": len(grid) > 1 and best_lr in (grid[0], grid[-1]),
            "steps": steps,
            "loss_mean": [_nanmean(v) for v in losses],
            "loss_min": [min(v) for v in losses],
            "loss_max": [max(v) for v in losses],
            "time_mean": [sum(v) / len(v) for v in times],
            "at_step": {
                str(c): {"mean": _nanmean(losses[steps.index(c)]), "min": min(losses[steps.index(c)]),
                         "max": max(losses[steps.index(c)])}
                for c in checkpoints if c in steps
            },
            "train_s_mean": sum(r["train_s"] for r in best) / len(best),
            "ms_per_step": 1000 * sum(r["train_s"] for r in best) / len(best) / rc.steps,
            "seeds": [r["seed"] for r in best],
        }
    if out:
        t_equal = min(a["train_s_mean"] for a in out.values())
        for name, a in out.items():
            best = [r for r in runs if r["arm"] == name and r["lr"] == a["best_lr"] and r["curve"][-1][0] == rc.steps]
            vals = [_interp(r["curve"], min(t_equal, r["curve"][-1][2])) for r in best]
            a["at_equal_time"] = {"seconds": t_equal, "mean": _nanmean(vals), "min": min(vals), "max": max(vals)}
    return out


def verdict(summary: dict, grit_arm: str = "grit_adamw") -> dict:
    """Does ``grit_arm`` beat the better of AdamW-LoRA and LoRA+ at every checkpoint and at equal time?"""
    baselines = [b for b in ("adamw", "loraplus") if b in summary]
    if grit_arm not in summary or not baselines:
        return {}
    g = summary[grit_arm]
    out = {"grit_arm": grit_arm}
    for key in list(g["at_step"]) + ["equal_time"]:
        pick = (lambda a: a["at_step"][key]["mean"]) if key != "equal_time" else (lambda a: a["at_equal_time"]["mean"])
        best_base = min(baselines, key=lambda b: pick(summary[b]))
        out[key] = {"grit": pick(g), "best_baseline": best_base, "baseline": pick(summary[best_base]),
                    "grit_minus_baseline": pick(g) - pick(summary[best_base])}
    out["grit_wins"] = all(v["grit_minus_baseline"] < 0 for k, v in out.items() if isinstance(v, dict))
    out["break_even"] = break_even(summary, grit_arm, baselines)
    return out


def _steps_to_reach(steps: list[int], losses: list[float], target: float) -> float:
    """The first step at which a (mean) loss curve reaches ``target``, linear between evaluations (inf if never)."""
    for s0, l0, s1, l1 in zip(steps, losses, steps[1:], losses[1:]):
        if l1 <= target:
            return float(s1) if l0 == l1 else s0 + (s1 - s0) * (l0 - target) / (l0 - l1)
    return math.inf


def break_even(summary: dict, grit_arm: str, baselines: list[str]) -> dict:
    """The step-cost ratio at which ``grit_arm`` would tie the better baseline at equal wall-clock: the baseline's
    final step count over the steps ``grit_arm``'s mean curve needs to reach the baseline's final mean loss (the
    same schedule, truncated), beside the step-cost ratio measured in this run. A hardware-free form of the
    equal-wall-clock verdict: GRIT wins at equal wall-clock wherever its step costs less than this ratio."""
    g = summary[grit_arm]
    final = str(max(int(k) for k in g["at_step"]))
    base = min(baselines, key=lambda b: summary[b]["at_step"][final]["mean"])
    reach = _steps_to_reach(g["steps"], g["loss_mean"], summary[base]["at_step"][final]["mean"])
    return {"baseline": base, "grit_steps_to_baseline_final": reach,
            "max_step_cost_ratio": int(final) / reach if reach > 0 else math.inf,
            "measured_step_cost_ratio": g["ms_per_step"] / summary[base]["ms_per_step"]}


def markdown_table(result: dict) -> str:
    s, rc = result["summary"], result["config"]
    ckpts = sorted({c for a in s.values() for c in a["at_step"]}, key=int)
    head = ["arm", "best lr (grid)"] + [f"held-out @{c}" for c in ckpts]
    head += [f"held-out @{next(iter(s.values()))['at_equal_time']['seconds']:.0f} s", "ms/step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(d):
        if not math.isfinite(d["mean"]):
            return "diverged"
        return f"{d['mean']:.4f} [{d['min']:.4f}, {d['max']:.4f}]"

    for name, a in s.items():
        grid = ", ".join(f"{v:g}" for v in a["lr_grid"])
        edge = " (edge!)" if a["best_at_edge"] else ""
        row = [a["label"], f"{a['best_lr']:g}{edge} ({grid})"] + [cell(a["at_step"][c]) for c in ckpts]
        row += [cell(a["at_equal_time"]), f"{a['ms_per_step']:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    seeds = len(rc["seeds"])
    lines.append("")
    lines.append(
        f"Held-out loss ({_unit(rc)}) of each arm at its best lr (lowest mean final loss over {seeds} seeds): "
        "mean [min, max] over seeds; equal wall-clock = the fastest arm's total training time, "
        + ("runs interleaved step by step in one process."
           if not result.get("merged_from") else
           f"runs interleaved step by step within each of {len(result['merged_from'])} processes merged here "
           "(" + ", ".join(m["file"] for m in result["merged_from"]) + ")")
    )
    verdicts = list((result.get("verdicts") or {}).values()) or [result.get("verdict")]
    for v in [v for v in verdicts if v]:
        parts = [f"{k}: {d['grit']:.4f} vs {d['best_baseline']} {d['baseline']:.4f} ({d['grit_minus_baseline']:+.4f})"
                 for k, d in v.items() if isinstance(d, dict) and "grit" in d]
        lines.append(f"{v['grit_arm']} vs the better baseline: " + "; ".join(parts)
                     + f". GRIT wins everywhere: {v['grit_wins']}.")
        b = v.get("break_even")
        if b and not math.isfinite(b["grit_steps_to_baseline_final"]):
            lines.append(f"Break-even step cost: {v['grit_arm']} never reaches {b['baseline']}'s final loss in this run, "
                         "so it loses at equal wall-clock at any step cost.")
        elif b:
            lines.append(
                f"Break-even step cost: {v['grit_arm']} reaches {b['baseline']}'s final loss at step "
                f"{b['grit_steps_to_baseline_final']:.0f}, so it wins at equal wall-clock wherever its step costs less "
                f"than {b['max_step_cost_ratio']:.2f}x {b['baseline']}'s (measured here: {b['measured_step_cost_ratio']:.2f}x)."
            )
    return "\n".join(lines) + "\n"


def _unit(config: dict) -> str:
    return "nats/token, assistant tokens" if config.get("model") else "nats/byte"


def plot(result: dict, path: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the PNG")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for i, (name, a) in enumerate(result["summary"].items()):
        color = f"C{i}"
        for ax, x in ((axes[0], a["steps"]), (axes[1], a["time_mean"])):
            ax.plot(x, a["loss_mean"], "-", color=color, label=f"{a['label']}, lr {a['best_lr']:g}")
            ax.fill_between(x, a["loss_min"], a["loss_max"], color=color, alpha=0.2)
    axes[0].set_xlabel("optimizer step")
    axes[1].set_xlabel("training wall-clock (s, interleaved)")
    axes[0].set_ylabel(f"held-out loss ({_unit(result['config'])})")
    finite = [v for a in result["summary"].values() for v in a["loss_max"][1:] if math.isfinite(v)]
    if finite:
        lo = min(v for a in result["summary"].values() for v in a["loss_min"] if math.isfinite(v))
        axes[0].set_ylim(lo - 0.02, min(max(finite), result["start_loss"]) + 0.02)
    axes[0].legend(fontsize=8)
    rc = result["config"]
    b = rc["base"]
    task = (f"{Path(rc['model']).name}, LoRA r={rc['r']}, chat SFT on pydoc topics" if rc.get("model")
            else f"Byte Llama ({b['layers']}x{b['hidden']}) pretrained on stdlib sources, LoRA r={rc['r']} on pydoc topics")
    fig.suptitle(f"{task}; mean and min/max over {len(rc['seeds'])} seeds, each arm at its best lr; "
                 f"{result['device']['name']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


#: RunConfig fields that must agree between result files merged by ``--from-json`` (the protocol; seeds and
#: threads may differ: each run keeps its own step times)
PROTOCOL_FIELDS = ("steps", "batch_size", "seq_len", "warmup", "eval_every", "r", "alpha", "momentum", "loraplus_ratio",
                   "heldout_windows", "max_length", "heldout_examples", "fuse")


def merge_results(results: list[dict], sources: list[str]) -> dict:
    """One result from several saved ones of the same protocol (for example seeds run in parallel processes):
    the union of their runs and arms; a run of the same (arm, lr, seed) in a later file replaces the earlier.
    Raises ``ValueError`` when the protocols, the model or an arm's definition differ."""
    merged = json.loads(json.dumps(results[0]))
    runs = {(r["arm"], r["lr"], r["seed"]): r for r in merged["runs"]}
    for other, source in zip(results[1:], sources[1:]):
        for key in PROTOCOL_FIELDS:
            if other["config"].get(key) != merged["config"].get(key):
                raise ValueError(f"{source}: config {key}={other['config'].get(key)!r} differs from "
                                 f"{sources[0]}'s {merged['config'].get(key)!r}; only one protocol can be merged")
        if Path(other["config"].get("model") or "").name != Path(merged["config"].get("model") or "").name:
            raise ValueError(f"{source}: another model ({other['config'].get('model')!r})")
        for name, arm in other["arms"].items():
            mine = merged["arms"].get(name)
            if mine is not None and (mine["inner"], mine["grit"]) != (arm["inner"], arm["grit"]):
                raise ValueError(f"{source}: arm {name!r} is defined differently there ({arm}) than before ({mine})")
            if mine is None:
                merged["arms"][name] = arm
            else:
                mine["lrs"] = sorted(set(mine["lrs"]) | set(arm["lrs"]))
        for r in other["runs"]:
            runs[(r["arm"], r["lr"], r["seed"])] = r
    merged["runs"] = list(runs.values())
    merged["config"]["seeds"] = sorted({r["seed"] for r in merged["runs"]})
    merged["merged_from"] = [{"file": Path(s).name, "git_commit": r.get("git_commit"), "date": r.get("date"),
                              "command": r.get("command")} for s, r in zip(sources, results)]
    merged["wall_s"] = sum(r.get("wall_s", 0.0) for r in results)
    return merged
