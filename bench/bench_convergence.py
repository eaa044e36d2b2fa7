"""Convergence benchmark: does GRIT fine-tune a *pretrained* model better than first-order LoRA?

Setup (no downloads; docs/design.md §13):

* **Base model**: a small byte-level Llama (vocabulary 256 = bytes) pretrained once with AdamW on the
  Python standard library's own ``.py`` sources (sorted, deterministic), cached outside the repository in
  ``~/.cache/grit-kernels/convergence/base-<hash>.pt`` (``$GRIT_KERNELS_CACHE`` or ``--cache-dir``
  overrides; the hash covers the model/pretraining config, the corpus bytes and the torch version).
* **Fine-tuning data**: a different distribution, the English documentation prose shipped with Python
  (``pydoc_data/topics.py``, one document per topic). Held-out split by document: every
  ``HELDOUT_EVERY``-th topic (sorted by name) is held out; training batches are random windows of the
  training topics' text, the held-out set is fixed non-overlapping windows of the held-out topics.
* **Arms**: LoRA (r=8, alpha=16, all 7 projections, PEFT init) trained with AdamW, LoRA+
  (``peft.optimizers.create_loraplus_optimizer``, ratio 16), SGD (momentum 0.9), GRIT+AdamW and
  GRIT+SGD (``GritOptimizer`` with the default :class:`~grit_kernels.GritConfig`), plus any GRIT
  variant given with ``--variant``. Same schedule for all (linear warm-up, cosine decay to 0), no
  weight decay, no gradient clipping.
* **Protocol**: per arm an lr grid (``ARMS[name].lrs``; the JSON flags a best lr at the grid's edge),
  every (arm, lr) on every seed. Within a seed every run starts from the same LoRA initialisation and
  sees the same batches in the same order. All runs live in one process and are stepped round-robin,
  one optimizer step each in turn, so load from other processes hits every arm alike and step times
  are comparable. Held-out loss every ``eval_every`` steps. Each arm's best lr is the one with the
  lowest mean (over seeds) final held-out loss; the table reports that lr's mean and min/max over
  seeds at each checkpoint step, and at equal wall-clock (the shortest arm's total training time).

Outputs to ``--out`` (default ``./grit-results``): ``<name>.json`` (device, versions, date, git commit,
config, every raw curve and step time), ``<name>.md`` (the table), ``<name>.png`` (held-out loss vs step
and vs wall-clock, mean and min/max band over seeds, each arm at its best lr).

    grit-kernels bench convergence [--quick] [--seeds 3] [--steps 300] [--arms adamw,loraplus,...]
    python bench/bench_convergence.py --out bench/results/cpu

Reusable API (stable names; other benchmarks import them)::

    base, info = build_base(cache_dir=None, config=BaseConfig())   # pretrained LlamaForCausalLM (cached)
    data = load_finetune_data(seq_len=128)      # {"train": uint8 tensor, "heldout": [n, seq_len] long}
    batches = train_batches(data, steps, batch_size, seq_len, seed)   # list of [batch, seq_len] long
    loss = evaluate(model, heldout_batches)     # token-mean held-out loss (nats/byte)
    model = lora_model(base, seed, r=8)         # PEFT LoRA copy of the base, seed-fixed init
    result = run_arm(base, data, arm="grit_adamw", lr=2e-3, seed=0, steps=300)   # one run, not interleaved
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as _dt
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from convergence_byte import (  # noqa: E402  (the byte-level task; re-exported: other benchmarks import them)
    BaseConfig,
    _schedule,
    build_base,
    heldout_batches,
    load_finetune_data,
    train_batches,
)
from convergence_report import _nanmean, markdown_table, merge_results, plot, summarise, verdict  # noqa: E402

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def batch_loss(model, batch):
    """The model's mean loss on one batch: a ``[b, seq]`` long tensor (every next token is a target) or a
    packed dict from :class:`grit_kernels.data.PackedCollator` (its supervised tokens only)."""
    if isinstance(batch, dict):
        return model(**batch).loss
    return model(input_ids=batch, labels=batch).loss


def _targets(batch) -> int:
    if isinstance(batch, dict):
        return int((batch["labels"][..., 1:] != -100).sum())
    return batch.shape[0] * (batch.shape[1] - 1)


@torch.no_grad()
def evaluate(model, batches) -> float:
    """Token-mean next-token cross-entropy (nats) over ``batches`` (see :func:`batch_loss`)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x in batches:
        n = _targets(x)
        total += float(batch_loss(model, x)) * n
        count += n
    model.train(was_training)
    return total / count


