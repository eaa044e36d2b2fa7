"""Block-level LoRA autograd Functions with GRIT's statistics inside.

A *projection group* is ``K`` LoRA projections that read the same input ``x [N, d]`` (q, k, v; gate,
up; or a single o / down), with frozen base weights ``W_k [o_k, d]`` (optional frozen bias), LoRA
``A_k [r, d]``, ``B_k [o_k, r]`` and scale ``s_k``. Forward, with ``A = [A_1; ...; A_K]`` ``[K r, d]`` and
``s B = blockdiag(s_1 B_1, ..., s_K B_K)`` ``[sum o_k, K r]`` (``s`` a scalar when the scales agree)::

    y = x W^T (+ bias)        one matmul for the group (W: the group's weights stacked)
    h = x A^T                 [N, K r], the rank-space activations of all K modules in one matmul
    y += s h B^T              in place (addmm, alpha = s)
    y += R                    optional residual, in place, inside the same Function (its gradient is
                              dL/dy itself: no extra graph node for the residual add)

Backward, from ``g = dL/dy``::

    delta   = s g B                       [N, K r]  (= s_k g_k B_k per module: dL/dh)
    grad_B_k = s_k g_k^T h_k               grad_A = delta^T x   (split per module)
    dL/dx   = g W + delta A                (only when x needs a gradient)

``h`` and ``delta`` are exactly the tensors GRIT's statistics need: backward hands them to
:data:`grit_kernels.layers.RECORDER`, which forms every module's row mask and Grams in one batched
pass when the backward ends (only for modules a :class:`~grit_kernels.GritPreconditioner` patched).
With ``fisher="kfac_full"`` / ``"kfac_lowrank"`` backward also hands ``x`` and each module's ``g`` to the
large-factor capture (:meth:`ProjectionGroup.record_large_factors`).

:class:`FusedQKV` is the q/k/v group returning ``q, k, v [..., H, D]`` (views of its output) with
the rotary position embedding of q and k applied inside (one ``mul`` + two ``addcmul_`` for q and k
together; the backward applies the inverse rotation straight into the group's gradient buffer).
:class:`FusedSwiGLU` chains the gate/up group, ``a = act(gate) * up`` (SiLU, or GELU for GeGLU) and the down
group; it saves the gate/up output (needed by the activation's gradient anyway) and recomputes ``a`` in backward.
Weights are never saved for backward: :class:`~grit_kernels.fused.weights.BlockWeights` provides
them again (one dequantisation per block for 4-bit).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..layers import RECORDER
from .base_stack import rms_norm_apply, rms_norm_backward, rms_norm_rstd, rotate_, unrotate_


class ProjectionGroup:
    """Static description of one projection group of a fused block (no tensors of its own).

    Args:
        name: group key in ``weights`` (``"qkv"``, ``"o"``, ``"gate_up"``, ``"down"``).
        layers: the PEFT LoRA layers, stacked along the output dimension in this order.
        adapter: the active adapter name.
        weights: the block's :class:`~grit_kernels.fused.weights.BlockWeights`.
    """

    #: gate/up groups: the MLP activation applied to the gate, ``"silu"`` (SwiGLU) or a GeGLU
    #: ``"gelu_tanh"`` / ``"gelu"`` (``F.gelu`` with ``approximate="tanh"`` / ``"none"``)
    activation = "silu"

    def __init__(self, name: str, layers: list, adapter: str, weights):
        self.name, self.layers, self.adapter, self.weights = name, list(layers), adapter, weights
        self.out_features = [layer.base_layer.out_features for layer in self.layers]
        self.rank = self.layers[0].r[adapter]

    def lora_weights(self) -> list[torch.Tensor]:
        """``[A_1, ..., A_K, B_1, ..., B_K]`` (the autograd inputs of the Functions), read from the
        layers at every call (plain dict look-ups: no ``nn.Module.__getattr__``)."""
        a = self.adapter
        return [layer._modules["lora_A"]._modules[a]._parameters["weight"] for layer in self.layers] + [
            layer._modules["lora_B"]._modules[a]._parameters["weight"] for layer in self.layers
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

    def record_large_factors(self, x: torch.Tensor, g: torch.Tensor) -> None:
        """Hand the group input ``x [N, d]`` and each module's output gradient ``dL/dy_k`` (its columns of
        ``g [N, sum o_k]``) to the large-factor option (``fisher="kfac_full"`` / ``"kfac_lowrank"``) of the
        preconditioner that patched the module, if any (a dict look-up per layer otherwise). Not inside a
        compiled graph (the capture keeps Python state): the preconditioner's step then says the large factors
        were not captured."""
        if torch.compiler.is_compiling():
            return
        at = 0
        for layer, out in zip(self.layers, self.out_features):
            state = layer.__dict__.get("_grit_state")
            owner = state.get("large_factors") if state else None
            if owner is not None:
                owner[0].capture_output_gradient(owner[1], x, g[:, at : at + out])
            at += out

    def record_statistics(self, h: torch.Tensor, delta: torch.Tensor) -> None:
        """Hand ``h, delta [N, K r]`` to the recorder for the modules a preconditioner patched."""
        states = [layer.__dict__.get("_grit_state") for layer in self.layers]
        if not any(states):
            return
        slots = [state["slot"] if state else None for state in states]
        bank = slots[0].bank if slots[0] is not None else None
        if bank is not None and all(s is not None and s.bank is bank for s in slots):
            RECORDER.record(bank, tuple(s.index for s in slots), h, delta)
            return
        r = self.rank
        for k, slot in enumerate(slots):
            if slot is not None:
                slot.record(h[:, k * r : (k + 1) * r], delta[:, k * r : (k + 1) * r])


_GELU_APPROXIMATE = {"gelu_tanh": "tanh", "gelu": "none"}  #: GeGLU activations -> F.gelu's ``approximate``


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
    """``y [N, sum o_k]`` and ``h [N, K r]`` of one group for ``x2 [N, d]``."""
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
        scales = group.scales() if k > 1 else None
        uniform = k == 1 or s != 1.0 or all(sc == 1.0 for sc in scales)
        hs = h * s if uniform and s != 1.0 else h  # grad_B_k = s_k g_k^T h_k
        if k == 1:
            grads[1] = _as(torch.mm(g.t(), hs), lora[1].dtype)
        else:
            at = 0
            for i, out in enumerate(group.out_features):
                grad_b = torch.mm(g[:, at : at + out].t(), hs[:, i * r : (i + 1) * r])
                if not uniform:
                    grad_b.mul_(scales[i])
                grads[k + i] = _as(grad_b, lora[k + i].dtype)
                at += out
    gx = None
    if needs_x:
        gx = torch.mm(g, group.weights.weight(group.name, g.dtype))
        gx.addmm_(delta, a)
    group.record_statistics(h, delta)
    group.record_large_factors(x2, g)
    return gx, grads


def _add_residual(y: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """``residual + y`` (``y [N, o]`` fresh: added in place when the dtypes agree; under autocast the
    residual keeps its wider dtype). Added after the matmul, not as the addmm's input, so the sum
    rounds exactly as HF's ``residual + out``."""
    if residual is None:
        return y
    residual = residual.reshape(y.shape[0], -1)
    return y.add_(residual) if residual.dtype == y.dtype else residual + y


