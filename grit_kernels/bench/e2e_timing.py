"""Running the arms of the end-to-end comparison: interleaved step by step on the CPU, back to back on CUDA
(:func:`time_arms`), a progress bar with a fixed total, and the CPU peak-memory probe in a fresh process
(:func:`probe_memory`)."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import subprocess
import sys
import time

import torch

from . import harness
from .e2e_arms import Arm, ArmUnavailable, SharedModel, make_arm, step_batches, sync, train_step
from .e2e_config import E2EConfig, model_config

# Progress units: one per training step of one arm; building an arm's model and a memory probe (a
# fresh process: imports, build, 4 steps) are counted as what they cost in steps on a 2-core CPU.
BUILD_UNITS = 2
PROBE_UNITS = 10
CPU_STEP_S = 1.1  # s per step, tiny 32-layer model, batch 4, max 512, quiet 2-core CPU (results/cpu/e2e.json)


def probed_arms(cfg: E2EConfig) -> list[str]:
    return [a for a in cfg.arms if a != "unsloth"] if cfg.memory and not cfg.device.startswith("cuda") else []


def work_units(cfg: E2EConfig, n_steps: int, probes: bool = True) -> int:
    """Total progress units of a run: builds + steps of every arm (+ CPU memory probes)."""
    return len(cfg.arms) * (BUILD_UNITS + n_steps) + (PROBE_UNITS * len(probed_arms(cfg)) if probes else 0)


def expected_seconds(cfg: E2EConfig) -> float | None:
    """Rough wall time on a quiet 2-core CPU, scaled from the measured tiny-model step; None on CUDA."""
    if cfg.device.startswith("cuda") or cfg.model_path is not None:
        return None
    hf = model_config(cfg)
    scale = (hf.num_hidden_layers / 32) * (hf.hidden_size / 64) * cfg.batch_size * cfg.grad_accum / 4
    scale *= min(cfg.max_length, 512) / 512 if cfg.seq != "max" else cfg.max_length / 350
    arms = [a for a in cfg.arms if a != "unsloth"]
    steps = len(arms) * (cfg.warmup + cfg.steps + BUILD_UNITS) + PROBE_UNITS * len(probed_arms(cfg))
    return 8.0 + CPU_STEP_S * scale * steps  # + imports and data


def progress_bar(total: int, cfg: E2EConfig, desc: str):
    return harness.progress(total, desc, enabled=cfg.progress)


def time_arms(cfg: E2EConfig, steps: list[list[dict]], bar=None, on_arm_done=None, deadline: float | None = None) -> dict:
    """Run every arm over ``steps``; returns ``{arm: result dict}`` with raw per-step times.

    ``bar``: a progress bar whose total includes this work (:func:`work_units`); one is made if None.
    ``on_arm_done(results)``: called after each arm of a sequential run (finished, failed or skipped), so
    that a run cut short keeps its finished arms. ``deadline`` (a ``time.perf_counter()`` value): a
    sequential arm is not started when the longest arm so far would not finish before it.
    """
    results: dict = {}
    live: dict[str, Arm] = {}
    shared_box: dict = {}

    def shared_model():
        if not cfg.share_model:
            return None
        if "error" in shared_box:
            raise shared_box["error"]
        if "model" not in shared_box:
            t0 = time.perf_counter()
            try:
                shared_box["model"] = SharedModel(cfg)
            except Exception as exc:
                shared_box["error"] = exc
                raise
            shared_box["build_s"] = time.perf_counter() - t0
        return shared_box["model"]
    breakdown = cfg.breakdown if cfg.breakdown is not None else not cfg.device.startswith("cuda")

    def start(name):
        bar.set_postfix_str(f"building {name}")
        t0 = time.perf_counter()
        try:
            live[name] = make_arm(name, cfg, None if name == "unsloth" else shared_model())
            results[name] = {
                "status": "ok",
                "lora_modules": live[name].num_modules,
                "times": [],
                "losses": [],
                "phases": [],
                "build_s": time.perf_counter() - t0,
                "shared_model": cfg.share_model and name != "unsloth",
            }
            if cfg.device.startswith("cuda"):
                sync(cfg.device)
                torch.cuda.reset_peak_memory_stats()
                results[name]["memory_after_build_mb"] = torch.cuda.memory_allocated() / 2**20
        except ArmUnavailable as exc:
            results[name] = {"status": "skipped", "reason": str(exc)}
            print(f"[bench e2e] arm {name!r} skipped: {exc}", file=sys.stderr)
        except Exception as exc:  # e.g. out of memory: report it, time the other arms
            fail(name, exc, "building")
        bar.update(BUILD_UNITS)

    def fail(name, exc, when):
        reason = f"{type(exc).__name__} while {when}: {str(exc).splitlines()[0] if str(exc) else ''}"
        results[name] = {"status": "failed", "reason": reason}
        print(f"[bench e2e] arm {name!r} failed: {reason}", file=sys.stderr)
        arm = live.pop(name, None)
        if arm is not None and arm.cleanup is not None:
            arm.cleanup()
        del arm
        gc.collect()
        if cfg.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def one_step(name, i):
        arm = live.get(name)
        if arm is None:  # failed earlier
            return
        sync(cfg.device)
        phases = {} if breakdown else None
        t0 = time.perf_counter()
        try:
            loss = train_step(arm, steps[i], cfg, phases)
            sync(cfg.device)
        except Exception as exc:
            del arm
            fail(name, exc, f"training step {i}")
            return
        results[name]["times"].append(time.perf_counter() - t0)
        results[name]["losses"].append(float(loss))
        if breakdown:
            results[name]["phases"].append(phases)

    def finish(name):
        arm = live.pop(name)
        if cfg.device.startswith("cuda") and cfg.order == "sequential":
            results[name]["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
            results[name]["memory_method"] = "torch.cuda.max_memory_allocated (arm alone, model included)"
        if arm.cleanup is not None:
            arm.cleanup()
        del arm
        gc.collect()
        if cfg.device.startswith("cuda"):
            torch.cuda.empty_cache()

    n_steps = len(steps)
    arm_seconds: list[float] = []
    own_bar = bar is None
    if own_bar:
        bar = progress_bar(work_units(cfg, n_steps, probes=False), cfg, "bench e2e")
    with contextlib.nullcontext() if not own_bar else bar:
        if cfg.order == "sequential":
            for name in cfg.arms:
                bar.set_postfix_str(name)
                t_arm = time.perf_counter()
                if deadline is not None and arm_seconds and t_arm + max(arm_seconds) > deadline:
                    results[name] = {
                        "status": "skipped",
                        "reason": f"time budget: {deadline - t_arm:.0f} s left, the longest arm so far took "
                        f"{max(arm_seconds):.0f} s",
                    }
                    print(f"[bench e2e] arm {name!r} skipped: {results[name]['reason']}", file=sys.stderr)
                    bar.update(BUILD_UNITS + n_steps)
                else:
                    start(name)
                    if name in live:
                        for i in range(n_steps):
                            one_step(name, i)
                            bar.update(1)
                        if name in live:
                            finish(name)
                    else:
                        bar.update(n_steps)
                    arm_seconds.append(time.perf_counter() - t_arm)
                    if "build_s" in shared_box and name in results:
                        results[name].setdefault("shared_model_build_s", shared_box.pop("build_s"))
                if on_arm_done is not None:
                    on_arm_done(results)
        else:
            for name in cfg.arms:
                start(name)
            names = [n for n in cfg.arms if n in live]
            bar.update(n_steps * (len(cfg.arms) - len(names)))  # skipped / failed arms: the total stays
            bar.set_postfix_str("training " + ", ".join(names))
            for i in range(n_steps):
                for name in harness.rotated(names, i):  # who goes first rotates: no arm always follows another
                    one_step(name, i)
                    bar.update(1)
            for name in names:
                if name in live:
                    finish(name)
    shared_box.clear()
    gc.collect()
    return results


def probe_memory(cfg: E2EConfig, arm: str, steps: int = 3) -> dict:
    """CPU peak RSS of a fresh process that builds ``arm`` and runs ``steps`` steps (JSON line)."""
    payload = json.dumps(dataclasses.asdict(dataclasses.replace(cfg, progress=False, notes=[])))
    cmd = [sys.executable, "-m", "grit_kernels.bench.e2e", "--probe-memory", arm, "--probe-steps", str(steps)]
    # the child imports this very package, wherever it comes from (an install, a checkout on PYTHONPATH)
    path = os.pathsep.join(p for p in (str(harness.PACKAGE_ROOT.parent), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, GRIT_E2E_PROBE_CONFIG=payload, PYTHONPATH=path)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"memory probe failed (exit {proc.returncode}): {tail[0]}"}
    return json.loads(lines[-1])


def run_probe(arm_name: str, steps: int) -> None:
    """The probe process's side of :func:`probe_memory`: prints one JSON line."""
    cfg = E2EConfig(**json.loads(os.environ["GRIT_E2E_PROBE_CONFIG"]))
    cfg = dataclasses.replace(cfg, arms=tuple(cfg.arms), warmup=min(cfg.warmup, 1), steps=steps)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    batches = step_batches(cfg)
    arm = make_arm(arm_name, cfg)
    gc.collect()
    after_build = harness.rss_mb("VmRSS")
    reset = harness.reset_peak_rss()  # Linux: the peak is that of training, not of imports
    for step in batches:
        train_step(arm, step, cfg)
    peak, method = harness.peak_rss_mb(since_reset=reset)
    print(json.dumps({"peak_rss_mb": peak, "rss_after_build_mb": after_build, "method": method}))
