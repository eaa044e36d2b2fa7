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
  (``bench/prior_art_grit.py``: per-module hooks, fp16 statistics, host inversion, ``.item()``);
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

Run: ``grit-kernels bench e2e`` (or ``python bench/bench_e2e.py``); ``--help`` lists the options.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import gc
import importlib.util
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from grit_kernels.config import BACKENDS

PROCESS_START = time.perf_counter()  #: what --time-budget counts from (close enough to the process start)
BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_ARMS = ("peft-adamw", "fused-adamw", "fused-grit", "peft-grit", "grit-prior", "unsloth")
ARMS = DEFAULT_ARMS + ("peft-eigen", "fused-eigen")  #: every arm --arms accepts
ARM_ALIASES = {"adamw": "peft-adamw", "grit": "peft-grit"}  # the names used before issue #9
BASELINE_ARM = "peft-adamw"  # the baseline of every ratio
FUSED_TARGETS = {"cpu": (0.8, 1.05), "cuda": (0.55, 1.02)}  # issue #9: fused-grit / peft-adamw, / fused-adamw
SEQ_POLICIES = ("dynamic", "grouped", "max", "packed")
PRESETS = ("tiny", "llama3-8b")
CPU_TARGET_RATIO = 1.15  # issue #5: GRIT / AdamW step time on the tiny 224-module model, CPU


