"""What one end-to-end comparison runs: the arms, the model, the data policy and the run's size
(:class:`E2EConfig`, with the device defaults filled in by :meth:`E2EConfig.resolve`)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

DEFAULT_ARMS = ("peft-adamw", "fused-adamw", "fused-grit", "peft-grit", "grit-prior", "unsloth")
ARMS = DEFAULT_ARMS + ("peft-eigen", "fused-eigen")  #: every arm --arms accepts
ARM_ALIASES = {"adamw": "peft-adamw", "grit": "peft-grit"}  # the names used before issue #9
BASELINE_ARM = "peft-adamw"  # the baseline of every ratio
FUSED_TARGETS = {"cpu": (0.8, 1.05), "cuda": (0.55, 1.02)}  # issue #9: fused-grit / peft-adamw, / fused-adamw
SEQ_POLICIES = ("dynamic", "grouped", "max", "packed")
PRESETS = ("tiny", "llama3-8b")
CPU_TARGET_RATIO = 1.15  # issue #5: GRIT / AdamW step time on the tiny 224-module model, CPU


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
