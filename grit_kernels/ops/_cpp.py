"""Backends ``cpp`` (C++ CPU kernels) and ``cuda`` (CUDA C++ kernels): thin wrappers over
``torch.ops.grit_kernels_cpp.*`` (``csrc/``, loaded by :mod:`grit_kernels._ext`).

Each wrapper has the signature of the op's ``torch`` implementation (see ``_backend.KERNELS``).
Inputs the compiled kernels do not take (an unsupported dtype, a gradient without unit column stride)
go to the ``torch`` implementation, so the result never depends on which backend was picked: by a
check before the call where it is cheap, else when the C++ op rejects the input (``TORCH_CHECK``), which
is counted and logged once (:mod:`grit_kernels.ops._fallback`; an input the ``torch`` form rejects too
raises).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _ext
from ._fallback import record, run_fallback

_GRAD_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
CUDA_MAX_RANK = 64  #: the CUDA kernels keep an R x R matrix per block in shared memory; larger R runs torch


def _too_large_for_cuda(t: torch.Tensor, rank: int) -> bool:
    return t.device.type == "cuda" and rank > CUDA_MAX_RANK


def _ops():
    if not _ext.load():
        raise RuntimeError(f"grit_kernels compiled kernels are not available: {_ext.load_error()}")
    return torch.ops.grit_kernels_cpp


def _torch(op: str):
    from ._backend import kernel

    return kernel("torch", op)


def accumulate_gram_(out: torch.Tensor, x: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """``out[r, r] += weight * x2^T x2`` (``x2 = x.reshape(-1, r)``), fp32 (fp64 for fp64 ``out``).

    On the CPU this runs the torch implementation (one MKL ``addmm``): measured faster than the C++
    kernel (4096 x 16 fp32 rows: 22 us vs 32 us, bf16: 47 us vs 54 us, one thread), so the ``cpp``
    backend never makes the statistics slower. The C++ kernel stays callable as
    ``torch.ops.grit_kernels_cpp.accumulate_gram_`` (tested against the oracle).
    """
    if (
        x.device.type == "cpu"
        or x.dtype not in _GRAD_DTYPES
        or out.dtype not in (torch.float32, torch.float64)
        or out.stride(-1) != 1
        or _too_large_for_cuda(out, out.shape[-1])
    ):
        return _torch("accumulate_gram_")(out, x, weight)
    _ops().accumulate_gram_(out, x, float(weight))
    return out


def accumulate_grams_(outs: Sequence[torch.Tensor], xs: Sequence[torch.Tensor], weight: float = 1.0) -> None:
    """``outs[i] += weight * xs[i]^T xs[i]`` for every ``i`` (one :func:`accumulate_gram_` each)."""
    for out, x in zip(outs, xs):
        if x.numel():
            accumulate_gram_(out, x, weight)


def ema_fold_(factor, stat_sum, weight, decay: float, initialized) -> None:
    """See :func:`grit_kernels.ops.ema_fold_` (``factor`` and ``initialized`` updated in place)."""
    if not (
        factor.is_contiguous()
        and initialized.is_contiguous()
        and factor.dtype in (torch.float32, torch.float64)
    ):
        return _torch("ema_fold_")(factor, stat_sum, weight, decay, initialized)
    _ops().ema_fold_(factor, stat_sum, weight, float(decay), initialized)
    return None


def damped_cholesky_inverse(
    mats, damping: float, eps_abs: float, ranks, previous, previous_valid, retry_factor: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`grit_kernels.ops.damped_cholesky_inverse`: same status codes and fallback chain."""
    if _too_large_for_cuda(mats, mats.shape[-1]):
        return _torch("damped_cholesky_inverse")(
            mats, damping, eps_abs, ranks, previous, previous_valid, retry_factor
        )
    if mats.dtype not in (torch.float32, torch.float64):
        inv, status = damped_cholesky_inverse(
            mats.float(), damping, eps_abs, ranks, previous, previous_valid, retry_factor
        )
        return inv.to(mats.dtype), status
    n, R = mats.shape[0], mats.shape[-1]
    if ranks is None:
        ranks = torch.full((n,), R, dtype=torch.int32, device=mats.device)
    if previous is None or previous_valid is None:
        previous = previous_valid = None
    return _ops().damped_cholesky_inverse(
        mats,
        float(damping),
        float(eps_abs),
        ranks.to(mats.device),
        previous,
        previous_valid,
        float(retry_factor),
    )


def precondition_(grads_a, grads_b, inv_d, inv_h, compute_dot: bool = False) -> torch.Tensor | None:
    """See :func:`grit_kernels.ops.precondition_`: one call over every module, in place."""
    supported = all(
        g.dim() == 2 and g.stride(1) == 1 and g.dtype in _GRAD_DTYPES for g in (*grads_a, *grads_b)
    )
    if (
        not supported
        or inv_d.dtype not in (torch.float32, torch.float64)
        or _too_large_for_cuda(inv_d, inv_d.shape[-1])
    ):
        return _torch("precondition_")(grads_a, grads_b, inv_d, inv_h, compute_dot)
    dot = _ops().precondition_(list(grads_a), list(grads_b), inv_d, inv_h, bool(compute_dot))
    return dot if compute_dot else None