def _load_sibling(name: str):
    """Import ``bench/<name>.py`` by path (bench/ is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- configuration
@dataclass
class E2EConfig:
    """What one end-to-end comparison runs. ``None`` fields take the device default."""

    preset: str | None = None  # "tiny" (CPU default) | "llama3-8b" (CUDA default)
    model_config: str | None = None  # a HF config.json path or inline JSON (model_type defaults to llama)
    model_path: str | None = None  # a local HF model directory (real weights)
    layers: int | None = None  # override num_hidden_layers
    r: int = 16
    qlora: bool | None = None  # NF4 base weights (bitsandbytes)
    dtype: str | None = None  # float32 | bfloat16 | float16
    batch_size: int | None = None
    grad_accum: int | None = None
    seq: str = "packed"  # packed: padding-free rows; dynamic: pad to the longest row; max: pad to max_length
    max_length: int | None = None
    steps: int | None = None  # measured optimizer steps per arm (quick 6, --full 20)
    warmup: int | None = None  # unmeasured steps per arm (quick 2, --full 5); GRIT warm-up is set to this
    full: bool = False  # the reference size: 5 + 20 steps, CPU memory probe
    arms: tuple = DEFAULT_ARMS
    order: str | None = None  # interleave (CPU default) | sequential (CUDA default)
    lr: float = 2e-4
    seed: int = 0
    backend: str = "auto"
    memory: bool | None = None  # CPU: measure peak RSS per arm in a subprocess
    threads: int | None = None  # CPU: torch.set_num_threads (default: the cores other processes leave idle)
    breakdown: bool | None = None  # time forward / backward / optimizer separately (CPU default; CUDA syncs)
    device: str | None = None
    progress: bool = True
    plot: bool = True  # write the PNG beside the JSON (matplotlib)
    time_budget: float | None = None  # seconds: arms that would not finish in it are not started
    share_model: bool | None = None  # one model for every arm (LoRA weights reset); default: sequential order
    notes: list = field(default_factory=list)

    def resolve(self) -> E2EConfig:
        """Fill device defaults and validate; returns a new config."""
        c = dataclasses.replace(self, arms=tuple(self.arms), notes=list(self.notes))
        if c.device is None:
            c.device = "cuda" if torch.cuda.is_available() else "cpu"
        cuda = c.device.startswith("cuda")
        if cuda and not torch.cuda.is_available():
            raise ValueError(f"--device {c.device}: torch sees no CUDA device (torch {torch.__version__})")
        if c.model_path is not None:  # a HF directory, or a .gguf file converted once into the cache
            from grit_kernels.model_files import resolve_model_path

            c.model_path = str(resolve_model_path(c.model_path))
        if c.preset is None and c.model_config is None and c.model_path is None:
            c.preset = "llama3-8b" if cuda else "tiny"
        if c.preset is not None and c.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {PRESETS}, got {c.preset!r}")
        defaults = dict(
            qlora=cuda,
            dtype="bfloat16" if cuda else "float32",
            batch_size=2 if cuda else 4,
            grad_accum=4 if cuda else 1,
            max_length=2048 if cuda else 512,
            order="sequential" if cuda else "interleave",
            memory=c.full and not cuda,
            steps=20 if c.full else 6,
            warmup=5 if c.full else 2,
        )
        for key, value in defaults.items():
            if getattr(c, key) is None:
                setattr(c, key, value)
        if c.seq not in SEQ_POLICIES:
            raise ValueError(f"--seq must be one of {SEQ_POLICIES}, got {c.seq!r}")
        c.arms = tuple(ARM_ALIASES.get(a, a) for a in c.arms)
        unknown = [a for a in c.arms if a not in ARMS]
        if unknown or not c.arms:
            raise ValueError(f"--arms: unknown {unknown}; choose from {ARMS}")
        if c.order not in ("interleave", "sequential"):
            raise ValueError(f"--order must be interleave or sequential, got {c.order!r}")
        for key in ("steps", "batch_size", "grad_accum", "max_length", "r"):
            if getattr(c, key) < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be >= 1")
        if c.warmup < 0:
            raise ValueError("--warmup must be >= 0")
        if c.share_model is None:
            c.share_model = c.order == "sequential"
        if c.share_model and c.order != "sequential":
            raise ValueError("--share-model needs --order sequential (interleaved arms train at the same time)")
        if c.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be float32, bfloat16 or float16, got {c.dtype!r}")
        return c

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


# ----------------------------------------------------------------------------- data
def make_batches(cfg: E2EConfig, num_micro_batches: int) -> list[dict]:
    """``num_micro_batches`` CPU micro-batches of ``cfg.batch_size`` synthetic Alpaca samples.

    Records from :func:`grit_kernels.data.generate_alpaca_sample` (Alpaca-GPT4-like lengths),
    :class:`~grit_kernels.data.ByteTokenizer`, prompt tokens masked, truncated to ``max_length``.
    Padding policy ``cfg.seq``: ``dynamic`` pads each micro-batch to its longest row, ``grouped``
    does the same after length-grouping the samples, ``max`` pads every row to ``max_length`` (what
    the prior "GRIT is slow" comparison did), ``packed`` concatenates the micro-batch into one
    padding-free row (position_ids restart per sample).
    """
    from grit_kernels import data

    tokenizer = data.ByteTokenizer()
    need = num_micro_batches * cfg.batch_size
    records = data.generate_alpaca_sample(2 * need + 16, seed=cfg.seed)
    features = data.tokenize_alpaca(records, tokenizer, max_length=cfg.max_length)[:need]
    if len(features) < need:
        raise ValueError(
            f"--max-length {cfg.max_length} leaves too few samples with a response token "
            "(the Alpaca prompt template alone is ~150-190 byte tokens)"
        )
    if cfg.seq == "grouped":
        order = data.length_grouped_indices([len(f["input_ids"]) for f in features], cfg.batch_size, seed=cfg.seed)
        features = [features[i] for i in order]
    if cfg.seq == "packed":
        collate = data.PackedCollator()
    else:
        multiple = cfg.max_length if cfg.seq == "max" else None
        collate = data.DynamicPaddingCollator(tokenizer.pad_token_id, pad_to_multiple_of=multiple)
    b = cfg.batch_size
    return [collate(features[k * b : (k + 1) * b]) for k in range(num_micro_batches)]


# ----------------------------------------------------------------------------- models and arms
def model_config(cfg: E2EConfig):
    """The HF config of the benchmarked model (``None`` when ``model_path`` gives real weights)."""
    from grit_kernels.models import llama3_8b_config, tiny_llama_config

    if cfg.model_path is not None:
        return None
    if cfg.model_config is not None:
        from transformers import AutoConfig

        text = cfg.model_config
        values = json.loads(Path(text).read_text() if not text.lstrip().startswith("{") else text)
        values = dict(values)
        model_type = values.pop("model_type", "llama")
        hf_config = AutoConfig.for_model(model_type, **values)
    elif cfg.preset == "llama3-8b":
        hf_config = llama3_8b_config()
    else:
        hf_config = tiny_llama_config()
    if cfg.layers is not None:
        hf_config.num_hidden_layers = cfg.layers
    return hf_config


def build_model(cfg: E2EConfig):
    """PEFT LoRA model on ``cfg.device``: random weights from the config, or ``cfg.model_path``.
    With ``--seq packed`` the model must keep packed sequences apart (:func:`data.packing_isolates`)."""
    from grit_kernels.data import packing_isolates

    model = _build_model(cfg)
    if cfg.seq == "packed" and not packing_isolates(model):
        raise ValueError(
            f"--seq packed: {type(model.get_base_model()).__name__} does not keep packed sequences apart "
            "(attention would cross samples): use --seq dynamic"
        )
    return model


def _build_model(cfg: E2EConfig):
    from grit_kernels.models import LLAMA_TARGETS, build_lora_model

    if cfg.model_path is None:
        return build_lora_model(
            model_config(cfg), r=cfg.r, quantize_4bit=cfg.qlora, dtype=cfg.torch_dtype, device=cfg.device, seed=cfg.seed,
            fast_init=cfg.device.startswith("cuda"),  # random weights filled on the GPU, no HF init pass
        )
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.manual_seed(cfg.seed)
    kwargs = {"dtype": cfg.torch_dtype}
    if cfg.qlora:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=cfg.torch_dtype
        )
    model = AutoModelForCausalLM.from_pretrained(cfg.model_path, **kwargs)
    if cfg.layers is not None:
        raise ValueError("--layers cannot be combined with --model (a checkpoint fixes its layers)")
    model.to(cfg.device)
    targets = [t for t in LLAMA_TARGETS if any(n.endswith(t) for n, _ in model.named_modules())]
    lora = LoraConfig(r=cfg.r, lora_alpha=2 * cfg.r, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


@dataclass
class Arm:
    name: str
    model: torch.nn.Module
    optimizer: object
    num_modules: int
    cleanup: object = None


def _adamw(model, lr):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


class SharedModel:
    """One model for every arm of a sequential run (``--share-model``): built once (an 8B model is built and
    quantized once, not once per arm), its trainable (LoRA) weights put back to their initial values before
    each arm, so every arm starts from the same state, as with a fresh build from the same seed."""

    def __init__(self, cfg: E2EConfig):
        self.model = build_model(cfg)
        self.initial = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def take(self) -> torch.nn.Module:
        for n, p in self.model.named_parameters():
            if n in self.initial:
                p.copy_(self.initial[n])
                p.grad = None
        return self.model


def _chain(*fns):
    fns = [f for f in fns if f is not None]
    return (lambda: [f() for f in fns]) if fns else None


def make_arm(name: str, cfg: E2EConfig, shared: SharedModel | None = None) -> Arm:
    """Build the model and optimizer of one arm (raises ``_Skip`` when the arm cannot run here).

    ``shared``: take the model from it instead of building one; the arm's cleanup then undoes what the arm
    did to it (GRIT's patching, the fusion)."""
    if name == "unsloth":
        return _make_unsloth_arm(cfg)
    model = shared.take() if shared is not None else build_model(cfg)
    model.train()
    inner = _adamw(model, cfg.lr)
    modules = sum(1 for n, _ in model.named_modules() if n.endswith("lora_A.default"))
    undo_fuse = None
    if name.startswith("fused-"):
        import grit_kernels as gk

        report = gk.fuse(model)
        if shared is not None:
            undo_fuse = lambda: gk.unfuse(model)  # noqa: E731
        if report.fused_modules == 0:
            if undo_fuse is not None:
                undo_fuse()
            raise _Skip(f"nothing to fuse: {report}")
        if cfg.progress:
            print(f"[bench e2e] {name}: {report.summary}", file=sys.stderr)
    if name in (BASELINE_ARM, "fused-adamw"):
        return Arm(name, model, inner, modules, cleanup=undo_fuse)
    if name in ("peft-grit", "fused-grit"):
        import grit_kernels as gk

        # GRIT's own warm-up (steps without preconditioning) ends with the benchmark's warm-up, so
        # every measured step pays for the full preconditioning.
        pre = gk.GritPreconditioner(model, gk.GritConfig(backend=cfg.backend, warmup_steps=cfg.warmup))
        return Arm(name, model, gk.GritOptimizer(inner, pre), pre.num_modules, cleanup=_chain(pre.remove, undo_fuse))
    if name in ("peft-eigen", "fused-eigen"):
        import grit_kernels as gk

        pre = gk.GritPreconditioner(model, gk.GritConfig(backend=cfg.backend, kl_clip=None))
        eigen = gk.EigenAdamW([p for p in model.parameters() if p.requires_grad], pre, lr=cfg.lr)
        return Arm(name, model, gk.GritOptimizer(eigen, pre), pre.num_modules, cleanup=_chain(pre.remove, undo_fuse))
    if name == "grit-prior":
        prior_art = _load_sibling("prior_art_grit")
        prior = prior_art.PriorArtGrit(model, warmup_steps=cfg.warmup)
        return Arm(name, model, prior_art.PriorArtGritOptimizer(inner, prior), prior.num_modules, cleanup=prior.remove)
    raise ValueError(name)


class _Skip(Exception):
    """An arm that cannot run on this machine (reason in the message)."""


def _make_unsloth_arm(cfg: E2EConfig) -> Arm:
    if not cfg.device.startswith("cuda"):
        raise _Skip("Unsloth needs a CUDA GPU")
    if importlib.util.find_spec("unsloth") is None:
        raise _Skip("unsloth is not installed (pip install unsloth)")
    try:
        from unsloth import FastLanguageModel
    except Exception as exc:  # unsloth raises many kinds of errors at import on unsupported setups
        raise _Skip(f"unsloth failed to import: {type(exc).__name__}: {exc}") from exc
    from grit_kernels.models import LLAMA_TARGETS

    path = cfg.model_path
    tmp = None
    if path is None:  # Unsloth loads checkpoints only: save the random-weight model once
        import tempfile

        from transformers import AutoModelForCausalLM

        tmp = tempfile.TemporaryDirectory(prefix="grit-e2e-unsloth-")
        torch.manual_seed(cfg.seed)
        AutoModelForCausalLM.from_config(model_config(cfg), dtype=cfg.torch_dtype).save_pretrained(tmp.name)
        path = tmp.name
    model, _tokenizer = FastLanguageModel.from_pretrained(
        model_name=path, max_seq_length=cfg.max_length, dtype=cfg.torch_dtype, load_in_4bit=cfg.qlora
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=cfg.r,
        lora_alpha=2 * cfg.r,
        lora_dropout=0.0,
        target_modules=list(LLAMA_TARGETS),
        use_gradient_checkpointing=False,
        random_state=cfg.seed,
    )
    model.train()
    modules = sum(1 for n, _ in model.named_modules() if n.endswith("lora_A.default"))
    return Arm("unsloth", model, _adamw(model, cfg.lr), modules, cleanup=tmp.cleanup if tmp else None)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_step(arm: Arm, micro_batches: list[dict], cfg: E2EConfig, phases: dict | None = None):
    """One optimizer step (``grad_accum`` micro-batches); returns the mean micro-batch loss (a tensor).

    ``phases``: if given, seconds spent in forward, backward and optimizer step (+ zero_grad) are added
    to its ``"forward"``, ``"backward"``, ``"optimizer"`` entries. On CPU this costs nothing (ops are
    synchronous); on CUDA it synchronises at every phase boundary (only with ``--breakdown``).
    """
    cuda = cfg.device.startswith("cuda")
    autocast = (
        torch.autocast("cuda", dtype=cfg.torch_dtype) if cuda and cfg.dtype != "float32" else contextlib.nullcontext()
    )

    def mark(key=None, since=None):
        if phases is None:
            return None
        _sync(cfg.device)
        now = time.perf_counter()
        if key is not None:
            phases[key] = phases.get(key, 0.0) + now - since
        return now

    total = torch.zeros((), device=cfg.device)
    for mb in micro_batches:
        t = mark()
        with autocast:
            loss = arm.model(**mb).loss
        t = mark("forward", t)
        (loss / len(micro_batches)).backward()
        mark("backward", t)
        total += loss.detach().float()
    t = mark()
    arm.optimizer.step()
    arm.optimizer.zero_grad(set_to_none=True)
    mark("optimizer", t)
    return total / len(micro_batches)


# ----------------------------------------------------------------------------- measuring
def _quantiles(values: list[float]) -> dict:
    t = torch.tensor(values, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)).tolist()
    return {"p20_s": q[0], "median_s": q[1], "p80_s": q[2], "mean_s": float(t.mean())}