def _residual_grad(grad_y: torch.Tensor, residual_dtype):
    if residual_dtype is None:
        return None
    return grad_y if grad_y.dtype == residual_dtype else grad_y.to(residual_dtype)


class FusedProjections(torch.autograd.Function):
    """``y [..., sum o_k]`` (``+ residual``) of one projection group (QKV, O); see the module docstring.

    Args (of ``apply``): ``x [..., d]``; ``residual [..., sum o_k]`` or ``None`` (added to the output in
    the base matmul); the group; then ``group.lora_weights()``.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, residual, group: ProjectionGroup, *lora: torch.Tensor
    ) -> torch.Tensor:
        dtype = _compute_dtype(x)
        lead = x.shape[:-1]
        x2 = _as(x.reshape(-1, x.shape[-1]), dtype)
        a, b, s = _lora_factors(group, lora, dtype)
        y, h = _group_forward(group, x2, a, b, s)
        y = _add_residual(y, residual)
        ctx.group, ctx.input_dtype, ctx.scale = group, x.dtype, s
        ctx.residual_dtype = None if residual is None else residual.dtype
        ctx.save_for_backward(x2, h, a, b, *lora)
        return y.view(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor):
        x2, h, a, b, *lora = ctx.saved_tensors
        g = _as(grad_y.reshape(-1, grad_y.shape[-1]), x2.dtype)
        gx, grads = _group_backward(
            ctx.group, g, x2, h, a, b, ctx.scale, lora, ctx.needs_input_grad[0], ctx.needs_input_grad[3:]
        )
        if gx is not None:
            gx = _as(gx.view(*grad_y.shape[:-1], gx.shape[-1]), ctx.input_dtype)
        return (gx, _residual_grad(grad_y, ctx.residual_dtype), None, *grads)


def _normed(x: torch.Tensor, norm_weight, rstd):
    """The group input: ``x`` itself, or its RMSNorm when the Function owns the norm."""
    return x if norm_weight is None else rms_norm_apply(x, norm_weight, rstd)


def _norm_grads(gx, x, norm_weight, rstd, needs_x: bool, needs_weight: bool):
    """``(dL/dx, dL/dnorm_weight)`` through the Function's own RMSNorm (or ``(gx, None)`` without one)."""
    if norm_weight is None:
        return gx, None
    return rms_norm_backward(gx, x, norm_weight, rstd, needs_x, needs_weight)