# ----------------------------------------------------------------------------------------- arms
@dataclass
class Arm:
    """An optimizer arm: the inner optimizer (``adamw`` | ``sgd`` | ``loraplus``), GRIT config overrides
    (``None``: no GRIT; ``{}``: the default :class:`GritConfig`) and its lr grid."""

    inner: str
    grit: dict | None
    lrs: tuple[float, ...]
    label: str = ""


ARMS: dict[str, Arm] = {
    "adamw": Arm("adamw", None, (4e-3, 8e-3, 1.6e-2, 3.2e-2), "AdamW-LoRA"),
    "loraplus": Arm("loraplus", None, (1e-3, 2e-3, 4e-3, 8e-3), "LoRA+ (ratio 16)"),
    "sgd": Arm("sgd", None, (0.25, 0.5, 1.0, 2.0), "SGD-LoRA (momentum 0.9)"),
    "grit_adamw": Arm("adamw", {}, (4e-3, 8e-3, 1.6e-2, 3.2e-2), "GRIT + AdamW (defaults)"),
    "grit_sgd": Arm("sgd", {}, (0.25, 0.5, 1.0, 2.0), "GRIT + SGD (defaults)"),
    "grit_loraplus": Arm("loraplus", {}, (1e-3, 2e-3, 4e-3, 8e-3), "GRIT + LoRA+ (defaults)"),
    "eigen_loraplus": Arm("eigen_loraplus", {"kl_clip": None}, (1.41e-3, 2e-3, 2.83e-3, 4e-3),
                          "EigenAdamW + LoRA+ groups"),
    "eigen": Arm("eigen_adam", {"kl_clip": None}, (1e-3, 2e-3, 4e-3, 8e-3), "EigenAdamW (the Trainer's and CLI's default)"),
}
DEFAULT_ARMS = ("adamw", "loraplus", "sgd", "grit_adamw", "grit_sgd")
#: --variant inner kinds that run :class:`grit_kernels.EigenAdamW` (Adam in the factors' eigenbasis) instead of
#: preconditioning the gradient; its own kwargs go under the JSON key "optimizer": {"basis_freq": 1, "second_moment": "keep"}
EIGEN_INNERS = ("eigen_adam", "eigen_loraplus")


@dataclass
class RunConfig:
    """Fine-tuning protocol (fixed before comparing variants)."""

    steps: int = 100
    batch_size: int = 8
    seq_len: int = 128
    warmup: int = 10
    eval_every: int = 20
    r: int = 8
    alpha: float = 16.0
    momentum: float = 0.9
    loraplus_ratio: float = 16.0
    seeds: tuple[int, ...] = (0, 1, 2)
    heldout_windows: int = 24
    threads: int = 1
    base: BaseConfig = field(default_factory=BaseConfig)
    #: real-model task (bench/convergence_real.py): a HF directory or .gguf file; None = the byte-level task
    model: str | None = None
    max_length: int = 192  #: real-model task: tokens per chat pair (batch_size pairs packed per step)
    heldout_examples: int = 32  #: real-model task: held-out pairs
    fuse: bool = False  #: every arm on gk.fuse's fused LoRA blocks


