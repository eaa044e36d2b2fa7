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

FSDP2 (``torch.distributed.fsdp.fully_shard``) works: the same statistics all-reduce, and the sharded
preconditioning of :mod:`grit_kernels.fsdp`. FSDP1 (``FullyShardedDataParallel``) and DeepSpeed are refused
(:func:`check_fsdp_supported`, :func:`fsdp1_error`, :func:`deepspeed_error`), with the reason and what works.
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


def fsdp1_error(where: str = "") -> NotImplementedError:
    """The error GRIT raises for FSDP1; ``where`` names the wrapped module if known."""
    return NotImplementedError(
        f"GRIT does not support FSDP1 (FullyShardedDataParallel{where}): it flattens each unit's parameters into "
        "one FlatParameter sharded at element offsets, so a rank holds arbitrary slices of lora_A / lora_B rows "
        "that the rank-space preconditioning cannot address. Use FSDP2 (torch.distributed.fsdp.fully_shard; "
        "accelerate / Trainer: fsdp_config={'fsdp_version': 2}), which shards whole rows, or DDP"
    )


def deepspeed_error() -> NotImplementedError:
    """The error GRIT raises for DeepSpeed (every ZeRO stage)."""
    return NotImplementedError(
        "GRIT does not support DeepSpeed: its engine owns the optimizer step and ZeRO partitions parameters, "
        "gradients (stage 2-3) and optimizer state as flat buffers at element offsets, so GRIT's optimizer would "
        "run on flat partitions instead of whole lora_A / lora_B gradients, after DeepSpeed's own reduction. Use "
        "FSDP2 (accelerate / Trainer: fsdp_config={'fsdp_version': 2}; ZeRO-3's sharding of weights, gradients and "
        "optimizer state) or DDP"
    )


def check_fsdp_supported(model: nn.Module) -> None:
    """Raise ``NotImplementedError`` if ``model`` is or contains an FSDP1 ``FullyShardedDataParallel`` module
    (FSDP2's ``fully_shard`` modules pass: :mod:`grit_kernels.fsdp`)."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except Exception:  # pragma: no cover - torch built without distributed
        return
    for name, module in model.named_modules():
        if isinstance(module, FullyShardedDataParallel):
            raise fsdp1_error(f", module {name!r}" if name else "")


__all__ = [
    "all_reduce_statistics",
    "check_fsdp_supported",
    "deepspeed_error",
    "fsdp1_error",
    "world_size",
]
