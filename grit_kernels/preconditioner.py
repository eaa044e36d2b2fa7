"""GritPreconditioner: a PEFT model -> patched LoRA layers + one FactorBank; ``step()`` preconditions.

A training step as data (docs/design.md §6): forward -> backward (each patched layer adds its
``sum h h^T``, ``sum delta delta^T`` and row count to the bank) -> ``step()``: EMA fold (one batched op),
every ``update_freq`` steps the batched inversion (one op), grouped preconditioning of every
lora_A / lora_B ``.grad`` in place (one op), optional KL-clip -> the wrapped optimizer steps.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from . import fsdp, ops
from .bank import BACKWARD, FORWARD, FactorBank
from .compress import RankAdapter
from .config import GritConfig
from .distributed import all_reduce_statistics, check_fsdp_supported
from .fisher import make_fisher
from .interface import Preconditioner
from .layers import CaptureSlot, is_lora_layer, patch_lora_layer, unpatch_lora_layer, unsupported_reason


@dataclass(frozen=True)
class GritModule:
    """One preconditioned LoRA module: its name, layer, adapter weights and bank index."""

    name: str
    layer: nn.Module
    lora_A: nn.Parameter  # [r, d_in]
    lora_B: nn.Parameter  # [d_out, r]
    index: int


def _name_matches(name: str, patterns) -> bool:
    return any(name == p or name.endswith("." + p) or name.split(".")[-1] == p for p in patterns)


class GritPreconditioner(Preconditioner):
    """Rank-space K-FAC for every supported LoRA layer of ``model``.

    Args:
        model: a PEFT model (or any module containing PEFT LoRA layers) with one active adapter.
        config: :class:`GritConfig`; defaults if ``None``.

    Attributes:
        modules: the preconditioned :class:`GritModule` s, in bank order.
        skipped: ``{layer name: reason}`` of LoRA layers left unpreconditioned (one warning lists them).
        bank: the :class:`FactorBank`.
        step_count: optimizer steps taken so far (host integer; no device sync).
    """

    def __init__(self, model: nn.Module, config: GritConfig | None = None):
        self.config = config if config is not None else GritConfig()
        if not isinstance(self.config, GritConfig):
            raise TypeError(f"config must be a GritConfig, got {type(self.config).__name__}")
        cfg = self.config
        check_fsdp_supported(model)
        found, self.skipped = [], {}
        for name, layer in model.named_modules():
            if not is_lora_layer(layer):
                continue
            if cfg.target_modules is not None and not _name_matches(name, cfg.target_modules):
                continue
            if _name_matches(name, cfg.exclude_modules):
                continue
            reason = unsupported_reason(layer)
            if reason is None:
                found.append((name, layer))
            else:
                self.skipped[name] = reason
        if self.skipped:
            lines = "\n".join(f"  {n}: {r}" for n, r in self.skipped.items())
            warnings.warn(f"GRIT leaves {len(self.skipped)} LoRA layer(s) unpreconditioned:\n{lines}", stacklevel=2)
        if not found:
            targets = f" (target_modules={list(cfg.target_modules)})" if cfg.target_modules is not None else ""
            if self.skipped:  # LoRA layers exist, none is supported: say why (DoRA, Conv2d, Embedding, ...)
                reasons = sorted(set(self.skipped.values()))
                raise ValueError(
                    f"GritPreconditioner: none of the model's {len(self.skipped)} LoRA layer(s) is supported"
                    f"{targets}: " + "; ".join(reasons)
                )
            raise ValueError(
                f"GritPreconditioner found no supported PEFT LoRA layer in the model{targets}; "
                "wrap the model with peft.get_peft_model(model, LoraConfig(...)) first"
            )
        self.modules: list[GritModule] = []
        for i, (name, layer) in enumerate(found):
            adapter = layer.active_adapters[0]
            self.modules.append(
                GritModule(name, layer, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, i)
            )
        devices = {m.lora_A.device for m in self.modules} | {m.lora_B.device for m in self.modules}
        if len(devices) != 1:
            raise ValueError(f"GRIT needs all LoRA adapters on one device, found {sorted(map(str, devices))}")
        self.bank = FactorBank([m.lora_A.shape[0] for m in self.modules], device=devices.pop())
        self.backend = self.bank.backend = ops.resolve_backend(cfg.backend, self.bank.device)
        for m in self.modules:
            slot = CaptureSlot(*self.bank.stat_views(m.index), backend=self.backend, bank=self.bank, index=m.index)
            patch_lora_layer(m.layer, slot)
        self.step_count = 0
        self._model = model
        #: FSDP2: the row layout of the sharded LoRA weights (None when they are plain tensors), see grit_kernels.fsdp
        self._sharded = fsdp.sharded_layout(self)
        if self._sharded is not None:
            fsdp.check_4bit_sharding(model)
        #: config.damping_floor: running maximum of every factor's tr(C)/r over the refreshes ([2, M]), else None
        self._scale_max = torch.zeros(2, self.bank.num_modules, device=self.bank.device) if cfg.damping_floor > 0 else None
        self._has_statistics: torch.Tensor | None = None  #: device bool, set at each refresh after warm-up
        self._removed = False
        self._snapshot: list[torch.Tensor] | None = None  #: snapshot_adapters' buffers (CPU)
        # config.fisher "diagonal" / "kfac_full" take over step() (grit_kernels.fisher); "kfac": None
        self._fisher = make_fisher(self)
        #: periodic reprojection / rank adaptation (config.reprojection), run by GritOptimizer after its step
        self.rank_adapter = RankAdapter(model, self) if cfg.reprojection != "off" else None

    # ------------------------------------------------------------------ properties
    @property
    def num_modules(self) -> int:
        return len(self.modules)

    def parameters(self) -> list[nn.Parameter]:
        """All preconditioned adapter weights (lora_A then lora_B per module)."""
        self._sync_parameters()
        return [p for m in self.modules for p in (m.lora_A, m.lora_B)]

    @property
    def sharded_layout(self):
        """FSDP2: the row layout of the sharded LoRA weights; ``None`` when they are plain tensors."""
        return self._sharded

    @property
    def sharded(self) -> bool:
        """Whether the LoRA weights are FSDP2-sharded ``DTensor`` s (:mod:`grit_kernels.fsdp`)."""
        self._sync_parameters()
        return self._sharded is not None

    def _sync_parameters(self) -> None:
        """Re-read every module's lora_A / lora_B when the model's parameters were replaced after construction
        (``fully_shard`` after the preconditioner, as accelerate's ``prepare`` does), and re-check the sharding.
        Two dict look-ups per call otherwise (the first and the last module)."""
        first, last = self.modules[0], self.modules[-1]
        if self._weight(first, "lora_A") is first.lora_A and self._weight(last, "lora_B") is last.lora_B:
            return
        self.modules = [
            dataclasses.replace(m, lora_A=self._weight(m, "lora_A"), lora_B=self._weight(m, "lora_B")) for m in self.modules
        ]
        self._snapshot = None
        self._sharded = fsdp.sharded_layout(self)
        if self._sharded is not None:
            fsdp.check_4bit_sharding(self._model)

    @staticmethod
    def _weight(m: GritModule, which: str) -> nn.Parameter:
        return getattr(m.layer, which)[m.layer._grit_state["adapter"]].weight

    @property
    def preconditioning_active(self) -> bool:
        """Whether the last ``step()`` changed gradients: past warm-up, with inverses built from statistics
        (False before any statistics exist, e.g. at PEFT's B = 0). Reads one device flag (a host sync
        when called; call it at logging steps)."""
        return self._has_statistics is not None and bool(self._has_statistics)

    # ------------------------------------------------------------------ the step
    def step(
        self,
        lr: float | torch.Tensor | None = None,
        loss_scale: float | torch.Tensor | None = None,
    ) -> None:
        """Reduce statistics over ranks (DDP), fold them, refresh inverses when due, precondition every
        LoRA ``.grad`` in place.

        Args:
            lr: learning rate, used only by the KL-clip (``config.kl_clip``); ``None`` skips the clip.
            loss_scale: the AMP loss scale the backward pass ran under (a tensor is read on the device,
                never synchronised); it is divided out of the backward factor.
        Call exactly once per optimizer step, after backward and before the inner optimizer step.
        No host synchronisation: every decision on tensor values is made on the device.
        """
        self._check_not_removed()
        self.check_active_adapter()
        self._sync_parameters()
        cfg = self.config
        if self._fisher is not None:
            return self._fisher.step(lr=lr, loss_scale=loss_scale)
        all_reduce_statistics(self.bank)  # DDP: one all-reduce of the step's statistics; no-op otherwise
        self.bank.fold(cfg.ema_decay, loss_scale=loss_scale, backend=self.backend)
        since = self.step_count - cfg.warmup_steps
        if since >= 0:
            # until the first scheduled refresh after warm-up, refresh every step: factors get their first
            # statistics when B != 0 (PEFT starts at B = 0), and the step that has them is preconditioned
            if since % cfg.update_freq == 0 or since < cfg.update_freq:
                self.bank.refresh_inverses(
                    cfg.damping, cfg.eps_abs, cfg.retry_damping_factor, backend=self.backend, floor=self._damping_floor()
                )
                self._has_statistics = self.bank.initialized.any()
            if self._sharded is not None:  # FSDP2: local rows of grad_B, gathered grad_A (one all_gather)
                fsdp.precondition_sharded_(self, lr)
            else:
                self._precondition_grads(lr)
        self.step_count += 1

    def _damping_floor(self) -> torch.Tensor | None:
        """Update the running maximum of tr(C)/r with the current factors (those with finite statistics) and
        return ``damping_floor * max`` ([2, M]), or None when ``config.damping_floor`` is 0."""
        if self._scale_max is None:
            return None
        scale = self.bank._scale().view(2, -1)
        ok = self.bank.initialized & torch.isfinite(scale)
        torch.maximum(self._scale_max, torch.where(ok, scale, torch.zeros_like(scale)), out=self._scale_max)
        return self.config.damping_floor * self._scale_max

    def update_factors(self, loss_scale: float | torch.Tensor | None = None) -> None:
        """Reduce and fold this step's statistics into the factor EMA only (no inversion, no preconditioning):
        the step of optimizers that use the factors themselves (:class:`grit_kernels.EigenAdamW`). Called by
        :class:`GritOptimizer` in place of :meth:`step`; ``loss_scale`` as there."""
        self._check_not_removed()
        self.check_active_adapter()
        all_reduce_statistics(self.bank)
        self.bank.fold(self.config.ema_decay, loss_scale=loss_scale, backend=self.backend)
        self.step_count += 1

    def discard_step(self) -> None:
        """Drop the statistics of a step that will not be taken (skipped for NaN/Inf, GradScaler skip)."""
        self.bank.reset_accumulators()

    def _precondition_grads(self, lr) -> None:
        modules = [m for m in self.modules if m.lora_A.grad is not None and m.lora_B.grad is not None]
        if not modules:
            return
        inv_d, inv_h = self.bank.inverse[BACKWARD], self.bank.inverse[FORWARD]
        # some modules without gradients: their bank rows, gathered on the device (index uploaded once, no sync)
        index = [m.index for m in modules] if len(modules) != len(self.modules) else None
        grads_a = [m.lora_A.grad for m in modules]
        grads_b = [m.lora_B.grad for m in modules]
        grads = grads_a + grads_b
        clip = self.config.kl_clip is not None and lr is not None
        graft = self.config.graft
        if graft and not clip:  # GritOptimizer's path (it clips the step taken): one grouped op
            ops.precondition_grafted_(grads_a, grads_b, inv_d, inv_h, backend=self.backend, modules=index)
            return
        if graft:  # the raw gradients' norms (and, for the gradient KL-clip, the raw gradients)
            raw = torch._foreach_mul(grads, 1.0) if clip else None
            raw_norms = torch._foreach_norm(grads)
        dot = ops.precondition_(
            grads_a, grads_b, inv_d, inv_h, compute_dot=clip and not graft, backend=self.backend, modules=index
        )
        if graft:  # GRIT's direction with the raw gradient's norm, per tensor
            tiny = torch.finfo(torch.float32).tiny
            ratio = torch._foreach_div(raw_norms, torch._foreach_clamp_min(torch._foreach_norm(grads), tiny))
            torch._foreach_mul_(grads, ratio)
            if clip:
                dot = torch.stack([(g * r).sum() for g, r in zip(grads, raw)]).sum().float()
        if clip:
            quad = (dot.abs() * lr**2).clamp_min(torch.finfo(torch.float32).tiny)  # lr: float or 0-dim tensor
            nu = torch.sqrt(self.config.kl_clip / quad).clamp(max=1.0)
            torch._foreach_mul_(grads_a + grads_b, nu)

    def snapshot_adapters(self) -> list[torch.Tensor]:
        """Copies of every lora_A, lora_B (bank order) before the inner optimizer step. On the CPU the copies
        are buffers refilled at every call (valid until the next one): no allocation of hundreds of tensors."""
        with torch.no_grad():  # (no per-tensor detach: hundreds of tensors)
            params = self.parameters()
            if self._sharded is not None:  # FSDP2: the local shards
                params = [fsdp.local(p) for p in params]
            if self.bank.device.type != "cpu":
                return ops.clone_tensors(params, backend=self.backend)
            if self._snapshot is None or not ops.copy_tensors_(self._snapshot, params, backend=self.backend):
                self._snapshot = ops.clone_tensors(params, backend=self.backend)
            return self._snapshot

    def clip_update_(self, before: list[torch.Tensor]) -> None:
        """KL-clip the step the inner optimizer just took (after its momentum, with its per-group lrs).

        ``Delta = p - before``; ``q = sum_m <D_m Delta_A, Delta_A> + <Delta_B H_m, Delta_B>`` (the Fisher
        quadratic form, ~2 x the per-token KL of the step); ``p <- before + min(1, sqrt(kl_clip / q)) Delta``.
        """
        params = self.parameters()
        if self._sharded is not None:  # FSDP2: one all_gather of the Delta_A rows
            fsdp.clip_update_sharded_(self, before)
            return
        with torch.no_grad():
            ops.kl_clip_update_(
                params[0::2], params[1::2], before[0::2], before[1::2], self.bank.factor[BACKWARD],
                self.bank.factor[FORWARD], self.config.kl_clip, backend=self.backend,
            )

    # ------------------------------------------------------------------ observability
    def curvature_summary(self) -> dict[str, torch.Tensor]:
        """Device tensors describing the factors (read them with ``.item()`` at logging steps only).

        Keys: ``damping_mean``, ``trace_forward_mean``, ``trace_backward_mean``, ``condition_max``
        (largest eigenvalue ratio of the damped factors, via an eigen solve of the bank), and
        ``inverse_failures`` (matrices with statistics whose latest inversion used the retry or a
        fallback; 0 before the first inversion).
        """
        bank, cfg = self.bank, self.config
        floor = cfg.damping_floor * self._scale_max if self._scale_max is not None else None
        lam = bank.damping_values(cfg.damping, cfg.eps_abs, floor)
        trace = torch.diagonal(bank.factor, dim1=2, dim2=3).sum(dim=2)
        eig = torch.linalg.eigvalsh(bank.factor.reshape(-1, bank.max_rank, bank.max_rank).double())
        # padded entries add zero eigenvalues; the damped spectrum is eig + lam
        lam_flat = lam.reshape(-1, 1).double()
        cond = (eig.max(dim=1).values + lam_flat[:, 0]) / (eig.clamp_min(0).min(dim=1).values + lam_flat[:, 0])
        return {
            "damping_mean": lam.mean(),
            "trace_forward_mean": trace[FORWARD].mean(),
            "trace_backward_mean": trace[BACKWARD].mean(),
            "condition_max": cond.max().float(),
            "inverse_failures": ((bank.status > 0) & bank.initialized).sum() * int(bank.refresh_count > 0),
        }

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything a resumed run needs: config, step count, the bank, the Fisher kind and (for
        ``fisher != "kfac"``) its state, and the rank adapter's schedule position (when reprojecting)."""
        state = {
            "config": self.config.to_dict(),
            "step_count": self.step_count,
            "module_names": [m.name for m in self.modules],
            "bank": self.bank.state_dict(),
            "fisher": self.config.fisher,
        }
        if self._fisher is not None:
            state["fisher_state"] = self._fisher.state_dict()
        if self.rank_adapter is not None:
            state["rank_adapter"] = self.rank_adapter.state_dict()
        if self._scale_max is not None:
            state["scale_max"] = self._scale_max.clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a saved state onto this preconditioner's device (the model must have the same modules)."""
        self._check_not_removed()
        kind = state.get("fisher", "kfac")  # states saved before the key existed are rank-space K-FAC
        if kind != self.config.fisher:
            raise ValueError(
                f"GritPreconditioner.load_state_dict: the state was saved with fisher={kind!r}, this preconditioner "
                f"has fisher={self.config.fisher!r}; build it with GritConfig(fisher={kind!r}) to resume"
            )
        names = [m.name for m in self.modules]
        if list(state["module_names"]) != names:
            missing = set(state["module_names"]) ^ set(names)
            raise ValueError(f"GritPreconditioner.load_state_dict: module mismatch, e.g. {sorted(missing)[:5]}")
        self.bank.load_state_dict(state["bank"])
        if self._fisher is not None:
            self._fisher.load_state_dict(state["fisher_state"])
        if self.rank_adapter is not None and "rank_adapter" in state:
            self.rank_adapter.load_state_dict(state["rank_adapter"])
        if self._scale_max is not None:  # absent from states saved without the floor: rebuilt from the factors
            if "scale_max" in state:
                self._scale_max.copy_(state["scale_max"])
            else:
                self._scale_max.zero_()
        self.step_count = int(state["step_count"])
        # derived, not saved: the restored inverses came from statistics iff a refresh ran after warm-up
        past_warmup = self.step_count > self.config.warmup_steps and self.bank.refresh_count > 0
        self._has_statistics = self.bank.initialized.any() if past_warmup else None

    def remove(self) -> None:
        """Restore plain PEFT layers; the preconditioner cannot be used afterwards."""
        for m in self.modules:
            unpatch_lora_layer(m.layer)
        if hasattr(self._fisher, "remove"):
            self._fisher.remove()
        self._removed = True

    def check_active_adapter(self) -> None:
        """Raise ``RuntimeError`` if the model's active adapter is no longer the one this preconditioner
        was built for (``model.set_adapter(other)`` after construction). O(1): PEFT switches every layer
        at once, so the first module stands for all."""
        first = self.modules[0]
        adapter = first.layer._grit_state["adapter"] if hasattr(first.layer, "_grit_state") else None
        active = list(first.layer.active_adapters)
        if adapter is None or active == [adapter]:
            return
        now = repr(active[0]) if len(active) == 1 else f"{active}"
        raise RuntimeError(
            f"GritPreconditioner: the active adapter changed from {adapter!r} to {now} after the preconditioner "
            f"was built (model.set_adapter); it captures statistics of and preconditions {adapter!r} only, so "
            f"no GRIT step is possible. Switch back with model.set_adapter({adapter!r}), or re-create GRIT for "
            "the new adapter: pre.remove(); pre = GritPreconditioner(model, config); opt = GritOptimizer("
            "<a new optimizer over model.parameters()>, pre) (with GritTrainer: build a new trainer)"
        )

    def _check_not_removed(self) -> None:
        if self._removed:
            raise RuntimeError("this GritPreconditioner was removed; create a new one")

    def __repr__(self) -> str:
        return (
            f"GritPreconditioner(num_modules={self.num_modules}, max_rank={self.bank.max_rank}, "
            f"backend={self.backend!r}, step_count={self.step_count}, skipped={len(self.skipped)})"
        )
