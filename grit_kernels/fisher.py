"""Fisher options beside rank-space K-FAC: ``GritConfig(fisher="diagonal" | "kfac_full" | "kfac_lowrank")``.

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
  refused above ``kfac_full_max_bytes``. Under DDP the sums of ``X`` and ``G`` are all-reduced with the bank.
* :class:`LowRankKFAC`: :class:`FullKFAC`'s step with each large factor kept as a *streaming Nystrom
  sketch*: for a fixed orthonormal test matrix ``V [d, m]`` (one per dimension, seeded), the EMA of
  ``Y = C V`` (linear in ``C``, so the EMA of the per-step sketches is the sketch of the EMA factor) and of
  ``tr C``. At a refresh, the top ``k`` eigenpairs ``(s, U)`` of the Nystrom approximation
  ``Y (V^T Y)^+ Y^T`` and the mean ``s_rest = (tr C - sum s) / (d - k)`` of the rest of the spectrum
  give ``C ~ U diag(s) U^T + s_rest (I - U U^T)``, inverted in closed form:
  ``(C + lam I)^-1 = (I - U U^T) / (s_rest + lam) + U diag(1 / (s + lam)) U^T``. Memory and work are
  ``O(d m)`` per factor (capture ``2 N d m`` flops), never ``d x d``: it runs at Llama-3-8B shapes.
  ``k = large_factor_rank``, ``m = large_factor_sketch`` (both cut to ``d - 1`` and ``d``); with
  ``m = d`` the sketch is exact and ``k = d - 1`` gives :class:`FullKFAC`'s step. Same damping, clip, capture
  and DDP reduction as :class:`FullKFAC`; one capture call per module, the fold, refresh and preconditioning
  batched over the modules of one width.

Capture: on PEFT's path by hooks on ``lora_A`` (input ``x``) and ``lora_B`` (output gradient); under
:func:`grit_kernels.fuse` inside the fused blocks' backward, which have both (``capture_output_gradient``).

Memory under activation checkpointing: both large-factor options need each LoRA layer's input ``x`` in backward.
Without checkpointing (and under reentrant checkpointing) they hold it from forward to backward, as autograd
does anyway; under non-reentrant ``torch.utils.checkpoint`` (transformers' default) they hold nothing after
forward and take ``x`` from the recomputation in backward, so checkpointing keeps its savings.

Every option's state (the diagonal moments; the ``d x d`` or sketched sums, factors and inverses) is part of
``GritPreconditioner.state_dict()`` under ``"fisher_state"``, with the kind under ``"fisher"``: a resumed
run continues bit-for-bit.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .bank import BACKWARD, FORWARD
from .distributed import all_reduce_statistics, world_size
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
    if kind == "kfac_lowrank":
        return LowRankKFAC(preconditioner)
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


class _LargeFactorKFAC:
    """What :class:`FullKFAC` and :class:`LowRankKFAC` share: capture of each LoRA layer's input ``x`` (forward
    hook on ``lora_A``) and output gradient ``g`` (tensor hook on ``lora_B``'s output, divided by the LoRA
    scale), the fold of per-step sums into EMA state, the step, and the state dict. A subclass says what it
    sums (``_accumulate``), how its state folds (``_INPUT_FOLDS``/``_OUTPUT_FOLDS``: ``(ema, sum)`` attribute
    pairs, lists in bank order; input sums are divided by the rows, output sums multiplied by
    ``rows / loss_scale^2`` as the bank does for ``D``), how it refreshes (``_refresh``) and how it applies
    the large factors' inverses (``_input_side``, ``_output_side`` in the per-module ``_precondition``; a
    subclass may replace ``_fold`` and ``_precondition`` by batched ones, as :class:`LowRankKFAC` does)."""

    _INPUT_FOLDS: tuple[tuple[str, str], ...] = ()
    _OUTPUT_FOLDS: tuple[tuple[str, str], ...] = ()
    _STATE_LISTS: tuple[str, ...] = ()

    def __init__(self, preconditioner):
        self.pre = preconditioner
        self.rows = torch.zeros(len(preconditioner.modules), device=preconditioner.bank.device)
        self.initialized = False
        self._inputs: dict[int, torch.Tensor | None] = {}  # module -> x from its forward (None: recomputed later)
        self._meeting: dict[tuple[int, int], tuple] = {}  # (backward, module) -> the first of x / (g, weight)
        self._handles = []

    def _register_hooks(self) -> None:
        """Hooks on PEFT's ``lora_A`` / ``lora_B`` (PEFT's path), and the module's entry in its layer's GRIT state
        that the fused blocks of :func:`grit_kernels.fuse` look up (they call :meth:`capture_output_gradient`)."""
        for m in self.pre.modules:
            adapter = m.layer.active_adapters[0]
            self._handles.append(m.layer.lora_A[adapter].register_forward_hook(self._input_hook(m.index)))
            self._handles.append(m.layer.lora_B[adapter].register_forward_hook(self._output_hook(m)))
            m.layer._grit_state["large_factors"] = (self, m.index)

    def capture_output_gradient(self, index: int, x: torch.Tensor, grad: torch.Tensor) -> None:
        """Add module ``index``'s sums from its LoRA input ``x [..., d_in]`` and the gradient of its whole
        output ``grad = dL/dy [..., d_out]`` (what a fused block has in backward; PEFT's path gets these from
        the hooks)."""
        self._capture(index, x, grad, 1.0)

    @staticmethod
    def _dims(pre) -> list[tuple[int, int]]:
        return [(m.lora_A.shape[1], m.lora_B.shape[0]) for m in pre.modules]

    # ------------------------------------------------------------------ capture
    # Under non-reentrant activation checkpointing the forward of a checkpointed block drops its activations and
    # backward recomputes them. Holding x from that forward would keep what checkpointing frees, so there the
    # input hook only notes the module (None) and takes x from the recomputation, which runs in backward around
    # the time g arrives: whichever of the two comes second is captured with the first (keyed by the running
    # backward, so micro-batches never mix). The recomputed graph is never backpropagated: no hook on it.
    def _input_hook(self, index: int):
        def hook(module, args, output):
            if not (torch.is_grad_enabled() and output.requires_grad):
                return
            phase = _checkpoint_phase()
            if phase == "recompute":
                self._meet(index, x=args[0].detach())
            else:
                self._inputs[index] = None if phase == "forward" else args[0].detach()

        return hook

    def _output_hook(self, m):
        def hook(module, args, output):
            if not (torch.is_grad_enabled() and output.requires_grad) or _checkpoint_phase() == "recompute":
                return
            if m.index not in self._inputs:
                return
            x = self._inputs.pop(m.index)
            weight = 1.0 / float(m.layer.scaling[m.layer.active_adapters[0]]) ** 2
            if x is None:
                output.register_hook(lambda grad: self._meet(m.index, grad=(grad, weight)))
            else:
                output.register_hook(lambda grad: self._capture(m.index, x, grad, weight))

        return hook

    def _meet(self, index: int, x: torch.Tensor | None = None, grad: tuple | None = None) -> None:
        """A recomputed ``x`` or an output gradient ``(g, weight)`` of module ``index`` (in backward): capture
        when its partner from the same backward is here, else wait for it."""
        key = (torch._C._current_graph_task_id(), index)
        partner = self._meeting.pop(key, None)
        if partner is None:
            self._meeting[key] = (x,) if x is not None else grad
        elif x is not None:
            self._capture(index, x, *partner)
        else:
            self._capture(index, partner[0], *grad)

    def _capture(self, index: int, x: torch.Tensor, grad: torch.Tensor, weight: float) -> None:
        """``x [..., d_in]``: the layer's LoRA input (after dropout); ``grad [..., d_out]``: the gradient of
        lora_B's output, ``g = grad / scaling`` so the output-side sums take ``weight = 1 / scaling^2``. Rows
        whose gradient is zero (padding, masked labels) do not count and contribute no ``x``."""
        x, grad = x.reshape(-1, x.shape[-1]).float(), grad.reshape(-1, grad.shape[-1]).float()
        row_norm = torch.linalg.vector_norm(grad, dim=1)  # (the 2-norm: 5x faster than abs().amax() on CPU)
        carries = (row_norm > ZERO_ROW_TOLERANCE * row_norm.amax()).float()
        self._accumulate(index, x, grad, carries, weight)
        self.rows[index] += carries.sum()

    def _accumulate(self, index: int, x: torch.Tensor, grad: torch.Tensor, carries: torch.Tensor, weight: float) -> None:
        """Add this micro-batch's sums: ``x [N, d_in]`` (rows to count where ``carries [N]`` is 1),
        ``grad [N, d_out]`` (every row; zero rows add nothing) weighted by ``weight``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the step
    def step(self, lr=None, loss_scale=None) -> None:
        pre, cfg = self.pre, self.pre.config
        self._meeting.clear()  # a recomputed x whose gradient never came (the layer did not reach the loss)
        if bool((self.rows.sum() == 0) & (pre.bank.rows.sum() > 0)):  # one host read per step
            raise RuntimeError(
                f"fisher={cfg.fisher!r}: the rank-space statistics were captured this step but the large factors "
                "were not: they are captured by hooks on PEFT's lora_A / lora_B modules and inside the blocks of "
                "grit_kernels.fuse; the LoRA layers ran through something that bypasses both (a custom LoRA "
                "kernel?). Use PEFT's path or gk.fuse, or fisher='kfac'"
            )
        all_reduce_statistics(pre.bank)
        self._all_reduce_sums()
        pre.bank.fold(cfg.ema_decay, loss_scale=loss_scale, backend=pre.backend)
        self._fold(cfg.ema_decay, loss_scale)
        since = pre.step_count - cfg.warmup_steps
        if since >= 0:
            if since % cfg.update_freq == 0:
                pre.bank.refresh_inverses(
                    cfg.damping, cfg.eps_abs, cfg.retry_damping_factor, backend=pre.backend
                )
                if self.initialized:
                    self._refresh(cfg.damping, cfg.eps_abs)
            self._precondition(lr)
        pre.step_count += 1

    def _all_reduce_sums(self) -> None:
        """DDP: sum this step's large-factor sums and rows over ranks (one all-reduce), the output side scaled
        by ``1 / W^2`` like the bank's ``D`` (each rank's ``g`` is ``W`` times its share of the global mean
        loss's). A no-op in one process."""
        w = world_size()
        if w == 1:
            return
        n = len(self.rows)
        inputs = [getattr(self, name)[i] for _, name in self._INPUT_FOLDS for i in range(n)]
        outputs = [getattr(self, name)[i] for _, name in self._OUTPUT_FOLDS for i in range(n)]
        flat = torch.cat([t.reshape(-1) for t in inputs + outputs] + [self.rows])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        sizes = [t.numel() for t in inputs + outputs] + [n]
        for j, (t, chunk) in enumerate(zip(inputs + outputs + [self.rows], flat.split(sizes))):
            t.copy_(chunk.view_as(t))
            if len(inputs) <= j < len(inputs) + len(outputs):
                t.mul_(1.0 / (w * w))

    def _fold(self, decay: float, loss_scale) -> None:
        """EMA of this step's sums per module (``C <- decay C + (1 - decay) C_step``; the first step with rows
        copies), skipped on the device for a module without rows or with a non-finite sum; the sums are then
        zeroed. No host sync once initialised (a per-module Python loop: a reference implementation)."""
        scale2 = 1.0 if loss_scale is None else torch.as_tensor(loss_scale, dtype=torch.float32) ** 2
        keep = decay if self.initialized else 0.0
        for i in range(len(self.rows)):
            rows = self.rows[i]
            pairs = [(getattr(self, e)[i], getattr(self, s)[i] / rows.clamp_min(1.0)) for e, s in self._INPUT_FOLDS]
            pairs += [(getattr(self, e)[i], getattr(self, s)[i] * rows / scale2) for e, s in self._OUTPUT_FOLDS]
            # a sum is finite iff every entry is (an overflow counts as non-finite): one reduction per tensor
            ok = (rows > 0) & torch.isfinite(torch.stack([step.sum() for _, step in pairs])).all()
            for ema, step in pairs:
                ema.copy_(torch.where(ok, keep * ema + (1.0 - keep) * step, ema))
            for _, name in self._INPUT_FOLDS + self._OUTPUT_FOLDS:
                getattr(self, name)[i].zero_()
        self.initialized = self.initialized or bool(self.rows.sum() > 0)
        self.rows.zero_()

    def _refresh(self, damping: float, eps_abs: float) -> None:
        raise NotImplementedError

    def _input_side(self, index: int, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _output_side(self, index: int, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _precondition(self, lr) -> None:
        """``grad_A <- (D + lam)^-1 grad_A (X + lam)^-1``, ``grad_B <- (G + lam)^-1 grad_B (H + lam)^-1``."""
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
            ga.copy_(self._input_side(m.index, inv_d @ ga.float()))
            gb.copy_(self._output_side(m.index, gb.float() @ inv_h))
            grads += [ga, gb]
        if raws:
            _kl_clip_(grads, raws, pre.config.kl_clip, lr)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Every list of ``_STATE_LISTS`` (bank order, clones), ``rows`` and ``initialized``."""
        state = {name: [t.clone() for t in getattr(self, name)] for name in self._STATE_LISTS}
        state.update(rows=self.rows.clone(), initialized=self.initialized)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Copy a saved state onto this model's device (every tensor's shape must match)."""
        kind = type(self).__name__
        for name in self._STATE_LISTS:
            mine, saved = getattr(self, name), state[name]
            shapes = [tuple(t.shape) for t in saved]
            if shapes != [tuple(t.shape) for t in mine]:
                raise ValueError(
                    f"{kind}.load_state_dict: saved {name} shapes {shapes[:4]}... ({len(shapes)} modules) do not "
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
        for m in self.pre.modules:
            m.layer.__dict__.get("_grit_state", {}).pop("large_factors", None)


def _checkpoint_phase() -> str | None:
    """``"forward"`` inside the forward of a block under non-reentrant ``torch.utils.checkpoint`` (its saved
    tensors go to the checkpoint's hooks and are recomputed in backward), ``"recompute"`` inside that
    recomputation, else None (plain forward, reentrant checkpointing). Read from the innermost saved-tensor hooks
    (a private torch API: without it, None, and x is held as without checkpointing)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    hooks = top(False) if top is not None else None
    name = getattr(hooks[0], "__qualname__", "") if hooks else ""
    if name.startswith("_checkpoint_hook."):
        return "forward"
    if name.startswith("_recomputation_hook."):
        return "recompute"
    return None


class FullKFAC(_LargeFactorKFAC):
    """Full K-FAC with ``d x d`` factors (see the module docstring).

    Attributes (per module, bank order): ``input_sum [d_in, d_in]``, ``output_sum [d_out, d_out]``,
    ``rows``; EMA factors ``input_factor`` (``X``) and ``output_factor`` (``G``); inverses of the
    damped factors ``input_inverse``, ``output_inverse`` (identity until the first refresh).
    """

    _INPUT_FOLDS = (("input_factor", "input_sum"),)
    _OUTPUT_FOLDS = (("output_factor", "output_sum"),)
    _STATE_LISTS = ("input_sum", "output_sum", "input_factor", "output_factor", "input_inverse", "output_inverse")

    def __init__(self, preconditioner):
        super().__init__(preconditioner)
        cfg = preconditioner.config
        dims = self._dims(preconditioner)
        need = 3 * 4 * sum(d_in * d_in + d_out * d_out for d_in, d_out in dims)
        if need > cfg.kfac_full_max_bytes:
            raise ValueError(
                f"fisher='kfac_full' would need {need / 2**20:.1f} MiB for the d x d factors of "
                f"{len(dims)} modules (sum, EMA and inverse in fp32), above kfac_full_max_bytes="
                f"{cfg.kfac_full_max_bytes / 2**20:.1f} MiB; it is a reference for small models -- use "
                "fisher='kfac_lowrank' or 'kfac', or raise the limit"
            )
        device = preconditioner.bank.device
        self.memory_bytes = need
        self.input_sum = [torch.zeros(d, d, device=device) for d, _ in dims]
        self.output_sum = [torch.zeros(d, d, device=device) for _, d in dims]
        self.input_factor = [torch.zeros_like(t) for t in self.input_sum]
        self.output_factor = [torch.zeros_like(t) for t in self.output_sum]
        self.input_inverse = [torch.eye(d, device=device) for d, _ in dims]
        self.output_inverse = [torch.eye(d, device=device) for _, d in dims]
        self._register_hooks()

    def _accumulate(self, index: int, x: torch.Tensor, grad: torch.Tensor, carries: torch.Tensor, weight: float) -> None:
        self.input_sum[index].addmm_(x.T, x * carries[:, None])
        self.output_sum[index].addmm_(grad.T, grad, alpha=weight)

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
        for i in range(len(self.input_factor)):
            self.input_inverse[i] = self._damped_inverse(self.input_factor[i], damping, eps_abs)
            self.output_inverse[i] = self._damped_inverse(self.output_factor[i], damping, eps_abs)

    def _input_side(self, index: int, t: torch.Tensor) -> torch.Tensor:
        return t @ self.input_inverse[index]

    def _output_side(self, index: int, t: torch.Tensor) -> torch.Tensor:
        return self.output_inverse[index] @ t


def _group_by(keys: list) -> dict:
    """``{key: [indices with that key]}`` in first-seen order."""
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


def sketch_test_matrix(d: int, m: int, device=None) -> torch.Tensor:
    """The fixed orthonormal test matrix ``V [d, m]`` of :class:`LowRankKFAC` (seeded by ``(d, m)``, so a
    resumed run and every module of width ``d`` get the same one). fp32."""
    gen = torch.Generator().manual_seed(1_000_003 * d + m)
    test = torch.linalg.qr(torch.randn(d, m, generator=gen, dtype=torch.float64))[0]
    return test.float().to(device)


def nystrom_eigenpairs(sketch: torch.Tensor, test: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` eigenpairs of the Nystrom approximation ``Y (V^T Y)^+ Y^T`` of a PSD ``C`` from its sketch
    ``Y = C V`` only (``sketch [..., d, m]``, ``test [d, m]`` orthonormal, ``k <= m``), in float32 with the
    shift ``nu = eps32 * |Y|`` that makes that stable (Tropp et al. 2017; float64 costs 2.5x on a CPU, far more
    on consumer GPUs), a Cholesky of ``V^T Y`` and one ``m x m``
    eigh (no ``d x m`` SVD): ``values [..., k]`` (descending, >= 0; a pair that is not finite comes back as 0),
    ``vectors [..., d, k]``. With ``m = d`` it is the eigendecomposition of ``C`` (up to the shift)."""
    y, v = sketch.float(), test.float()
    nu = torch.finfo(torch.float32).eps * torch.linalg.matrix_norm(y)[..., None, None]
    y = y + nu * v
    core = v.T @ y  # V^T C V + nu I: positive definite for PSD C
    chol, info = torch.linalg.cholesky_ex(0.5 * (core + core.transpose(-1, -2)))
    b = torch.linalg.solve_triangular(chol, y.transpose(-1, -2), upper=False).transpose(-1, -2)  # y L^-T
    # a failed factorisation (non-finite or indefinite sketch) gives no eigenpairs: the factor is then
    # treated as isotropic (tr C / d) by the caller -- decided on the device, no host sync
    ok = (info == 0) & torch.isfinite(b.sum(dim=(-2, -1)))
    b = torch.where(ok[..., None, None], b, 0.0)
    values, w = torch.linalg.eigh(b.transpose(-1, -2) @ b)  # C_nys = b b^T: eigenpairs from the m x m Gram
    values, w = values.flip(-1)[..., :k], w.flip(-1)[..., :k]
    vectors = b @ (w * values.clamp_min(torch.finfo(torch.float32).tiny).rsqrt()[..., None, :])
    return torch.where(ok[..., None], (values - nu[..., 0]).clamp_min(0.0), 0.0), vectors


class _SketchGroup:
    """The modules whose large factor on one side has the same width ``d`` (so the same ``m``, ``k`` and test
    matrix ``V [d, m]``): their state stacked, ``[n, ...]`` in ``members`` order."""

    def __init__(self, members: list[int], d: int, m: int, k: int, test: torch.Tensor):
        device = test.device
        n = len(members)
        self.d, self.k, self.test = d, k, test
        self.index = torch.tensor(members, device=device)  #: the members' module indices
        self.sketch_sum = torch.zeros(n, d, m, device=device)  #: this step's ``sum y (y^T V)``
        self.trace_sum = torch.zeros(n, device=device)  #: this step's ``sum |y|^2``
        self.sketch = torch.zeros(n, d, m, device=device)  #: EMA of ``C V``
        self.trace = torch.zeros(n, device=device)  #: EMA of ``tr C``
        self.vectors = torch.zeros(n, d, k, device=device)  #: ``U`` of the last refresh
        self.gain = torch.zeros(n, k, device=device)  #: ``1 / (s + lam) - 1 / (s_rest + lam)``
        self.rest = torch.ones(n, device=device)  #: ``1 / (s_rest + lam)``


class LowRankKFAC(_LargeFactorKFAC):
    """K-FAC with Nystrom-sketched large factors (see the module docstring).

    State, per side (``input``: ``X`` from ``x``; ``output``: ``G`` from ``g``), stacked per width in
    :class:`_SketchGroup` s (``input_groups``, ``output_groups``) and exposed per module (bank order) as views:
    ``input_sketch_sum [d_in, m]`` (``sum x (x^T V)`` this step), ``input_trace_sum []``, their EMAs
    ``input_sketch``, ``input_trace``; after a refresh ``input_vectors [d_in, k]`` (``U``), ``input_gain [k]``
    and ``input_rest []``, so that ``(X + lam I)^-1 t = t * rest + U diag(gain) U^T t`` (identity until the
    first refresh); the same for ``output_``. ``memory_bytes``: what all of it takes.

    The fold, the refresh and the preconditioning are batched over the modules of one width (no host sync once
    the factors are initialised). The capture is one hook call per module: on a CPU, stacking the layers'
    ``x`` and ``g`` for batched products cost more in copies than it saved (measured: 21 vs 12 ms per step
    at width 128).
    """

    _INPUT_FOLDS = (("input_sketch", "input_sketch_sum"), ("input_trace", "input_trace_sum"))
    _OUTPUT_FOLDS = (("output_sketch", "output_sketch_sum"), ("output_trace", "output_trace_sum"))
    _STATE_LISTS = tuple(n for pair in _INPUT_FOLDS + _OUTPUT_FOLDS for n in pair) + (
        "input_vectors", "input_gain", "input_rest", "output_vectors", "output_gain", "output_rest"
    )
    _GROUP_FIELDS = ("sketch_sum", "trace_sum", "sketch", "trace", "vectors", "gain", "rest")

    def __init__(self, preconditioner):
        super().__init__(preconditioner)
        cfg = preconditioner.config
        device = preconditioner.bank.device
        dims = self._dims(preconditioner)
        self.tests: dict[tuple[int, int], torch.Tensor] = {}
        n = len(dims)
        for side, widths in (("input", [d for d, _ in dims]), ("output", [d for _, d in dims])):
            ms = [min(cfg.large_factor_sketch or 2 * cfg.large_factor_rank, d) for d in widths]
            ks = [min(cfg.large_factor_rank, m, d - 1) for m, d in zip(ms, widths)]
            setattr(self, f"_{side}_shapes", list(zip(widths, ms, ks)))
            groups, where = [], [None] * n
            for (d, m, k), members in _group_by(list(zip(widths, ms, ks))).items():
                if (d, m) not in self.tests:
                    self.tests[(d, m)] = sketch_test_matrix(d, m, device)
                group = _SketchGroup(members, d, m, k, self.tests[(d, m)])
                groups.append(group)
                for j, i in enumerate(members):
                    where[i] = (group, j)
            setattr(self, f"{side}_groups", groups)
            setattr(self, f"_{side}_where", where)  # module -> (its group, its position there)
            for field in self._GROUP_FIELDS:  # per-module views (state dict, DDP reduction, tests)
                setattr(self, f"{side}_{field}", [getattr(g, field)[j] for g, j in where])
        state = sum(t.numel() for name in self._STATE_LISTS for t in getattr(self, name))
        self.memory_bytes = 4 * (state + sum(t.numel() for t in self.tests.values()))
        self._last_input = None  # (key, x, x V) of the last input sketched: layers that share x reuse x V
        self._indices: dict[tuple[int, ...], torch.Tensor] = {}  # _on_device's index tensors
        self._register_hooks()

    def _accumulate(self, index: int, x: torch.Tensor, grad: torch.Tensor, carries: torch.Tensor, weight: float) -> None:
        """``sum x (x^T V)`` over carrying rows (the mask on the ``[N, m]`` product), ``sum |x|^2``; the same
        for ``g`` (``weight`` folds in ``1 / scaling^2``). ``O(N d m)``, in place into the group's stacked sums."""
        group, j = self._input_where[index]
        key = (x.data_ptr(), x.shape, x.stride(), x.dtype)
        if self._last_input is None or self._last_input[0] != key:  # q/k/v, gate/up: one x V for their shared x
            self._last_input = (key, x, x @ group.test)  # (holding x keeps its address from being reused)
        group.sketch_sum[j].addmm_(x.T, self._last_input[2] * carries[:, None])
        group.trace_sum[j].add_(torch.dot(torch.linalg.vector_norm(x, dim=1).square(), carries))
        group, j = self._output_where[index]
        group.sketch_sum[j].addmm_(grad.T, grad @ group.test, alpha=weight)
        group.trace_sum[j].add_(torch.linalg.vector_norm(grad).square() * weight)

    # ------------------------------------------------------------------ the step
    def _fold(self, decay: float, loss_scale) -> None:
        """:meth:`_LargeFactorKFAC._fold`, batched per width: a module is skipped (on the device) when it has
        no rows or any of its four sums is not finite."""
        scale2 = 1.0 if loss_scale is None else torch.as_tensor(loss_scale, dtype=torch.float32) ** 2
        keep = decay if self.initialized else 0.0
        bad = torch.zeros(len(self.rows), device=self.rows.device)
        steps = []
        for side in ("input", "output"):
            for g in getattr(self, f"{side}_groups"):
                rows = self.rows[g.index]
                factor = 1.0 / rows.clamp_min(1.0) if side == "input" else rows / scale2
                sketch, trace = g.sketch_sum * factor[:, None, None], g.trace_sum * factor
                # a sum is finite iff every entry is (an overflow counts as non-finite): one reduction
                bad.index_add_(0, g.index, (~torch.isfinite(sketch.sum(dim=(1, 2)) + trace)).float())
                steps.append((g, sketch, trace))
        ok = (self.rows > 0) & (bad == 0)
        self._last_input = None
        for g, sketch, trace in steps:
            take = ok[g.index]
            g.sketch.copy_(torch.where(take[:, None, None], keep * g.sketch + (1.0 - keep) * sketch, g.sketch))
            g.trace.copy_(torch.where(take, keep * g.trace + (1.0 - keep) * trace, g.trace))
            g.sketch_sum.zero_()
            g.trace_sum.zero_()
        self.initialized = self.initialized or bool(self.rows.sum() > 0)
        self.rows.zero_()

    def _refresh(self, damping: float, eps_abs: float) -> None:
        """Eigenpairs of every sketch, one batched call per width."""
        for g in self.input_groups + self.output_groups:
            values, top = nystrom_eigenpairs(g.sketch, g.test, g.k)
            trace = g.trace.double()[:, None]
            lam = damping * trace / g.d + eps_abs
            rest = ((trace - values.sum(dim=1, keepdim=True)) / (g.d - g.k)).clamp_min(0.0)
            g.vectors.copy_(top)
            g.gain.copy_(1.0 / (values + lam) - 1.0 / (rest + lam))
            g.rest.copy_(1.0 / (rest[:, 0] + lam[:, 0]))

    def _on_device(self, values: tuple[int, ...]) -> torch.Tensor:
        """``values`` as an index tensor on the bank's device, made once (a host-to-device copy every step would
        wait for the device)."""
        if values not in self._indices:
            self._indices[values] = torch.tensor(values, device=self.rows.device)
        return self._indices[values]

    def _precondition(self, lr) -> None:
        """:meth:`_LargeFactorKFAC._precondition`, batched: ``grad_A`` per (input width, rank), ``grad_B`` per
        (output width, rank); one grouped copy back, and the KL-clip's dot product from the stacked raw grads."""
        pre, bank = self.pre, self.pre.bank
        clip = pre.config.kl_clip is not None and lr is not None
        ready = [m for m in pre.modules if m.lora_A.grad is not None and m.lora_B.grad is not None]
        targets, results, dots = [], [], []
        for side, slot, where in (("A", BACKWARD, self._input_where), ("B", FORWARD, self._output_where)):
            keys = [(id(where[m.index][0]), int(bank.module_ranks[m.index])) for m in ready]
            for (_, r), members in _group_by(keys).items():
                mods = [ready[i] for i in members]
                group = where[mods[0].index][0]
                grads = [m.lora_A.grad if side == "A" else m.lora_B.grad for m in mods]
                raw = torch.stack(grads).float()  # A: [n, r, d_in]; B: [n, d_out, r]
                index = self._on_device(tuple(m.index for m in mods))
                at = self._on_device(tuple(where[m.index][1] for m in mods))
                inverse = bank.inverse[slot, index, :r, :r]
                u, gain, rest = group.vectors[at], group.gain[at], group.rest[at]
                if side == "A":
                    out = _apply_input_side(inverse @ raw, u, gain, rest)
                else:
                    out = _apply_output_side(raw @ inverse, u, gain, rest)
                if clip:
                    dots.append((out * raw).sum())
                targets += grads
                results += list(out.unbind(0))
        if targets:
            torch._foreach_copy_(targets, results)
        if dots:
            quad = (torch.stack(dots).sum().abs() * lr**2).clamp_min(torch.finfo(torch.float32).tiny)
            torch._foreach_mul_(targets, torch.sqrt(pre.config.kl_clip / quad).clamp(max=1.0))


def _apply_input_side(t: torch.Tensor, u: torch.Tensor, gain: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """``t (X + lam I)^-1 = t * rest + ((t U) * gain) U^T`` (``t [..., r, d]``, ``u [..., d, k]``, ``gain [..., k]``,
    ``rest [...]``)."""
    return t * rest[..., None, None] + ((t @ u) * gain[..., None, :]) @ u.transpose(-1, -2)


def _apply_output_side(t: torch.Tensor, u: torch.Tensor, gain: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """``(G + lam I)^-1 t = t * rest + U (gain * (U^T t))`` (``t [..., d, r]``, ``u [..., d, k]``)."""
    return t * rest[..., None, None] + u @ (gain[..., :, None] * (u.transpose(-1, -2) @ t))
