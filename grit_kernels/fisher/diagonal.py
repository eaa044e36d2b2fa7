"""``GritConfig(fisher="diagonal")``: :class:`DiagonalFisher`.

``v <- beta v + (1 - beta) g^2`` per LoRA entry (``beta = ema_decay``, the first step initialises
``v = g^2``), ``g <- g / (v + lam)`` with ``lam = damping * mean(v) + eps_abs`` per tensor. ``g`` is the
gradient of the (mean) loss the optimizer sees, so ``v`` is the empirical, batch-size-dependent diagonal
Fisher (the Adam second moment without the square root). Grouped ``torch._foreach`` ops, no per-module loop.
"""

from __future__ import annotations

import torch

from ..distributed import all_reduce_statistics
from .base import CurvatureModel, _kl_clip_


class DiagonalFisher(CurvatureModel):
    """Diagonal natural gradient (see :mod:`grit_kernels.fisher.diagonal`). ``second_moment``: one tensor per LoRA
    parameter, in :meth:`GritPreconditioner.parameters` order (``None`` before the first step)."""

    def __init__(self, preconditioner):
        self.pre = preconditioner
        self.second_moment: list[torch.Tensor] | None = None

    def step(self, lr=None, loss_scale=None) -> None:
        pre, cfg = self.pre, self.pre.config
        all_reduce_statistics(pre.bank)  # DDP: the bank (logging) as in rank-space K-FAC; grads are already reduced
        pre.bank.fold(cfg.ema_decay, loss_scale=loss_scale, backend=pre.backend)
        params = pre.parameters()
        if any(p.grad is None for p in params):
            pre.step_count += 1
            return
        grads = [p.grad for p in params]
        squares = torch._foreach_mul(grads, grads)
        squares = [s.float() for s in squares]
        if self.second_moment is None or any(v.shape != s.shape for v, s in zip(self.second_moment, squares)):
            self.second_moment = squares
        else:
            torch._foreach_mul_(self.second_moment, cfg.ema_decay)
            torch._foreach_add_(self.second_moment, squares, alpha=1.0 - cfg.ema_decay)
        if pre.step_count >= cfg.warmup_steps:
            means = torch.stack([v.mean() for v in self.second_moment])
            lam = cfg.damping * means + cfg.eps_abs
            raw = [g.clone() for g in grads] if cfg.kl_clip is not None and lr is not None else None
            denominators = torch._foreach_add(self.second_moment, list(lam.unbind()))
            torch._foreach_div_(grads, [d.to(g.dtype) for d, g in zip(denominators, grads)])
            if raw is not None:
                _kl_clip_(grads, raw, cfg.kl_clip, lr)
        pre.step_count += 1

    def on_resize(self, indices) -> None:
        """Ranks changed: the per-entry moments no longer match; start them afresh."""
        self.second_moment = None

    def state_dict(self) -> dict:
        """``{"second_moment": [tensor per LoRA parameter] | None}`` (clones)."""
        moments = None if self.second_moment is None else [v.clone() for v in self.second_moment]
        return {"second_moment": moments}

    def load_state_dict(self, state: dict) -> None:
        """Restore the moments onto this model's device (shapes must match the LoRA parameters)."""
        moments = state["second_moment"]
        if moments is None:
            self.second_moment = None
            return
        params = self.pre.parameters()
        shapes = [tuple(p.shape) for p in params]
        saved = [tuple(v.shape) for v in moments]
        if saved != shapes:
            raise ValueError(
                f"DiagonalFisher.load_state_dict: saved moment shapes {saved[:4]}... ({len(saved)} tensors) do not "
                f"match this model's LoRA parameters {shapes[:4]}... ({len(shapes)})"
            )
        self.second_moment = [v.to(device=p.device, dtype=torch.float32, copy=True) for v, p in zip(moments, params)]
