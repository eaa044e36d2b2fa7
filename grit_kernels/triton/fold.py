"""Triton ``ema_fold_``: fold one step's statistics into the factor EMA, all matrices in one launch.

One program per matrix. Pass 1 checks that ``weight * stat_sum`` is finite over the whole ``R x R``
matrix; pass 2 writes ``C_step`` (first fold) or ``decay * C + (1 - decay) * C_step``. Skipped
matrices (weight 0 or a non-finite ``C_step``) are not written at all. ``R*R`` is processed in chunks
of at most ``MAX_CHUNK`` elements, so any ``R`` works (for ``R <= 64`` one chunk, both passes read
the same cached lines).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._device import check_same_device

MAX_CHUNK = 4096
FLT_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _ema_fold_kernel(
    factor_ptr,
    stat_ptr,
    weight_ptr,
    init_ptr,
    R,
    sf0,
    sf1,
    sf2,
    ss0,
    ss1,
    ss2,
    stride_w,
    stride_init,
    decay,
    one_minus_decay,
    CHUNK: tl.constexpr,
    N_CHUNKS: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    w = tl.load(weight_ptr + i * stride_w).to(tl.float32)
    was_init = tl.load(init_ptr + i * stride_init) != 0
    numel = R * R
    f_base = factor_ptr + i * sf0
    s_base = stat_ptr + i * ss0

    n_bad = 0
    for c in range(N_CHUNKS):
        e = c * CHUNK + tl.arange(0, CHUNK)
        m = e < numel
        s = tl.load(s_base + (e // R) * ss1 + (e % R) * ss2, mask=m, other=0.0).to(tl.float32)
        step = s * w
        n_bad += tl.sum((~(tl.abs(step) <= FLT_MAX)).to(tl.int32), axis=0)  # NaN compares False
    ok = (w != 0) & (n_bad == 0)

    if ok:
        for c in range(N_CHUNKS):
            e = c * CHUNK + tl.arange(0, CHUNK)
            m = e < numel
            s = tl.load(s_base + (e // R) * ss1 + (e % R) * ss2, mask=m, other=0.0).to(tl.float32)
            f_ptrs = f_base + (e // R) * sf1 + (e % R) * sf2
            step = s * w
            if was_init:
                f = tl.load(f_ptrs, mask=m, other=0.0).to(tl.float32)
                step = decay * f + one_minus_decay * step
            tl.store(f_ptrs, step.to(factor_ptr.dtype.element_ty), mask=m)
        tl.store(init_ptr + i * stride_init, tl.full((), 1, tl.uint8))


def ema_fold_(
    factor: torch.Tensor,
    stat_sum: torch.Tensor,
    weight: torch.Tensor,
    decay: float,
    initialized: torch.Tensor,
) -> None:
    """In place fold of ``weight[i] * stat_sum[i]`` into ``factor[i]``; sets ``initialized[i]``.

    ``factor``, ``stat_sum``: ``[n, R, R]`` (any strides; math in fp32); ``weight``: ``[n]``;
    ``initialized``: ``[n]`` bool, updated in place (through a same-size ``uint8`` view).
    Oracle: :func:`grit_kernels.reference.ema_fold`.
    """
    n, R, _ = factor.shape
    if initialized.dtype != torch.bool or initialized.shape != (n,):
        raise ValueError(f"ema_fold_: initialized must be a [n] bool tensor, got {initialized.dtype} {tuple(initialized.shape)}")
    check_same_device("ema_fold_", factor.device, stat_sum=stat_sum, weight=weight, initialized=initialized)
    for name, t in (("factor", factor), ("stat_sum", stat_sum), ("weight", weight)):
        if not t.is_floating_point():
            raise TypeError(f"ema_fold_ (triton): {name} must be floating point, got {t.dtype}")
    if n == 0 or R == 0:
        return
    init_bytes = initialized.view(torch.uint8)
    chunk = min(MAX_CHUNK, triton.next_power_of_2(R * R))
    _ema_fold_kernel[(n,)](
        factor,
        stat_sum,
        weight,
        init_bytes,
        R,
        *factor.stride(),
        *stat_sum.stride(),
        weight.stride(0),
        init_bytes.stride(0),
        float(decay),
        1.0 - float(decay),
        CHUNK=chunk,
        N_CHUNKS=triton.cdiv(R * R, chunk),
        num_warps=4,
    )