def _step_batches(cfg: E2EConfig) -> list[list[dict]]:
    total_steps = cfg.warmup + cfg.steps
    flat = make_batches(cfg, total_steps * cfg.grad_accum)
    flat = [{k: v.to(cfg.device) if torch.is_tensor(v) else v for k, v in mb.items()} for mb in flat]
    return [flat[i * cfg.grad_accum : (i + 1) * cfg.grad_accum] for i in range(total_steps)]


def _token_counts(step: list[dict]) -> tuple[int, int]:
    """(real, padded) tokens of one step; packed rows have no padding (and no attention_mask)."""
    padded = sum(mb["input_ids"].numel() for mb in step)
    real = sum(int(mb["attention_mask"].sum()) if "attention_mask" in mb else mb["input_ids"].numel() for mb in step)
    return real, padded


def _check_vocab(cfg: E2EConfig) -> None:
    from grit_kernels.data import ByteTokenizer

    hf = model_config(cfg)
    if hf is None:
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(cfg.model_path)
    if hf.vocab_size < ByteTokenizer().vocab_size:
        raise ValueError(f"the model's vocabulary ({hf.vocab_size}) is smaller than the byte tokenizer's (260)")


# Progress units: one per training step of one arm; building an arm's model and a memory probe (a
# fresh process: imports, build, 4 steps) are counted as what they cost in steps on a 2-core CPU.
BUILD_UNITS = 2
PROBE_UNITS = 10
CPU_STEP_S = 1.1  # s per step, tiny 32-layer model, batch 4, max 512, quiet 2-core CPU (results/cpu/e2e.json)


