"""``precondition_``: rank-space K-FAC preconditioning of every LoRA gradient, in place."""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Sequence

import torch

from .._device import to_device
from . import _library
from ._backend import kernel, resolve_backend

CPU_CHUNK_ELEMENTS = 1 << 16  #: CPU: elements per cache-resident chunk (256 KiB of fp32)


def precondition_(
    grads_a: Sequence[torch.Tensor],
    grads_b: Sequence[torch.Tensor],
    inv_d: torch.Tensor,
    inv_h: torch.Tensor,
    compute_dot: bool = False,
    backend: str = "auto",
    modules: Sequence[int] | None = None,
) -> torch.Tensor | None:
    """In place ``grads_a[i] <- inv_d[m_i] @ grads_a[i]`` and ``grads_b[i] <- grads_b[i] @ inv_h[m_i]``.

    Args:
        grads_a: ``M`` lora_A gradients ``[r_i, d_in_i]`` (float32 or bfloat16/float16).
        grads_b: ``M`` lora_B gradients ``[d_out_i, r_i]``.
        inv_d: ``[n, R, R]`` float32 inverses of the damped backward factors (left side of grad_A),
            ``R >= r_i``; matrix ``i`` uses the leading ``r_i x r_i`` block of ``inv_d[m_i]``.
        inv_h: ``[n, R, R]`` float32 inverses of the damped forward factors (right side of grad_B).
        compute_dot: also return ``sum_i <g_new_i, g_old_i>`` (float32 scalar tensor on the device),
            used by the KL-clip trust region.
        modules: ``m_i``, the row of ``inv_d`` / ``inv_h`` of each gradient pair (host integers);
            default ``0 .. M-1``. Gathered on the device with an index uploaded once per distinct
            list (no host sync).
    Products in float32. Never synchronises the host. Oracle: :func:`grit_kernels.reference.precondition`.
    """
    if len(grads_a) != len(grads_b) or inv_h.shape != inv_d.shape or inv_d.dim() != 3:
        raise ValueError("precondition_: need one lora_A and one lora_B grad per module and [n, R, R] inverses")
    R = inv_d.shape[-1]
    _check_shapes(tuple(map(_size, grads_a)), tuple(map(_size, grads_b)), R)
    if modules is not None:
        if len(modules) != len(grads_a):
            raise ValueError(f"precondition_: {len(modules)} module indices for {len(grads_a)} gradient pairs")
        if list(modules) != list(range(len(grads_a))):
            index = _device_index(tuple(int(m) for m in modules), inv_d.shape[0], inv_d.device)
            inv_d, inv_h = inv_d.index_select(0, index), inv_h.index_select(0, index)
    elif inv_d.shape[0] < len(grads_a):
        raise ValueError(f"precondition_: {len(grads_a)} gradient pairs but only {inv_d.shape[0]} inverses")
    if not grads_a:
        return torch.zeros((), dtype=torch.float32, device=inv_d.device) if compute_dot else None
    name = resolve_backend(backend, grads_a[0].device)
    if torch.compiler.is_compiling():
        dot = _library.precondition_(list(grads_a), list(grads_b), inv_d, inv_h, compute_dot, name)
        return dot if compute_dot else None
    return kernel(name, "precondition_")(grads_a, grads_b, inv_d, inv_h, compute_dot)


def precondition_grafted_(
    grads_a: Sequence[torch.Tensor],
    grads_b: Sequence[torch.Tensor],
    inv_d: torch.Tensor,
    inv_h: torch.Tensor,
    backend: str = "auto",
    modules: Sequence[int] | None = None,
) -> None:
    """:func:`precondition_`, then grafting (``GritConfig.graft``): every gradient ``g <- P g * |g| / |P g|``
    (GRIT's direction with the raw gradient's norm, per tensor; ``|P g|`` clamped at the smallest fp32 normal).

    Same arguments as :func:`precondition_`. One C++ op on the ``cpp`` backend; norms and scaling with
    ``torch._foreach_*`` elsewhere. No host synchronisation.
    """
    if torch.compiler.is_compiling() or not grads_a:
        return torch_precondition_grafted_(grads_a, grads_b, inv_d, inv_h, backend=backend, modules=modules)
    name = resolve_backend(backend, grads_a[0].device)
    if name != "cpp":
        return torch_precondition_grafted_(grads_a, grads_b, inv_d, inv_h, backend=name, modules=modules)
    if modules is not None and list(modules) != list(range(len(grads_a))):
        index = _device_index(tuple(int(m) for m in modules), inv_d.shape[0], inv_d.device)
        inv_d, inv_h = inv_d.index_select(0, index), inv_h.index_select(0, index)
    kernel(name, "precondition_grafted_")(grads_a, grads_b, inv_d, inv_h)


def torch_precondition_grafted_(grads_a, grads_b, inv_d, inv_h, backend="torch", modules=None) -> None:
    """Torch form of :func:`precondition_grafted_`: :func:`precondition_` between two ``torch._foreach_norm``."""
    grads = [*grads_a, *grads_b]
    raw_norms = torch._foreach_norm(grads)
    precondition_(grads_a, grads_b, inv_d, inv_h, backend=backend, modules=modules)
    tiny = torch.finfo(torch.float32).tiny
    ratio = torch._foreach_div(raw_norms, torch._foreach_clamp_min(torch._foreach_norm(grads), tiny))
    torch._foreach_mul_(grads, ratio)


