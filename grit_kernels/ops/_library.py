"""The public ops as ``torch.library`` custom ops (namespace ``grit_kernels``), for ``torch.compile``.

``torch.ops.grit_kernels.<op>`` runs the implementation of the backend named in its last argument
(:data:`grit_kernels.ops._backend.KERNELS`); its fake implementation gives ``torch.compile`` the output
shapes without running anything, and ``mutates_args`` tells it which inputs are written in place. The
public functions in :mod:`grit_kernels.ops` validate their inputs, then call these ops while
``torch.compile`` traces (so a compiled training step has no graph break in our code) and the
implementation directly in eager mode (a custom-op call costs ~40 us of Python, and the Gram op runs
hundreds of times per micro-batch).
"""

from __future__ import annotations

import torch

from ._backend import kernel

NAMESPACE = "grit_kernels"


@torch.library.custom_op(f"{NAMESPACE}::accumulate_gram_", mutates_args=("out",))
def accumulate_gram_(out: torch.Tensor, x: torch.Tensor, weight: float, backend: str) -> None:
    kernel(backend, "accumulate_gram_")(out, x, weight)


@accumulate_gram_.register_fake
def _(out, x, weight, backend):
    return None


@torch.library.custom_op(f"{NAMESPACE}::accumulate_grams_", mutates_args=("outs",))
def accumulate_grams_(outs: list[torch.Tensor], xs: list[torch.Tensor], weight: float, backend: str) -> None:
    kernel(backend, "accumulate_grams_")(outs, xs, weight)


@accumulate_grams_.register_fake
def _(outs, xs, weight, backend):
    return None


@torch.library.custom_op(f"{NAMESPACE}::ema_fold_", mutates_args=("factor", "initialized"))
def ema_fold_(
    factor: torch.Tensor, stat_sum: torch.Tensor, weight: torch.Tensor, decay: float, initialized: torch.Tensor, backend: str
) -> None:
    kernel(backend, "ema_fold_")(factor, stat_sum, weight, decay, initialized)


@ema_fold_.register_fake
def _(factor, stat_sum, weight, decay, initialized, backend):
    return None


@torch.library.custom_op(f"{NAMESPACE}::damped_cholesky_inverse", mutates_args=())
def damped_cholesky_inverse(
    mats: torch.Tensor,
    damping: float,
    eps_abs: float,
    ranks: torch.Tensor | None,
    previous: torch.Tensor | None,
    previous_valid: torch.Tensor | None,
    retry_factor: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    inv, status = kernel(backend, "damped_cholesky_inverse")(
        mats, damping, eps_abs, ranks, previous, previous_valid, retry_factor
    )
    return inv, status


@damped_cholesky_inverse.register_fake
def _(mats, damping, eps_abs, ranks, previous, previous_valid, retry_factor, backend):
    return torch.empty_like(mats, memory_format=torch.contiguous_format), mats.new_empty(mats.shape[:1], dtype=torch.int32)


@torch.library.custom_op(f"{NAMESPACE}::precondition_", mutates_args=("grads_a", "grads_b"))
def precondition_(
    grads_a: list[torch.Tensor],
    grads_b: list[torch.Tensor],
    inv_d: torch.Tensor,
    inv_h: torch.Tensor,
    compute_dot: bool,
    backend: str,
) -> torch.Tensor:
    dot = kernel(backend, "precondition_")(grads_a, grads_b, inv_d, inv_h, compute_dot)
    return dot if dot is not None else inv_d.new_zeros((), dtype=torch.float32)


@precondition_.register_fake
def _(grads_a, grads_b, inv_d, inv_h, compute_dot, backend):
    return inv_d.new_empty((), dtype=torch.float32)
