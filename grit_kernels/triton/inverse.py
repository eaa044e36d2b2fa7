"""Triton ``damped_cholesky_inverse``: every ``r x r`` factor of the model inverted in one launch.

One program per matrix holds the matrix in registers as an ``RP x RP`` fp32 tile (``RP`` = ``R``
rounded up to a power of two, at least 16 for ``tl.dot``; rows/columns past the matrix's rank are
the identity). Per attempt with damping ``lam``:

1. right-looking Cholesky of ``C + lam*I``, one column per loop iteration (tile-wide ``tl.where``
   updates); it reads only the lower triangle of ``C``, like ``torch.linalg.cholesky``; a pivot that
   is not positive and finite marks the attempt failed,
2. forward substitution for ``L^-1``, one row per iteration,
3. ``C^-1 = L^-T L^-1`` with ``tl.dot(..., input_precision="ieee")`` (no TF32), symmetrised.

At ``RP = 64`` (``SCRATCH``) the register tiles would spill, so ``L`` and ``L^-1`` go through a
per-matrix fp32 global scratch ``[n, 2, 64, 64]`` (32 KiB a matrix, L2-resident, allocated by the
wrapper; still one launch): step 1 stores ``L`` column by column and keeps only the trailing matrix in
registers, step 2 reads ``L`` back row by row and stores each row of ``L^-1``, and step 3 sums the
outer products of the rows of ``L^-1`` (same values as the ``tl.dot``, in a different summation
order). ``tl.debug_barrier`` orders each phase's stores before the next phase's loads.

Square roots and divisions are the IEEE-rounded ``tl.sqrt_rn`` / ``tl.div_rn`` (Triton's ``/`` and
``tl.sqrt`` are approximate on the GPU).

The fallback chain of docs/design.md §4 is decided inside the kernel (no host synchronisation): attempt
with ``lam``, retry with ``lam * retry_factor`` only where the first failed (a branch on the device),
else the previous inverse where ``previous_valid``, else ``I/lam`` (``I`` if ``lam`` is not finite
and positive). A non-finite entry in the ``r x r`` block or a non-finite ``lam`` fails every attempt;
so does a non-finite result. Status codes: :class:`grit_kernels.status.InverseStatus`.

``R > MAX_TRITON_R`` (64) and float64 matrices are refused here (``ValueError``): the register tile would
spill beyond 64. The op front end (:func:`grit_kernels.ops.damped_cholesky_inverse`) sends them to the
sync-free torch batched path instead (this module imports nothing from ``grit_kernels.ops``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._device import check_same_device
from ..status import InverseStatus

MAX_TRITON_R = 64
FLT_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)
OK: tl.constexpr = tl.constexpr(int(InverseStatus.OK))
RETRIED: tl.constexpr = tl.constexpr(int(InverseStatus.RETRIED))
KEPT_PREVIOUS: tl.constexpr = tl.constexpr(int(InverseStatus.KEPT_PREVIOUS))
SCALED_IDENTITY: tl.constexpr = tl.constexpr(int(InverseStatus.SCALED_IDENTITY))


@triton.jit
def _all_finite(x):
    return tl.sum(tl.sum((~(tl.abs(x) <= FLT_MAX)).to(tl.int32), axis=1), axis=0) == 0


@triton.jit
def _damped_inverse(c, lam, r, idx_r, idx_c):
    """Inverse of ``c + lam*I`` on the leading ``r x r`` block (identity outside) and success flag.

    ``c``: ``[RP, RP]`` fp32, exactly symmetric, identity outside the block.
    """
    row = idx_r[:, None]
    col = idx_c[None, :]
    active_diag = (row == col) & (row < r)
    m = c + tl.where(active_diag, lam, 0.0)
    eye_pad = tl.where((row == col) & (row >= r), 1.0, 0.0)

    # Cholesky, right-looking: lt holds L^T (lt[j, b] = L[b, j]).
    lt = eye_pad
    ok = lam == lam  # True (lam is finite here), as a device scalar
    for j in range(0, r):
        col_j = tl.sum(tl.where(col == j, m, 0.0), axis=1)  # m[:, j], indexed by row
        row_j = tl.sum(tl.where(row == j, m, 0.0), axis=0)  # m[j, :] == m[:, j], indexed by column
        d = tl.sum(tl.where(idx_r == j, col_j, 0.0), axis=0)
        pivot_ok = (d > 0.0) & (d <= FLT_MAX)
        ok = ok & pivot_ok
        s = tl.sqrt_rn(tl.where(pivot_ok, d, 1.0))
        # div_rn wants operands of equal shape
        l_by_row = tl.where(idx_r > j, tl.div_rn(col_j, tl.zeros_like(col_j) + s), tl.where(idx_r == j, s, 0.0))
        l_by_col = tl.where(idx_c > j, tl.div_rn(row_j, tl.zeros_like(row_j) + s), tl.where(idx_c == j, s, 0.0))
        lt = tl.where(row == j, l_by_col[None, :], lt)
        m = tl.where((row > j) & (col > j), m - l_by_row[:, None] * l_by_col[None, :], m)

    # Forward substitution: li = L^-1, row i = (e_i - sum_{k<i} L[i, k] li[k, :]) / L[i, i].
    li = eye_pad
    for i in range(0, r):
        l_row_i = tl.sum(tl.where(col == i, lt, 0.0), axis=1)  # L[i, k], indexed by k (row)
        l_ii = tl.sum(tl.where(idx_r == i, l_row_i, 0.0), axis=0)
        v = tl.sum(l_row_i[:, None] * li, axis=0)  # includes k == i, where li[i, :] is still 0
        e_i = tl.where(idx_c == i, 1.0, 0.0)
        li = tl.where(row == i, tl.div_rn(e_i - v, tl.zeros_like(v) + l_ii)[None, :], li)

    inv = tl.dot(tl.trans(li), li, input_precision="ieee")
    ok = ok & _all_finite(inv)
    return inv, ok


@triton.jit
def _damped_inverse_scratch(c, lam, r, idx_r, idx_c, scratch, RP: tl.constexpr):
    """:func:`_damped_inverse` with ``L`` and ``L^-1`` passed through global scratch, not register tiles.

    ``scratch``: this matrix's ``[2, RP, RP]`` fp32 row-major buffer (L2-resident; contents on entry
    are never read). Column ``j`` of ``L`` is stored at iteration ``j`` of the factorisation and row
    ``i`` read back (entries ``k <= i``) by the substitution, which stores each row of ``L^-1`` into
    the second half; the product is then a sum of outer products of those rows. Only one
    ``[RP, RP]`` tile is live per phase besides ``c``. ``L`` and ``L^-1`` come from the same operations
    in the same order as in :func:`_damped_inverse`; the product differs from the ``tl.dot`` only in
    its summation order (interpreter, r = 40 / 64: relative difference <= 6e-8).
    """
    row = idx_r[:, None]
    col = idx_c[None, :]
    active_diag = (row == col) & (row < r)
    m = c + tl.where(active_diag, lam, 0.0)
    eye_pad = tl.where((row == col) & (row >= r), 1.0, 0.0)

    tl.debug_barrier()  # a previous attempt's reads of the scratch are done
    ok = lam == lam
    for j in range(0, r):
        col_j = tl.sum(tl.where(col == j, m, 0.0), axis=1)
        row_j = tl.sum(tl.where(row == j, m, 0.0), axis=0)
        d = tl.sum(tl.where(idx_r == j, col_j, 0.0), axis=0)
        pivot_ok = (d > 0.0) & (d <= FLT_MAX)
        ok = ok & pivot_ok
        s = tl.sqrt_rn(tl.where(pivot_ok, d, 1.0))
        l_by_row = tl.where(idx_r > j, tl.div_rn(col_j, tl.zeros_like(col_j) + s), tl.where(idx_r == j, s, 0.0))
        l_by_col = tl.where(idx_c > j, tl.div_rn(row_j, tl.zeros_like(row_j) + s), tl.where(idx_c == j, s, 0.0))
        tl.store(scratch + idx_r * RP + j, l_by_row)  # L[:, j]
        m = tl.where((row > j) & (col > j), m - l_by_row[:, None] * l_by_col[None, :], m)
    tl.debug_barrier()  # L complete and visible to every thread of the program

    li = eye_pad
    for i in range(0, r):
        l_row_i = tl.load(scratch + i * RP + idx_r, mask=idx_r <= i, other=0.0)  # L[i, k], indexed by k
        l_ii = tl.load(scratch + i * RP + i)
        v = tl.sum(l_row_i[:, None] * li, axis=0)
        e_i = tl.where(idx_c == i, 1.0, 0.0)
        li_i = tl.div_rn(e_i - v, tl.zeros_like(v) + l_ii)
        li = tl.where(row == i, li_i[None, :], li)
        tl.store(scratch + RP * RP + i * RP + idx_c, li_i)  # row i of L^-1
    tl.debug_barrier()

    # C^-1 = L^-T L^-1 = sum_k outer(L^-1[k, :], L^-1[k, :]), rows read back from the scratch.
    inv = eye_pad
    for k in range(0, r):
        a_r = tl.load(scratch + RP * RP + k * RP + idx_r)
        a_c = tl.load(scratch + RP * RP + k * RP + idx_c)
        inv += a_r[:, None] * a_c[None, :]
    ok = ok & _all_finite(inv)
    return inv, ok


@triton.jit
def _attempt(c, lam, r, idx_r, idx_c, scratch, RP: tl.constexpr, SCRATCH: tl.constexpr):
    if SCRATCH:
        inv, ok = _damped_inverse_scratch(c, lam, r, idx_r, idx_c, scratch, RP)
    else:
        inv, ok = _damped_inverse(c, lam, r, idx_r, idx_c)
    return inv, ok


@triton.jit
def _inverse_kernel(
    mats_ptr,
    out_ptr,
    status_ptr,
    ranks_ptr,
    prev_ptr,
    prev_valid_ptr,
    scratch_ptr,
    R,
    sm0,
    sm1,
    sm2,
    so0,
    so1,
    so2,
    sp0,
    sp1,
    sp2,
    stride_rank,
    stride_pv,
    damping,
    eps_abs,
    retry_factor,
    RP: tl.constexpr,
    HAS_RANKS: tl.constexpr,
    HAS_PREV: tl.constexpr,
    SCRATCH: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    if HAS_RANKS:
        r = tl.load(ranks_ptr + i * stride_rank).to(tl.int32)
    else:
        r = R
    idx_r = tl.arange(0, RP)
    idx_c = tl.arange(0, RP)
    row = idx_r[:, None]
    col = idx_c[None, :]
    block = (row < r) & (col < r)
    diag = row == col
    eye_pad = tl.where(diag & (row >= r), 1.0, 0.0)
    eye_block = tl.where(diag & (row < r), 1.0, 0.0)

    base = mats_ptr + i * sm0
    c_raw = tl.load(base + row * sm1 + col * sm2, mask=block, other=0.0).to(tl.float32)
    c_up = tl.load(base + col * sm1 + row * sm2, mask=block, other=0.0).to(tl.float32)  # c_raw^T
    c_finite = _all_finite(c_raw)
    # The lower triangle mirrored: exactly symmetric, what a Cholesky factorisation reads.
    c = tl.where(row >= col, c_raw, c_up)
    c = tl.where(c_finite, c, 0.0) + eye_pad
    trace = tl.sum(tl.sum(tl.where(diag, c_raw, 0.0), axis=1), axis=0)
    lam = damping * trace / r.to(tl.float32) + eps_abs
    lam_finite = tl.abs(lam) <= FLT_MAX

    scratch = scratch_ptr + i * (2 * RP * RP)  # [L | L^-1] per matrix, used where SCRATCH
    lam1 = tl.where(lam_finite, lam, 1.0)
    result, ok = _attempt(c, lam1, r, idx_r, idx_c, scratch, RP, SCRATCH)
    ok = ok & c_finite & lam_finite
    status = tl.where(ok, OK, SCALED_IDENTITY)
    if ok == 0:  # a branch on the device: the retry costs nothing where the first attempt worked
        lam2 = lam * retry_factor
        lam2_finite = tl.abs(lam2) <= FLT_MAX
        retried, ok2 = _attempt(c, tl.where(lam2_finite, lam2, 1.0), r, idx_r, idx_c, scratch, RP, SCRATCH)
        ok2 = ok2 & c_finite & lam2_finite
        usable = lam_finite & (lam > 0.0)
        fallback = eye_block / tl.where(usable, lam, 1.0) + eye_pad
        fallback_status = SCALED_IDENTITY
        if HAS_PREV:
            keep = tl.load(prev_valid_ptr + i * stride_pv) != 0
            prev = tl.load(prev_ptr + i * sp0 + row * sp1 + col * sp2, mask=block, other=0.0).to(tl.float32)
            fallback = tl.where(keep, prev + eye_pad, fallback)
            fallback_status = tl.where(keep, KEPT_PREVIOUS, SCALED_IDENTITY)
        result = tl.where(ok2, retried, fallback)
        status = tl.where(ok2, RETRIED, fallback_status)

    result = 0.5 * (result + tl.trans(result))
    in_matrix = (row < R) & (col < R)
    tl.store(out_ptr + i * so0 + row * so1 + col * so2, result.to(out_ptr.dtype.element_ty), mask=in_matrix)
    tl.store(status_ptr + i, status.to(tl.int32))


def _num_warps(rp: int) -> int:
    # ptxas register reports for sm_90 (cuobjdump -res-usage; not timed on a GPU yet), triton 3.6 / 3.9:
    # RP=16 at 1 warp 118 / 101 registers, RP=32 at 4 warps 153 / 139, no spills. RP=64 with the scratch
    # formulation at 16 warps: 128 / 112-113 registers, no stack (the all-register version spilled at any
    # warp count: 64 / 88 stack bytes at 16 warps; scratch for L only, with tl.dot: 3.6 still 56 bytes).
    return {16: 1, 32: 4}.get(rp, 16)


def handles(mats: torch.Tensor) -> bool:
    """Whether the kernel inverts ``mats`` (``[n, R, R]``): ``R <= MAX_TRITON_R`` and not float64."""
    return mats.shape[-1] <= MAX_TRITON_R and mats.dtype != torch.float64


def damped_cholesky_inverse(
    mats: torch.Tensor,
    damping: float,
    eps_abs: float = 1e-12,
    ranks: torch.Tensor | None = None,
    previous: torch.Tensor | None = None,
    previous_valid: torch.Tensor | None = None,
    retry_factor: float = 100.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backend of :func:`grit_kernels.ops.damped_cholesky_inverse` (same contract).

    ``mats``: ``[n, R, R]`` float32 (float16/bfloat16 are upcast in the kernel; any strides);
    returns ``(inverses [n, R, R] in mats.dtype, status [n] int32)`` from one kernel launch.
    """
    n, R, _ = mats.shape
    if not handles(mats):
        raise ValueError(
            f"triton damped_cholesky_inverse: {mats.dtype} [{n}, {R}, {R}] is beyond the kernel (R <= {MAX_TRITON_R}, "
            "not float64); grit_kernels.ops.damped_cholesky_inverse sends such matrices to the torch batched path"
        )
    device = mats.device
    if ranks is not None and not torch.is_tensor(ranks):
        ranks = torch.as_tensor(list(ranks), dtype=torch.int32, device=device)
    has_prev = previous is not None and previous_valid is not None
    _check_inverse_args(mats, ranks, previous if has_prev else None, previous_valid if has_prev else None)
    out = torch.empty((n, R, R), dtype=mats.dtype, device=device)
    status = torch.empty((n,), dtype=torch.int32, device=device)
    if n == 0:
        return out, status
    if has_prev:
        prev_valid = previous_valid
        prev_valid = prev_valid.view(torch.uint8) if prev_valid.dtype == torch.bool else prev_valid
        prev_strides = previous.stride()
    else:  # unused pointer arguments (distinct tensors: the interpreter mishandles aliased arguments)
        previous = torch.zeros((1, 1, 1), dtype=torch.float32, device=device)
        prev_valid, prev_strides = torch.zeros((1,), dtype=torch.uint8, device=device), (0, 0, 0)
    if ranks is None:
        ranks_arg, stride_rank = torch.zeros((1,), dtype=torch.int32, device=device), 0
    else:
        ranks_arg, stride_rank = ranks, ranks.stride(0)
    rp = max(16, triton.next_power_of_2(R))
    use_scratch = rp >= 64  # L and L^-1 through global scratch: the register tiles would spill
    scratch = torch.empty((n if use_scratch else 1, 2, rp, rp), dtype=torch.float32, device=device)
    _inverse_kernel[(n,)](
        mats,
        out,
        status,
        ranks_arg,
        previous,
        prev_valid,
        scratch,
        R,
        *mats.stride(),
        *out.stride(),
        *prev_strides,
        stride_rank,
        prev_valid.stride(0),
        float(damping),
        float(eps_abs),
        float(retry_factor),
        RP=rp,
        HAS_RANKS=ranks is not None,
        HAS_PREV=has_prev,
        SCRATCH=use_scratch,
        num_warps=_num_warps(rp),
    )
    return out, status