_size = torch.Tensor.size
_checked: list = [None]  #: the (sizes_a, sizes_b, R) of the last call that passed :func:`_check_shapes`


def _check_shapes(sizes_a: tuple, sizes_b: tuple, R: int) -> None:
    """Raise on a gradient pair that is not ``[r, d_in]`` / ``[d_out, r]`` with ``r <= R``.

    Every optimizer step passes the same shapes (448 tensors for Llama-3-8B): a repeat of the last
    validated shapes is one tuple comparison instead of a Python loop over every pair.
    """
    key = (sizes_a, sizes_b, R)
    if _checked[0] == key:
        return
    for i, (sa, sb) in enumerate(zip(sizes_a, sizes_b)):
        if len(sa) != 2 or len(sb) != 2 or sa[0] != sb[1]:
            raise ValueError(
                f"precondition_: module {i}: lora_A grad {tuple(sa)} and lora_B grad {tuple(sb)} "
                "must be [r, d_in] and [d_out, r]"
            )
        if sa[0] > R:
            raise ValueError(
                f"precondition_: module {i} has rank {sa[0]} but the inverses are {R} x {R}; "
                "the bank was built for smaller ranks (rebuild the preconditioner after changing the adapter)"
            )
    _checked[0] = key


_indices: OrderedDict[tuple, torch.Tensor] = OrderedDict()


def _device_index(modules: tuple[int, ...], n: int, device: torch.device) -> torch.Tensor:
    if min(modules) < 0 or max(modules) >= n:
        raise ValueError(f"precondition_: module indices must be in [0, {n}), got {min(modules)}..{max(modules)}")
    key = (device, modules)
    index = _indices.get(key)
    if index is None:
        index = _indices[key] = to_device(modules, torch.int64, device)
        if len(_indices) > 16:
            _indices.popitem(last=False)
    return index


def torch_precondition_(grads_a, grads_b, inv_d, inv_h, compute_dot=False):
    """Torch backend of :func:`precondition_` (module ``i`` uses ``inv_*[i]``).

    CPU: each gradient is processed in cache-resident chunks (``CPU_CHUNK_ELEMENTS``): product into a
    scratch buffer, dot product, copy back -- one read and one write of the gradient from memory.
    Other devices: one batched matmul per distinct gradient shape.
    """
    if grads_a[0].device.type == "cpu":
        return _cpu_chunked(grads_a, grads_b, inv_d, inv_h, compute_dot)
    dots = []
    for side, grads, inv in (("left", grads_a, inv_d), ("right", grads_b, inv_h)):
        groups = defaultdict(list)
        for i, g in enumerate(grads):
            groups[(tuple(g.shape), g.dtype)].append(i)
        for (shape, _dtype), idx in groups.items():
            r = shape[0] if side == "left" else shape[1]
            members = [grads[i] for i in idx]
            old = torch.stack(members).float()
            p = torch.stack([inv[i, :r, :r] for i in idx])  # views: no host index upload
            new = torch.bmm(p, old) if side == "left" else torch.bmm(old, p)
            if compute_dot:
                dots.append((new * old).sum())
            torch._foreach_copy_(members, list(new.unbind(0)))
    return torch.stack(dots).sum() if compute_dot else None


def _cpu_chunked(grads_a, grads_b, inv_d, inv_h, compute_dot):
    dot = torch.zeros((), dtype=torch.float64) if compute_dot else None
    scratch = torch.empty(CPU_CHUNK_ELEMENTS, dtype=torch.float32)
    product = torch.empty(CPU_CHUNK_ELEMENTS, dtype=torch.float32)
    inv_d, inv_h = inv_d.float(), inv_h.float()
    for i, g in enumerate(grads_a):  # [r, d_in]: column chunks, new = P @ chunk
        r = g.shape[0]
        p = inv_d[i, :r, :r]
        step = max(1, CPU_CHUNK_ELEMENTS // max(r, 1))
        for c0 in range(0, g.shape[1], step):
            chunk = g[:, c0 : c0 + step]
            dot = _chunk_update(chunk, p, True, scratch, product, dot)
    for i, g in enumerate(grads_b):  # [d_out, r]: row chunks, new = chunk @ P
        r = g.shape[1]
        p = inv_h[i, :r, :r]
        step = max(1, CPU_CHUNK_ELEMENTS // max(r, 1))
        for c0 in range(0, g.shape[0], step):
            chunk = g[c0 : c0 + step]
            dot = _chunk_update(chunk, p, False, scratch, product, dot)
    return dot.float() if compute_dot else None


def _chunk_update(chunk, p, left, scratch, product, dot):
    if chunk.numel() == 0:
        return dot
    shape = chunk.shape
    old = chunk if chunk.dtype == torch.float32 else scratch[: chunk.numel()].view(shape).copy_(chunk)
    new = product[: chunk.numel()].view(shape)
    torch.mm(p, old, out=new) if left else torch.mm(old, p, out=new)
    if dot is not None:
        if old.is_contiguous():
            dot += torch.dot(new.view(-1), old.view(-1))
        else:
            dot += torch.dot(new.view(-1), scratch[: chunk.numel()].view(shape).copy_(old).view(-1))
    chunk.copy_(new)
    return dot
