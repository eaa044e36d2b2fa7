"""Migration from the published GRIT notebook API: ``GRITConfig``, ``GRITManager``,
``GritTrainer(grit_manager=...)``, ``GritCallback``.

The published code is driven like this (and keeps working with these names)::

    config = GRITConfig(); config.kfac_update_freq = 10; config.kfac_damping = 1e-5
    manager = GRITManager(model=peft_model, config=config, device="cuda")
    trainer = GritTrainer(grit_manager=manager, model=peft_model, args=training_args,
                          train_dataset=ds, tokenizer=tok, callbacks=[GritCallback(manager)])
    trainer.train()

    # or a hand-written loop
    loss.backward()
    if step % config.kfac_update_freq == 0: manager.update_and_invert_factors()
    if manager.factors_are_ready: manager.precondition_gradients()
    optimizer.step(); optimizer.zero_grad(); manager.step(loss.item())

Underneath, a :class:`~grit_kernels.GritPreconditioner` does the work (fused statistics, batched
inversion, grouped preconditioning; docs/design.md §2). Differences from the published code, on purpose:

* **Factor pairing is corrected**: the published code preconditions grad_A with the activation factor
  and grad_B with the gradient factor; we precondition grad_A with ``D = E[delta delta^T]`` (left) and grad_B
  with ``H = E[h h^T]`` (right), which makes the update invariant to ``(A, B) -> (QA, BQ^-1)``.
* ``kfac_damping`` is *relative* (``lam = damping * tr(C)/r``), not added to the covariance as is.
* Preconditioning starts where the published code starts it: at the first inversion, step
  ``kfac_update_freq`` (or ``ng_warmup_steps`` if later); until then gradients pass through.
* ``kfac_min_samples`` is accepted but not needed: every LoRA module sees every token of every batch.
* ``GRITManager`` does not run neural reprojection, rank adaptation or the curvature regularisers
  (``lambda_kfac``, ``lambda_reproj``); their settings are accepted and ignored (one warning). Real
  reprojection and rank schedules are ``GritConfig(reprojection=..., rank_schedule=...)`` and
  ``gk.compress_adapter`` (:mod:`grit_kernels.compress`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback

from ..bank import BACKWARD, FORWARD
from ..config import GritConfig
from ..preconditioner import GritPreconditioner
from ..trainer import GritTrainer as _GritTrainer

PAIRING_WARNING = (
    "grit_kernels.compat: factor pairing corrected -- grad_A is preconditioned by D=E[delta delta^T] and "
    "grad_B by H=E[h h^T] (the published GRIT code pairs A with H and B with D), so results differ from "
    "the notebook by design"
)
_UNSUPPORTED = ("neural reprojection", "rank adaptation", "curvature regularisers lambda_kfac/lambda_reproj")


@dataclass
class GRITConfig:
    """The published ``GRITConfig`` fields (published defaults), mapped onto :class:`GritConfig`.

    Used by GRIT: ``kfac_update_freq`` -> ``update_freq``; ``kfac_damping`` -> ``damping`` (now relative);
    ``max(kfac_update_freq, ng_warmup_steps)`` -> ``warmup_steps``; ``learning_rate`` -> the KL-clip's lr in
    :meth:`GRITManager.precondition_gradients`; ``ema_decay``, ``kl_clip``, ``backend`` (new, optional).
    ``lora_rank`` / ``lora_alpha`` / ``lora_dropout`` / ``lora_target_modules`` build a LoRA config via
    :meth:`lora_config`. The rest is accepted for compatibility and ignored.
    """

    model_id: str = "meta-llama/Llama-3.2-3B"
    batch_size: int = 8
    gradient_accumulation_steps: int = 4
    num_epochs: int = 3
    learning_rate: float = 2e-5
    precision: str = "bf16"
    max_length: int = 1024
    lora_rank: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.0
    lora_target_modules: list = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    kfac_update_freq: int = 50
    kfac_damping: float = 0.001
    kfac_min_samples: int = 64
    ng_warmup_steps: int = 0
    reprojection_freq: int = 50
    reprojection_k: int = 8
    grit_cov_update_freq: int = 15
    use_two_sided_reprojection: bool = True
    enable_rank_adaptation: bool = True
    rank_adaptation_threshold: float = 0.99
    min_lora_rank: int = 4
    regularizer_warmup_steps: int = 0
    reprojection_warmup_steps: int = 0
    rank_adaptation_start_step: int = 0
    lambda_kfac: float = 1e-5
    lambda_reproj: float = 1e-4
    # grit_kernels knobs without a published counterpart
    ema_decay: float = GritConfig.ema_decay
    kl_clip: float | None = GritConfig.kl_clip
    backend: str = GritConfig.backend

    def to_grit_config(self) -> GritConfig:
        return GritConfig(
            update_freq=int(self.kfac_update_freq),
            damping=float(self.kfac_damping),
            ema_decay=float(self.ema_decay),
            warmup_steps=max(int(self.kfac_update_freq), int(self.ng_warmup_steps or 0)),
            kl_clip=self.kl_clip,
            backend=self.backend,
        )

    def lora_config(self, **kwargs: Any):
        """A ``peft.LoraConfig`` with ``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules`` from
        these fields."""
        from peft import LoraConfig

        values = dict(
            r=self.lora_rank,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=list(self.lora_target_modules),
            task_type="CAUSAL_LM",
        )
        values.update(kwargs)
        return LoraConfig(**values)


def _effective_rank(mats: torch.Tensor) -> torch.Tensor:
    """exp(entropy of the normalised eigenvalues) of each symmetric matrix in ``mats [n, r, r]``."""
    eig = torch.linalg.eigvalsh(mats.double()).clamp_min(0)
    p = eig / eig.sum(dim=-1, keepdim=True).clamp_min(1e-300)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(dim=-1)
    return torch.where(eig.sum(dim=-1) > 0, entropy.exp(), torch.zeros_like(entropy))


class GRITManager:
    """The published ``GRITManager(model, config, device)`` on top of a :class:`GritPreconditioner`.

    Args:
        model: the PEFT LoRA model.
        config: a :class:`GRITConfig` (or a :class:`GritConfig`).
        device: accepted for compatibility; the factors live on the LoRA weights' device.

    Attributes:
        preconditioner: the :class:`GritPreconditioner` doing the work.
        optimized_modules: the preconditioned PEFT LoRA layers.
        global_step: optimizer steps seen (:meth:`step` calls).
    """

    def __init__(self, model: torch.nn.Module, config: Any = None, device: Any = None):
        config = GRITConfig() if config is None else config
        grit_config = config if isinstance(config, GritConfig) else config.to_grit_config()
        self.model, self.config, self.device = model, config, device
        self.preconditioner = GritPreconditioner(model, grit_config)
        self.optimized_modules = [m.layer for m in self.preconditioner.modules]
        self.global_step = 0
        self.loss_history: list[float] = []
        self._preconditioned = False
        self._driven_by_trainer = False
        warnings.warn(PAIRING_WARNING, UserWarning, stacklevel=2)
        if isinstance(config, GRITConfig) and (
            config.enable_rank_adaptation
            or config.reprojection_freq
            or config.lambda_kfac
            or config.lambda_reproj
        ):
            warnings.warn(
                f"grit_kernels.compat: {', '.join(_UNSUPPORTED)} are not implemented; "
                "those GRITConfig settings are ignored",
                UserWarning,
                stacklevel=2,
            )

    @property
    def factors_are_ready(self) -> bool:
        """Always True: the preconditioner itself passes gradients through until its factors are usable
        (warm-up) and decides everything else on the device, so ``precondition_gradients`` may run every
        step."""
        return True

    @property
    def a_covs(self) -> dict:
        """``{layer: H}``: the rank-space activation factor ``E[h h^T]`` of each module (views, r x r)."""
        return self._factor_views(FORWARD)

    @property
    def g_covs(self) -> dict:
        """``{layer: D}``: rank-space gradient factor ``E[delta delta^T]`` of each module (r x r views)."""
        return self._factor_views(BACKWARD)

    def _factor_views(self, which: int) -> dict:
        bank = self.preconditioner.bank
        return {
            m.layer: bank.factor[which, m.index, : bank.module_ranks[m.index], : bank.module_ranks[m.index]]
            for m in self.preconditioner.modules
        }

    def update_and_invert_factors(self) -> None:
        """Invert the current factors now (the preconditioner also inverts every ``kfac_update_freq``
        steps)."""
        pre = self.preconditioner
        if pre.step_count == 0:
            return  # nothing folded yet
        cfg = pre.config
        pre.bank.refresh_inverses(cfg.damping, cfg.eps_abs, cfg.retry_damping_factor, backend=pre.backend)

    def precondition_gradients(self) -> None:
        """Fold this step's statistics and precondition every LoRA ``.grad`` in place (once per step).

        A no-op when a :class:`GritTrainer` drives the manager (it preconditions inside ``optimizer.step``).
        """
        if self._driven_by_trainer or self._preconditioned:
            return
        lr = getattr(self.config, "learning_rate", None)
        self.preconditioner.step(lr=lr)
        self._preconditioned = True

    def step(self, loss: float | None = None) -> None:
        """Count an optimizer step. Statistics of a step that was not preconditioned are discarded."""
        self.global_step += 1
        if loss is not None:
            self.loss_history = (self.loss_history + [float(loss)])[-20:]
        if not self._driven_by_trainer and not self._preconditioned:
            self.preconditioner.discard_step()
        self._preconditioned = False

    def neural_reprojection(self) -> None:
        warnings.warn(
            "grit_kernels.compat: neural reprojection is not implemented; skipped", UserWarning, stacklevel=2
        )

    def log_final_effective_ranks(self) -> dict[str, tuple[float, float]]:
        """``{module name: (effective rank of H, effective rank of D)}`` (entropy-based; one host sync)."""
        bank = self.preconditioner.bank
        ranks = _effective_rank(bank.factor.reshape(-1, bank.max_rank, bank.max_rank)).view(2, -1).tolist()
        return {
            m.name: (ranks[FORWARD][m.index], ranks[BACKWARD][m.index]) for m in self.preconditioner.modules
        }

    def log_final_raw_ranks(self) -> dict[str, int]:
        """``{module name: LoRA rank}`` (no truncation is performed here)."""
        return {m.name: int(m.lora_A.shape[0]) for m in self.preconditioner.modules}

    def remove(self) -> None:
        """Restore plain PEFT layers."""
        self.preconditioner.remove()


class GritCallback(TrainerCallback):
    """The published callback: ticks :meth:`GRITManager.step` after each optimizer step."""

    def __init__(self, grit_manager: GRITManager):
        self.grit_manager = grit_manager

    def on_step_end(self, args, state, control, **kwargs):
        last = state.log_history[-1].get("loss") if state.log_history else None
        self.grit_manager.step(loss=last if isinstance(last, (int, float)) and math.isfinite(last) else None)


class GritTrainer(_GritTrainer):
    """The published ``GritTrainer(grit_manager, model=..., args=..., tokenizer=..., ...)`` signature.

    ``grit_manager``'s preconditioner is used (preconditioning runs inside ``optimizer.step``, the
    manager's own ``precondition_gradients`` becomes a no-op); ``tokenizer=`` is passed on as
    ``processing_class`` (transformers 5 removed ``tokenizer``); the published ``grit_config=`` keyword
    is accepted (a :class:`GRITConfig` is converted, a :class:`GritConfig` used as is).
    """

    def __init__(self, grit_manager: GRITManager | None = None, *args, grit_config: Any = None, **kwargs):
        if "tokenizer" in kwargs:
            tokenizer = kwargs.pop("tokenizer")
            kwargs.setdefault("processing_class", tokenizer)
        if isinstance(grit_config, GRITConfig):
            grit_config = grit_config.to_grit_config()
        if grit_manager is not None:
            super().__init__(*args, grit_preconditioner=grit_manager.preconditioner, **kwargs)
            grit_manager._driven_by_trainer = True
        else:
            super().__init__(*args, grit_config=grit_config, **kwargs)
        self.grit_manager = grit_manager


__all__ = ["PAIRING_WARNING", "GRITConfig", "GRITManager", "GritCallback", "GritTrainer"]