def _check_inverse_args(mats, ranks, previous, previous_valid) -> None:
    """Devices, dtypes and shapes of every argument, before the launch (see ``check_same_device``)."""
    n, R, _ = mats.shape
    check_same_device("damped_cholesky_inverse", mats.device, ranks=ranks, previous=previous, previous_valid=previous_valid)
    if not mats.is_floating_point():
        raise TypeError(f"damped_cholesky_inverse: mats must be floating point, got {mats.dtype}")
    if ranks is not None and (ranks.shape != (n,) or ranks.is_floating_point() or ranks.dtype == torch.bool):
        raise ValueError(f"damped_cholesky_inverse: ranks must be an integer [{n}] tensor, got {ranks.dtype} {tuple(ranks.shape)}")
    if previous is not None:
        if previous.shape != mats.shape or not previous.is_floating_point():
            raise ValueError(
                f"damped_cholesky_inverse: previous must be floating point {tuple(mats.shape)}, got "
                f"{previous.dtype} {tuple(previous.shape)}"
            )
        if previous_valid.shape != (n,) or previous_valid.is_floating_point():
            raise ValueError(
                f"damped_cholesky_inverse: previous_valid must be a bool [{n}] tensor, got "
                f"{previous_valid.dtype} {tuple(previous_valid.shape)}"
            )


__all__ = ["MAX_TRITON_R", "damped_cholesky_inverse", "handles"]
