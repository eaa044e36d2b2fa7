"""Triton ``precondition_``: rank-space K-FAC preconditioning of every LoRA gradient, one launch.

All ``2M`` gradient matrices of the model are described by device tables; each program handles one
tile of one matrix:

* left (``grad_A [r, d_in]``): a ``[RP, BLOCK]`` slab of ``BLOCK`` columns, ``new = inv_d[m] @ slab``
* right (``grad_B [d_out, r]``): a ``[BLOCK, RP]`` slab of ``BLOCK`` rows, ``new = slab @ inv_h[m]``

A program reads its whole slab before writing it back and no two programs share a slab, so the update
is in place. Products are fp32 (``tl.dot(..., input_precision="ieee")``), results are stored in the
gradient's dtype. With ``compute_dot`` each program also writes its ``<new, old>`` partial sum to a
per-tile buffer that one ``torch.sum`` reduces (deterministic, unlike a contended atomic scalar).

**Tables.** A :class:`_Plan` is keyed by the gradients' shapes, strides and dtypes only (not their
addresses), and holds one int64 device buffer: the per-matrix pointers (``[n_mats]``), the static
per-matrix fields (length, outer and inner stride, rank, module, side) and the tile list. The static
part is uploaded once; each call only compares the gradients' current addresses with the uploaded
ones, and when they changed (``zero_grad(set_to_none=True)``: most steps) uploads the ``n_mats``
pointers with a pinned, non-blocking copy (:mod:`grit_kernels._device`). No call
synchronises the host, the first one included.

**CUDA graphs.** A plan used while a graph is captured is *frozen*: it is kept alive for the life of
the process (:data:`_graph_plans`, never evicted) and never rewritten; a later call whose gradients
live elsewhere works on a fork of it. Replaying the graph therefore always reads the pointers of the
gradients it was captured with (the usual static-address rule of CUDA graphs). Capture after one
eager warm-up call with the same gradients (torch's recipe), or the pointer upload itself is captured
(its pinned staging buffer is then kept alive too).

**Launches and configurations.** Gradients are grouped by ``(dtype, last-dim-contiguous)``: one launch
per group (one launch for the usual model). ``RP`` is the largest rank of the group rounded up to a
power of two (at least 16); smaller ranks are masked. When every rank equals ``RP`` and every length
is a multiple of ``BLOCK`` the kernel is specialised without masks (``EVEN``), and with 16-byte
alignment hints (``ALIGNED``) when addresses and strides allow: vectorised loads and stores.
``BLOCK`` and ``num_warps`` per ``(RP, dtype)`` come from :data:`CONFIGS`, chosen so that no
configuration spills registers on sm_90 with triton 3.6 and 3.9 (checked by
``tests/test_triton_compile.py::test_kernels_compile_for_sm90``); ``RP = 128`` spills (documented there).
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._device import capturing, check_same_device, host_table, upload_

#: (RP, element bytes) -> (BLOCK, num_warps); no register spills on sm_90, triton 3.6 and 3.9 (ptxas)
CONFIGS = {
    (16, 4): (128, 4),
    (16, 2): (128, 4),
    (32, 4): (64, 4),
    (32, 2): (32, 8),
    (64, 4): (32, 8),
    (64, 2): (16, 8),
}
_CACHE_SIZE = 16
N_META: tl.constexpr = tl.constexpr(5)  #: per matrix: length, stride_outer, stride_inner, rank, module * 2 + side


def config(rp: int, element_size: int) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` for rank tile ``rp`` and gradients of ``element_size`` bytes."""
    if (rp, element_size) in CONFIGS:
        return CONFIGS[(rp, element_size)]
    return max(16, 2048 // rp), 8  # RP >= 128: spills; works


@triton.jit
def _precondition_kernel(
    ptr_table,
    meta_table,
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
    EVEN: tl.constexpr,
    ALIGNED: tl.constexpr,
    COMPUTE_DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    mat = tl.load(tile_table + 2 * pid)
    start = tl.load(tile_table + 2 * pid + 1)
    g_ptr = tl.load(ptr_table + mat).to(dtype_ref.dtype)
    entry = meta_table + mat * N_META
    length = tl.load(entry)
    stride_outer = tl.load(entry + 1)
    if CONTIG:
        stride_inner = 1
    else:
        stride_inner = tl.load(entry + 2)
    r = tl.load(entry + 3)
    module_side = tl.load(entry + 4)
    module = module_side // 2
    if ALIGNED:  # 16-byte aligned base, strides and tile starts: vectorised accesses
        g_ptr = tl.multiple_of(g_ptr, 16)
        stride_outer = tl.multiple_of(stride_outer, 16)
        start = tl.multiple_of(start, 16)

    k = tl.arange(0, RP)
    pos = start + tl.arange(0, BLOCK)
    k_ok = k < r
    pos_ok = pos < length
    p_mask = k_ok[:, None] & k_ok[None, :]
    # Names differ between the branches: Triton requires names bound in both branches of a runtime
    # `if` to have the same type, and the left and right slabs are transposed shapes.
    if module_side % 2 == 0:
        # grad_A [r, d_in]: element (k, c) at k * stride_outer + c * stride_inner; new = inv_d @ slab
        p_d_ptrs = inv_d_ptr + module * sd0 + k[:, None] * sd1 + k[None, :] * sd2
        ptrs_a = g_ptr + k[:, None] * stride_outer + pos[None, :] * stride_inner
        mask_a = k_ok[:, None] & pos_ok[None, :]
        if EVEN:
            p_d = tl.load(p_d_ptrs)
            old_a = tl.load(ptrs_a).to(tl.float32)
        else:
            p_d = tl.load(p_d_ptrs, mask=p_mask, other=0.0)
            old_a = tl.load(ptrs_a, mask=mask_a, other=0.0).to(tl.float32)
        new_a = tl.dot(p_d.to(tl.float32), old_a, input_precision="ieee")
        if EVEN:
            tl.store(ptrs_a, new_a.to(dtype_ref.dtype.element_ty))
        else:
            tl.store(ptrs_a, new_a.to(dtype_ref.dtype.element_ty), mask=mask_a)
        if COMPUTE_DOT:
            tl.store(partial_ptr + pid, tl.sum(tl.sum(new_a * old_a, axis=1), axis=0))
    else:
        # grad_B [d_out, r]: element (c, k) at c * stride_outer + k * stride_inner; new = slab @ inv_h
        p_h_ptrs = inv_h_ptr + module * sh0 + k[:, None] * sh1 + k[None, :] * sh2
        ptrs_b = g_ptr + pos[:, None] * stride_outer + k[None, :] * stride_inner
        mask_b = pos_ok[:, None] & k_ok[None, :]
        if EVEN:
            p_h = tl.load(p_h_ptrs)
            old_b = tl.load(ptrs_b).to(tl.float32)
        else:
            p_h = tl.load(p_h_ptrs, mask=p_mask, other=0.0)
            old_b = tl.load(ptrs_b, mask=mask_b, other=0.0).to(tl.float32)
        new_b = tl.dot(old_b, p_h.to(tl.float32), input_precision="ieee")
        if EVEN:
            tl.store(ptrs_b, new_b.to(dtype_ref.dtype.element_ty))
        else:
            tl.store(ptrs_b, new_b.to(dtype_ref.dtype.element_ty), mask=mask_b)
        if COMPUTE_DOT:
            tl.store(partial_ptr + pid, tl.sum(tl.sum(new_b * old_b, axis=1), axis=0))


@dataclass
class _Launch:
    """One grouped launch over the gradients of one (dtype, contiguity) group."""

    first: int  # first matrix of the group in the plan's pointer order
    n_mats: int
    meta_at: int  # offsets of the group's tables in the plan buffer
    tiles_at: int
    n_tiles: int
    dtype: torch.dtype
    rp: int
    block: int
    num_warps: int
    contig: bool
    even: bool  # every rank == rp and every length a multiple of block
    strides_aligned: bool  # every outer stride a multiple of 16 elements, inner stride 1


class _Plan:
    """Device tables of one gradient layout (shapes, strides, dtypes); see the module docstring."""

    def __init__(self, order: list[int], launches: list[_Launch], static: torch.Tensor, device: torch.device):
        self.order = order  # index into grads_a + grads_b of each pointer slot
        # the gradients in pointer order, picked in C (the usual single group keeps the call's order)
        self.natural = order == list(range(len(order)))
        self.pick = operator.itemgetter(*order) if len(order) > 1 else (lambda grads: tuple(grads[i] for i in order))
        self.launches = launches
        self.static = static  # host copy of the static part (pinned on CUDA), to fork from
        self.device = device
        n = len(order)
        self.buffer = torch.empty(n + static.numel(), dtype=torch.int64, device=device)
        upload_(self.buffer[n:], static)
        self.pointers = self.buffer[:n]
        self.uploaded: tuple[int, ...] | None = None
        self.aligned = False  # every uploaded pointer 16-byte aligned (set with the pointers)
        self.frozen = False
        self.dtype_refs = {launch.dtype: torch.empty(1, dtype=launch.dtype, device=device) for launch in launches}
        self.partials = [torch.empty(launch.n_tiles, dtype=torch.float32, device=device) for launch in launches]

    def fork(self) -> _Plan:
        return _Plan(self.order, self.launches, self.static, self.device)

    def table(self, at: int, n: int) -> torch.Tensor:
        return self.buffer[len(self.order) + at : len(self.order) + at + n]


_plans: OrderedDict[tuple, _Plan] = OrderedDict()  #: LRU cache by gradient layout
_graph_plans: list[_Plan] = []  #: plans read by captured CUDA graphs: kept for the life of the process
_recent: list = [None, None]  #: [key, plan] of the last call: most steps repeat it (no hashing of a 448-entry key)

_size, _stride, _device_index, _data_ptr = torch.Tensor.size, torch.Tensor.stride, torch.Tensor.get_device, torch.Tensor.data_ptr
_dtype = operator.attrgetter("dtype")


def _layout_key(grads: Sequence[torch.Tensor], device: torch.device) -> tuple:
    """What a plan depends on: the device, the module count and every gradient's shape, strides, dtype and device.

    Built with ``map`` over C-level accessors (one pass per field): this runs on every call, over 448
    gradients for Llama-3-8B.
    """
    return (
        device,
        len(grads) // 2,
        tuple(map(_size, grads)),
        tuple(map(_stride, grads)),
        tuple(map(_dtype, grads)),
        tuple(map(_device_index, grads)),
    )


def _build_plan(grads: Sequence[torch.Tensor], n_modules: int, device: torch.device) -> _Plan:
    groups: dict[tuple, list[tuple[int, torch.Tensor, int, int]]] = {}
    for slot, g in enumerate(grads):
        side, module = divmod(slot, n_modules)
        check_same_device("precondition_", device, **{f"{('grads_a', 'grads_b')[side]}[{module}]": g})
        if g.dim() != 2:
            raise ValueError(f"precondition_: gradients must be 2-D, got {tuple(g.shape)}")
        if g.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"precondition_: gradient dtype {g.dtype} not supported by the triton backend")
        contig = g.stride(1) == 1 or g.shape[1] <= 1  # row-major rows: the kernel's fast path
        groups.setdefault((g.dtype, contig), []).append((slot, g, side, module))

    order, meta, tiles, launches = [], [], [], []
    for (dtype, contig), members in groups.items():
        members = [m for m in members if m[1].numel() > 0]
        if not members:
            continue
        ranks = [g.shape[0] if side == 0 else g.shape[1] for _, g, side, _ in members]
        rp = max(16, triton.next_power_of_2(max(ranks)))
        block, num_warps = config(rp, dtype.itemsize)
        first, meta_at, tiles_at = len(order), len(meta), len(tiles)
        even, strides_aligned = True, True
        for (slot, g, side, module), rank in zip(members, ranks):
            length = g.shape[1] if side == 0 else g.shape[0]
            s_outer, s_inner = g.stride(0), (g.stride(1) if g.shape[1] > 1 else 1)
            even = even and rank == rp and length % block == 0
            strides_aligned = strides_aligned and s_inner == 1 and (s_outer * dtype.itemsize) % 16 == 0
            tiles.extend(x for start in range(0, length, block) for x in (len(order) - first, start))
            meta.extend((length, s_outer, s_inner, rank, 2 * module + side))
            order.append(slot)
        n_tiles = (len(tiles) - tiles_at) // 2
        launches.append(
            _Launch(first, len(order) - first, meta_at, tiles_at, n_tiles, dtype, rp, block, num_warps, contig, even, strides_aligned)
        )
    # one static buffer: all meta rows, then all tiles (tile offsets are relative to the tiles part)
    for launch in launches:
        launch.tiles_at += len(meta)
    static = host_table(meta + tiles, torch.int64, device)
    return _Plan(order, launches, static, device)


def _plan(grads: Sequence[torch.Tensor], n_modules: int, device: torch.device) -> _Plan:
    key = _layout_key(grads, device)
    if _recent[0] == key:  # tuple equality: no hash of the key on the common path
        plan = _recent[1]
    else:
        plan = _plans.get(key)
        if plan is None:
            plan = _plans[key] = _build_plan(grads, n_modules, device)
            if len(_plans) > _CACHE_SIZE:
                _plans.popitem(last=False)  # frozen plans live on in _graph_plans
        else:
            _plans.move_to_end(key)
        _recent[:] = key, plan
    pointers = tuple(map(_data_ptr, grads if plan.natural and len(grads) == len(plan.order) else plan.pick(grads)))
    graph = capturing(device)
    if pointers != plan.uploaded:
        if plan.frozen:  # a captured graph reads this plan's pointers: work on a fork
            plan = _plans[key] = plan.fork()
            _recent[:] = key, plan
        upload_(plan.pointers, host_table(pointers, torch.int64, device))
        plan.uploaded = pointers
        plan.aligned = all(p % 16 == 0 for p in pointers)
    if graph and not plan.frozen:
        plan.frozen = True
        _graph_plans.append(plan)
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
    check_same_device("precondition_", device, inv_h=inv_h)
    if not (inv_d.is_floating_point() and inv_h.is_floating_point()):
        raise TypeError(f"precondition_: inverses must be floating point, got {inv_d.dtype} and {inv_h.dtype}")
    grads = list(grads_a) + list(grads_b)
    plan = _plan(grads, len(grads_a), device)
    if inv_h.dtype != inv_d.dtype:
        inv_h = inv_h.to(inv_d.dtype)
    aligned = plan.aligned
    for launch, partials in zip(plan.launches, plan.partials):
        _precondition_kernel[(launch.n_tiles,)](
            plan.pointers[launch.first :],
            plan.table(launch.meta_at, 5 * launch.n_mats),
            plan.table(launch.tiles_at, 2 * launch.n_tiles),
            plan.dtype_refs[launch.dtype],
            inv_d,
            inv_h,
            partials,
            *inv_d.stride(),
            *inv_h.stride(),
            RP=launch.rp,
            BLOCK=launch.block,
            CONTIG=launch.contig,
            EVEN=launch.even,
            ALIGNED=launch.even and launch.strides_aligned and aligned,
            COMPUTE_DOT=compute_dot,
            num_warps=launch.num_warps,
        )
    if not compute_dot:
        return None
    if not plan.launches:
        return torch.zeros((), dtype=torch.float32, device=device)
    if len(plan.partials) == 1:
        return plan.partials[0].sum()
    return torch.stack([p.sum() for p in plan.partials]).sum()
