"""Fisher options beside rank-space K-FAC: ``GritConfig(fisher="diagonal" | "kfac_full")``.

``"kfac"`` (the default) is :class:`~grit_kernels.GritPreconditioner`'s own step. The two options here
take over its ``step()`` (it dispatches to ``fisher.step``), keep its warm-up and the rank-space bank
(folded every step, so logging and ``curvature_summary`` stay meaningful). KL-clip: under
:class:`~grit_kernels.GritOptimizer` (which calls ``step()`` without ``lr``) the clip is the one on the step
taken, with the rank-space quadratic form (``GritPreconditioner.clip_update_``); the gradient-level clip here
runs only when ``step(lr=...)`` is called directly:

* :class:`DiagonalFisher`: ``v <- beta v + (1 - beta) g^2`` per LoRA entry (``beta = ema_decay``, the
  first step initialises ``v = g^2``), ``g <- g / (v + lam)`` with ``lam = damping * mean(v) + eps_abs``
  per tensor. ``g`` is the gradient of the (mean) loss the optimizer sees, so ``v`` is the empirical,
  batch-size-dependent diagonal Fisher (the Adam second moment without the square root). Grouped
  ``torch._foreach`` ops, no per-module loop.
* :class:`FullKFAC`: the textbook K-FAC of the LoRA parameters, with the large factors kept:
  ``grad_A <- (D + lam I)^-1 grad_A (X + lam I)^-1`` (``X = E[x x^T]``, ``d_in x d_in``, over the rows that
  carry gradient) and ``grad_B <- (G + lam I)^-1 grad_B (H + lam I)^-1`` (``G = E[g g^T]``, ``d_out x d_out``,
  ``g = dL/dy`` scaled like ``D``: ``rows * sum g g^T / loss_scale^2``). With ``X = G = I`` it reduces to
  rank-space K-FAC. A reference for small models: per-module Python loops and forward/tensor hooks,
  refused above ``kfac_full_max_bytes``. Single process (no DDP reduction of ``X`` and ``G``).

Both options' state (the diagonal moments; the ``d x d`` sums, factors and inverses) is part of
``GritPreconditioner.state_dict()`` under ``"fisher_state"``, with the kind under ``"fisher"``: a resumed
run continues bit-for-bit.
"""

from __future__ import annotations

import torch

from .bank import BACKWARD, FORWARD
from .layers import ZERO_ROW_TOLERANCE


def make_fisher(preconditioner):
    """The step implementation for ``preconditioner.config.fisher`` (``None`` for ``"kfac"``)."""
    kind = preconditioner.config.fisher
    if kind == "kfac":
        return None
    if kind == "diagonal":
        return DiagonalFisher(preconditioner)
    if kind == "kfac_full":
        return FullKFAC(preconditioner)
    raise ValueError(f"unknown fisher {kind!r}")


def _kl_clip_(grads: list[torch.Tensor], raw: list[torch.Tensor], kl_clip: float | None, lr) -> None:
    """Scale the preconditioned ``grads`` by ``min(1, sqrt(kl_clip / (lr^2 |sum g_pre . g|)))`` (device)."""
    if kl_clip is None or lr is None or not grads:
        return
    dot = torch.stack([(g * r).sum() for g, r in zip(grads, raw)]).sum()
    quad = (dot.abs() * lr**2).clamp_min(torch.finfo(torch.float32).tiny)
    torch._foreach_mul_(grads, torch.sqrt(kl_clip / quad).clamp(max=1.0))


class DiagonalFisher:
    """Diagonal natural gradient (see the module docstring). ``second_moment``: one tensor per LoRA
    parameter, in :meth:`GritPreconditioner.parameters` order (``None`` before the first step)."""

    def __init__(self, preconditioner):
        self.pre = preconditioner
        self.second_moment: list[torch.Tensor] | None = None

    def step(self, lr=None, loss_scale=None) -> None:
        pre, cfg = self.pre, self.pre.config
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