def _on_cpu(tensors) -> bool:
    return bool(tensors) and tensors[0].device.type == "cpu"


# The C++ ops below validate every input before writing anything (TORCH_CHECK -> RuntimeError); an input
# they do not take (a dtype, a layout, another device) runs the torch form instead, counted and logged once
# (run_fallback; if the torch form rejects it too, that error is raised). No per-tensor Python check on the
# hot path: hundreds of tensors per call.


_rank_statistics_op = None  #: torch.ops.grit_kernels_cpp.rank_statistics_, looked up once (called per module)


def accumulate_rank_statistics_(stat_sum, rows, indices, h, delta, tolerance: float) -> None:
    """See :func:`grit_kernels.ops.statistics.accumulate_rank_statistics_`: one C++ call (mask, Grams, bank add)."""
    global _rank_statistics_op
    if h.device.type == "cpu":
        if _rank_statistics_op is None:
            _rank_statistics_op = _ops().rank_statistics_
        try:
            return _rank_statistics_op(stat_sum, rows, indices, h, delta, tolerance)
        except RuntimeError as error:
            op = "accumulate_rank_statistics_"
            return run_fallback("cpp", op, error, _torch(op), stat_sum, rows, indices, h, delta, tolerance)
    return _torch("accumulate_rank_statistics_")(stat_sum, rows, indices, h, delta, tolerance)


def accumulate_rank_statistics_many_(stat_sum, rows, groups, tolerance: float) -> None:
    """See :func:`grit_kernels.ops.statistics.accumulate_rank_statistics_many_`: one C++ call for every group."""
    if groups[0][1].device.type == "cpu":
        indices = [i for group in groups for i in group[0]]
        counts = [len(group[0]) for group in groups]
        try:
            return _ops().rank_statistics_many_(
                stat_sum, rows, indices, counts, [g[1] for g in groups], [g[2] for g in groups], tolerance
            )
        except RuntimeError as error:  # mixed dtypes or devices: group by group (same numbers)
            try:
                _each_group(stat_sum, rows, groups, tolerance)
            except Exception as caller_error:
                raise caller_error from error
            record("cpp", "accumulate_rank_statistics_many_", error, fallback="per-group")
            return None
    _each_group(stat_sum, rows, groups, tolerance)
    return None


def _each_group(stat_sum, rows, groups, tolerance: float) -> None:
    for indices, h, delta in groups:
        accumulate_rank_statistics_(stat_sum, rows, indices, h, delta, tolerance)


def precondition_grafted_(grads_a, grads_b, inv_d, inv_h) -> None:
    """See :func:`grit_kernels.ops.precondition_grafted_` (module ``i`` uses ``inv_*[i]``): one C++ call."""
    if _on_cpu(grads_a):
        try:
            return _ops().precondition_grafted_(grads_a, grads_b, inv_d, inv_h)
        except RuntimeError as error:
            op = "precondition_grafted_"
            return run_fallback("cpp", op, error, _torch(op), grads_a, grads_b, inv_d, inv_h)
    return _torch("precondition_grafted_")(grads_a, grads_b, inv_d, inv_h)


def clone_tensors(tensors):
    """See :func:`grit_kernels.ops.clone_tensors`."""
    if _on_cpu(tensors):
        return _ops().clone_all(tensors)
    return _torch("clone_tensors")(tensors)


def copy_tensors_(dst, src) -> bool:
    """See :func:`grit_kernels.ops.copy_tensors_`."""
    if _on_cpu(src) and _ops().copy_all_(dst, src):
        return True
    return _torch("copy_tensors_")(dst, src)


def sum_of_squares(tensors):
    """See :func:`grit_kernels.ops.sum_of_squares`."""
    if _on_cpu(tensors):
        try:
            return _ops().sum_squares(tensors)
        except RuntimeError as error:
            return run_fallback("cpp", "sum_of_squares", error, _torch("sum_of_squares"), tensors)
    return _torch("sum_of_squares")(tensors)


def kl_clip_update_(params_a, params_b, before_a, before_b, factor_d, factor_h, kl_clip: float):
    """See :func:`grit_kernels.ops.kl_clip_update_`: one C++ call (``before_*`` are left unchanged)."""
    if _on_cpu(params_a):
        try:
            return _ops().kl_clip_update_(params_a, params_b, before_a, before_b, factor_d, factor_h, kl_clip)
        except RuntimeError as error:
            args = (params_a, params_b, before_a, before_b, factor_d, factor_h, kl_clip)
            return run_fallback("cpp", "kl_clip_update_", error, _torch("kl_clip_update_"), *args)
    return _torch("kl_clip_update_")(params_a, params_b, before_a, before_b, factor_d, factor_h, kl_clip)