#: the real-model task's protocol (fixed before comparing variants): 40 steps of 4 packed chat pairs, 1 thread
#: (the measured runs of docs/benchmarks.md; 2 threads stall when other processes share a 2-core machine)
REAL_DEFAULTS = dict(steps=40, batch_size=4, warmup=6, eval_every=20, r=16, alpha=32.0, threads=1, fuse=True)
#: lr grids on the real model (2x apart, centred on a first 1-seed screen; extended where the best is at an edge)
REAL_LRS = {"adamw": (1.41e-3, 2e-3, 2.83e-3), "loraplus": (1.25e-4, 1.77e-4, 2.5e-4), "sgd": (0.25, 0.5, 1.0),
            "grit_adamw": (2e-3, 4e-3, 8e-3), "grit_sgd": (0.25, 0.5, 1.0), "grit_loraplus": (5e-4, 1e-3, 2e-3),
            "eigen_loraplus": (2.5e-4, 5e-4, 1e-3), "eigen": (1.41e-3, 2e-3, 2.83e-3)}
REAL_ARMS = ("adamw", "loraplus", "grit_adamw", "eigen")


def task_batches(data: dict, rc: RunConfig, seed: int) -> list:
    """The training batches of ``seed`` for the task of ``rc``."""
    if rc.model is not None:
        import convergence_real

        return convergence_real.train_batches(data, rc.steps, rc.batch_size, seed)
    return train_batches(data, rc.steps, rc.batch_size, rc.seq_len, seed)


def task_heldout(data: dict, rc: RunConfig) -> list:
    if rc.model is not None:
        import convergence_real

        return convergence_real.heldout_batches(data)
    return heldout_batches(data)


def lora_model(base, seed: int, r: int = 8, alpha: float = 16.0, fuse: bool = False):
    """A PEFT LoRA copy of ``base`` (all 7 projections); the LoRA init depends only on ``seed``. The copy shares
    ``base``'s frozen parameters (memory: one base for all runs). ``fuse``: on gk.fuse's fused blocks."""
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(base, memo={id(p): p for p in base.parameters() if not p.requires_grad})
    torch.manual_seed(seed)
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if fuse:
        import grit_kernels as gk

        report = gk.fuse(model)
        if report.fused_modules != report.lora_modules:
            raise RuntimeError(f"gk.fuse left LoRA modules on PEFT's path:\n{report}")
    model.train()
    return model


def make_optimizer(model, arm: Arm, lr: float, rc: RunConfig):
    """``(optimizer to step, inner optimizer for the scheduler)`` of ``arm`` at ``lr``."""
    import grit_kernels as gk

    params = [p for p in model.parameters() if p.requires_grad]
    if arm.inner in EIGEN_INNERS:  # EigenAdamW: GritConfig overrides, plus its own kwargs under "optimizer"
        grit = dict(arm.grit or {})
        kwargs = dict(grit.pop("optimizer", {}), weight_decay=0.0)
        pre = gk.GritPreconditioner(model, gk.GritConfig(**grit))
        if arm.inner == "eigen_adam":
            inner = gk.EigenAdamW(params, pre, lr=lr, **kwargs)
        else:  # LoRA+'s groups (lora_B at ratio x lr) around EigenAdamW
            from peft.optimizers import create_loraplus_optimizer

            inner = create_loraplus_optimizer(
                model, gk.EigenAdamW, lr=lr, loraplus_lr_ratio=rc.loraplus_ratio, preconditioner=pre, **kwargs
            )
        return gk.GritOptimizer(inner, pre), inner
    if arm.inner == "adamw":
        inner = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    elif arm.inner == "sgd":
        inner = torch.optim.SGD(params, lr=lr, momentum=rc.momentum)
    elif arm.inner == "loraplus":
        from peft.optimizers import create_loraplus_optimizer

        inner = create_loraplus_optimizer(
            model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=rc.loraplus_ratio, weight_decay=0.0
        )
    else:
        raise ValueError(f"unknown inner optimizer {arm.inner!r}")
    if arm.grit is None:
        return inner, inner
    pre = gk.GritPreconditioner(model, gk.GritConfig(**arm.grit))
    return gk.GritOptimizer(inner, pre), inner


