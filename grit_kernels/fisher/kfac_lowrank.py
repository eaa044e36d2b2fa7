"""``GritConfig(fisher="kfac_lowrank")``: :class:`LowRankKFAC`.

:class:`~grit_kernels.fisher.FullKFAC`'s step with each large factor kept as a *streaming Nystrom
sketch*: for a fixed orthonormal test matrix ``V [d, m]`` (one per dimension, seeded), the EMA of
``Y = C V`` (linear in ``C``, so the EMA of the per-step sketches is the sketch of the EMA factor) and of
``tr C``. At a refresh, the top ``k`` eigenpairs ``(s, U)`` of the Nystrom approximation
``Y (V^T Y)^+ Y^T`` and the mean ``s_rest = (tr C - sum s) / (d - k)`` of the rest of the spectrum
give ``C ~ U diag(s) U^T + s_rest (I - U U^T)``, inverted in closed form:
``(C + lam I)^-1 = (I - U U^T) / (s_rest + lam) + U diag(1 / (s + lam)) U^T``
(:mod:`grit_kernels.fisher.nystrom`). Memory and work are
``O(d m)`` per factor (capture ``2 N d m`` flops), never ``d x d``: it runs at Llama-3-8B shapes.
``k = large_factor_rank``, ``m = large_factor_sketch`` (both cut to ``d - 1`` and ``d``); with
``m = d`` the sketch is exact and ``k = d - 1`` gives :class:`~grit_kernels.fisher.FullKFAC`'s step. Same
damping, clip, capture and DDP reduction as :class:`~grit_kernels.fisher.FullKFAC`; one capture call per
module, the fold, refresh and preconditioning batched over the modules of one width.
"""

from __future__ import annotations

import torch

from ..bank import BACKWARD, FORWARD
from .large_factor import _LargeFactorKFAC
from .nystrom import _apply_input_side, _apply_output_side, nystrom_eigenpairs, sketch_test_matrix


def _group_by(keys: list) -> dict:
    """``{key: [indices with that key]}`` in first-seen order."""
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups



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
    """K-FAC with Nystrom-sketched large factors (see :mod:`grit_kernels.fisher.kfac_lowrank`).

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
