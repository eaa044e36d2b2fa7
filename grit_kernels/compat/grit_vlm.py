"""Migration from grit-vlm: ``GRITLoRAConfig``, ``GRITTrainingArguments``, ``create_grit_trainer``.

grit-vlm's documented sequence::

    config = GRITLoRAConfig(r=16, lora_alpha=32, fisher_approximation="kfac", fisher_update_freq=10)
    model, adapter = gk.create_vlm_grit_adapter(vlm, config=config)
    args = GRITTrainingArguments(output_dir="out", fisher_update_freq=10, enable_natural_gradient=True)
    trainer = create_grit_trainer(model, adapter, train_dataset=ds, training_args=args)
    trainer.train()

Fields whose meaning differs warn once at conversion (``"block_diagonal"`` -> ``fisher="kfac_full"``,
relative damping, projection budget -> real rank schedule). The trainer is always
:class:`grit_kernels.GritTrainer` (grit-vlm has no ``GritTrainer`` of its own; the notebook's signature
lives in :mod:`grit_kernels.compat.notebook`).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ..config import GritConfig
from ..trainer import GritTrainer as _GritTrainer
from ..trainer import GritTrainingArguments as _GritTrainingArguments

#: grit-vlm ``fisher_approximation`` -> our ``GritConfig.fisher``
FISHER_NAMES = {"diagonal": "diagonal", "kfac": "kfac", "block_diagonal": "kfac_full"}
BLOCK_DIAGONAL_WARNING = (
    "grit_kernels.compat: fisher_approximation='block_diagonal' maps to fisher='kfac_full' (full K-FAC with "
    "d x d input and output factors per LoRA module), a reference for small models refused above "
    "GritConfig.kfac_full_max_bytes; grit-vlm's block-diagonal option did not precondition anything"
)
DAMPING_WARNING = (
    "grit_kernels.compat: natural_gradient_damping is relative here (lam = damping * tr(C)/r); fisher_damping "
    "becomes the absolute floor eps_abs"
)


def _projection_fields(budget_start: int, budget_end: int, schedule: str, enabled: bool) -> dict:
    """grit-vlm's projection budget (a top-k mask of gradient entries there) as our rank schedule: a
    shrinking budget becomes ``rank_start=1, rank_end=end/start`` over the schedule; a growing one (the
    grit-vlm default 32 -> 96) cannot be a rank schedule (ranks only shrink) and is ignored."""
    if not enabled:
        return {}
    if budget_end >= budget_start:
        warnings.warn(
            f"grit_kernels.compat: projection_budget {budget_start} -> {budget_end} grows; ranks only shrink here, "
            "so the projection schedule is ignored",
            UserWarning,
            stacklevel=3,
        )
        return {}
    warnings.warn(
        "grit_kernels.compat: the projection budget becomes a rank schedule (real LoRA ranks shrink from r to "
        f"r * {budget_end}/{budget_start}); grit-vlm masked gradient entries instead",
        UserWarning,
        stacklevel=3,
    )
    return dict(
        reprojection="one_sided",
        rank_schedule=schedule,
        rank_start=1.0,
        rank_end=max(budget_end / budget_start, 1e-6),
    )


def _fisher_name(name: str) -> str:
    if name not in FISHER_NAMES:
        raise ValueError(f"fisher_approximation must be one of {sorted(FISHER_NAMES)}, got {name!r}")
    if name == "block_diagonal":
        warnings.warn(BLOCK_DIAGONAL_WARNING, UserWarning, stacklevel=3)
    return FISHER_NAMES[name]


@dataclass
class GRITLoRAConfig:
    """grit-vlm's ``GRITLoRAConfig`` (its field names and defaults), mapped onto our objects.

    ``r`` / ``lora_alpha`` / ``lora_dropout`` / ``target_modules`` -> ``peft.LoraConfig`` (:meth:`lora_config`)
    or every modality group of :meth:`to_vlm_config`; ``fisher_approximation`` -> ``GritConfig.fisher``
    (``"block_diagonal"`` -> ``"kfac_full"``, with a warning); ``fisher_update_freq`` -> ``update_freq``;
    ``fisher_ema_decay`` -> ``ema_decay``; ``natural_gradient_damping`` -> ``damping`` (relative here) and
    ``fisher_damping`` -> ``eps_abs`` (warning); ``projection_*`` -> a rank schedule if the budget shrinks
    (warning); ``enable_natural_gradient=False`` -> plain LoRA (no preconditioner) in
    :func:`create_grit_trainer`.
    """

    r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.1
    fisher_approximation: str = "diagonal"
    fisher_damping: float = 1e-4
    fisher_ema_decay: float = 0.95
    fisher_update_freq: int = 10
    projection_budget_start: int = 32
    projection_budget_end: int = 96
    projection_schedule: str = "linear"
    natural_gradient_damping: float = 1e-3
    enable_projection: bool = True
    enable_natural_gradient: bool = True
    target_modules: list | None = None

    def __post_init__(self):
        if self.target_modules is None:
            self.target_modules = [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]

    def to_grit_config(self, **overrides: Any) -> GritConfig:
        warnings.warn(DAMPING_WARNING, UserWarning, stacklevel=2)
        values = dict(
            fisher=_fisher_name(self.fisher_approximation),
            update_freq=int(self.fisher_update_freq),
            ema_decay=float(self.fisher_ema_decay),
            damping=float(self.natural_gradient_damping),
            eps_abs=float(self.fisher_damping),
        )
        values.update(
            _projection_fields(
                self.projection_budget_start,
                self.projection_budget_end,
                self.projection_schedule,
                self.enable_projection,
            )
        )
        if values["fisher"] != "kfac" and values.get("reprojection"):
            warnings.warn(
                "grit_kernels.compat: rank schedules need fisher='kfac'; the projection schedule is ignored",
                UserWarning,
                stacklevel=2,
            )
            for key in ("reprojection", "rank_schedule", "rank_start", "rank_end"):
                values.pop(key)
        values.update(overrides)
        return GritConfig(**values)

    def lora_config(self, **kwargs: Any):
        from peft import LoraConfig

        values = dict(
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=list(self.target_modules),
        )
        values.update(kwargs)
        return LoraConfig(**values)

    def to_vlm_config(self):
        """A :class:`~grit_kernels.vlm.VLMGritConfig` with this rank/alpha for every modality group (what
        ``gk.create_vlm_grit_adapter(model, config=GRITLoRAConfig(...))`` uses)."""
        from ..vlm import ModalityGroup, VLMGritConfig

        def group():
            return ModalityGroup(r=self.r, lora_alpha=self.lora_alpha)

        return VLMGritConfig(
            vision=group(),
            projector=group(),
            language=group(),
            grit=self.to_grit_config(),
            lora_dropout=self.lora_dropout,
        )


@dataclass
class GRITTrainingArguments(_GritTrainingArguments):
    """grit-vlm's ``GRITTrainingArguments`` (its fields and defaults) over our
    :class:`~grit_kernels.GritTrainingArguments`: ``enable_natural_gradient`` -> ``grit``,
    ``fisher_update_freq`` -> ``grit_update_freq``, ``natural_gradient_damping`` -> ``grit_damping``
    (relative), ``fisher_damping`` -> ``grit_eps_abs``, ``fisher_ema_decay`` -> ``grit_ema_decay``,
    ``fisher_approximation`` -> ``GritConfig.fisher`` (``"block_diagonal"`` -> ``"kfac_full"``, warning),
    ``projection_*`` as in :class:`GRITLoRAConfig`, ``grit_optimizer_type`` -> ``optim`` (``"sgd"`` ->
    ``"sgd"``, ``"adam"`` / ``"adaptive"`` -> ``"adamw_torch"``). ``log_fisher_stats`` and
    ``save_fisher_matrices`` are accepted; the GRIT statistics are always logged (``grit/...``) and the
    factors saved with each checkpoint.
    """

    fisher_update_freq: int = 10
    natural_gradient_damping: float = 1e-3
    enable_natural_gradient: bool = True
    enable_projection: bool = True
    projection_budget_start: int = 32
    projection_budget_end: int = 96
    projection_schedule: str = "linear"
    fisher_approximation: str = "diagonal"
    fisher_ema_decay: float = 0.95
    fisher_damping: float = 1e-4
    grit_optimizer_type: str = "sgd"
    log_fisher_stats: bool = True
    save_fisher_matrices: bool = False

    def __post_init__(self):
        optims = {"sgd": "sgd", "adam": "adamw_torch", "adaptive": "adamw_torch"}
        if self.grit_optimizer_type not in optims:
            raise ValueError(
                f"grit_optimizer_type must be one of {sorted(optims)}, got {self.grit_optimizer_type!r}"
            )
        self.optim = optims[self.grit_optimizer_type]
        self.grit = bool(self.enable_natural_gradient)
        self.grit_update_freq = int(self.fisher_update_freq)
        self.grit_damping = float(self.natural_gradient_damping)
        self.grit_eps_abs = float(self.fisher_damping)
        self.grit_ema_decay = float(self.fisher_ema_decay)
        super().__post_init__()

    def to_grit_config(self) -> GritConfig:
        extra = dict(fisher=_fisher_name(self.fisher_approximation))
        extra.update(
            _projection_fields(
                self.projection_budget_start,
                self.projection_budget_end,
                self.projection_schedule,
                self.enable_projection,
            )
        )
        if extra["fisher"] != "kfac":
            for key in ("reprojection", "rank_schedule", "rank_start", "rank_end"):
                extra.pop(key, None)
        if extra.get("rank_schedule") is not None:
            extra["rank_schedule_steps"] = max(int(self.max_steps), 1) if self.max_steps > 0 else 1000
        return dataclasses.replace(super().to_grit_config(), **extra)


def create_grit_trainer(
    model: torch.nn.Module,
    grit_adapter: Any = None,
    train_dataset: Any = None,
    eval_dataset: Any = None,
    training_args: Any = None,
    **kwargs: Any,
):
    """grit-vlm's ``create_grit_trainer(model, grit_adapter, train_dataset, eval_dataset, training_args)``.

    ``grit_adapter``: a :class:`~grit_kernels.GritPreconditioner` (or the grouped one of
    ``create_vlm_grit_adapter``), a ``(peft_model, preconditioner)`` pair, or ``None`` (the trainer builds
    one from ``training_args``). ``training_args``: a :class:`GRITTrainingArguments` (grit-vlm's defaults
    if ``None``: 3 epochs, batch 4 x 4 accumulation, lr 2e-4, SGD). Returns a
    :class:`~grit_kernels.GritTrainer` (a plain ``Trainer`` run when ``enable_natural_gradient=False``).
    """
    if isinstance(grit_adapter, tuple):
        model, grit_adapter = grit_adapter if grit_adapter[0] is not None else (model, grit_adapter[1])
    if training_args is None:
        training_args = GRITTrainingArguments(
            output_dir="./grit_output",
            num_train_epochs=3,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=4,
            learning_rate=2e-4,
            logging_steps=50,
            save_steps=500,
            eval_strategy="steps" if eval_dataset is not None else "no",
            eval_steps=500,
            report_to="none",
        )
    pre = grit_adapter if getattr(training_args, "grit", True) else None
    if grit_adapter is not None and pre is None:
        warnings.warn(
            "create_grit_trainer: enable_natural_gradient=False, the GRIT adapter's preconditioner "
            "is removed (plain LoRA)",
            UserWarning,
            stacklevel=2,
        )
        grit_adapter.remove()
    return _GritTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        grit_preconditioner=pre,
        **kwargs,
    )


__all__ = [
    "BLOCK_DIAGONAL_WARNING",
    "DAMPING_WARNING",
    "FISHER_NAMES",
    "GRITLoRAConfig",
    "GRITTrainingArguments",
    "create_grit_trainer",
]