class Run:
    """One (arm, lr, seed) fine-tuning run, stepped from outside (round-robin with the others)."""

    def __init__(self, name: str, arm: Arm, lr: float, seed: int, base, batches, rc: RunConfig, start_loss: float):
        self.name, self.arm, self.lr, self.seed, self.rc = name, arm, lr, seed, rc
        self.model = lora_model(base, seed, rc.r, rc.alpha, rc.fuse)
        self.opt, inner = make_optimizer(self.model, arm, lr, rc)
        self.sched = _schedule(inner, rc.steps, rc.warmup)
        self.batches = batches
        self.curve = [(0, start_loss, 0.0)]  # (step, held-out loss, cumulative train seconds)
        self.train_losses: list[float] = []
        self.train_s = 0.0
        self.diverged_at: int | None = None

    def step(self, i: int) -> None:
        """Optimizer step ``i`` (1-based), timed: forward, backward, optimizer step, scheduler."""
        if self.diverged_at is not None:
            return
        x = self.batches[i - 1]
        t0 = time.perf_counter()
        loss = batch_loss(self.model, x)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        value = loss.item()  # the training loop's own logging read, inside the timed region like any loop
        self.train_s += time.perf_counter() - t0
        self.train_losses.append(value)
        if not math.isfinite(value) or value > 20.0:
            self.diverged_at = i

    def evaluate(self, i: int, batches) -> None:
        loss = math.nan if self.diverged_at is not None else evaluate(self.model, batches)
        if not math.isfinite(loss):
            loss = math.nan
        self.curve.append((i, loss, self.train_s))

    def result(self) -> dict:
        return {
            "arm": self.name,
            "lr": self.lr,
            "seed": self.seed,
            "curve": self.curve,
            "train_losses": self.train_losses,
            "train_s": self.train_s,
            "diverged_at": self.diverged_at,
            "skipped_steps": getattr(self.opt, "skipped_steps", 0),
        }


def run_interleaved(plan, base, data, rc: RunConfig, progress: bool = True, start_losses=None,
                    on_eval=None) -> list[dict]:
    """Train every ``(name, arm, lr, seed)`` of ``plan`` for ``rc.steps`` steps, round-robin one step each.
    ``on_eval(results so far)`` is called after every evaluation (partial results survive a cut-short run)."""
    heldout = task_heldout(data, rc)
    batches = {s: task_batches(data, rc, s) for s in {p[3] for p in plan}}
    start = start_losses if start_losses is not None else evaluate(base, heldout)
    runs = [Run(n, a, lr, s, base, batches[s], rc, start) for n, a, lr, s in plan]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=rc.steps * len(runs), unit="step", desc=f"{len(runs)} runs round-robin", mininterval=5)
    for i in range(1, rc.steps + 1):
        for run in runs:
            run.step(i)
        if i % rc.eval_every == 0 or i == rc.steps:
            for run in runs:
                run.evaluate(i, heldout)
            if on_eval is not None:
                on_eval([r.result() for r in runs])
        if bar is not None:
            bar.update(len(runs))
    if bar is not None:
        bar.close()
    return [r.result() for r in runs]


def run_arm(base, data, arm: str | Arm = "adamw", lr: float = 2e-3, seed: int = 0, steps: int | None = None,
            rc: RunConfig | None = None, return_model: bool = False):
    """One fine-tuning run on its own (not interleaved): the result dict, and the trained PEFT model
    (its optimizer as ``model.grit_bench_optimizer``) if ``return_model``."""
    rc = dataclasses.replace(rc or RunConfig(), **({"steps": steps} if steps is not None else {}))
    spec = ARMS[arm] if isinstance(arm, str) else arm
    name = arm if isinstance(arm, str) else (spec.label or "custom")
    heldout = task_heldout(data, rc)
    run = Run(name, spec, lr, seed, base, task_batches(data, rc, seed), rc, evaluate(base, heldout))
    for i in range(1, rc.steps + 1):
        run.step(i)
        if i % rc.eval_every == 0 or i == rc.steps:
            run.evaluate(i, heldout)
    if return_model:
        run.model.grit_bench_optimizer = run.opt
        return run.result(), run.model
    return run.result()


