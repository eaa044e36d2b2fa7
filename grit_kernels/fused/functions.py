"""Block-level LoRA autograd Functions with GRIT's statistics inside.

A *projection group* is ``K`` LoRA projections that read the same input ``x [N, d]`` (q, k, v; gate,
up; or a single o / down), with frozen base weights ``W_k [o_k, d]`` (optional frozen bias), LoRA
``A_k [r, d]``, ``B_k [o_k, r]`` and scale ``s_k``. Forward, with ``A = [A_1; ...; A_K]`` ``[K r, d]`` and
``s B = blockdiag(s_1 B_1, ..., s_K B_K)`` ``[sum o_k, K r]`` (``s`` a scalar when the scales agree)::

    y = x W^T (+ bias)        one matmul for the group (W: the group's weights stacked)
    h = x A^T                 [N, K r], the rank-space activations of all K modules in one matmul
    y += s h B^T              in place (addmm, alpha = s)

Backward, from ``g = dL/dy``::

    delta   = s g B                       [N, K r]  (= s_k g_k B_k per module: dL/dh)
    grad_B_k = s_k g_k^T h_k               grad_A = delta^T x   (split per module)
    dL/dx   = g W + delta A                (only when x needs a gradient)

``h`` and ``delta`` are exactly the tensors GRIT's statistics need: backward hands them to
:data:`grit_kernels.layers.RECORDER`, which forms every module's row mask and Grams in one batched
pass when the backward ends (only for modules a :class:`~grit_kernels.GritPreconditioner` patched).

:class:`FusedSwiGLU` chains the gate/up group, ``a = silu(gate) * up`` and the down group; it saves
the gate/up output (needed by SiLU's gradient anyway) and recomputes ``a`` in backward.
Weights are never saved for backward: :class:`~grit_kernels.fused.weights.BlockWeights` provides
them again (one dequantisation per block for 4-bit).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..layers import RECORDER


class ProjectionGroup:
    """Static description of one projection group of a fused block (no tensors of its own).

    Args:
        name: group key in ``weights`` (``"qkv"``, ``"o"``, ``"gate_up"``, ``"down"``).
        layers: the PEFT LoRA layers, stacked along the output dimension in this order.
        adapter: the active adapter name.
        weights: the block's :class:`~grit_kernels.fused.weights.BlockWeights`.
    """

    def __init__(self, name: str, layers: list, adapter: str, weights):
        self.name, self.layers, self.adapter, self.weights = name, list(layers), adapter, weights
        self.out_features = [layer.base_layer.out_features for layer in self.layers]
        self.rank = self.layers[0].r[adapter]

    def lora_weights(self) -> list[torch.Tensor]:
        """``[A_1, ..., A_K, B_1, ..., B_K]`` (the autograd inputs of the Functions)."""
        a = self.adapter
        return [layer.lora_A[a].weight for layer in self.layers] + [
            layer.lora_B[a].weight for layer in self.layers
        ]

    def scales(self) -> list[float]:
        return [layer.scaling[self.adapter] for layer in self.layers]

    def active(self) -> bool:
        """Whether PEFT would run exactly this adapter on every layer now (not disabled, merged, switched)."""
        a = self.adapter
        return all(
            not layer._disable_adapters and not layer.merged_adapters and layer._active_adapter in (a, [a])
            for layer in self.layers
        )

    def record_statistics(self, h: torch.Tensor, delta: torch.Tensor) -> None:
        """Hand ``h, delta [N, K r]`` to the recorder for the modules a preconditioner patched."""
        slots = [
            getattr(layer.__dict__.get("_grit_state"), "get", lambda _k: None)("slot")
            for layer in self.layers
        ]
        if all(s is None for s in slots):
            return
        bank = slots[0].bank if slots[0] is not None else None
        if bank is not None and all(s is not None and s.bank is bank for s in slots):
            RECORDER.record(bank, tuple(s.index for s in slots), h, delta)
            return
        r = self.rank
        for k, slot in enumerate(slots):
            if slot is not None:
                slot.record(h[:, k * r : (k + 1) * r], delta[:, k * r : (k + 1) * r])


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _lora_factors(group: ProjectionGroup, lora: tuple, dtype: torch.dtype):
    """``A [K r, d]``, ``B [sum o_k, K r]`` and a scalar ``s`` in ``dtype`` with ``s B = blockdiag(s_k B_k)``.

    With equal scales (the usual case) ``B = blockdiag(B_k)`` and ``s = s_k``; otherwise the scales are
    folded into ``B`` and ``s = 1``.
    """
    k = len(group.layers)
    scales = group.scales()
    a_parts, b_parts = lora[:k], lora[k:]
    if k == 1:
        return _as(a_parts[0], dtype), _as(b_parts[0], dtype), scales[0]
    a = _as(torch.cat(a_parts), dtype)
    if all(sc == scales[0] for sc in scales):
        return a, _as(torch.block_diag(*b_parts), dtype), scales[0]
    return a, _as(torch.block_diag(*(bk * sc for bk, sc in zip(b_parts, scales))), dtype), 1.0


def _group_forward(group: ProjectionGroup, x2: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float):
    dtype = x2.dtype
    w = group.weights.weight(group.name, dtype)
    if w.device != x2.device:
        raise RuntimeError(
            f"fused block weights are on {w.device} but the input is on {x2.device}: the model was moved after "
            "grit_kernels.fuse(); call grit_kernels.unfuse(model), move it, then fuse again"
        )
    bias = group.weights.bias(group.name, dtype)
    y = torch.mm(x2, w.t()) if bias is None else torch.addmm(bias, x2, w.t())
    h = torch.mm(x2, a.t())
    y.addmm_(h, b.t(), alpha=s)
    return y, h


def _group_backward(group, g, x2, h, a, b, s: float, lora, needs_x: bool, needs_lora: tuple):
    """Gradients of one group; returns ``(dL/dx or None, [grad_A_k..., grad_B_k...])``."""
    k, r = len(group.layers), group.rank
    delta = torch.mm(g, b)  # [N, K r]
    if s != 1.0:
        delta.mul_(s)
    grads: list = [None] * (2 * k)
    if any(needs_lora[:k]):
        grad_a = torch.mm(delta.t(), x2)
        for i in range(k):
            grads[i] = _as(grad_a[i * r : (i + 1) * r], lora[i].dtype)
    if any(needs_lora[k:]):
        scales = group.scales()
        uniform = s != 1.0 or all(sc == 1.0 for sc in scales)
        hs = h * s if uniform and s != 1.0 else h  # grad_B_k = s_k g_k^T h_k
        at = 0
        for i, out in enumerate(group.out_features):
            gk = g if k == 1 else g[:, at : at + out]
            grad_b = torch.mm(gk.t(), hs if k == 1 else hs[:, i * r : (i + 1) * r])
            if not uniform:
                grad_b.mul_(scales[i])
            grads[k + i] = _as(grad_b, lora[k + i].dtype)
            at += out
    gx = None
    if needs_x:
        gx = torch.mm(g, group.weights.weight(group.name, g.dtype))
        gx.addmm_(delta, a)
    group.record_statistics(h, delta)
    return gx, grads


class FusedProjections(torch.autograd.Function):
    """``y [..., sum o_k]`` of one projection group (QKV, O); see the module docstring."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProjectionGroup, *lora: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        lead = x.shape[:-1]
        x2 = _as(x.reshape(-1, x.shape[-1]), dtype)
        a, b, s = _lora_factors(group, lora, dtype)
        y, h = _group_forward(group, x2, a, b, s)
        ctx.group, ctx.input_dtype, ctx.scale = group, x.dtype, s
        ctx.save_for_backward(x2, h, a, b, *lora)
        return y.view(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor):
        x2, h, a, b, *lora = ctx.saved_tensors
        g = _as(grad_y.reshape(-1, grad_y.shape[-1]), x2.dtype)
        gx, grads = _group_backward(
            ctx.group, g, x2, h, a, b, ctx.scale, lora, ctx.needs_input_grad[0], ctx.needs_input_grad[2:]
        )
        if gx is not None:
            gx = _as(gx.view(*grad_y.shape[:-1], gx.shape[-1]), ctx.input_dtype)
        return (gx, None, *grads)


