"""The preconditioner contract: what :class:`~grit_kernels.GritOptimizer`, :class:`~grit_kernels.GritTrainer`
and :func:`~grit_kernels.compress_adapter` use of a preconditioner, and nothing else.

Two classes implement it: :class:`~grit_kernels.GritPreconditioner` (one bank over the model's LoRA layers)
and :class:`~grit_kernels.vlm.GroupedGritPreconditioner` (one ``GritPreconditioner`` per modality group,
composed). Code that drives a preconditioner should use only the members listed here; code that needs one
bank's internals (:class:`~grit_kernels.EigenAdamW`, the Fisher variants) needs a ``GritPreconditioner``.

Data attributes are declared as annotations (an implementation may store them or compute them as
properties); methods are abstract, so an implementation that forgets one cannot be instantiated.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import nn


class Preconditioner(abc.ABC):
    """A rank-space K-FAC preconditioner as its users see it.

    Attributes:
        config: the :class:`~grit_kernels.GritConfig` the optimizer reads (``nonfinite_grads``, ``kl_clip``,
            ``fisher``, ...); for a grouped preconditioner, the shared base config.
        modules: the preconditioned :class:`~grit_kernels.preconditioner.GritModule` s (their ``lora_A`` /
            ``lora_B`` must be owned by the wrapped optimizer).
        skipped: ``{layer name: reason}`` of LoRA layers left unpreconditioned.
        bank: a :class:`~grit_kernels.bank.FactorBank` whose ``device`` and ``refresh_count`` stand for the
            preconditioner's (what the Trainer logs and loads checkpoints onto). Not the place to read
            factors of a grouped preconditioner: each group has its own bank.
        backend: the resolved op backend (``"torch"``, ``"triton"``, ...).
        step_count: optimizer steps taken so far (host integer).
        num_modules: ``len(modules)``.
        rank_adapter: ``None``, or an object with ``after_step(optimizer)`` that GritOptimizer calls after the
            inner step (periodic reprojection / rank schedule).
        sharded_layout: ``None``, or the row layout of FSDP2-sharded LoRA weights (:mod:`grit_kernels.fsdp`)
            that the optimizer's non-finite check and the Trainer's gradient norms reduce over.
    """

    config: Any
    modules: list
    skipped: dict[str, str]
    bank: Any
    backend: str
    step_count: int
    num_modules: int
    rank_adapter: Any
    sharded_layout: Any

    # ------------------------------------------------------------------ the step (GritOptimizer)
    @abc.abstractmethod
    def parameters(self) -> list[nn.Parameter]:
        """Every preconditioned adapter weight, ``lora_A`` then ``lora_B`` per module, in a fixed order."""

    @abc.abstractmethod
    def check_active_adapter(self) -> None:
        """Raise ``RuntimeError`` if the model's active PEFT adapter is not the one preconditioned."""

    @abc.abstractmethod
    def step(
        self, lr: float | torch.Tensor | None = None, loss_scale: float | torch.Tensor | None = None
    ) -> None:
        """Fold this step's statistics, refresh inverses when due, precondition every ``.grad`` in place."""

    @abc.abstractmethod
    def update_factors(self, loss_scale: float | torch.Tensor | None = None) -> None:
        """Fold this step's statistics only (for optimizers that use the factors themselves)."""

    @abc.abstractmethod
    def discard_step(self) -> None:
        """Drop the statistics of a step that will not be taken."""

    @abc.abstractmethod
    def snapshot_adapters(self) -> list[torch.Tensor]:
        """Copies of :meth:`parameters` before the inner optimizer step (for :meth:`clip_update_`)."""

    @abc.abstractmethod
    def clip_update_(self, before: list[torch.Tensor]) -> None:
        """KL-clip the step just taken, given :meth:`snapshot_adapters`' copies."""

    # ------------------------------------------------------------------ observability (GritTrainer)
    @property
    @abc.abstractmethod
    def preconditioning_active(self) -> bool:
        """Whether the last step changed gradients (one host sync)."""

    @abc.abstractmethod
    def curvature_summary(self) -> dict[str, torch.Tensor]:
        """Device tensors: ``damping_mean``, ``trace_forward_mean``, ``trace_backward_mean``,
        ``condition_max``, ``inverse_failures``."""

    def group_summaries(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{group: curvature_summary()}`` of the parts logged separately (``grit/<group>/...``); none here."""
        return {}

    # ------------------------------------------------------------------ state and lifetime
    @abc.abstractmethod
    def state_dict(self) -> dict:
        """Everything a resumed run needs."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output (same modules)."""

    @abc.abstractmethod
    def remove(self) -> None:
        """Restore plain PEFT layers; the preconditioner cannot be used afterwards."""


__all__ = ["Preconditioner"]