def _best_lr(runs: list[dict], name: str) -> tuple[float, list[float]]:
    mine = [r for r in runs if r["arm"] == name]
    by_lr = {}
    for r in mine:
        by_lr.setdefault(r["lr"], []).append(r["curve"][-1][1])
    mean = {lr: _nanmean(v) for lr, v in by_lr.items()}
    return min(mean, key=lambda k: (mean[k], k)), sorted(mean)


def run_protocol(arms: dict[str, Arm], base, data, rc: RunConfig, start_loss: float, max_extensions: int = 2,
                 progress: bool = True, on_eval=None) -> list[dict]:
    """Stage 1: every arm's lr grid on the first seed, interleaved; where the best lr is at the grid's
    edge, the grid is extended one step (the grid's ratio) beyond it, up to ``max_extensions`` times.
    Stage 2: the other seeds at each arm's best lr, interleaved."""
    seed0, others = rc.seeds[0], rc.seeds[1:]
    done: list[dict] = []
    partial = (lambda current: on_eval(done + current)) if on_eval is not None else None
    runs = run_interleaved([(n, a, lr, seed0) for n, a in arms.items() for lr in a.lrs], base, data, rc, progress,
                           start_loss, partial)
    done[:] = runs
    for _ in range(max_extensions):
        extra = []
        for n, a in arms.items():
            best, grid = _best_lr(runs, n)
            if len(grid) < 2 or best not in (grid[0], grid[-1]) or not math.isfinite(_best_loss(runs, n, best)):
                continue
            ratio = grid[1] / grid[0] if best == grid[0] else grid[-1] / grid[-2]
            lr = best / ratio if best == grid[0] else best * ratio
            arms[n] = dataclasses.replace(a, lrs=tuple(sorted(set(a.lrs) | {lr})))
            extra.append((n, arms[n], lr, seed0))
        if not extra:
            break
        print(f"[convergence] best lr at a grid edge, extending: {[(n, f'{lr:g}') for n, _, lr, _ in extra]}", flush=True)
        runs += run_interleaved(extra, base, data, rc, progress, start_loss, partial)
        done[:] = runs
    if others:
        plan = [(n, a, _best_lr(runs, n)[0], s) for s in others for n, a in arms.items()]
        runs += run_interleaved(plan, base, data, rc, progress, start_loss, partial)
    return runs


def _best_loss(runs, name, lr):
    return _nanmean([r["curve"][-1][1] for r in runs if r["arm"] == name and r["lr"] == lr])


# ----------------------------------------------------------------------------------------- CLI
def _parse_variant(text: str) -> tuple[str, Arm]:
    """``name=inner:{json GritConfig overrides}[:lr1,lr2,...]``; inner ``adamw|sgd|loraplus`` (GritOptimizer
    around it) or ``eigen_adam|eigen_loraplus`` (EigenAdamW; its kwargs under the JSON key ``"optimizer"``)."""
    name, _, rest = text.partition("=")
    inner, _, rest = rest.partition(":")
    if rest.rstrip().endswith("}"):
        overrides, lrs = rest, ""
    else:
        overrides, _, lrs = rest.rpartition(":")
    default = {"sgd": "grit_sgd", "eigen_loraplus": "grit_loraplus"}.get(inner, "grit_adamw")
    grid = tuple(float(v) for v in lrs.split(",")) if lrs else ARMS[default].lrs
    label = f"EigenAdamW ({inner}) {overrides}" if inner in EIGEN_INNERS else f"GRIT + {inner} {overrides}"
    return name, Arm(inner, json.loads(overrides or "{}"), grid, label)