class FusedSwiGLU(torch.autograd.Function):
    """``down(silu(gate(x)) * up(x))`` with LoRA on all three projections, in one Function."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, gate_up: ProjectionGroup, down: ProjectionGroup, *lora: torch.Tensor
    ) -> torch.Tensor:
        dtype = _compute_dtype(x)
        lead = x.shape[:-1]
        x2 = _as(x.reshape(-1, x.shape[-1]), dtype)
        lora_gu, lora_d = lora[:4], lora[4:]
        a_gu, b_gu, s_gu = _lora_factors(gate_up, lora_gu, dtype)
        y_gu, h_gu = _group_forward(gate_up, x2, a_gu, b_gu, s_gu)
        gate, up = y_gu.chunk(2, dim=1)
        act = F.silu(gate).mul_(up)
        a_d, b_d, s_d = _lora_factors(down, lora_d, dtype)
        y, h_d = _group_forward(down, act, a_d, b_d, s_d)
        ctx.groups, ctx.input_dtype, ctx.scales = (gate_up, down), x.dtype, (s_gu, s_d)
        ctx.save_for_backward(x2, y_gu, h_gu, h_d, a_gu, b_gu, a_d, b_d, *lora)
        return y.view(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor):
        x2, y_gu, h_gu, h_d, a_gu, b_gu, a_d, b_d, *lora = ctx.saved_tensors
        gate_up, down = ctx.groups
        needs = ctx.needs_input_grad
        g = _as(grad_y.reshape(-1, grad_y.shape[-1]), x2.dtype)
        s_gu, s_d = ctx.scales
        gate, up = y_gu.chunk(2, dim=1)
        silu = F.silu(gate)
        act = silu * up  # recomputed, not stored
        g_act, grads_d = _group_backward(down, g, act, h_d, a_d, b_d, s_d, lora[4:], True, needs[7:9])
        if torch.compiler.is_compiling():  # dynamo rejects out= into strided views; the compiler fuses anyway
            g_gate_up = torch.cat([torch.ops.aten.silu_backward(g_act * up, gate), g_act * silu], dim=1)
        else:  # eager: both halves written in place, no concatenation copy
            g_gate_up = torch.empty_like(y_gu)
            g_gate, g_up = g_gate_up.chunk(2, dim=1)
            torch.mul(g_act, silu, out=g_up)
            torch.ops.aten.silu_backward.grad_input(g_act.mul_(up), gate, grad_input=g_gate)
        gx, grads_gu = _group_backward(
            gate_up, g_gate_up, x2, h_gu, a_gu, b_gu, s_gu, lora[:4], needs[0], needs[3:7]
        )
        if gx is not None:
            gx = _as(gx.view(*grad_y.shape[:-1], gx.shape[-1]), ctx.input_dtype)
        return (gx, None, None, *grads_gu, *grads_d)