def _probed_arms(cfg: E2EConfig) -> list[str]:
    return [a for a in cfg.arms if a != "unsloth"] if cfg.memory and not cfg.device.startswith("cuda") else []


def work_units(cfg: E2EConfig, n_steps: int, probes: bool = True) -> int:
    """Total progress units of a run: builds + steps of every arm (+ CPU memory probes)."""
    return len(cfg.arms) * (BUILD_UNITS + n_steps) + (PROBE_UNITS * len(_probed_arms(cfg)) if probes else 0)


def expected_seconds(cfg: E2EConfig) -> float | None:
    """Rough wall time on a quiet 2-core CPU, scaled from the measured tiny-model step; None on CUDA."""
    if cfg.device.startswith("cuda") or cfg.model_path is not None:
        return None
    hf = model_config(cfg)
    scale = (hf.num_hidden_layers / 32) * (hf.hidden_size / 64) * cfg.batch_size * cfg.grad_accum / 4
    scale *= min(cfg.max_length, 512) / 512 if cfg.seq != "max" else cfg.max_length / 350
    arms = [a for a in cfg.arms if a != "unsloth"]
    steps = len(arms) * (cfg.warmup + cfg.steps + BUILD_UNITS) + PROBE_UNITS * len(_probed_arms(cfg))
    return 8.0 + CPU_STEP_S * scale * steps  # + imports and data