def _finish(result: dict, arms: dict[str, Arm], rc: RunConfig, out: Path, name: str) -> None:
    from grit_kernels import GritConfig

    result.setdefault("grit_defaults", GritConfig().to_dict())  # what "{}" (defaults) meant for GRIT arms
    result["summary"] = summarise(result["runs"], arms, rc)
    grit_arms = [n for n in arms if arms[n].grit is not None]
    result["verdict"] = verdict(result["summary"], "grit_adamw" if "grit_adamw" in arms else (grit_arms or ["-"])[0])
    result["verdicts"] = {n: verdict(result["summary"], n) for n in grit_arms}
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    table = markdown_table(result)
    (out / f"{name}.md").write_text(table)
    png = plot(result, out / f"{name}.png")
    print("\n" + table)
    print(f"[convergence] {result['wall_s'] / 60:.1f} min; wrote {path}, {out / f'{name}.md'}" + (f", {png}" if png else ""))


def resummarise(paths: list[Path], out: Path, name: str | None = None, keep_arms: list[str] | None = None) -> int:
    """Recompute summary, table and plot of saved results from their raw runs (no training); several files
    of one protocol are merged first (:func:`merge_results`); ``keep_arms``: only these arms."""
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    results = [json.loads(p.read_text()) for p in paths]
    result = merge_results(results, [str(p) for p in paths]) if len(results) > 1 else results[0]
    if keep_arms:
        missing = sorted(set(keep_arms) - set(result["arms"]))
        if missing:
            raise ValueError(f"--merge-arms: {missing} not in the results (arms: {sorted(result['arms'])})")
        result["arms"] = {n: a for n, a in result["arms"].items() if n in keep_arms}
        result["runs"] = [r for r in result["runs"] if r["arm"] in keep_arms]
    path = paths[0]
    cfg = dict(result["config"])
    cfg["base"] = BaseConfig(**cfg["base"])
    cfg["seeds"] = tuple(cfg["seeds"])
    rc = RunConfig(**cfg)
    arms = {n: Arm(a["inner"], a["grit"], tuple(a["lrs"]), a["label"]) for n, a in result["arms"].items()}
    from grit_kernels import GritConfig

    result.setdefault("resummarised", []).append(_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    if "grit_defaults" not in result:  # older files: the defaults of the code at run time are not recorded
        result["grit_defaults"] = None
        result["grit_defaults_at_resummary"] = GritConfig().to_dict()
    out.mkdir(parents=True, exist_ok=True)
    _finish(result, arms, rc, out, name or path.stem)
    return 0


def main(argv=None, prog: str | None = None) -> int:
    from bench_e2e import device_info, git_commit, versions

    from grit_kernels._noise import silence_known_noise

    silence_known_noise()  # two harmless third-party messages (grit_kernels/_noise.py)

    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, 2 lrs per arm, 40 steps, small base (<= 3 min)")
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"comma-separated, from {sorted(ARMS)}")
    p.add_argument("--variant", action="append", default=[],
                   help='extra GRIT arm: name=adamw|sgd|loraplus|eigen_adam|eigen_loraplus:{"eps_abs": 1e-3}[:lr1,lr2,...] '
                        '(repeatable; eigen_*: EigenAdamW, its kwargs under "optimizer")')
    p.add_argument("--lrs", action="append", default=[], help="override an arm's grid: arm=1e-3,2e-3 (repeatable)")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3; --quick 1)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default 1 on the byte-level task: fair on a shared machine; 2 with --model)")
    p.add_argument("--model", default=None,
                   help="real-model task: a HF model directory or .gguf file, chat SFT on the Python reference "
                        "manual (bench/convergence_real.py); default: the byte-level task")
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=None,
                   help="every arm on gk.fuse's fused LoRA blocks (default: on with --model, off otherwise)")
    p.add_argument("--cache-dir", default=None, help="pretrained-base cache (default ~/.cache/grit-kernels/convergence)")
    p.add_argument("--out", default="grit-results", help="output directory (default ./grit-results)")
    p.add_argument("--name", default=None, help="output file stem (default convergence[_quick])")
    p.add_argument("--full-sweep", action="store_true", help="every lr on every seed (default: sweep on seed 0)")
    p.add_argument("--max-extensions", type=int, default=2, help="grid extensions per arm when the best lr is at an edge")
    p.add_argument("--from-json", action="append", default=[],
                   help="re-summarise a saved result's raw runs (no training); repeat to merge results of one "
                        "protocol (e.g. seeds run in parallel processes; a later file's run of the same arm, lr "
                        "and seed replaces an earlier one)")
    p.add_argument("--merge-arms", default=None, help="with --from-json: keep only these arms (comma-separated)")
    p.add_argument("--seed-list", default=None,
                   help="explicit seeds, comma-separated (instead of --seeds N): the first sweeps the lr grids")
    p.add_argument("--no-probe", dest="probe", action="store_false",
                   help="skip the few timed steps that estimate the run's duration")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # test-only: seconds end to end
    args = p.parse_args(argv)

    if args.model is not None and args.arms == ",".join(DEFAULT_ARMS):
        args.arms = ",".join(REAL_ARMS)
    arms = {n: ARMS[n] for n in args.arms.split(",") if n}
    unknown = [n for n in args.arms.split(",") if n and n not in ARMS]
    if unknown:
        p.error(f"unknown arms {unknown}; choose from {sorted(ARMS)}")
    if args.model is not None:
        arms = {n: dataclasses.replace(a, lrs=REAL_LRS.get(n, a.lrs)) for n, a in arms.items()}
    for text in args.variant:
        name, arm = _parse_variant(text)
        arms[name] = arm
    for text in args.lrs:
        name, _, grid = text.partition("=")
        if name not in arms:
            p.error(f"--lrs for unknown arm {name!r}")
        arms[name] = dataclasses.replace(arms[name], lrs=tuple(float(v) for v in grid.split(",")))

    rc = RunConfig()
    if args.model is not None:
        rc = dataclasses.replace(rc, model=args.model, **REAL_DEFAULTS)
    if args.quick:
        rc = dataclasses.replace(rc, steps=40, eval_every=10, seeds=(0,),
                                 base=BaseConfig(pretrain_steps=200, corpus_bytes=1_000_000))
        arms = {n: dataclasses.replace(a, lrs=a.lrs[1:3]) for n, a in arms.items()}
        args.max_extensions = 0
    if args.tiny:
        rc = dataclasses.replace(rc, steps=4, eval_every=2, seeds=(0,), heldout_windows=4, batch_size=2, seq_len=32,
                                 base=BaseConfig(hidden=32, layers=1, intermediate=64, heads=2, seq_len=32,
                                                 corpus_bytes=50_000, pretrain_steps=3, pretrain_batch=2))
        arms = {n: dataclasses.replace(a, lrs=a.lrs[:2]) for n, a in arms.items()}
        args.max_extensions = 0
    if args.seeds:
        rc = dataclasses.replace(rc, seeds=tuple(range(args.seeds)))
    if args.seed_list:
        rc = dataclasses.replace(rc, seeds=tuple(int(v) for v in args.seed_list.split(",")))
    if args.steps:
        rc = dataclasses.replace(rc, steps=args.steps)
    if args.eval_every:
        rc = dataclasses.replace(rc, eval_every=args.eval_every)
    if args.threads:
        rc = dataclasses.replace(rc, threads=args.threads)
    if args.fuse is not None:
        rc = dataclasses.replace(rc, fuse=args.fuse)
    torch.set_num_threads(rc.threads)
    if args.from_json:
        keep = [n for n in (args.merge_arms or "").split(",") if n] or None
        return resummarise([Path(f) for f in args.from_json], Path(args.out), args.name, keep)
    name = args.name or ("convergence_quick" if args.quick else "convergence")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    if rc.model is not None:
        import convergence_real

        base, tokenizer, base_info = convergence_real.load_real_model(rc.model)
        data = convergence_real.load_real_data(tokenizer, rc.max_length, rc.heldout_examples)
        data_info = {k: v for k, v in data.items() if k not in ("train", "heldout")}
        print(f"[convergence] real model {base_info['model_type']} ({base_info['layers']} layers, hidden "
              f"{base_info['hidden']}); chat SFT data {data_info}", flush=True)
    else:
        print(f"[convergence] base model: {rc.base}", flush=True)
        base, base_info = build_base(args.cache_dir, rc.base)
        print(f"[convergence] base {'loaded from' if base_info['cached'] else 'pretrained and cached in'} "
              f"{base_info['cache']}", flush=True)
        data = load_finetune_data(rc.seq_len, rc.heldout_windows)
        data_info = {"train_bytes": int(data["train"].numel()), "heldout_windows": int(data["heldout"].shape[0]),
                     "train_topics": data["train_topics"], "heldout_topics": data["heldout_topics"]}
    start_loss = evaluate(base, task_heldout(data, rc))
    n_runs = sum(len(a.lrs) for a in arms.values()) + (len(arms) * (len(rc.seeds) - 1) if not args.full_sweep
                                                       else sum(len(a.lrs) for a in arms.values()) * (len(rc.seeds) - 1))

    # expected time: a few timed steps of a plain and a GRIT arm (--no-probe: skip, no estimate)
    probe, expected = {"adamw": math.nan, "grit_adamw": math.nan}, math.nan
    if args.probe:
        probe_rc = dataclasses.replace(rc, steps=4)
        for kind in ("adamw", "grit_adamw"):
            r = run_arm(base, data, ARMS[kind], ARMS[kind].lrs[0], 0, rc=probe_rc)
            probe[kind] = r["train_s"] / probe_rc.steps
        t_eval = time.perf_counter()
        evaluate(base, task_heldout(data, rc))
        t_eval = time.perf_counter() - t_eval
        grit_share = sum(1 for a in arms.values() if a.grit is not None) / len(arms)
        per_step = (1 - grit_share) * probe["adamw"] + grit_share * probe["grit_adamw"]
        expected = n_runs * (rc.steps * per_step + t_eval * (rc.steps // rc.eval_every))
    protocol = "every lr on every seed" if args.full_sweep else (
        f"stage 1: lr sweep on seed {rc.seeds[0]} (grid extended where the best lr is at an edge); "
        f"stage 2: seeds {list(rc.seeds[1:])} at each arm's best lr")
    print(f"[convergence] {len(arms)} arms, {rc.steps} steps, seeds {list(rc.seeds)}; {protocol}; ~{n_runs} runs; "
          f"{probe['adamw'] * 1000:.0f} / {probe['grit_adamw'] * 1000:.0f} ms per step (LoRA / GRIT, measured now): "
          f"expected ~{expected / 60:.1f} min (more if a grid is extended)", flush=True)

    result = {
        "benchmark": "convergence",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_info("cpu"),
        "versions": versions(),
        "git_commit": git_commit(),
        "command": list(sys.argv[1:] if argv is None else argv),
        "config": dataclasses.asdict(rc),
        "arms": {n: dataclasses.asdict(a) for n, a in arms.items()},
        "base": base_info,
        "data": data_info,
        "start_loss": start_loss,
        "expected_s": expected,
    }
    partial_path = out / f"{name}.partial.json"

    def save_partial(runs_so_far):  # raw runs so far: `--from-json` summarises a cut-short run
        result["arms"] = {n: dataclasses.asdict(a) for n, a in arms.items()}
        partial_path.write_text(json.dumps({**result, "wall_s": time.perf_counter() - started, "runs": runs_so_far}))

    if args.full_sweep:
        plan = [(n, a, lr, s) for s in rc.seeds for n, a in arms.items() for lr in a.lrs]
        runs = run_interleaved(plan, base, data, rc, start_losses=start_loss, on_eval=save_partial)
    else:
        runs = run_protocol(arms, base, data, rc, start_loss, max_extensions=args.max_extensions, on_eval=save_partial)
    result.update(wall_s=time.perf_counter() - started, load_average_1m_end=os.getloadavg()[0], runs=runs,
                  arms={n: dataclasses.asdict(a) for n, a in arms.items()})
    partial_path.unlink(missing_ok=True)
    _finish(result, arms, rc, out, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
