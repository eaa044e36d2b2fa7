"""Triton ``precondition_``: rank-space K-FAC preconditioning of every LoRA gradient, one launch.

All ``2M`` gradient matrices of the model are described by a device table (raw ``data_ptr``,
length, row stride, rank, module, side); each program handles one tile of one matrix:

* left (``grad_A [r, d_in]``): a ``[RP, BLOCK]`` slab of ``BLOCK`` columns, ``new = inv_d[m] @ slab``
* right (``grad_B [d_out, r]``): a ``[BLOCK, RP]`` slab of ``BLOCK`` rows, ``new = slab @ inv_h[m]``

A program reads its whole slab before writing it back and no two programs share a slab, so the update
is in place. Products are fp32 (``tl.dot(..., input_precision="ieee")``), results are stored in the
gradient's dtype. With ``compute_dot`` each program also writes its ``<new, old>`` partial sum to a
per-tile buffer that one ``torch.sum`` reduces (deterministic, unlike a contended atomic scalar).

The tables are cached, keyed on every gradient's ``(data_ptr, shape, stride, dtype)``, so a training
loop that keeps its ``.grad`` tensors (``zero_grad(set_to_none=False)``) or gets them back at the same
addresses builds them once; a different address just builds (and caches) a new table. Building the
key is host work only (about 0.15 ms of Python for 448 gradients on a slow CPU; no synchronisation).
The last ``_CACHE_SIZE`` (16) tables are kept; a captured CUDA graph points at its table and partials
buffer, so a graph must not outlive 16 other gradient sets being preconditioned after its capture.

Gradients are grouped by ``(dtype, last-dim-contiguous)``: one launch per group, i.e. one launch for
the usual model whose LoRA gradients all share a dtype and are contiguous. Mixed ranks share a launch
(``RP`` is the largest rank of the group rounded up to a power of two, at least 16; smaller ranks are
masked). The ``RP x RP`` inverse tile lives in registers: sized for LoRA ranks up to 64-128; larger
ranks work but spill.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

TILE_ELEMENTS = 2048  #: RP * BLOCK elements per program
NUM_WARPS = 8  #: with 2048-element tiles: 61 registers at RP=16, no spills (ptxas -v, sm_90)
_CACHE_SIZE = 16
N_FIELDS: tl.constexpr = tl.constexpr(7)  #: per matrix: ptr, length, stride_outer, stride_inner, rank, module, side


@triton.jit
def _precondition_kernel(
    mat_table,
    tile_table,
    dtype_ref,
    inv_d_ptr,
    inv_h_ptr,
    partial_ptr,
    sd0,
    sd1,
    sd2,
    sh0,
    sh1,
    sh2,
    RP: tl.constexpr,
    BLOCK: tl.constexpr,
    CONTIG: tl.constexpr,
    COMPUTE_DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    mat = tl.load(tile_table + 2 * pid)
    start = tl.load(tile_table + 2 * pid + 1).to(tl.int64)
    entry = mat_table + mat.to(tl.int64) * N_FIELDS
    g_ptr = tl.load(entry).to(dtype_ref.dtype)
    length = tl.load(entry + 1)
    stride_outer = tl.load(entry + 2)
    if CONTIG:
        stride_inner = 1
    else:
        stride_inner = tl.load(entry + 3)
    r = tl.load(entry + 4)
    module = tl.load(entry + 5)
    side = tl.load(entry + 6)

    k = tl.arange(0, RP)
    pos = start + tl.arange(0, BLOCK)
    k_ok = k < r
    pos_ok = pos < length
    p_mask = k_ok[:, None] & k_ok[None, :]
    # Names differ between the branches: Triton requires names bound in both branches of a runtime
    # `if` to have the same type, and the left and right slabs are transposed shapes.
    if side == 0:
        # grad_A [r, d_in]: element (k, c) at k * stride_outer + c * stride_inner; new = inv_d @ slab
        p_d = tl.load(inv_d_ptr + module * sd0 + k[:, None] * sd1 + k[None, :] * sd2, mask=p_mask, other=0.0)
        ptrs_a = g_ptr + k[:, None] * stride_outer + pos[None, :] * stride_inner
        mask_a = k_ok[:, None] & pos_ok[None, :]
        old_a = tl.load(ptrs_a, mask=mask_a, other=0.0).to(tl.float32)
        new_a = tl.dot(p_d.to(tl.float32), old_a, input_precision="ieee")
        tl.store(ptrs_a, new_a.to(dtype_ref.dtype.element_ty), mask=mask_a)
        if COMPUTE_DOT:
            tl.store(partial_ptr + pid, tl.sum(tl.sum(new_a * old_a, axis=1), axis=0))
    else:
        # grad_B [d_out, r]: element (c, k) at c * stride_outer + k * stride_inner; new = slab @ inv_h
        p_h = tl.load(inv_h_ptr + module * sh0 + k[:, None] * sh1 + k[None, :] * sh2, mask=p_mask, other=0.0)
        ptrs_b = g_ptr + pos[:, None] * stride_outer + k[None, :] * stride_inner
        mask_b = pos_ok[:, None] & k_ok[None, :]
        old_b = tl.load(ptrs_b, mask=mask_b, other=0.0).to(tl.float32)
        new_b = tl.dot(old_b, p_h.to(tl.float32), input_precision="ieee")
        tl.store(ptrs_b, new_b.to(dtype_ref.dtype.element_ty), mask=mask_b)
        if COMPUTE_DOT:
            tl.store(partial_ptr + pid, tl.sum(tl.sum(new_b * old_b, axis=1), axis=0))


@dataclass
class _Launch:
    """One grouped launch: device tables for the gradients of one (dtype, contiguity) group."""

    mat_table: torch.Tensor  # [n_mats, N_FIELDS] int64
    tile_table: torch.Tensor  # [n_tiles, 2] int32
    dtype_ref: torch.Tensor  # 1-element tensor of the group's dtype (typed pointer for the kernel)
    partials: torch.Tensor  # [n_tiles] float32, per-tile <new, old>
    rp: int
    block: int
    contig: bool


_plans: OrderedDict[tuple, list[_Launch]] = OrderedDict()


def _plan_key(grads_a: Sequence[torch.Tensor], grads_b: Sequence[torch.Tensor], device: torch.device) -> tuple:
    return (device,) + tuple((g.data_ptr(), g.shape, g.stride(), g.dtype) for g in grads_a) + tuple(
        (g.data_ptr(), g.shape, g.stride(), g.dtype) for g in grads_b
    )


def _build_plan(grads_a: Sequence[torch.Tensor], grads_b: Sequence[torch.Tensor], device: torch.device) -> list[_Launch]:
    groups: dict[tuple, list[tuple[torch.Tensor, int, int]]] = {}
    for side, grads in ((0, grads_a), (1, grads_b)):
        for module, g in enumerate(grads):
            if g.dim() != 2:
                raise ValueError(f"precondition_: gradients must be 2-D, got {tuple(g.shape)}")
            if g.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise TypeError(f"precondition_: gradient dtype {g.dtype} not supported by the triton backend")
            contig = g.stride(1) == 1 or g.shape[1] <= 1  # row-major rows: the kernel's fast path
            groups.setdefault((g.dtype, contig), []).append((g, side, module))

    launches = []
    for (dtype, contig), members in groups.items():
        max_rank = max(g.shape[0] if side == 0 else g.shape[1] for g, side, _ in members)
        rp = max(16, triton.next_power_of_2(max_rank))
        block = max(16, TILE_ELEMENTS // rp)
        rows, tiles = [], []
        for g, side, module in members:
            if side == 0:
                rank, length, s_outer, s_inner = g.shape[0], g.shape[1], g.stride(0), g.stride(1)
            else:
                rank, length, s_outer, s_inner = g.shape[1], g.shape[0], g.stride(0), g.stride(1)
            if rank == 0 or length == 0:
                continue
            tiles.extend((len(rows), start) for start in range(0, length, block))
            rows.append((g.data_ptr(), length, s_outer, s_inner, rank, module, side))
        if not tiles:
            continue
        launches.append(
            _Launch(
                mat_table=torch.tensor(rows, dtype=torch.int64).to(device),
                tile_table=torch.tensor(tiles, dtype=torch.int32).to(device),
                dtype_ref=torch.empty(1, dtype=dtype, device=device),
                partials=torch.empty(len(tiles), dtype=torch.float32, device=device),
                rp=rp,
                block=block,
                contig=contig,
            )
        )
    return launches


def _plan(grads_a: Sequence[torch.Tensor], grads_b: Sequence[torch.Tensor], device: torch.device) -> list[_Launch]:
    key = _plan_key(grads_a, grads_b, device)
    plan = _plans.get(key)
    if plan is None:
        plan = _build_plan(grads_a, grads_b, device)
        _plans[key] = plan
        if len(_plans) > _CACHE_SIZE:
            _plans.popitem(last=False)
    else:
        _plans.move_to_end(key)
    return plan


def precondition_(
    grads_a: Sequence[torch.Tensor],
    grads_b: Sequence[torch.Tensor],
    inv_d: torch.Tensor,
    inv_h: torch.Tensor,
    compute_dot: bool = False,
) -> torch.Tensor | None:
    """Triton backend of :func:`grit_kernels.ops.precondition_` (same contract).

    ``grads_a[i] <- inv_d[i, :r, :r] @ grads_a[i]``, ``grads_b[i] <- grads_b[i] @ inv_h[i, :r, :r]``
    in place; returns the fp32 device scalar ``sum <new, old>`` when ``compute_dot``.
    """
    device = inv_d.device
    launches = _plan(grads_a, grads_b, device)
    if inv_h.dtype != inv_d.dtype:
        inv_h = inv_h.to(inv_d.dtype)
    for launch in launches:
        _precondition_kernel[(launch.tile_table.shape[0],)](
            launch.mat_table,
            launch.tile_table,
            launch.dtype_ref,
            inv_d,
            inv_h,
            launch.partials,
            *inv_d.stride(),
            *inv_h.stride(),
            RP=launch.rp,
            BLOCK=launch.block,
            CONTIG=launch.contig,
            COMPUTE_DOT=compute_dot,
            num_warps=NUM_WARPS,
        )
    if not compute_dot:
        return None
    if not launches:
        return torch.zeros((), dtype=torch.float32, device=device)
    if len(launches) == 1:
        return launches[0].partials.sum()
    return torch.stack([launch.partials.sum() for launch in launches]).sum()
