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
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

HELDOUT_EVERY = 8  #: every 8th pydoc topic (sorted by name) is held out
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------------------- base model
@dataclass(frozen=True)
class BaseConfig:
    """The pretrained base: model shape (bytes vocabulary) and its pretraining run."""

    hidden: int = 128
    layers: int = 2
    intermediate: int = 344
    heads: int = 4
    seq_len: int = 128
    corpus_bytes: int = 4_000_000  #: first bytes of the sorted stdlib sources
    pretrain_steps: int = 600
    pretrain_batch: int = 16
    pretrain_lr: float = 3e-3
    seed: int = 0

    def digest(self, corpus: bytes) -> str:
        key = json.dumps(dataclasses.asdict(self), sort_keys=True) + torch.__version__
        return hashlib.sha256(key.encode() + hashlib.sha256(corpus).digest()).hexdigest()[:12]


def llama_config(cfg: BaseConfig):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=256,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.seq_len,
        tie_word_embeddings=True,
    )


def pretrain_corpus(max_bytes: int) -> bytes:
    """The Python standard library's top-level ``.py`` files, sorted by name, concatenated."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for path in sorted(lib.glob("*.py")):
        text = path.read_bytes()
        out.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return b"".join(out)[:max_bytes]


def default_cache_dir() -> Path:
    root = os.environ.get("GRIT_KERNELS_CACHE") or Path.home() / ".cache" / "grit-kernels"
    return Path(root) / "convergence"


def _windows(tokens: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, tokens.numel() - seq_len, (batch,), generator=gen)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()]).long()


def build_base(cache_dir: str | Path | None = None, config: BaseConfig | None = None, progress: bool = True):
    """The pretrained base model (eval mode, frozen), from the cache or pretrained now (deterministic).

    Returns ``(model, info)``; ``info`` has the cache path, the hash, pretraining time and loss curve.
    """
    from transformers import AutoModelForCausalLM

    cfg = config or BaseConfig()
    corpus = pretrain_corpus(cfg.corpus_bytes)
    digest = cfg.digest(corpus)
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = path / f"base-{digest}.pt"
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(llama_config(cfg))
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(saved["state_dict"])
        info = dict(saved["info"], cache=str(path), cached=True)
    else:
        info = _pretrain(model, cfg, corpus, progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"state_dict": model.state_dict(), "info": info}, tmp)
        tmp.replace(path)
        info = dict(info, cache=str(path), cached=False)
    model.eval()
    model.requires_grad_(False)
    return model, info


def _pretrain(model, cfg: BaseConfig, corpus: bytes, progress: bool) -> dict:
    tokens = torch.frombuffer(bytearray(corpus), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.01)
    sched = _schedule(opt, cfg.pretrain_steps, warmup=max(1, cfg.pretrain_steps // 20))
    model.train()
    curve, started = [], time.perf_counter()
    for step in range(1, cfg.pretrain_steps + 1):
        x = _windows(tokens, cfg.pretrain_batch, cfg.seq_len, gen)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if step % 50 == 0 or step == cfg.pretrain_steps:
            curve.append((step, loss.item()))
            if progress:
                print(f"  pretrain step {step}/{cfg.pretrain_steps}: loss {curve[-1][1]:.3f}", flush=True)
    return {
        "config": dataclasses.asdict(cfg),
        "digest": cfg.digest(corpus),
        "corpus": f"Python {sys.version.split()[0]} stdlib top-level .py files, first {len(corpus)} bytes",
        "pretrain_s": time.perf_counter() - started,
        "pretrain_curve": curve,
    }


# ----------------------------------------------------------------------------------------- fine-tuning data
def load_finetune_data(seq_len: int = 128, max_heldout_windows: int = 24) -> dict:
    """Documentation prose shipped with Python (``pydoc_data.topics``), split by topic.

    Returns ``{"train": uint8 [n_train_bytes], "heldout": long [n, seq_len], "train_topics",
    "heldout_topics"}``; held-out windows are non-overlapping, evenly spread over the held-out text.
    """
    from pydoc_data.topics import topics

    names = sorted(topics)
    held = set(names[HELDOUT_EVERY // 2 :: HELDOUT_EVERY])
    train_text = "\n\n".join(topics[n] for n in names if n not in held).encode("utf-8")
    held_text = "\n\n".join(topics[n] for n in names if n in held).encode("utf-8")
    held_tokens = torch.frombuffer(bytearray(held_text), dtype=torch.uint8).long()
    n_windows = held_tokens.numel() // seq_len
    pick = torch.linspace(0, n_windows - 1, min(n_windows, max_heldout_windows)).round().long().unique()
    heldout = held_tokens[: n_windows * seq_len].view(n_windows, seq_len)[pick]
    return {
        "train": torch.frombuffer(bytearray(train_text), dtype=torch.uint8),
        "heldout": heldout,
        "train_topics": len(names) - len(held),
        "heldout_topics": len(held),
    }


def train_batches(data: dict, steps: int, batch_size: int, seq_len: int, seed: int) -> list[torch.Tensor]:
    """``steps`` batches ``[batch_size, seq_len]`` of random training windows; fixed by ``seed``."""
    gen = torch.Generator().manual_seed(1000 + seed)
    return [_windows(data["train"], batch_size, seq_len, gen) for _ in range(steps)]


def heldout_batches(data: dict, batch_size: int = 16) -> list[torch.Tensor]:
    return list(data["heldout"].split(batch_size))


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


#: the real-model task's protocol (fixed before comparing variants): 60 steps of 4 packed chat pairs
REAL_DEFAULTS = dict(steps=60, batch_size=4, warmup=6, eval_every=20, r=16, alpha=32.0, threads=2, fuse=True)
#: lr grids on the real model (2x apart, centred on a first 1-seed screen; extended where the best is at an edge)
REAL_LRS = {"adamw": (2e-3, 4e-3, 8e-3), "loraplus": (5e-4, 1e-3, 2e-3), "sgd": (0.25, 0.5, 1.0),
            "grit_adamw": (8e-3, 1.6e-2, 3.2e-2), "grit_sgd": (0.25, 0.5, 1.0), "grit_loraplus": (5e-4, 1e-3, 2e-3),
            "eigen_loraplus": (2.5e-4, 5e-4, 1e-3)}
REAL_ARMS = ("adamw", "loraplus", "grit_adamw", "eigen_loraplus")


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


def _schedule(opt, steps: int, warmup: int):
    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


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


def run_interleaved(plan, base, data, rc: RunConfig, progress: bool = True, start_losses=None) -> list[dict]:
    """Train every ``(name, arm, lr, seed)`` of ``plan`` for ``rc.steps`` steps, round-robin one step each."""
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
                 progress: bool = True) -> list[dict]:
    """Stage 1: every arm's lr grid on the first seed, interleaved; where the best lr is at the grid's
    edge, the grid is extended one step (the grid's ratio) beyond it, up to ``max_extensions`` times.
    Stage 2: the other seeds at each arm's best lr, interleaved."""
    seed0, others = rc.seeds[0], rc.seeds[1:]
    runs = run_interleaved([(n, a, lr, seed0) for n, a in arms.items() for lr in a.lrs], base, data, rc, progress,
                           start_loss)
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
        runs += run_interleaved(extra, base, data, rc, progress, start_loss)
    if others:
        plan = [(n, a, _best_lr(runs, n)[0], s) for s in others for n, a in arms.items()]
        runs += run_interleaved(plan, base, data, rc, progress, start_loss)
    return runs


def _best_loss(runs, name, lr):
    return _nanmean([r["curve"][-1][1] for r in runs if r["arm"] == name and r["lr"] == lr])


# ----------------------------------------------------------------------------------------- summary
def _nanmean(values):
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if len(finite) == len(values) else math.inf


def _interp(curve, t: float) -> float:
    """Held-out loss at cumulative train time ``t`` (linear between evaluations; inf if not reached)."""
    for (s0, l0, t0), (s1, l1, t1) in zip(curve, curve[1:]):
        if t0 <= t <= t1:
            return l0 if t1 == t0 else l0 + (l1 - l0) * (t - t0) / (t1 - t0)
    return math.inf


def summarise(runs: list[dict], arms: dict[str, Arm], rc: RunConfig) -> dict:
    """Per arm: mean final loss per lr, best lr (lowest mean final held-out loss), its curve statistics."""
    out = {}
    evals = [s for s, _, _ in runs[0]["curve"]] if runs else [rc.steps]
    checkpoints = sorted({min(evals, key=lambda s: (abs(s - rc.steps / 2), s)), rc.steps})  # mid-run and final
    for name in arms:
        mine = [r for r in runs if r["arm"] == name]
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
            best = [r for r in runs if r["arm"] == name and r["lr"] == a["best_lr"]]
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
        "runs interleaved step by step in one process."
    )
    v = result.get("verdict")
    if v:
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


def resummarise(path: Path, out: Path, name: str | None = None) -> int:
    """Recompute summary, table and plot of a saved result from its raw runs (no training)."""
    result = json.loads(path.read_text())
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
    p.add_argument("--from-json", default=None, help="re-summarise a saved result's raw runs (no training)")
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
        return resummarise(Path(args.from_json), Path(args.out), args.name)
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

    if args.full_sweep:
        plan = [(n, a, lr, s) for s in rc.seeds for n, a in arms.items() for lr in a.lrs]
        runs = run_interleaved(plan, base, data, rc, start_losses=start_loss)
    else:
        runs = run_protocol(arms, base, data, rc, start_loss, max_extensions=args.max_extensions)
    result = {
        "benchmark": "convergence",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - started,
        "device": device_info("cpu"),
        "load_average_1m_end": os.getloadavg()[0],
        "versions": versions(),
        "git_commit": git_commit(),
        "command": list(sys.argv[1:] if argv is None else argv),
        "config": dataclasses.asdict(rc),
        "arms": {n: dataclasses.asdict(a) for n, a in arms.items()},
        "base": base_info,
        "data": data_info,
        "start_loss": start_loss,
        "expected_s": expected,
        "runs": runs,
    }
    _finish(result, arms, rc, out, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