class FullKFAC:
    """Full K-FAC with ``d x d`` factors (see the module docstring).

    Attributes (per module, bank order): ``input_sum [d_in, d_in]``, ``output_sum [d_out, d_out]``,
    ``rows``; EMA factors ``input_factor`` (``X``) and ``output_factor`` (``G``); inverses of the
    damped factors ``input_inverse``, ``output_inverse`` (identity until the first refresh).
    """

    def __init__(self, preconditioner):
        self.pre = pre = preconditioner
        cfg = pre.config
        dims = [(m.lora_A.shape[1], m.lora_B.shape[0]) for m in pre.modules]
        need = 3 * 4 * sum(d_in * d_in + d_out * d_out for d_in, d_out in dims)
        if need > cfg.kfac_full_max_bytes:
            raise ValueError(
                f"fisher='kfac_full' would need {need / 2**20:.1f} MiB for the d x d factors of "
                f"{len(dims)} modules (sum, EMA and inverse in fp32), above kfac_full_max_bytes="
                f"{cfg.kfac_full_max_bytes / 2**20:.1f} MiB; it is a reference for small models -- use "
                "fisher='kfac' or raise the limit"
            )
        device = pre.bank.device
        self.memory_bytes = need
        self.input_sum = [torch.zeros(d, d, device=device) for d, _ in dims]
        self.output_sum = [torch.zeros(d, d, device=device) for _, d in dims]
        self.rows = torch.zeros(len(dims), device=device)
        self.input_factor = [torch.zeros_like(t) for t in self.input_sum]
        self.output_factor = [torch.zeros_like(t) for t in self.output_sum]
        self.input_inverse = [torch.eye(d, device=device) for d, _ in dims]
        self.output_inverse = [torch.eye(d, device=device) for _, d in dims]
        self.initialized = False
        self._inputs: dict[int, torch.Tensor] = {}
        self._handles = []
        for m in pre.modules:
            adapter = m.layer.active_adapters[0]
            self._handles.append(m.layer.lora_A[adapter].register_forward_hook(self._input_hook(m.index)))
            self._handles.append(m.layer.lora_B[adapter].register_forward_hook(self._output_hook(m)))

    # ------------------------------------------------------------------ capture
    def _input_hook(self, index: int):
        def hook(module, args, output):
            if torch.is_grad_enabled() and output.requires_grad:
                self._inputs[index] = args[0].detach()

        return hook

    def _output_hook(self, m):
        def hook(module, args, output):
            if not (torch.is_grad_enabled() and output.requires_grad):
                return
            x = self._inputs.pop(m.index, None)
            if x is None:
                return
            scaling = float(m.layer.scaling[m.layer.active_adapters[0]])
            output.register_hook(lambda grad: self._capture(m.index, x, grad / scaling))

        return hook

    def _capture(self, index: int, x: torch.Tensor, g: torch.Tensor) -> None:
        """``g = dL/dy [..., d_out]`` of the layer output; ``x`` its LoRA input (after dropout)."""
        x, g = x.reshape(-1, x.shape[-1]).float(), g.reshape(-1, g.shape[-1]).float()
        row_max = g.abs().amax(dim=1)
        carries = row_max > ZERO_ROW_TOLERANCE * row_max.amax()
        x = x * carries[:, None]
        self.input_sum[index].addmm_(x.T, x)
        self.output_sum[index].addmm_(g.T, g)
        self.rows[index] += carries.sum()

    # ------------------------------------------------------------------ the step
    def step(self, lr=None, loss_scale=None) -> None:
        pre, cfg = self.pre, self.pre.config
        pre.bank.fold(cfg.ema_decay, loss_scale=loss_scale, backend=pre.backend)
        self._fold(cfg.ema_decay, loss_scale)
        since = pre.step_count - cfg.warmup_steps
        if since >= 0:
            if since % cfg.update_freq == 0:
                pre.bank.refresh_inverses(
                    cfg.damping, cfg.eps_abs, cfg.retry_damping_factor, backend=pre.backend
                )
                self._refresh(cfg.damping, cfg.eps_abs)
            self._precondition(lr)
        pre.step_count += 1

    def _fold(self, decay: float, loss_scale) -> None:
        scale2 = 1.0 if loss_scale is None else torch.as_tensor(loss_scale, dtype=torch.float32) ** 2
        for i in range(len(self.input_sum)):
            rows = self.rows[i]
            if bool(rows > 0):
                x_step = self.input_sum[i] / rows
                g_step = self.output_sum[i] * rows / scale2
                if bool(torch.isfinite(x_step).all() & torch.isfinite(g_step).all()):
                    for factor, step in ((self.input_factor[i], x_step), (self.output_factor[i], g_step)):
                        if self.initialized:
                            factor.mul_(decay).add_(step, alpha=1.0 - decay)
                        else:
                            factor.copy_(step)
            self.input_sum[i].zero_()
            self.output_sum[i].zero_()
        self.initialized = self.initialized or bool(self.rows.sum() > 0)
        self.rows.zero_()

    @staticmethod
    def _damped_inverse(factor: torch.Tensor, damping: float, eps_abs: float) -> torch.Tensor:
        d = factor.shape[0]
        c = factor.double()
        lam = damping * torch.trace(c) / d + eps_abs
        eye = torch.eye(d, dtype=torch.float64, device=c.device)
        chol, info = torch.linalg.cholesky_ex(c + lam * eye)
        if int(info) != 0:  # a reference: a host sync is fine here
            chol = torch.linalg.cholesky(c + (100.0 * lam + 1e-12) * eye)
        return torch.cholesky_inverse(chol).float()

    def _refresh(self, damping: float, eps_abs: float) -> None:
        if not self.initialized:
            return
        for i in range(len(self.input_factor)):
            self.input_inverse[i] = self._damped_inverse(self.input_factor[i], damping, eps_abs)
            self.output_inverse[i] = self._damped_inverse(self.output_factor[i], damping, eps_abs)

    def _precondition(self, lr) -> None:
        pre, bank = self.pre, self.pre.bank
        grads, raws = [], []
        for m in pre.modules:
            ga, gb = m.lora_A.grad, m.lora_B.grad
            if ga is None or gb is None:
                continue
            r = bank.module_ranks[m.index]
            inv_d = bank.inverse[BACKWARD, m.index, :r, :r]
            inv_h = bank.inverse[FORWARD, m.index, :r, :r]
            if pre.config.kl_clip is not None and lr is not None:
                raws += [ga.clone(), gb.clone()]
            ga.copy_(inv_d @ ga.float() @ self.input_inverse[m.index])
            gb.copy_(self.output_inverse[m.index] @ gb.float() @ inv_h)
            grads += [ga, gb]
        if raws:
            _kl_clip_(grads, raws, pre.config.kl_clip, lr)

    _STATE_LISTS = ("input_sum", "output_sum", "input_factor", "output_factor", "input_inverse", "output_inverse")

    def state_dict(self) -> dict:
        """The ``d x d`` sums, EMA factors and inverses (lists in bank order), ``rows`` and ``initialized``."""
        state = {name: [t.clone() for t in getattr(self, name)] for name in self._STATE_LISTS}
        state.update(rows=self.rows.clone(), initialized=self.initialized)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Copy a saved state onto this model's device (every factor's shape must match)."""
        for name in self._STATE_LISTS:
            mine, saved = getattr(self, name), state[name]
            shapes = [tuple(t.shape) for t in saved]
            if shapes != [tuple(t.shape) for t in mine]:
                raise ValueError(
                    f"FullKFAC.load_state_dict: saved {name} shapes {shapes[:4]}... ({len(shapes)} modules) do not "
                    f"match this model's {[tuple(t.shape) for t in mine][:4]}... ({len(mine)})"
                )
        for name in self._STATE_LISTS:
            for t, v in zip(getattr(self, name), state[name]):
                t.copy_(v)
        self.rows.copy_(state["rows"])
        self.initialized = bool(state["initialized"])

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
