"""The optimizer side of the GRIT Trainer: :class:`TrainerGritOptimizer` (the GritOptimizer a GRIT trainer
builds: grad-norm ratio at logging steps, plain inner-optimizer checkpoints), the choice between EigenAdamW and
the preconditioned inner optimizer (``grit_optimizer``, ``grit_kl_clip``), the LoRA+ group split and the
EigenAdamW swap applied to the optimizer ``Trainer.create_optimizer`` built, and finding a GritOptimizer
under accelerate's wrappers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import fsdp
from .config import GritConfig
from .optim import GritOptimizer
from .preconditioner import GritPreconditioner


def _total_norm(params: list[torch.nn.Parameter], layout=None) -> torch.Tensor:
    grads = [fsdp.local(p.grad) for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if layout is not None:  # FSDP2: the shards' sums of squares, all-reduced (logging steps only)
        local = torch.stack(torch._foreach_norm(grads)).double().square().sum()
        return fsdp.global_sum_of_squares(local, layout).sqrt().float()
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


class TrainerGritOptimizer(GritOptimizer):
    """The :class:`GritOptimizer` a GRIT trainer builds. Adds, for the Trainer:

    * on request (``measure_grad_norm_ratio = True``, set for logging steps only) the device tensor
      ``grad_norm_ratio = ||preconditioned LoRA grads|| / ||LoRA grads entering step()||``;
    * checkpoint format: ``state_dict()`` is the *inner* optimizer's (plain, loadable without GRIT);
      the preconditioner is saved separately as ``grit_preconditioner.pt``.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, preconditioner: GritPreconditioner, grad_scaler: Any = None
    ):
        super().__init__(optimizer, preconditioner, grad_scaler=grad_scaler)
        self.measure_grad_norm_ratio = False
        self.grad_norm_ratio: torch.Tensor | None = None
        self.grad_norm_ratio_step = -1  #: preconditioner.step_count of the measured step

    def step(self, closure: Callable | None = None):
        pre = self.preconditioner
        measure, self.measure_grad_norm_ratio = self.measure_grad_norm_ratio, False
        params = pre.parameters()
        raw = _total_norm(params, pre.sharded_layout) if measure else None
        taken_before, skipped_before = pre.step_count, self.skipped_steps
        loss = super().step(closure)
        if measure and self.skipped_steps == skipped_before:
            after = _total_norm(params, pre.sharded_layout)
            self.grad_norm_ratio = torch.where(raw > 0, after / raw.clamp_min(1e-30), torch.ones_like(raw))
            self.grad_norm_ratio_step = taken_before
        return loss

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) == {"optimizer", "preconditioner"}:  # a GritOptimizer.state_dict()
            super().load_state_dict(state_dict)
        else:
            self.optimizer.load_state_dict(state_dict)


def check_eigen_config(fisher: str, reprojection: str, prefix: str = "") -> None:
    """``ValueError`` when GRIT's options need ``"wrap"`` rather than EigenAdamW (``prefix``: how the caller
    spells the options, ``"grit_"`` for GritTrainingArguments)."""
    if fisher != "kfac" or reprojection != "off":
        raise ValueError(
            f"{prefix}optimizer='eigen_adamw' runs in the eigenbasis of the rank-space factors: it needs "
            f"{prefix}fisher='kfac' and {prefix}reprojection='off', got {fisher!r}, {reprojection!r}; "
            f"set {prefix}optimizer='wrap' to precondition the inner optimizer's gradients instead"
        )


def choose_optimizer(requested: str, fisher: str, reprojection: str, grouped: bool = False,
                     sharded: bool = False) -> tuple[str, str]:
    """``(optimizer, reason)``: ``requested`` itself unless it is ``"auto"``, which is ``"eigen_adamw"`` where
    EigenAdamW runs and ``"wrap"`` where it does not (the reason says why)."""
    if requested != "auto":
        return requested, "requested"
    blockers = [(fisher != "kfac", f"fisher={fisher!r}"), (reprojection != "off", f"reprojection={reprojection!r}"),
                (grouped, "modality groups (GroupedGritPreconditioner)"), (sharded, "FSDP2")]
    why = [what for bad, what in blockers if bad]
    if why:
        return "wrap", "EigenAdamW does not run with " + ", ".join(why)
    return "eigen_adamw", "the best-measured setting"


def resolve_kl_clip(value, optimizer: str) -> float | None:
    """``grit_kl_clip`` as a number or ``None``: ``"auto"`` is ``None`` with ``grit_optimizer="eigen_adamw"``
    and :class:`GritConfig`'s default with ``"wrap"``; strings (from the command line) are parsed; numbers
    and ``None`` pass through (GritConfig validates them)."""
    if not isinstance(value, str):
        return value
    text = value.strip().lower()
    if text == "auto":
        return None if optimizer == "eigen_adamw" else GritConfig().kl_clip
    if text == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"GritTrainingArguments.grit_kl_clip must be a number > 0, 'none' or 'auto', got {value!r}") from None


def _split_loraplus_groups(optimizer: torch.optim.Optimizer, model: torch.nn.Module, ratio: float) -> None:
    """LoRA+ in place, before any step: every parameter group (Trainer's weight decay on / off) gives its lora_B
    parameters to a new group at ``ratio x`` its lr (marked ``grit_loraplus``, so a second call is a no-op);
    groups left empty are dropped."""
    if any(g.get("grit_loraplus") for g in optimizer.param_groups):
        return
    lora_b = {id(p) for n, p in model.named_parameters() if ".lora_B." in n}
    for group in list(optimizer.param_groups):
        moved = [p for p in group["params"] if id(p) in lora_b]
        if moved:
            group["params"] = [p for p in group["params"] if id(p) not in lora_b]
            optimizer.add_param_group({"params": moved, "lr": group["lr"] * ratio,
                                       "weight_decay": group["weight_decay"], "grit_loraplus": True})
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]


def _eigen_adamw_over(
    optimizer: torch.optim.Optimizer, pre: GritPreconditioner, args
) -> torch.optim.Optimizer:
    """:class:`~grit_kernels.EigenAdamW` over the parameter groups (lr, weight decay) of the optimizer Trainer
    built, with Trainer's betas and eps (``grit_optimizer="eigen_adamw"``)."""
    from .eigen_adam import EigenAdamW

    keys = ("params", "lr", "weight_decay", "grit_loraplus")
    groups = [{k: g[k] for k in keys if k in g} for g in optimizer.param_groups]
    return EigenAdamW(groups, pre, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                      eps=args.adam_epsilon, weight_decay=args.weight_decay)


def _find_grit_optimizer(optimizer: Any) -> GritOptimizer | None:
    """The GritOptimizer inside ``optimizer`` (itself, or under accelerate / ``.optimizer`` wrappers)."""
    for _ in range(8):
        if isinstance(optimizer, GritOptimizer):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
        if optimizer is None:
            return None
    return None


def _unwrap_accelerated(optimizer: Any) -> Any:
    try:
        from accelerate.optimizer import AcceleratedOptimizer
    except ImportError:  # pragma: no cover
        return optimizer
    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer
