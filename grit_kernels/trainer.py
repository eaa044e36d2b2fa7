"""GRIT in the Hugging Face ``Trainer``: :class:`GritTrainer`, :class:`GritTrainingArguments`,
:func:`enable_grit`.

How it plugs in. ``Trainer.create_optimizer`` builds the usual inner optimizer (AdamW, 8-bit Adam, ...);
GRIT wraps it in a :class:`TrainerGritOptimizer` *before* ``accelerator.prepare``, so accelerate's
``AcceleratedOptimizer`` wraps our optimizer and preconditioning runs inside ``optimizer.step()``:

    micro-batch forward/backward x gradient_accumulation_steps   (statistics of all micro-batches)
    -> Trainer clips gradients to ``max_grad_norm``               (RAW gradients, see below)
    -> optimizer.step(): [GradScaler unscale / inf check] -> all-reduce statistics (DDP)
       -> EMA fold, then ``grit_optimizer``: "eigen_adamw" (the default where it runs, "auto"): Adam in
          the factors' eigenbasis (grit_kernels.EigenAdamW, over the Trainer's parameter groups);
          "wrap": inversion every ``update_freq`` steps, precondition LoRA grads, KL-clip -> AdamW

* **Batches**: with no ``data_collator``, :class:`GritTrainer` packs text features padding-free
  (:class:`PackingCollator`) when the model keeps packed sequences apart (``grit_packing``, default "auto").
* **Gradient accumulation**: statistics of every micro-batch of one optimizer step are folded together.
* **fp16**: accelerate's ``GradScaler`` is passed as ``grad_scaler`` so the loss scale is divided out of the
  backward factor. A step the scaler skips (inf/NaN) never reaches our ``step``; its statistics are
  discarded (``accelerator.optimizer_step_was_skipped`` after the step, and again at the next step's begin).
* **bf16 / gradient checkpointing**: statistics are fp32 and captured once per micro-batch in backward.
* **max_grad_norm**: the Trainer clips the *raw* gradients before ``optimizer.step()``, so the clip bounds
  the gradient GRIT receives, not the preconditioned step. The preconditioned step is bounded by the
  KL-clip (``grit_kl_clip``: ``lr^2 * g_pre . g <= kl_clip``) and by the warm-up (``grit_warmup_steps``,
  plain gradients while the factors are young). The logged ``grad_norm`` is the raw (pre-clip) norm;
  ``grit/grad_norm_ratio`` is ``||preconditioned|| / ||clipped raw||`` of the LoRA gradients.
* **Checkpoints**: every checkpoint directory gets ``grit_preconditioner.pt`` (``pre.state_dict()``);
  ``optimizer.pt`` holds the inner optimizer only, in the plain format. ``resume_from_checkpoint``
  restores both; the adapters are plain PEFT files (``adapter_model.safetensors``), loadable by
  ``PeftModel.from_pretrained`` without grit_kernels.
* **Logging**: at logging steps only (no per-step host sync), ``grit/damping``, ``grit/condition_max``,
  ``grit/inverse_failures``, ``grit/grad_norm_ratio``, ... are added to the Trainer's logs.
* **Distributed**: DDP works (one all-reduce of the statistics per step, see :mod:`grit_kernels.distributed`),
  and FSDP2 (``fsdp_config={"fsdp_version": 2}``; sharded preconditioning, see :mod:`grit_kernels.fsdp`);
  FSDP1 and DeepSpeed are refused with the reason.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import IntervalStrategy

from . import fsdp
from .arguments import GritConfigArguments, trainer_config
from .checkpoints import atomic_checkpoint
from .config import GritConfig
from .data import PackedCollator, packing_isolates
from .distributed import check_fsdp_supported, deepspeed_error, fsdp1_error
from .fused.patch import fuse, is_fused, unfuse
from .interface import Preconditioner
from .optim import GritOptimizer
from .preconditioner import GritPreconditioner
from .trainer_optimizer import (
    TrainerGritOptimizer,
    _eigen_adamw_over,
    _find_grit_optimizer,
    _split_loraplus_groups,
    _unwrap_accelerated,
    check_eigen_config,
    choose_optimizer,
    resolve_kl_clip,
)

GRIT_CHECKPOINT_NAME = "grit_preconditioner.pt"
logger = logging.getLogger(__name__)
GRIT_OPTIMIZERS = ("auto", "eigen_adamw", "wrap")


# --------------------------------------------------------------------------------------------- arguments
@dataclass
class GritTrainingArguments(GritConfigArguments, TrainingArguments):
    """``TrainingArguments`` plus ``grit_*`` fields: one per :class:`~grit_kernels.GritConfig` field
    (generated from it by :mod:`grit_kernels.arguments`: same names, defaults, help and validation), and the
    Trainer-only knobs below.

    ``grit=False`` turns GRIT off (the trainer is then a plain ``Trainer``; handy for A/B runs).
    ``grit_fuse`` (default True) routes the model through :func:`grit_kernels.fuse` where it applies, with or
    without GRIT. ``to_grit_config()`` returns the validated :class:`GritConfig`; invalid values raise
    ``ValueError`` naming the ``grit_*`` field when the arguments are built.
    """

    grit: bool = field(
        default=True, metadata={"help": "Precondition LoRA gradients with GRIT (rank-space K-FAC)."}
    )
    grit_fuse: bool = field(
        default=True,
        metadata={
            "help": "Run the model's decoder blocks through grit_kernels.fuse (fused LoRA blocks, statistics "
            "inside) wherever it applies, with GRIT or without (grit=False A/B runs stay like for like); "
            "parts it does not support keep PEFT's path and the reason is logged. False: PEFT's path."
        },
    )
    grit_optimizer: str = field(
        default="auto",
        metadata={
            "help": "auto | eigen_adamw | wrap. eigen_adamw: Trainer's optimizer is replaced by "
            "grit_kernels.EigenAdamW (Adam in the eigenbasis of the rank-space factors), with Trainer's lr, betas, "
            "eps, weight decay and parameter groups; it uses the factors only (grit_damping, grit_graft, "
            "grit_update_freq and grit_warmup_steps do not apply); the best-measured setting (docs/benchmarks.md). "
            "wrap: GRIT preconditions the gradients of the optimizer Trainer builds (optim=..., AdamW by default). "
            "auto (default): eigen_adamw wherever it runs, else wrap (grit_fisher other than 'kfac', "
            "grit_reprojection, VLM modality groups, FSDP2); the choice and its reason are logged."
        },
    )
    grit_kl_clip: str | None = field(  # replaces the generated float field: its default depends on grit_optimizer
        default="auto",
        metadata={
            "help": "KL-clip trust region on the step taken, > 0, or none (off). auto (default): off with "
            "grit_optimizer='eigen_adamw', GritConfig's default (0.1) with 'wrap' (each as measured best)."
        },
    )
    grit_loraplus_ratio: float | None = field(
        default=None,
        metadata={
            "help": "LoRA+: lora_B parameters train at this multiple of the learning rate (None: one lr). "
            "Works with either grit_optimizer, and with grit=False (plain LoRA+ for an A/B run)."
        },
    )

    grit_packing: str = field(
        default="auto",
        metadata={
            "help": "auto | on | off: GritTrainer's batches when no data_collator is given. auto: padding-free "
            "packing (data.PackedCollator) of text features when the model keeps packed sequences apart, "
            "else the collator Trainer would use; on: always pack (error if the model cannot); off: Trainer's."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.grit_kl_clip, str) and self.grit_kl_clip.strip().lower() == "auto"):
            self.grit_kl_clip = resolve_kl_clip(self.grit_kl_clip, "wrap")  # a number or None ("auto": at build time)
        if self.grit_packing not in ("auto", "on", "off"):
            raise ValueError(f"grit_packing must be 'auto', 'on' or 'off', got {self.grit_packing!r}")
        if self.grit_optimizer not in GRIT_OPTIMIZERS:
            raise ValueError(f"grit_optimizer must be one of {GRIT_OPTIMIZERS}, got {self.grit_optimizer!r}")
        if self.grit and self.grit_optimizer == "eigen_adamw":
            check_eigen_config(self.grit_fisher, self.grit_reprojection, "grit_")
        ratio = self.grit_loraplus_ratio
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0):
            raise ValueError(f"grit_loraplus_ratio must be a number > 0 or None, got {ratio!r}")
        if self.grit:
            self.to_grit_config()  # fail at argument time, naming the grit_* field

    def to_grit_config(self, optimizer: str | None = None) -> GritConfig:
        """The :class:`GritConfig` these arguments describe; ``grit_kl_clip="auto"`` resolved for ``optimizer``
        (default: what ``grit_optimizer`` gives without modality groups or FSDP2)."""
        choice = optimizer or choose_optimizer(self.grit_optimizer, self.grit_fisher, self.grit_reprojection)[0]
        clip = resolve_kl_clip(self.grit_kl_clip, choice)
        return trainer_config(self, kl_clip=clip)


# --------------------------------------------------------------------------------------------- logging
def grit_log_metrics(
    preconditioner: GritPreconditioner, optimizer: GritOptimizer | None = None
) -> dict[str, float]:
    """GRIT's logging scalars as Python floats; **one** host sync. Call at logging steps only.

    Keys: ``grit/damping`` (mean lam over the 2M factors), ``grit/condition_max`` (largest condition
    number of the damped factors), ``grit/inverse_failures`` (factors whose latest inversion retried or
    fell back; 0 before the first inversion), ``grit/trace_forward`` / ``grit/trace_backward`` (mean
    trace of H / D),
    ``grit/preconditioning_active`` (0 during warm-up), ``grit/steps`` (GRIT steps taken), and with a
    :class:`TrainerGritOptimizer`: ``grit/skipped_steps`` (NaN/Inf steps skipped) and
    ``grit/grad_norm_ratio`` (from the latest measured step, if it is the latest step).
    """
    summary = preconditioner.curvature_summary()
    names = {
        "grit/damping": "damping_mean",
        "grit/condition_max": "condition_max",
        "grit/inverse_failures": "inverse_failures",
        "grit/trace_forward": "trace_forward_mean",
        "grit/trace_backward": "trace_backward_mean",
    }
    keys, values = list(names), [summary[v].float().reshape(()) for v in names.values()]
    for group, part in preconditioner.group_summaries().items():  # per modality group (vlm): grit/<group>/...
        for key, name in names.items():
            keys.append(key.replace("grit/", f"grit/{group}/"))
            values.append(part[name].float().reshape(()).to(values[0].device))
    ratio = getattr(optimizer, "grad_norm_ratio", None)
    if ratio is not None and getattr(optimizer, "grad_norm_ratio_step", -1) == preconditioner.step_count - 1:
        keys.append("grit/grad_norm_ratio")
        values.append(ratio.float().reshape(()).to(values[0].device))
    host = torch.stack(values).tolist()  # the one sync
    logs = dict(zip(keys, host))
    logs["grit/inverse_failures"] = int(logs["grit/inverse_failures"])
    inner = getattr(optimizer, "optimizer", None)
    if getattr(inner, "uses_grit_factors", False):  # EigenAdamW: its bases come from the factors from step 1 on
        logs["grit/preconditioning_active"] = int(inner.steps > 0)
    else:
        logs["grit/preconditioning_active"] = int(preconditioner.bank.refresh_count > 0)
    logs["grit/steps"] = preconditioner.step_count
    if optimizer is not None:
        logs["grit/skipped_steps"] = optimizer.skipped_steps
    return logs


class GritCallback(TrainerCallback):
    """Per-step bookkeeping of a GRIT trainer (added automatically; host-sync free).

    ``on_step_begin``: drop statistics that belong to no optimizer step (a step skipped by the
    GradScaler, which never reaches our ``step``; stray backward passes between steps).
    ``on_pre_optimizer_step``: ask the optimizer to measure the grad-norm ratio iff the coming step
    will be logged. ``on_optimizer_step``: discard the statistics if accelerate skipped the step.
    """

    def __init__(self, trainer: Trainer):
        self._trainer = trainer

    def _pre(self) -> GritPreconditioner | None:
        return getattr(self._trainer, "grit_preconditioner", None)

    def on_step_begin(self, args, state, control, **kwargs):
        pre = self._pre()
        if pre is not None:
            pre.discard_step()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        opt = _find_grit_optimizer(getattr(self._trainer, "optimizer", None))
        if isinstance(opt, TrainerGritOptimizer):
            coming = state.global_step + 1
            opt.measure_grad_norm_ratio = (
                (coming == 1 and args.logging_first_step)
                or (
                    args.logging_strategy == IntervalStrategy.STEPS
                    and coming % max(1, state.logging_steps) == 0
                )
                or coming >= state.max_steps
            )

    def on_optimizer_step(self, args, state, control, **kwargs):
        pre = self._pre()
        if pre is not None and getattr(self._trainer.accelerator, "optimizer_step_was_skipped", False):
            pre.discard_step()


# --------------------------------------------------------------------------------------------- the trainer
def _check_train_dataset(dataset: Any) -> None:
    """A clear error for an empty training set (torch's sampler would say ``num_samples=0``)."""
    try:
        empty = dataset is not None and len(dataset) == 0
    except TypeError:  # an IterableDataset has no length
        return
    if empty:
        raise ValueError(
            "GritTrainer: train_dataset is empty (0 rows), there is nothing to train on; check the data file "
            "and the preprocessing (tokenize_alpaca / tokenize_chat drop rows with no supervised token "
            "left within max_length)"
        )


class _GritTrainerMixin:
    """GRIT behaviour layered over any ``transformers.Trainer`` subclass (Trainer, TRL's SFTTrainer, ...)."""

    grit_config: GritConfig | None
    grit_preconditioner: GritPreconditioner | None

    def _grit_init(
        self,
        config: GritConfig | None,
        preconditioner: GritPreconditioner | None,
        force: bool = False,
        fuse: bool | None = None,
    ) -> None:
        """Resolve the config (explicit > the preconditioner's > ``args.to_grit_config()`` > defaults);
        ``args.grit=False`` disables GRIT unless ``force`` (enable_grit). ``fuse`` (default
        ``args.grit_fuse``, else True): fuse the model now (:meth:`_grit_fuse_model`)."""
        if preconditioner is not None and not isinstance(preconditioner, Preconditioner):
            raise TypeError(
                f"grit_preconditioner must be a GritPreconditioner, got {type(preconditioner).__name__}"
            )
        args = getattr(self, "args", None)
        if config is None and preconditioner is not None:
            config = preconditioner.config
        requested = self.__dict__.get("_grit_optimizer_request") or getattr(args, "grit_optimizer", "auto")
        grouped = preconditioner is not None and not isinstance(preconditioner, GritPreconditioner)
        sharded = bool(getattr(self, "is_fsdp_enabled", False))
        if config is None and isinstance(args, GritTrainingArguments):
            fisher, reprojection = args.grit_fisher, args.grit_reprojection
        else:
            fisher, reprojection = (config.fisher, config.reprojection) if config is not None else ("kfac", "off")
        choice, reason = choose_optimizer(requested, fisher, reprojection, grouped, sharded)
        self._grit_optimizer_resolved = choice
        if config is None:
            if isinstance(args, GritTrainingArguments):
                config = args.to_grit_config(choice) if (args.grit or force) else None
            else:
                config = GritConfig(kl_clip=resolve_kl_clip("auto", choice))
        if config is not None and not isinstance(config, GritConfig):
            raise TypeError(f"grit_config must be a GritConfig, got {type(config).__name__}")
        if config is not None and choice == "eigen_adamw":
            check_eigen_config(config.fisher, config.reprojection)
            if grouped:
                raise ValueError("optimizer 'eigen_adamw' needs one GritPreconditioner; modality groups run with 'wrap'")
        if config is not None and requested == "auto":
            logger.info("GRIT: optimizer %s (%s)", choice, reason)
        self.grit_config = config
        self.grit_preconditioner = preconditioner
        self.grit_fuse = bool(getattr(args, "grit_fuse", True) if fuse is None else fuse)
        self.grit_fusion = None
        self._grit_fused_model = None
        if config is not None:
            if getattr(self, "is_fsdp_xla_enabled", False):
                raise fsdp1_error(" on XLA")
            if getattr(self, "is_fsdp_enabled", False):  # FSDP2 runs (grit_kernels.fsdp); FSDP1 cannot
                if getattr(getattr(self.accelerator.state, "fsdp_plugin", None), "fsdp_version", 1) != 2:
                    raise fsdp1_error()
                fsdp.check_config(config, choice)
            if getattr(self, "is_deepspeed_enabled", False):
                raise deepspeed_error()
            check_fsdp_supported(self.model)
            _check_train_dataset(getattr(self, "train_dataset", None))
            if not any(isinstance(cb, GritCallback) for cb in self.callback_handler.callbacks):
                self.add_callback(GritCallback(self))
        if self.model is not None:  # model_init: fused when the optimizer is created
            self._grit_fuse_model()

    def _grit_fuse_model(self) -> None:
        """Route ``self.model`` through :func:`grit_kernels.fuse` (once per model) if ``grit_fuse``; log the
        report once, and why when parts (or all of it) keep PEFT's path. ``grit_fusion`` holds the report
        (``None``: not attempted)."""
        model = self.model
        if not self.grit_fuse or model is None or model is self._grit_fused_model:
            return
        self._grit_fused_model = model
        if getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_xla_enabled", False):
            logger.warning("grit_fuse: not fusing a model under DeepSpeed / FSDP on XLA; it keeps PEFT's path")
            return
        if is_fused(model):
            logger.info("grit_fuse: the model was already fused by the caller; keeping that")
            return
        if self.grit_config is not None and self.grit_config.reprojection != "off":
            logger.warning(
                f"grit_fuse: not fusing: grit_reprojection={self.grit_config.reprojection!r} re-bases (and "
                "resizes) the LoRA parameters, which needs PEFT's layers; training on PEFT's path"
            )
            return
        self.grit_fusion = report = fuse(model)
        if report.fused_modules == 0:
            reasons = "; ".join(sorted(set(report.unfused.values())))
            logger.warning(f"grit_fuse: nothing to fuse ({reasons}); training on PEFT's path")
        elif report.fused_modules < report.lora_modules or report.unfused:
            logger.warning(f"grit_fuse: partly fused; the rest keeps PEFT's path:\n{report}")
        else:
            logger.info(f"grit_fuse: {report}")

    @property
    def grit_optimizer(self) -> TrainerGritOptimizer | None:
        """The :class:`TrainerGritOptimizer` inside ``self.optimizer`` (None before training / no GRIT)."""
        return _find_grit_optimizer(getattr(self, "optimizer", None))

    @property
    def grit_optimizer_choice(self) -> str:
        """``"eigen_adamw"`` or ``"wrap"``: the optimizer GRIT builds, as resolved when GRIT was set up
        (``"auto"``: :func:`choose_optimizer`)."""
        return self.__dict__.get("_grit_optimizer_resolved") or "wrap"

    def get_train_dataloader(self, *args, **kwargs):
        _check_train_dataset(self.train_dataset)
        return super().get_train_dataloader(*args, **kwargs)

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        if _find_grit_optimizer(optimizer) is not None:
            return optimizer
        grit_args = self.args if isinstance(self.args, GritTrainingArguments) else None
        if grit_args is not None and grit_args.grit_loraplus_ratio is not None:
            _split_loraplus_groups(_unwrap_accelerated(optimizer), self.model, grit_args.grit_loraplus_ratio)
        self._grit_fuse_model()  # model_init / hyper-parameter search: a new model since __init__
        if self.grit_config is None:
            return optimizer
        model = args[0] if args else kwargs.get("model")
        if model is not None:
            check_fsdp_supported(model)
        pre = self.grit_preconditioner
        if pre is not None and not any(p is pre.modules[0].lora_A for p in self.model.parameters()):
            pre.remove()  # the model was replaced (model_init / hyper-parameter search): start afresh
            pre = None
        if pre is None:
            self.grit_preconditioner = GritPreconditioner(self.model, self.grit_config)
        inner = _unwrap_accelerated(optimizer)
        if self.grit_optimizer_choice == "eigen_adamw":
            inner = _eigen_adamw_over(inner, self.grit_preconditioner, self.args)
        scaler = getattr(getattr(self, "accelerator", None), "scaler", None)
        self.optimizer = TrainerGritOptimizer(inner, self.grit_preconditioner, scaler)
        return self.optimizer

    def _save_checkpoint(self, model, trial, *args, **kwargs):
        """Trainer's checkpoint plus ``grit_preconditioner.pt``, written under a temporary name and renamed
        into place when complete (:func:`grit_kernels.checkpoints.atomic_checkpoint`): a process killed
        mid-save leaves no half-written ``checkpoint-<step>``."""
        with atomic_checkpoint(self, trial) as staged:
            super()._save_checkpoint(model, trial, *args, **kwargs)
            pre = self.grit_preconditioner
            if pre is not None and self.args.should_save and not self.args.save_only_model:
                torch.save(pre.state_dict(), os.path.join(staged, GRIT_CHECKPOINT_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint, *args, **kwargs):
        super()._load_optimizer_and_scheduler(checkpoint, *args, **kwargs)
        pre = self.grit_preconditioner
        if checkpoint is None or pre is None:
            return
        path = os.path.join(checkpoint, GRIT_CHECKPOINT_NAME)
        if os.path.isfile(path):
            pre.load_state_dict(torch.load(path, map_location=pre.bank.device, weights_only=True))
        else:
            warnings.warn(
                f"{checkpoint} has no {GRIT_CHECKPOINT_NAME}: GRIT factors start from scratch "
                "(and warm up again)",
                stacklevel=2,
            )

    def grit_metrics(self) -> dict[str, float]:
        """:func:`grit_log_metrics` of this trainer (empty without a preconditioner). One host sync."""
        if self.grit_preconditioner is None:
            return {}
        return grit_log_metrics(self.grit_preconditioner, self.grit_optimizer)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self.grit_preconditioner is not None:
            logs.update(self.grit_metrics())
        super().log(logs, *args, **kwargs)


class GritTrainer(_GritTrainerMixin, Trainer):
    """``transformers.Trainer`` with GRIT natural-gradient preconditioning of the LoRA gradients.

    ``GritTrainer(model=peft_model, args=GritTrainingArguments(...), train_dataset=..., data_collator=...)``
    accepts every ``Trainer`` argument plus:

    Args:
        grit_config: a :class:`GritConfig`; default: ``args.to_grit_config()`` for
            :class:`GritTrainingArguments` (``None`` if ``args.grit`` is False: plain Trainer), else
            ``GritConfig()``.
        grit_preconditioner: an existing :class:`GritPreconditioner` of ``model`` to use (default: one is
            built from ``grit_config`` when the optimizer is created).

    Attributes:
        grit_preconditioner: the preconditioner (after the optimizer is created).
        grit_optimizer: the :class:`TrainerGritOptimizer` wrapping the Trainer's optimizer.

    See the module docstring for gradient accumulation, fp16/bf16, ``max_grad_norm`` (clips raw gradients),
    checkpoints and logging.
    """

    def __init__(
        self,
        *args,
        grit_config: GritConfig | None = None,
        grit_preconditioner: GritPreconditioner | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        collator_given = kwargs.get("data_collator") is not None or (len(args) > 2 and args[2] is not None)
        if not collator_given:
            self.data_collator = _default_collator(self.model, self.args, self.data_collator)
        self._grit_init(grit_config, grit_preconditioner)


class PackingCollator:
    """GritTrainer's default batches: text-only features are packed padding-free
    (:class:`~grit_kernels.data.PackedCollator`: one row, no pad tokens, sequences isolated by
    ``position_ids``); a batch with any other key (``pixel_values``, ...) goes to ``fallback``, the
    collator ``Trainer`` would have used."""

    def __init__(self, fallback: Callable):
        self.packed, self.fallback = PackedCollator(), fallback

    def __call__(self, features):
        if all(set(f) <= PackedCollator.TEXT_KEYS for f in features):
            return self.packed(features)
        return self.fallback(features)


def _default_collator(model: torch.nn.Module, args: TrainingArguments, trainer_default: Callable) -> Callable:
    """The collator for ``GritTrainer(data_collator=None)`` under ``args.grit_packing`` (see
    :class:`GritTrainingArguments`); ``trainer_default`` is the one ``Trainer`` chose."""
    mode = getattr(args, "grit_packing", "auto")
    if mode == "off":
        return trainer_default
    if not packing_isolates(model):
        if mode == "on":
            raise ValueError(
                f"grit_packing='on': {type(model).__name__} does not keep packed sequences apart "
                "(attention would cross samples); use grit_packing='auto' or 'off', or pass a data_collator"
            )
        return trainer_default
    return PackingCollator(trainer_default)


@functools.lru_cache(maxsize=None)
def _grit_class(base: type) -> type:
    namespace = {"__module__": base.__module__, "_grit_original_class": base}
    return type(f"Grit{base.__name__}", (_GritTrainerMixin, base), namespace)


def enable_grit(
    trainer: Trainer,
    config: GritConfig | None = None,
    preconditioner: GritPreconditioner | None = None,
    fuse: bool | None = None,
    optimizer: str | None = None,
) -> Trainer:
    """Turn GRIT on for an existing ``transformers.Trainer`` (or subclass, e.g. TRL's ``SFTTrainer``).

    Call it before ``trainer.train()``. The trainer instance gets GRIT's optimizer wrapping,
    checkpointing and logging (its class is swapped for a ``Grit<Class>`` subclass that layers
    :class:`GritTrainer`'s methods over the original ones; nothing else changes), and its model is
    fused (:func:`grit_kernels.fuse`) where that applies. Returns the trainer. :func:`disable_grit` undoes it.

    Args:
        trainer: the trainer, with a PEFT LoRA model.
        config: :class:`GritConfig` (default: the preconditioner's, else ``args.to_grit_config()`` for
            :class:`GritTrainingArguments` -- even with ``grit=False`` --, else ``GritConfig()``).
        preconditioner: an existing :class:`GritPreconditioner` of ``trainer.model``.
        fuse: fuse the model (default: ``args.grit_fuse`` for :class:`GritTrainingArguments`, else True);
            parts :func:`grit_kernels.fuse` does not support keep PEFT's path and the reason is logged.
        optimizer: ``"auto"``, ``"eigen_adamw"`` or ``"wrap"``, as ``GritTrainingArguments.grit_optimizer``
            (default: that field for :class:`GritTrainingArguments`, else ``"auto"``: EigenAdamW, the best-measured
            setting, where it runs; with no config given, ``GritConfig(kl_clip=None)`` for EigenAdamW).
    """
    if optimizer is not None and optimizer not in GRIT_OPTIMIZERS:
        raise ValueError(f"enable_grit: optimizer must be one of {GRIT_OPTIMIZERS}, got {optimizer!r}")
    if not isinstance(trainer, Trainer):
        raise TypeError(f"enable_grit expects a transformers.Trainer, got {type(trainer).__name__}")
    if isinstance(trainer, _GritTrainerMixin):
        if trainer.grit_preconditioner is not None or trainer.grit_config is not None:
            if config is not None or preconditioner is not None or fuse is not None:
                raise RuntimeError(
                    "GRIT is already enabled on this trainer; pass the config when creating it"
                )
            return trainer
    else:
        trainer.__class__ = _grit_class(type(trainer))
    if getattr(trainer, "optimizer", None) is not None:
        trainer.optimizer = _unwrap_accelerated(trainer.optimizer)
    trainer._grit_optimizer_request = optimizer
    trainer._grit_init(config, preconditioner, force=True, fuse=fuse)
    return trainer


def disable_grit(trainer: Trainer) -> Trainer:
    """Undo :func:`enable_grit` (or turn GRIT off on a :class:`GritTrainer`) between ``train()`` calls.

    The model is unfused if GRIT fused it, the preconditioner is removed (plain PEFT layers), the inner
    optimizer (with its state) replaces GRIT's wrapper (EigenAdamW, whose moments live in the factors'
    eigenbasis, is dropped instead: the next ``train()`` builds the Trainer's own optimizer and scheduler),
    GRIT's callback goes, and a trainer whose class
    :func:`enable_grit` swapped gets its original class back. Returns the trainer.
    """
    if not isinstance(trainer, _GritTrainerMixin):
        return trainer
    if trainer.grit_fusion is not None and trainer.grit_fusion.fused_modules and trainer.model is trainer._grit_fused_model:
        unfuse(trainer.model)
    if trainer.grit_preconditioner is not None:
        trainer.grit_preconditioner.remove()
    grit_optimizer = _find_grit_optimizer(getattr(trainer, "optimizer", None))
    if grit_optimizer is not None and getattr(grit_optimizer.optimizer, "uses_grit_factors", False):
        # EigenAdamW's moments live in the factors' eigenbasis: dropped; the next train() builds Trainer's own
        trainer.optimizer = trainer.lr_scheduler = None
    elif grit_optimizer is not None:
        trainer.optimizer = grit_optimizer.optimizer
    for callback in [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, GritCallback)]:
        trainer.remove_callback(callback)
    trainer.grit_config = trainer.grit_preconditioner = trainer.grit_fusion = trainer._grit_fused_model = None
    trainer.grit_fuse = False
    original = type(trainer).__dict__.get("_grit_original_class")
    if original is not None:
        trainer.__class__ = original
        for name in ("grit_config", "grit_preconditioner", "grit_fusion", "_grit_fused_model", "grit_fuse", "_grit_optimizer_request",
                     "_grit_optimizer_resolved"):
            trainer.__dict__.pop(name, None)
    return trainer


__all__ = [
    "GRIT_CHECKPOINT_NAME",
    "GritCallback",
    "GritTrainer",
    "GritTrainingArguments",
    "PackingCollator",
    "TrainerGritOptimizer",
    "disable_grit",
    "enable_grit",
    "grit_log_metrics",
]