def _progress(total: int, cfg: E2EConfig, desc: str):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, disable=not cfg.progress, leave=False,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]{postfix}",
    )


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
                _sync(cfg.device)
                torch.cuda.reset_peak_memory_stats()
                results[name]["memory_after_build_mb"] = torch.cuda.memory_allocated() / 2**20
        except _Skip as exc:
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
        _sync(cfg.device)
        phases = {} if breakdown else None
        t0 = time.perf_counter()
        try:
            loss = train_step(arm, steps[i], cfg, phases)
            _sync(cfg.device)
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
        bar = _progress(work_units(cfg, n_steps, probes=False), cfg, "bench e2e")
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
                for k in range(len(names)):  # rotate who goes first: no arm always follows another
                    name = names[(i + k) % len(names)]
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
    cmd = [sys.executable, str(Path(__file__).resolve()), "--probe-memory", arm, "--probe-steps", str(steps)]
    env = dict(os.environ, GRIT_E2E_PROBE_CONFIG=payload)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO_ROOT))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"memory probe failed (exit {proc.returncode}): {tail[0]}"}
    return json.loads(lines[-1])


def _run_probe(arm_name: str, steps: int) -> None:
    cfg = E2EConfig(**json.loads(os.environ["GRIT_E2E_PROBE_CONFIG"]))
    cfg = dataclasses.replace(cfg, arms=tuple(cfg.arms), warmup=min(cfg.warmup, 1), steps=steps)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    batches = _step_batches(cfg)
    arm = make_arm(arm_name, cfg)
    gc.collect()
    after_build = _rss_status("VmRSS")
    method = "VmHWM after reset"
    try:  # Linux: reset the peak-RSS mark so the peak is that of training, not of imports
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        method = "ru_maxrss (whole process)"
    for step in batches:
        train_step(arm, step, cfg)
    peak = _rss_status("VmHWM") if method.startswith("VmHWM") else None
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        method = "ru_maxrss (whole process)"
    print(json.dumps({"peak_rss_mb": peak, "rss_after_build_mb": after_build, "method": method}))


