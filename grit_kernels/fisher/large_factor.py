"""The step, fold and state that :class:`~grit_kernels.fisher.FullKFAC` and
:class:`~grit_kernels.fisher.LowRankKFAC` share (``_LargeFactorKFAC``), on top of their capture
(:mod:`grit_kernels.fisher.capture`). Under DDP this step's sums are all-reduced with the bank."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..bank import BACKWARD, FORWARD
from ..distributed import all_reduce_statistics, world_size
from .base import CurvatureModel, _kl_clip_
from .capture import _LargeFactorCapture


class _LargeFactorKFAC(_LargeFactorCapture, CurvatureModel):
    """What :class:`FullKFAC` and :class:`LowRankKFAC` share: capture of each LoRA layer's input ``x`` (forward
    hook on ``lora_A``) and output gradient ``g`` (tensor hook on ``lora_B``'s output, divided by the LoRA
    scale; :class:`~grit_kernels.fisher.capture._LargeFactorCapture`), the fold of per-step sums into EMA
    state, the step, and the state dict. A subclass says what it sums (``_accumulate``), how its state folds
    (``_INPUT_FOLDS``/``_OUTPUT_FOLDS``: ``(ema, sum)`` attribute pairs, lists in bank order; input sums are
    divided by the rows, output sums multiplied by ``rows / loss_scale^2`` as the bank does for ``D``), how it
    refreshes (``_refresh``) and how it applies the large factors' inverses (``_input_side``, ``_output_side``
    in the per-module ``_precondition``; a subclass may replace ``_fold`` and ``_precondition`` by batched
    ones, as :class:`LowRankKFAC` does)."""

    _INPUT_FOLDS: tuple[tuple[str, str], ...] = ()
    _OUTPUT_FOLDS: tuple[tuple[str, str], ...] = ()
    _STATE_LISTS: tuple[str, ...] = ()

    def __init__(self, preconditioner):
        super().__init__(preconditioner)
        self.initialized = False

    @staticmethod
    def _dims(pre) -> list[tuple[int, int]]:
        return [(m.lora_A.shape[1], m.lora_B.shape[0]) for m in pre.modules]

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
