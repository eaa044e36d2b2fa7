"""Data-parallel GRIT: one all-reduce of the bank's step statistics per optimizer step.

Under DDP every rank captures ``sum h h^T``, ``sum delta delta^T`` and row counts of its own tokens.
Before the EMA fold, :func:`all_reduce_statistics` sums them over ranks (one ``all_reduce`` of the
contiguous ``bank.accumulators``), so every rank folds, inverts and preconditions identically.

**The world-size factor.** DDP averages gradients, so each rank's loss is ``W`` times its share of
the global mean loss (``W`` = world size): with the Trainer's ``average_tokens_across_devices``
(default) ``loss_r = W * sum_{t in r} l_t / N_global`` exactly; with per-rank mean losses the same
holds when ranks have equal token counts (the condition under which DDP's averaged gradient is the
gradient of the global mean loss). Hence a locally captured ``delta_t = dloss_r/dh_t`` is ``W`` times the
``delta_t`` of one process on the concatenated batch, and the summed ``sum delta delta^T`` is ``W^2``
times too large. Rows and ``sum h h^T`` are plain sums. So after the all-reduce the backward sum is
multiplied by ``1/W^2``; then ``D_step = rows * sum(delta delta^T) / scale^2`` (FactorBank.fold) equals
the single-process value, and so do ``H``, the inverses and the preconditioned (already averaged)
gradients. ``tests/test_distributed.py`` checks this with two gloo processes on CPU.

FSDP shards the LoRA weights and their gradients, which the in-place grouped preconditioning cannot
see whole; :func:`check_not_fsdp` refuses it. Use DDP: LoRA adapters are small enough to replicate.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn

from .bank import BACKWARD


def world_size(group: Any | None = None) -> int:
    """Number of processes in ``group`` (1 without an initialised process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


def all_reduce_statistics(bank, group: Any | None = None) -> None:
    """Sum this optimizer step's statistics over data-parallel ranks, in place (one all-reduce).

    ``bank`` is a :class:`~grit_kernels.bank.FactorBank`; ``bank.accumulators`` (``stat_sum`` then
    ``rows``, one fp32 tensor) is all-reduced with SUM and the backward sums are scaled by ``1/W^2``
    (see the module docstring). A no-op without an initialised process group or with ``W == 1``.
    Collective: every rank must call it at the same point, right before ``bank.fold``. No host sync.
    """
    w = world_size(group)
    if w == 1:
        return
    dist.all_reduce(bank.accumulators, op=dist.ReduceOp.SUM, group=group)
    bank.stat_sum[BACKWARD].mul_(1.0 / (w * w))


def _fsdp_classes() -> tuple[type, ...]:
    classes: list[type] = []
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        classes.append(FullyShardedDataParallel)
    except Exception:  # pragma: no cover - torch built without distributed
        pass
    try:
        from torch.distributed.fsdp import FSDPModule  # FSDP2 (fully_shard)

        classes.append(FSDPModule)
    except Exception:  # pragma: no cover - older torch
        pass
    return tuple(classes)


def fsdp_error(where: str = "") -> NotImplementedError:
    """The error GRIT raises for FSDP; ``where`` names the FSDP-wrapped module if known."""
    return NotImplementedError(
        f"GRIT does not support FSDP{where}: FSDP shards the LoRA weights and gradients, so the "
        "rank-space preconditioning cannot act on whole lora_A / lora_B gradients. Use DDP instead "
        "(LoRA adapters are small enough to replicate; QLoRA keeps the base model 4-bit on every rank)."
    )


def check_not_fsdp(model: nn.Module) -> None:
    """Raise ``NotImplementedError`` if ``model`` is or contains an FSDP (1 or 2) wrapped module."""
    classes = _fsdp_classes()
    if not classes:
        return
    for name, module in model.named_modules():
        if isinstance(module, classes):
            raise fsdp_error(f" (module {name!r})" if name else "")


__all__ = [
    "all_reduce_statistics",
    "check_not_fsdp",
    "fsdp_error",
    "world_size",
]
