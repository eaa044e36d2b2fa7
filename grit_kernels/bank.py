"""FactorBank: the one place factors live. One flat fp32 store for every module's statistics,
row counts, EMA factors and inverses, with per-module views.

Layout of ``storage`` (float32), ``M`` modules padded to rank ``R = max(ranks)``::

    stat_sum [2, M, R, R]   this optimizer step's sums: [0] = sum h h^T, [1] = sum delta delta^T
    rows     [M]            rows (tokens) accumulated this step
    factor   [2, M, R, R]   EMA factors: [FORWARD] = H = E[h h^T], [BACKWARD] = D = E[delta delta^T]
    inverse  [2, M, R, R]   (factor + lam I)^-1, identity in the padding

``stat_sum`` and ``rows`` are adjacent (``accumulators``) so a distributed run reduces them with one
all-reduce. Index ``[FORWARD, m]`` preconditions lora_B's gradient (right side), ``[BACKWARD, m]``
lora_A's (left side). Status, initialisation and validity flags are small int/bool tensors beside it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import ops
from ._device import to_device
from .status import InverseStatus

FORWARD = 0  #: H = E[h h^T], h = A dropout(x): preconditions grad_B from the right
BACKWARD = 1  #: D = E[delta delta^T], delta = dL/dh: preconditions grad_A from the left


class FactorBank:
    """Statistics, factors and inverses of ``M`` LoRA modules of (possibly different) ranks."""

    def __init__(self, ranks: Sequence[int], device: str | torch.device = "cpu"):
        if not ranks or min(ranks) < 1:
            raise ValueError(f"FactorBank needs at least one module of rank >= 1, got ranks={list(ranks)}")
        self.num_modules = M = len(ranks)
        self.max_rank = R = max(ranks)
        self.module_ranks = [int(r) for r in ranks]
        device = torch.device(device)
        mat = 2 * M * R * R
        self.storage = torch.zeros(3 * mat + M, dtype=torch.float32, device=device)
        self.accumulators = self.storage[: mat + M]
        self.stat_sum = self.storage[:mat].view(2, M, R, R)
        self.rows = self.storage[mat : mat + M]
        self.factor = self.storage[mat + M : 2 * mat + M].view(2, M, R, R)
        self.inverse = self.storage[2 * mat + M :].view(2, M, R, R)
        self.inverse.copy_(torch.eye(R, device=device).expand(2, M, R, R))
        self.status = torch.full((2, M), int(InverseStatus.SCALED_IDENTITY), dtype=torch.int32, device=device)
        self.initialized = torch.zeros(2, M, dtype=torch.bool, device=device)
        self.inverse_valid = torch.zeros(2, M, dtype=torch.bool, device=device)
        self.ranks = torch.tensor(self.module_ranks, dtype=torch.int32, device=device).repeat(2)
        self.refresh_count = 0  #: inversions run so far (host integer)
        self.backend = "auto"  #: ops backend of the statistics capture (GritPreconditioner sets its own)
        self._index_cache: dict[tuple[int, ...], torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return self.storage.device

    def _flat(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(2 * self.num_modules, *t.shape[2:])

    def stat_views(self, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(sum h h^T [r, r], sum delta delta^T [r, r], rows [1])`` views of module ``m``."""
        r = self.module_ranks[m]
        return self.stat_sum[FORWARD, m, :r, :r], self.stat_sum[BACKWARD, m, :r, :r], self.rows[m : m + 1]

    def add_statistics_(self, indices: Sequence[int], grams: torch.Tensor, rows: torch.Tensor) -> None:
        """Add the step statistics of modules ``indices`` (all of rank ``r``) in one op each.

        Args:
            indices: bank indices of the ``K`` modules (a host tuple; a contiguous ascending run is a
                slice, anything else an index tensor cached per tuple -- no host-device copy per call).
            grams: ``[2, K, r, r]`` fp32 ``(sum h h^T, sum delta delta^T)`` per module.
            rows: ``[K]`` fp32 rows that carried gradient.
        """
        k, r = grams.shape[1], grams.shape[-1]
        first = indices[0]
        if tuple(indices) == tuple(range(first, first + k)):
            self.stat_sum[:, first : first + k, :r, :r].add_(grams)
            self.rows[first : first + k].add_(rows)
            return
        key = tuple(indices)
        index = self._index_cache.get(key)
        if index is None:
            index = self._index_cache[key] = to_device(key, torch.long, self.device)  # pinned, non-blocking
        for which in (FORWARD, BACKWARD):
            self.stat_sum[which, :, :r, :r].index_add_(0, index, grams[which])
        self.rows.index_add_(0, index, rows)

    def reset_accumulators(self) -> None:
        """Discard this step's statistics (after a fold, or when a step is skipped)."""
        self.accumulators.zero_()

    def fold(self, decay: float, loss_scale: torch.Tensor | float | None = None, backend: str = "auto") -> None:
        """Fold this step's statistics into the EMA factors (one batched op), then reset them.

        Scale normalisation (docs/design.md §2): ``H_step = sum h h^T / rows`` and
        ``D_step = rows * sum delta delta^T / loss_scale^2`` -- the per-token Fisher of the mean
        loss, invariant to batch size, gradient-accumulation split and the AMP loss scale. Modules
        without rows this step, and non-finite statistics, are skipped on the device.
        """
        rows = self.rows
        has_rows = rows > 0
        safe_rows = torch.where(has_rows, rows, torch.ones_like(rows))
        forward_weight = torch.where(has_rows, 1.0 / safe_rows, torch.zeros_like(rows))
        backward_weight = rows
        if loss_scale is not None:
            if torch.is_tensor(loss_scale):  # read on the device (GradScaler's scale): no sync
                scale = loss_scale.to(device=self.device, dtype=torch.float32, non_blocking=True)
                backward_weight = rows / (scale * scale)
            else:  # a Python number: a scalar operand, no host->device copy
                backward_weight = rows / (float(loss_scale) ** 2)
        weight = torch.cat([forward_weight, backward_weight])
        ops.ema_fold_(
            self._flat(self.factor), self._flat(self.stat_sum), weight, decay, self.initialized.view(-1), backend=backend
        )
        self.reset_accumulators()

    def refresh_inverses(
        self,
        damping: float,
        eps_abs: float,
        retry_factor: float,
        backend: str = "auto",
        floor: torch.Tensor | None = None,
    ) -> None:
        """Invert every damped factor in one batched op with the device-side fallback chain.

        Factors that never received statistics keep the identity (gradients pass through).
        ``floor``: optional ``[2, M]`` lower bound on the damping's scale, ``lam = damping * max(tr(C)/r, floor)
        + eps_abs`` (``GritConfig.damping_floor``); applied by inverting ``C + e I`` with
        ``e = damping * (floor - tr(C)/r)_+ / (1 + damping)``, which the relative damping of ``C + e I`` makes
        exactly ``lam`` (``e = 0``, bit-identical, where the floor is inactive). The retry multiplies only
        the relative part.
        """
        mats = self._flat(self.factor)
        if floor is not None:
            shift = damping * (floor.reshape(-1) - self._scale()).clamp_min(0) / (1 + damping)
            mats = mats + torch.diag_embed(shift[:, None].expand(-1, self.max_rank))
        inverse, status = ops.damped_cholesky_inverse(
            mats,
            damping,
            eps_abs,
            ranks=self.ranks,
            previous=self._flat(self.inverse),
            previous_valid=self.inverse_valid.view(-1),
            retry_factor=retry_factor,
            backend=backend,
        )
        init = self.initialized.view(-1)
        eye = torch.eye(self.max_rank, device=self.device)
        self._flat(self.inverse).copy_(torch.where(init[:, None, None], inverse, eye))
        self.status.view(-1).copy_(status)
        self.inverse_valid.view(-1).copy_(init & (status <= int(InverseStatus.KEPT_PREVIOUS)))
        self.refresh_count += 1

    def _scale(self) -> torch.Tensor:
        """``[2M]`` ``tr(C)/r`` of every factor's ``r x r`` block (flat order)."""
        diag = torch.diagonal(self._flat(self.factor), dim1=1, dim2=2)
        inside = torch.arange(self.max_rank, device=self.device)[None, :] < self.ranks[:, None]
        return torch.where(inside, diag, torch.zeros((), device=self.device)).sum(dim=1) / self.ranks.float()

    def damping_values(self, damping: float, eps_abs: float, floor: torch.Tensor | None = None) -> torch.Tensor:
        """``[2, M]`` damping ``lam = damping * max(tr(C)/r, floor) + eps_abs`` of the current factors
        (``floor``: ``[2, M]`` or ``None``, see :meth:`refresh_inverses`)."""
        scale = self._scale().view(2, -1)
        if floor is not None:
            scale = torch.maximum(scale, floor)
        return damping * scale + eps_abs

    def state_dict(self) -> dict:
        return {
            "ranks": list(self.module_ranks),
            "storage": self.storage.clone(),
            "status": self.status.clone(),
            "initialized": self.initialized.clone(),
            "inverse_valid": self.inverse_valid.clone(),
            "refresh_count": self.refresh_count,
        }

    def load_state_dict(self, state: dict) -> None:
        """Load a saved bank onto this bank's device (tensors are copied, not adopted)."""
        if list(state["ranks"]) != self.module_ranks:
            raise ValueError(
                f"FactorBank.load_state_dict: saved ranks {list(state['ranks'])[:8]}... ({len(state['ranks'])} modules) "
                f"do not match this model's {self.module_ranks[:8]}... ({self.num_modules} modules)"
            )
        self.storage.copy_(state["storage"])
        self.status.copy_(state["status"])
        self.initialized.copy_(state["initialized"])
        self.inverse_valid.copy_(state["inverse_valid"])
        self.refresh_count = int(state.get("refresh_count", 0))