def _rss_status(key: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` of this process in MiB from /proc (None where unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# ----------------------------------------------------------------------------- environment
def device_info(device: str) -> dict:
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
        return {"type": "cuda", "name": name, "slug": _slug(name), "count": torch.cuda.device_count()}
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "type": "cpu",
        "name": name,
        "slug": "cpu",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "triton", "grit_kernels", "unsloth"):
        try:
            from importlib.metadata import version

            out[name] = version(name.replace("_", "-"))
        except Exception:
            out[name] = None
    return out


def git_commit() -> str | None:
    """HEAD of the checkout; ``GRIT_COMMIT`` where .git did not travel (the GPU machine: run_gpu_all.sh sets it)."""
    if os.environ.get("GRIT_COMMIT"):
        return os.environ["GRIT_COMMIT"]
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return proc.stdout.strip() or None
    except Exception:
        return None


# ----------------------------------------------------------------------------- report
def summarise(cfg: E2EConfig, raw: dict, steps: list[list[dict]]) -> dict:
    counts = [_token_counts(s) for s in steps]
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
            **_quantiles(times),
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
                k: _quantiles([ph[k] for ph in measured_phases])["median_s"] for k in measured_phases[0]
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
                q = _quantiles([t / b for t, b in zip(entry["step_times_s"], base_times)])
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
    directory = Path(out_dir) if out_dir else Path.cwd() / "grit-results" / device["slug"]
    return directory / ("e2e-qlora.json" if cfg.qlora else "e2e.json")


# ----------------------------------------------------------------------------- entry points
def other_busy_cores(seconds: float = 0.5) -> float | None:
    """Cores kept busy by other processes: ``(1 - idle fraction) x cores`` from ``/proc/stat`` over
    ``seconds`` while this process sleeps. None where /proc/stat is unavailable (not Linux)."""

    def sample():
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def auto_threads(default: int, busy: float | None) -> int:
    """Intra-op threads for a CPU run: the cores other processes leave idle, at most ``default``.

    On a 2-core machine with another job running, 2 threads stall in OpenMP barriers: measured here
    0.77 s vs 17 s per step (8-layer tiny model) for 1 vs 2 threads under a load average of 6."""
    if busy is None:
        return default
    return max(1, min(default, round((os.cpu_count() or 1) - busy)))


def machine_load(busy_before: float | None, busy_after: float | None, load_after: float, threads: int) -> dict:
    """Whether other processes competed for the CPU during the run (their cores, before and after)."""
    others = [b for b in (busy_before, busy_after) if b is not None]
    # the 1-minute load average counts this process's threads too
    others.append(max(0.0, load_after - threads))
    worst = max(others)
    return {"other_busy_cores_max": worst, "loaded": worst >= 0.5}


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
    busy_before = other_busy_cores() if cpu else None
    if cpu and not cfg.threads:
        cfg.threads = auto_threads(torch.get_num_threads(), busy_before)
        cfg.notes.append(
            f"{cfg.threads} intra-op thread(s): {busy_before if busy_before is None else round(busy_before, 2)} "
            f"of {os.cpu_count()} cores busy with other processes at the start (--threads N to choose)"
        )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.device.startswith("cuda") and cfg.preset == "llama3-8b" and cfg.layers is None:
        cfg.notes.append("Llama-3-8B shapes with random weights (speed only)")
    hf = model_config(cfg)
    device = device_info(cfg.device)
    _check_vocab(cfg)
    steps = _step_batches(cfg)
    bar = _progress(work_units(cfg, len(steps)), cfg, "bench e2e")
    started = _dt.datetime.now(_dt.timezone.utc)
    t_start = time.perf_counter()
    deadline = PROCESS_START + cfg.time_budget if cfg.time_budget else None  # the imports count too
    load_before = os.getloadavg()
    path = result_path(cfg, device, out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    head = {
        "benchmark": "e2e",
        "date": started.isoformat(timespec="seconds"),
        "device": device,
        "versions": versions(),
        "git_commit": git_commit(),
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
        partial = _assemble(cfg, head, raw, steps, t_start)
        partial["partial"] = True
        path.write_text(json.dumps(partial, indent=1) + "\n")
        done = ", ".join(f"{n}: {raw[n]['status']}" for n in cfg.arms if n in raw)
        print(f"[bench e2e] arms done ({done}); wrote {path}", file=sys.stderr, flush=True)

    raw = time_arms(cfg, steps, bar=bar, on_arm_done=write_partial, deadline=deadline)
    load_after = os.getloadavg()
    busy_after = other_busy_cores() if cpu else None
    result = _assemble(cfg, head, raw, steps, t_start)
    # other processes on the machine skew CPU timings: the 1-minute load before/after the timing
    result["load_average_1m"] = {"before": load_before[0], "after": load_after[0]}
    result["machine_load"] = (
        machine_load(busy_before, busy_after, load_after[0], cfg.threads or torch.get_num_threads()) if cpu else None
    )
    if cfg.memory and not cfg.device.startswith("cuda"):
        for name, entry in result["arms"].items():
            if name not in _probed_arms(cfg):
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
    path.write_text(json.dumps(result, indent=1) + "\n")
    png = plot(result, path.with_suffix(".png")) if cfg.plot else None
    result["json_path"], result["png_path"] = str(path), str(png) if png else None
    return result


def _assemble(cfg: E2EConfig, head: dict, raw: dict, steps: list[list[dict]], t_start: float) -> dict:
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
        _run_probe(args.probe_memory, args.probe_steps)
        return 0
    fields = {f.name for f in dataclasses.fields(E2EConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    values["arms"] = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    try:
        cfg = E2EConfig(**values)
        resolved = cfg.resolve()
    except ValueError as exc:
        print(f"{prog or 'bench_e2e'}: error: {exc}", file=sys.stderr)
        return 2
    if not args.quick:
        print(_plan(resolved), flush=True)
    result = run(cfg, out_dir=args.out, quick=args.quick, argv=list(sys.argv if argv is None else argv))
    print(_report(result))
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


def _report(result: dict) -> str:
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


if __name__ == "__main__":
    sys.exit(main())
