"""The arms of the end-to-end comparison: the benchmarked model, the data each step trains on, each arm's
model and optimizer (:func:`make_arm`) and one training step (:func:`train_step`)."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import time
from dataclasses import dataclass

import torch

from .e2e_config import BASELINE_ARM, E2EConfig, model_config


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
    """Build the model and optimizer of one arm (raises ``ArmUnavailable`` when the arm cannot run here).

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
            raise ArmUnavailable(f"nothing to fuse: {report}")
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
        from . import prior_art

        prior = prior_art.PriorArtGrit(model, warmup_steps=cfg.warmup)
        return Arm(name, model, prior_art.PriorArtGritOptimizer(inner, prior), prior.num_modules, cleanup=prior.remove)
    raise ValueError(name)


class ArmUnavailable(Exception):
    """An arm that cannot run on this machine (reason in the message)."""


def _make_unsloth_arm(cfg: E2EConfig) -> Arm:
    if not cfg.device.startswith("cuda"):
        raise ArmUnavailable("Unsloth needs a CUDA GPU")
    if importlib.util.find_spec("unsloth") is None:
        raise ArmUnavailable("unsloth is not installed (pip install unsloth)")
    try:
        from unsloth import FastLanguageModel
    except Exception as exc:  # unsloth raises many kinds of errors at import on unsupported setups
        raise ArmUnavailable(f"unsloth failed to import: {type(exc).__name__}: {exc}") from exc
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


def sync(device: str) -> None:
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
        sync(cfg.device)
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


def step_batches(cfg: E2EConfig) -> list[list[dict]]:
    total_steps = cfg.warmup + cfg.steps
    flat = make_batches(cfg, total_steps * cfg.grad_accum)
    flat = [{k: v.to(cfg.device) if torch.is_tensor(v) else v for k, v in mb.items()} for mb in flat]
    return [flat[i * cfg.grad_accum : (i + 1) * cfg.grad_accum] for i in range(total_steps)]


def token_counts(step: list[dict]) -> tuple[int, int]:
    """(real, padded) tokens of one step; packed rows have no padding (and no attention_mask)."""
    padded = sum(mb["input_ids"].numel() for mb in step)
    real = sum(int(mb["attention_mask"].sum()) if "attention_mask" in mb else mb["input_ids"].numel() for mb in step)
    return real, padded


def check_vocab(cfg: E2EConfig) -> None:
    from grit_kernels.data import ByteTokenizer

    hf = model_config(cfg)
    if hf is None:
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(cfg.model_path)
    if hf.vocab_size < ByteTokenizer().vocab_size:
        raise ValueError(f"the model's vocabulary ({hf.vocab_size}) is smaller than the byte tokenizer's (260)")
