"""GritOptimizer: wraps any torch optimizer; preconditions LoRA gradients before its step.

It shares the wrapped optimizer's ``param_groups`` and ``state`` so LR schedulers, gradient
clipping helpers and checkpointing see the inner optimizer unchanged.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from . import fsdp, ops
from .interface import Preconditioner


class GritOptimizer(torch.optim.Optimizer):
    """``GritOptimizer(torch.optim.AdamW(model.parameters(), lr=2e-4), preconditioner)``.

    ``step()``: (1) if ``config.nonfinite_grads != "ignore"``, check the LoRA gradients (one
    device->host scalar read): NaN/Inf anywhere, or all exactly zero (no supervised token, e.g. every
    label masked), makes the step either skipped -- statistics discarded, adapters and optimizer
    state untouched, ``skipped_steps`` incremented, a warning -- or raise ``FloatingPointError``; (2) ``preconditioner.step``
    (``preconditioner.update_factors`` for an optimizer that uses the factors itself: :class:`~grit_kernels.EigenAdamW`);
    (3) the inner optimizer's step. ``zero_grad()`` also discards statistics of a step that was never
    taken (for example one skipped by ``GradScaler``).

    Args:
        optimizer: any torch optimizer (AdamW, SGD, bitsandbytes 8-bit, ...) over the model's params.
        preconditioner: the :class:`GritPreconditioner` of the same model.
        grad_scaler: optional ``torch.amp.GradScaler`` used for the backward passes; its current scale
            is divided out of the backward factor (read on the device).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        preconditioner: Preconditioner,
        grad_scaler: Any | None = None,
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"GritOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(preconditioner, Preconditioner):
            raise TypeError(f"expected a GritPreconditioner, got {type(preconditioner).__name__}")
        if getattr(optimizer, "uses_grit_factors", False) and optimizer.preconditioner is not preconditioner:
            raise ValueError(f"{type(optimizer).__name__} was built with another GritPreconditioner than this one")
        preconditioner.parameters()  # re-reads the LoRA weights if fully_shard replaced them since
        owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [m.name for m in preconditioner.modules if id(m.lora_A) not in owned or id(m.lora_B) not in owned]
        if missing:
            raise ValueError(
                f"{len(missing)} preconditioned LoRA modules are not in the optimizer (e.g. {missing[:3]}); "
                "build the optimizer over model.parameters()"
            )
        self.optimizer = optimizer
        self.preconditioner = preconditioner
        self.grad_scaler = grad_scaler
        self.skipped_steps = 0
        # share, do not copy: schedulers and checkpoints act on the inner optimizer
        self.defaults = optimizer.defaults
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value):
        self.optimizer.state = value

    def _gradient_problem(self) -> str | None:
        """One device->host read: why this step must not be taken, or None."""
        pre = self.preconditioner
        grads = [p.grad for p in pre.parameters() if p.grad is not None]
        if not grads:
            return "no LoRA parameter has a gradient"
        if pre.sharded_layout is not None:  # FSDP2: the shards' sums, all-reduced, so every rank takes the same decision
            local = ops.sum_of_squares([fsdp.local(g) for g in grads], backend=pre.backend)
            total = float(fsdp.global_sum_of_squares(local, pre.sharded_layout))  # the one host read
        else:
            total = float(ops.sum_of_squares(grads, backend=pre.backend))  # the one host read
        if not math.isfinite(total):
            return "NaN/Inf in LoRA gradients"
        return "all LoRA gradients are zero" if total == 0 else None

    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.preconditioner.check_active_adapter()  # a switched adapter is not a "no gradient" step
        policy = self.preconditioner.config.nonfinite_grads
        problem = self._gradient_problem() if policy != "ignore" else None
        if problem is not None:
            self.preconditioner.discard_step()
            hint = (
                "a batch whose labels are all -100 gives a NaN loss and zero gradients under mean reduction; "
                "an fp16 overflow gives Inf"
            )
            if policy == "raise":
                raise FloatingPointError(
                    f"GritOptimizer: {problem}; the step was not taken and its statistics were discarded ({hint})"
                )
            self.skipped_steps += 1
            warnings.warn(
                f"GritOptimizer: {problem}, step skipped ({self.skipped_steps} so far); adapters, optimizer state "
                f"and factors unchanged ({hint})",
                RuntimeWarning,
                stacklevel=2,
            )
            return loss
        pre = self.preconditioner
        clip = pre.config.kl_clip is not None  # on the step taken: after momentum, with each group's lr
        before = pre.snapshot_adapters() if clip else None
        if getattr(self.optimizer, "uses_grit_factors", False):  # EigenAdamW: it uses the factors itself
            if pre.sharded_layout is not None:
                raise NotImplementedError(
                    f"{type(self.optimizer).__name__} rotates whole lora_A / lora_B tensors into the factors' eigenbasis; "
                    "it does not run under FSDP2 (sharded rows). Use the default GritOptimizer over AdamW there, or DDP"
                )
            pre.update_factors(loss_scale=self._loss_scale())
        else:
            pre.step(loss_scale=self._loss_scale())
        self.optimizer.step()
        if clip:
            pre.clip_update_(before)
        if getattr(self.preconditioner, "rank_adapter", None) is not None:  # config.reprojection
            self.preconditioner.rank_adapter.after_step(self.optimizer)
        return loss

    def _loss_scale(self) -> torch.Tensor | None:
        """The GradScaler's current scale as a device tensor (no sync), or None without AMP scaling."""
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return None
        return scaler._get_scale_async() if hasattr(scaler, "_get_scale_async") else scaler._scale

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.preconditioner.discard_step()
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "preconditioner": self.preconditioner.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.preconditioner.load_state_dict(state_dict["preconditioner"])

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def __repr__(self) -> str:
        return f"GritOptimizer({self.optimizer.__class__.__name__}, {self.preconditioner!r})"