class FusedQKV(torch.autograd.Function):
    """The q/k/v group of an attention block: ``q [..., Hq, D]``, ``k, v [..., Hk, D]`` with RoPE on q, k.

    Args (of ``apply``): ``x [..., d]``; ``norm_weight [d]`` and ``eps`` of the block's input RMSNorm,
    applied to ``x`` inside (``None``: ``x`` is the group input as is); the group (stacked q, k, v);
    ``heads = (Hq, Hk, D)``; ``cos, sin [..., D]`` (HF's position embeddings, broadcast over heads) or
    ``None, None`` for no rotation; then ``group.lora_weights()``. Outputs are views of the group's
    output (``v``) and of one rotated ``[..., Hq + Hk, D]`` buffer (``q``, ``k``); do not modify them
    in place. With the norm inside, ``x`` and the fp32 ``rstd [..., 1]`` are saved and the normalised
    input is recomputed in backward (one multiply) instead of stored.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, norm_weight, eps, group: ProjectionGroup, heads: tuple, cos, sin, *lora
    ):
        hq, hk, d = heads
        dtype = _compute_dtype(x)
        lead = x.shape[:-1]
        rstd = None if norm_weight is None else rms_norm_rstd(x, eps)
        xn = _normed(x, norm_weight, rstd)
        x2 = _as(xn.reshape(-1, xn.shape[-1]), dtype)
        a, b, s = _lora_factors(group, lora, dtype)
        y, h = _group_forward(group, x2, a, b, s)
        y4 = y.view(*lead, hq + 2 * hk, d)
        if cos is not None:
            cos, sin = _as(cos, dtype).unsqueeze(-2), _as(sin, dtype).unsqueeze(-2)
            qk = y4[..., : hq + hk, :]
            qk = rotate_(torch.empty(qk.shape, dtype=dtype, device=y.device), qk, cos, sin)
        else:
            qk = y4
        ctx.group, ctx.input_dtype, ctx.scale, ctx.heads = group, x.dtype, s, heads
        ctx.set_materialize_grads(False)
        source = x2 if norm_weight is None else x  # the normalised input is recomputed from x
        ctx.save_for_backward(source, norm_weight, rstd, h, a, b, cos, sin, *lora)
        return qk[..., :hq, :], qk[..., hq : hq + hk, :], y4[..., hq + hk :, :]

    @staticmethod
    def backward(ctx: Any, grad_q, grad_k, grad_v):
        source, norm_weight, rstd, h, a, b, cos, sin, *lora = ctx.saved_tensors
        hq, hk, d = ctx.heads
        x2 = (
            source
            if norm_weight is None
            else _as(_normed(source, norm_weight, rstd).reshape(h.shape[0], -1), h.dtype)
        )
        g = torch.empty(x2.shape[0], (hq + 2 * hk) * d, dtype=x2.dtype, device=x2.device)
        some = next(t for t in (grad_q, grad_k, grad_v) if t is not None)
        g4 = g.view(*some.shape[:-2], hq + 2 * hk, d)
        for grad, lo, hi in ((grad_q, 0, hq), (grad_k, hq, hq + hk), (grad_v, hq + hk, hq + 2 * hk)):
            dst = g4[..., lo:hi, :]
            if grad is None:
                dst.zero_()
            elif cos is not None and lo < hq + hk:
                unrotate_(dst, grad, cos, sin)
            else:
                dst.copy_(grad)
        needs = ctx.needs_input_grad
        gx, grads = _group_backward(
            ctx.group, g, x2, h, a, b, ctx.scale, lora, needs[0] or needs[1], needs[7:]
        )
        grad_w = None
        if gx is not None:
            gx = gx.view(*g4.shape[:-2], gx.shape[-1])
            gx, grad_w = _norm_grads(gx, source, norm_weight, rstd, needs[0], needs[1])
            gx = _as(gx, ctx.input_dtype) if needs[0] else None
        return (gx, grad_w, None, None, None, None, None, *grads)


class FusedSwiGLU(torch.autograd.Function):
    """``residual + down(silu(gate(x')) * up(x'))`` with LoRA on all three projections, in one Function;
    ``x' = RMSNorm(x)`` when the Function owns the block's post-attention norm, else ``x``. The gate's
    activation is ``gate_up.activation``: SiLU (SwiGLU) or GELU, tanh-approximate or exact (GeGLU: Gemma).

    Args (of ``apply``): ``x [..., d]``; ``residual [..., d]``, ``True`` (the residual is ``x`` itself,
    as in a decoder block: its gradient is added inside, and dynamo traces no duplicate input) or
    ``None``; ``norm_weight [d]`` and ``eps`` (or ``None``); the gate/up and down groups; then
    ``gate_up.lora_weights()`` and ``down.lora_weights()``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        residual,
        norm_weight,
        eps,
        gate_up: ProjectionGroup,
        down: ProjectionGroup,
        *lora: torch.Tensor,
    ) -> torch.Tensor:
        dtype = _compute_dtype(x)
        lead = x.shape[:-1]
        rstd = None if norm_weight is None else rms_norm_rstd(x, eps)
        xn = _normed(x, norm_weight, rstd)
        x2 = _as(xn.reshape(-1, xn.shape[-1]), dtype)
        lora_gu, lora_d = lora[:4], lora[4:]
        a_gu, b_gu, s_gu = _lora_factors(gate_up, lora_gu, dtype)
        y_gu, h_gu = _group_forward(gate_up, x2, a_gu, b_gu, s_gu)
        gate, up = y_gu.chunk(2, dim=1)
        if gate_up.activation == "silu":
            act = F.silu(gate).mul_(up)
        else:  # GeGLU
            act = F.gelu(gate, approximate=_GELU_APPROXIMATE[gate_up.activation]).mul_(up)
        a_d, b_d, s_d = _lora_factors(down, lora_d, dtype)
        y, h_d = _group_forward(down, act, a_d, b_d, s_d)
        ctx.self_residual = residual is True
        y = _add_residual(y, x if ctx.self_residual else residual)
        ctx.groups, ctx.input_dtype, ctx.scales = (gate_up, down), x.dtype, (s_gu, s_d)
        ctx.residual_dtype = None if residual is None or ctx.self_residual else residual.dtype
        source = x2 if norm_weight is None else x  # the normalised input is recomputed from x
        ctx.save_for_backward(source, norm_weight, rstd, y_gu, h_gu, h_d, a_gu, b_gu, a_d, b_d, *lora)
        return y.view(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor):
        source, norm_weight, rstd, y_gu, h_gu, h_d, a_gu, b_gu, a_d, b_d, *lora = ctx.saved_tensors
        gate_up, down = ctx.groups
        needs = ctx.needs_input_grad
        n = y_gu.shape[0]
        x2 = (
            source
            if norm_weight is None
            else _as(_normed(source, norm_weight, rstd).reshape(n, -1), y_gu.dtype)
        )
        g = _as(grad_y.reshape(-1, grad_y.shape[-1]), x2.dtype)
        s_gu, s_d = ctx.scales
        gate, up = y_gu.chunk(2, dim=1)
        gelu = _GELU_APPROXIMATE.get(gate_up.activation)  # None: SiLU
        activated = F.silu(gate) if gelu is None else F.gelu(gate, approximate=gelu)
        act = activated * up  # recomputed, not stored
        g_act, grads_d = _group_backward(down, g, act, h_d, a_d, b_d, s_d, lora[4:], True, needs[10:12])
        if torch.compiler.is_compiling():  # dynamo rejects out= into strided views; the compiler fuses anyway
            g_gate = (
                torch.ops.aten.silu_backward(g_act * up, gate)
                if gelu is None
                else torch.ops.aten.gelu_backward(g_act * up, gate, approximate=gelu)
            )
            g_gate_up = torch.cat([g_gate, g_act * activated], dim=1)
        else:  # eager: both halves written in place, no concatenation copy
            g_gate_up = torch.empty_like(y_gu)
            g_gate, g_up = g_gate_up.chunk(2, dim=1)
            torch.mul(g_act, activated, out=g_up)
            if gelu is not None:  # GeGLU: d gelu(gate) / d gate
                torch.ops.aten.gelu_backward.grad_input(
                    g_act.mul_(up), gate, approximate=gelu, grad_input=g_gate
                )
            else:
                torch.ops.aten.silu_backward.grad_input(g_act.mul_(up), gate, grad_input=g_gate)
        gx, grads_gu = _group_backward(
            gate_up, g_gate_up, x2, h_gu, a_gu, b_gu, s_gu, lora[:4], needs[0] or needs[2], needs[6:10]
        )
        grad_w = None
        if gx is not None:
            gx = gx.view(*grad_y.shape[:-1], gx.shape[-1])
            gx, grad_w = _norm_grads(gx, source, norm_weight, rstd, needs[0], needs[2])
            gx = _as(gx, ctx.input_dtype) if needs[0] else None
            if gx is not None and ctx.self_residual:  # + d(x + ...)/dx: gx is a fresh tensor of x's dtype
                gx.add_(_as(grad_y, gx.dtype))
        return (gx, _residual_grad(grad_y, ctx.residual_dtype), grad_w, None, None, None, *grads_gu, *grads_d)
