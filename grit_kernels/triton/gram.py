"""Triton ``accumulate_gram_``: ``out[r, r] += weight * x2^T x2`` in fp32, one launch.

The rows of ``x2 = x.reshape(-1, r)`` are split across programs (grid axis 0); each program reduces
its row range to a partial ``r x r`` Gram tile in fp32 registers and adds it into ``out`` with
``tl.atomic_add`` (so the summation order, and the last bits of the result, vary from run to run).
For ``r > 64`` the output is tiled into ``64 x 64`` blocks (grid axis 1).

Products are exact in fp32 for fp16/bf16 inputs, so on the GPU half-precision tiles go straight to
the tensor cores (fp32 accumulation); fp32 inputs use ``input_precision="ieee"`` (no TF32). In the
CPU interpreter every tile is upcast to fp32 first (bf16 dot is wrong there).
float64 ``out`` or ``x`` (tests only) is computed with ``torch.addmm`` instead.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .._device import check_same_device, interpreter_active, to_device

MAX_TILE_R = 64  #: output tile edge; r above this is tiled
ROWS_PER_STEP = 128  #: rows loaded per loop iteration of one program
N_GRAM_FIELDS: tl.constexpr = tl.constexpr(8)  #: grouped table: x ptr, rows, r, 2 x strides, out ptr, 2 out strides


@triton.jit
def _gram_kernel(
    x_ptr,
    out_ptr,
    n_rows,
    r,
    rows_per_program,
    stride_xm,
    stride_xk,
    stride_om,
    stride_on,
    weight,
    n_col_tiles,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    tile = tl.program_id(1)
    i0 = (tile // n_col_tiles) * BLOCK_R
    j0 = (tile % n_col_tiles) * BLOCK_R
    ri = i0 + tl.arange(0, BLOCK_R)
    rj = j0 + tl.arange(0, BLOCK_R)
    row_begin = pid * rows_per_program
    row_end = tl.minimum(row_begin + rows_per_program, n_rows)

    acc = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    for start in range(row_begin, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        rows64 = rows.to(tl.int64)
        xi = tl.load(
            x_ptr + rows64[:, None] * stride_xm + ri[None, :] * stride_xk,
            mask=row_ok[:, None] & (ri[None, :] < r),
            other=0.0,
        )
        if SINGLE_TILE:
            xj = xi
        else:
            xj = tl.load(
                x_ptr + rows64[:, None] * stride_xm + rj[None, :] * stride_xk,
                mask=row_ok[:, None] & (rj[None, :] < r),
                other=0.0,
            )
        if UPCAST:
            xi = xi.to(tl.float32)
            xj = xj.to(tl.float32)
        if IEEE:
            acc = tl.dot(tl.trans(xi), xj, acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(xi), xj, acc)

    out_mask = (ri[:, None] < r) & (rj[None, :] < r)
    out_ptrs = out_ptr + ri[:, None] * stride_om + rj[None, :] * stride_on
    tl.atomic_add(out_ptrs, acc * weight, mask=out_mask, sem="relaxed")  # a sum: no ordering needed


@triton.jit
def _grams_kernel(
    table,
    dtype_ref,
    out_ref,
    weight,
    n_programs,
    BLOCK_M: tl.constexpr,
    RP: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Grouped Gram: program ``(p, i)`` adds rows ``p::n_programs`` blocks of matrix ``i``.

    ``table[i]``: x pointer, rows, rank, row stride, column stride, out pointer, out strides (int64).
    """
    pid = tl.program_id(0)
    entry = table + tl.program_id(1).to(tl.int64) * N_GRAM_FIELDS
    x_ptr = tl.load(entry).to(dtype_ref.dtype)
    n_rows = tl.load(entry + 1)
    r = tl.load(entry + 2)
    stride_xm = tl.load(entry + 3)
    stride_xk = tl.load(entry + 4)
    out_ptr = tl.load(entry + 5).to(out_ref.dtype)
    stride_om = tl.load(entry + 6)
    stride_on = tl.load(entry + 7)
    k = tl.arange(0, RP)
    k_ok = k < r
    acc = tl.zeros((RP, RP), dtype=tl.float32)
    for start in range(pid * BLOCK_M, n_rows, n_programs * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + k[None, :] * stride_xk,
            mask=(rows[:, None] < n_rows) & k_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            x = x.to(tl.float32)
        if IEEE:
            acc = tl.dot(tl.trans(x), x, acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(x), x, acc)
    out_ptrs = out_ptr + k[:, None] * stride_om + k[None, :] * stride_on
    tl.atomic_add(out_ptrs, acc * weight, mask=k_ok[:, None] & k_ok[None, :], sem="relaxed")


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":  # the interpreter: a few programs, so the atomics are exercised
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def accumulate_gram_(out: torch.Tensor, x: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """In place ``out += weight * x2^T x2``, ``x2 = x.reshape(-1, r)``; returns ``out``.

    ``out``: ``[r, r]`` float32 (any strides); ``x``: ``[..., r]`` float32/float16/bfloat16 (any
    strides: ``reshape`` may copy). One kernel launch, no host synchronisation.
    """
    r = out.shape[-1]
    check_same_device("accumulate_gram_", out.device, x=x)
    if out.dtype == torch.float64 or x.dtype == torch.float64:
        rows = x.reshape(-1, r).to(out.dtype)
        return out.addmm_(rows.T, rows, alpha=weight)
    if out.dtype != torch.float32:
        raise TypeError(f"accumulate_gram_: out must be float32, got {out.dtype}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"accumulate_gram_: x must be float32/float16/bfloat16, got {x.dtype}")
    rows = x.reshape(-1, r)
    n_rows = rows.shape[0]
    if n_rows == 0:
        return out

    block_r = max(16, min(MAX_TILE_R, triton.next_power_of_2(r)))
    n_col_tiles = triton.cdiv(r, block_r)
    interp = interpreter_active()
    block_m = ROWS_PER_STEP
    # Enough row programs to fill the machine (a few per SM) without drowning `out` in atomics.
    max_programs = max(1, 4 * _num_sms(x.device) // (n_col_tiles * n_col_tiles))  # CPU: 8
    n_programs = min(triton.cdiv(n_rows, block_m), max_programs)
    rows_per_program = triton.cdiv(triton.cdiv(n_rows, n_programs), block_m) * block_m
    n_programs = triton.cdiv(n_rows, rows_per_program)

    _gram_kernel[(n_programs, n_col_tiles * n_col_tiles)](
        rows,
        out,
        n_rows,
        r,
        rows_per_program,
        rows.stride(0),
        rows.stride(1),
        out.stride(0),
        out.stride(1),
        float(weight),
        n_col_tiles,
        BLOCK_M=block_m,
        BLOCK_R=block_r,
        SINGLE_TILE=n_col_tiles == 1,
        UPCAST=interp or rows.dtype == torch.float32,
        IEEE=interp or rows.dtype == torch.float32,
        num_warps=8 if block_r == MAX_TILE_R else 4,  # no register spills on sm_90 (ptxas -v)
    )
    return out


@functools.lru_cache(maxsize=None)
def _typed_ref(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 1-element tensor whose pointer type tells the kernel the element type of table pointers."""
    return torch.empty(1, dtype=dtype, device=device)


def accumulate_grams_(outs: Sequence[torch.Tensor], xs: Sequence[torch.Tensor], weight: float = 1.0) -> Sequence[torch.Tensor]:
    """Grouped :func:`accumulate_gram_`: ``outs[i] += weight * xs[i]^T xs[i]``, one launch per input dtype.

    ``outs[i]``: ``[r_i, r_i]`` float32, any strides, distinct; ``xs[i]``: ``[..., r_i]``
    float32/float16/bfloat16. The per-matrix table (pointers, row counts, strides) is uploaded with a
    pinned non-blocking copy: no host synchronisation. Ranks above ``MAX_TILE_R`` and float64 go
    through :func:`accumulate_gram_` one by one.
    """
    if outs:  # one device for the whole call: each launch reads a pointer table of every member
        device = outs[0].device
        for i, (out, x) in enumerate(zip(outs, xs)):
            check_same_device("accumulate_grams_", device, **{f"outs[{i}]": out, f"xs[{i}]": x})
    groups: dict[torch.dtype, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for out, x in zip(outs, xs):
        r = out.shape[-1]
        if x.numel() == 0:
            continue
        if r > MAX_TILE_R or out.dtype != torch.float32 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            accumulate_gram_(out, x, weight)
            continue
        groups.setdefault(x.dtype, []).append((out, x.reshape(-1, r)))
    interp = interpreter_active()
    for dtype, members in groups.items():
        device = members[0][1].device
        rp = max(16, triton.next_power_of_2(max(out.shape[-1] for out, _ in members)))
        max_rows = max(rows.shape[0] for _, rows in members)
        n_programs = max(1, min(triton.cdiv(max_rows, ROWS_PER_STEP), 4 * _num_sms(device) // len(members)))
        table = to_device(
            [
                v
                for out, rows in members
                for v in (rows.data_ptr(), rows.shape[0], out.shape[-1], *rows.stride(), out.data_ptr(), *out.stride())
            ],
            torch.int64,
            device,
        )
        _grams_kernel[(n_programs, len(members))](
            table,
            _typed_ref(dtype, device),
            _typed_ref(torch.float32, device),
            float(weight),
            n_programs,
            BLOCK_M=ROWS_PER_STEP,
            RP=rp,
            UPCAST=interp or dtype == torch.float32,
            IEEE=interp or dtype == torch.float32,
            num_warps=8 if rp == MAX_TILE_R else 4,
        )
    return outs
