"""The frozen base stack of a fused decoder block: RMSNorm and rotary position embedding (RoPE).

Each is one autograd Function with a hand-written backward (one graph node instead of the 6-10 that
HF's module code records, and no ``rotate_half`` ``cat`` chains):

* :class:`RMSNormFunction`: ``y = w * (x * rsqrt(mean(x^2) + eps))`` with the statistics in fp32 and the
  normalised value cast back to ``x.dtype`` before the weight, exactly as HF's Llama/Mistral/Qwen
  ``RMSNorm``. Saves ``x`` and ``rstd [..., 1]`` (fp32).
* :class:`GemmaRMSNormFunction`: Gemma's variant, ``y = (x * rstd * (1 + w)).to(x.dtype)`` all in fp32
  up to the cast (HF's ``GemmaRMSNorm`` / ``Gemma2RMSNorm``), with an optional residual add inside
  (Gemma2 adds the residual after its post-attention and post-feedforward norms).
* :class:`RotaryFunction`: ``q' = q cos + rotate_half(q) sin`` and the same for ``k`` in one node; its
  backward applies the inverse rotation ``g cos + rotate_half^T(g sin)``. Saves only ``cos, sin``.

:func:`rms_norm` and :func:`rotary` pick the implementation: liger-kernel's Triton kernels on CUDA when
``liger_kernel`` imports (optional extra ``grit-kernels[liger]``), these Functions otherwise (CPU,
or CUDA without liger). :func:`rotate_` / :func:`unrotate_` are the in-place building blocks that the
fused QKV Function also uses.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch
import torch.nn.functional as F


def rotate_(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``out = x * cos + rotate_half(x) * sin`` (HF's rotation, ``rotate_half(x) = [-x2, x1]``).

    Args:
        out: ``[..., D]`` result buffer (may be a strided view; not aliasing ``x``).
        x: ``[..., D]`` input, ``D`` even.
        cos, sin: broadcastable to ``x``.
    Three ops: one multiply and two ``addcmul_`` into the halves of ``out``.
    """
    half = x.shape[-1] // 2
    if torch.compiler.is_compiling():  # dynamo rejects out= into strided views; the compiler fuses anyway
        x1, x2 = x[..., :half], x[..., half:]
        c1, c2, s1, s2 = cos[..., :half], cos[..., half:], sin[..., :half], sin[..., half:]
        return out.copy_(torch.cat((x1 * c1 - x2 * s1, x2 * c2 + x1 * s2), dim=-1))
    torch.mul(x, cos, out=out)
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1.0)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out


def unrotate_(out: torch.Tensor, g: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The transpose of :func:`rotate_` (its backward): ``out = g * cos + rotate_half^T(g * sin)``,
    ``rotate_half^T(u) = [u2, -u1]``; shapes as in :func:`rotate_`."""
    half = g.shape[-1] // 2
    if torch.compiler.is_compiling():
        g1, g2 = g[..., :half], g[..., half:]
        c1, c2, s1, s2 = cos[..., :half], cos[..., half:], sin[..., :half], sin[..., half:]
        return out.copy_(torch.cat((g1 * c1 + g2 * s2, g2 * c2 - g1 * s1), dim=-1))
    torch.mul(g, cos, out=out)
    out[..., :half].addcmul_(g[..., half:], sin[..., half:])
    out[..., half:].addcmul_(g[..., :half], sin[..., :half], value=-1.0)
    return out


def rms_norm_rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``rsqrt(mean(x^2, -1) + eps)`` ``[..., 1]`` in fp32."""
    x32 = x if x.dtype == torch.float32 else x.float()
    return torch.rsqrt(torch.mean(x32 * x32, dim=-1, keepdim=True).add_(eps))


def rms_norm_apply(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """``weight * (x * rstd).to(x.dtype)`` (HF's order of casts); a new tensor."""
    xhat = (x if x.dtype == torch.float32 else x.float()) * rstd
    if xhat.dtype != x.dtype:
        xhat = xhat.to(x.dtype)
    return xhat.mul_(weight) if weight.dtype == xhat.dtype else weight * xhat


def rms_norm_backward(grad_y, x, weight, rstd, needs_x: bool = True, needs_weight: bool = False):
    """``(dL/dx or None, dL/dweight or None)`` of :func:`rms_norm_apply` from ``grad_y [..., d]``:
    ``dx = rstd * (g - xhat * mean(g * xhat))`` with ``g = grad_y * weight``, in fp32."""
    x32 = x if x.dtype == torch.float32 else x.float()
    xhat = x32 * rstd
    grad_x = grad_w = None
    if needs_x:
        g = grad_y * weight  # dL/dxhat
        if g.dtype != torch.float32:
            g = g.float()
        proj = torch.mean(g * xhat, dim=-1, keepdim=True)
        grad_x = torch.addcmul(g, xhat, proj, value=-1.0).mul_(rstd)
        if grad_x.dtype != x.dtype:
            grad_x = grad_x.to(x.dtype)
    if needs_weight:
        xh = xhat if x.dtype == torch.float32 else xhat.to(x.dtype)
        grad_w = (grad_y * xh).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    return grad_x, grad_w


class RMSNormFunction(torch.autograd.Function):
    """``y [..., d] = weight * (x * rstd).to(x.dtype)``, ``rstd = rsqrt(mean(x^2, -1) + eps)`` in fp32.

    ``weight [d]`` may be trainable (its gradient is formed only when needed). Saves ``x`` and ``rstd``.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rstd = rms_norm_rstd(x, eps)
        ctx.save_for_backward(x, weight, rstd)
        return rms_norm_apply(x, weight, rstd)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        grad_x, grad_w = rms_norm_backward(grad_y, x, weight, rstd, *ctx.needs_input_grad[:2])
        return grad_x, grad_w, None


class GemmaRMSNormFunction(torch.autograd.Function):
    """Gemma's RMSNorm, optionally followed by a residual add, in one node:
    ``y [..., d] = [residual +] (x32 * rstd * (1 + weight32)).to(x.dtype)``, with ``x32 = x.float()``,
    ``rstd = rsqrt(mean(x32^2, -1) + eps)`` and everything up to the cast in fp32 (HF's ``GemmaRMSNorm``
    / ``Gemma2RMSNorm``: the scale is ``1 + weight``, and the weight multiplies *before* the cast, unlike
    Llama's). ``residual [..., d]`` or ``None`` (Gemma2's ``residual + post_norm(out)``; added after the
    cast, in ``residual``'s dtype when it is wider, as HF's ``residual + hidden``). Saves ``x`` and
    ``rstd [..., 1]`` (fp32); the weight gradient is formed only when needed.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float, residual) -> torch.Tensor:
        rstd = rms_norm_rstd(x, eps)
        y = ((x if x.dtype == torch.float32 else x.float()) * rstd).mul_(1.0 + weight.float())
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        ctx.residual_dtype = None if residual is None else residual.dtype
        ctx.save_for_backward(x, weight, rstd)
        if residual is None:
            return y
        return y.add_(residual) if residual.dtype == y.dtype else residual + y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        needs_x, needs_weight = ctx.needs_input_grad[:2]
        g32 = grad_y.float()
        xhat = (x if x.dtype == torch.float32 else x.float()) * rstd
        grad_x = grad_w = grad_residual = None
        if needs_x:  # dL/dxhat = g (1 + w); dx = rstd (dL/dxhat - xhat mean(dL/dxhat * xhat))
            gh = g32 * (1.0 + weight.float())
            proj = torch.mean(gh * xhat, dim=-1, keepdim=True)
            grad_x = torch.addcmul(gh, xhat, proj, value=-1.0).mul_(rstd)
            if grad_x.dtype != x.dtype:
                grad_x = grad_x.to(x.dtype)
        if needs_weight:
            grad_w = (g32 * xhat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        if ctx.residual_dtype is not None and ctx.needs_input_grad[3]:
            grad_residual = grad_y if grad_y.dtype == ctx.residual_dtype else grad_y.to(ctx.residual_dtype)
        return grad_x, grad_w, None, grad_residual


class RotaryFunction(torch.autograd.Function):
    """``(q', k')`` = HF's ``apply_rotary_pos_emb(q, k, cos, sin)`` with ``cos, sin`` already
    broadcastable to ``q [..., Hq, S, D]`` / ``[..., S, Hq, D]`` and ``k`` (any layout); one node."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        ctx.save_for_backward(cos, sin)
        q_out = rotate_(torch.empty_like(q, memory_format=torch.contiguous_format), q, cos, sin)
        k_out = rotate_(torch.empty_like(k, memory_format=torch.contiguous_format), k, cos, sin)
        return q_out, k_out

    @staticmethod
    def backward(ctx: Any, grad_q: torch.Tensor, grad_k: torch.Tensor):
        cos, sin = ctx.saved_tensors
        gq = None if grad_q is None else unrotate_(torch.empty_like(grad_q), grad_q, cos, sin)
        gk = None if grad_k is None else unrotate_(torch.empty_like(grad_k), grad_k, cos, sin)
        return gq, gk, None, None


@functools.cache
def liger_ops():
    """``(rms_norm_fn, rope_fn)`` from liger-kernel, or ``None`` when it does not import."""
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.rope import LigerRopeFunction
    except Exception:  # noqa: BLE001 -- not installed, or broken (triton / torch version mismatch)
        return None
    return LigerRMSNormFunction, LigerRopeFunction


def uses_liger(device: torch.device | str) -> bool:
    """Whether :func:`rms_norm` / :func:`rotary` run liger-kernel's Triton kernels on ``device``."""
    return torch.device(device).type == "cuda" and liger_ops() is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of ``x [..., d]`` with ``weight [d]`` (HF Llama semantics); liger on CUDA when available."""
    if x.is_cuda and not torch.compiler.is_compiling() and liger_ops() is not None:
        return liger_ops()[0].apply(x, weight, eps, 0.0, "llama", False)
    return RMSNormFunction.apply(x, weight, eps)


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual=None) -> torch.Tensor:
    """Gemma's RMSNorm of ``x [..., d]`` (scale ``1 + weight [d]``, fp32 inside; :class:`GemmaRMSNormFunction`),
    plus ``residual [..., d]`` when given. Our Function on every device (liger's Gemma mode is not wired)."""
    return GemmaRMSNormFunction.apply(x, weight, eps, residual)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """RoPE of ``q [B, Hq, S, D]``, ``k [B, Hk, S, D]`` (any strides) with ``cos, sin [B, S, D]``.

    Returns ``(q', k')`` in the same shapes; liger on CUDA when available.
    """
    if q.is_cuda and not torch.compiler.is_compiling() and liger_ops() is not None:
        return liger_ops()[1].apply(q, k, cos, sin, None, 1)
    return RotaryFunction.apply(q, k, cos.unsqueeze(1), sin.unsqueeze(1))


# ----------------------------------------------------------------------------- packed (varlen) attention
#: the last checked masks, newest last: [(weakref to the mask, weakref to position_ids, segments), ...]; two,
#: so that models alternating two masks over their layers (Gemma2: full and sliding) check each once
_SEGMENTS: list = []


def packed_segments(attention_mask, position_ids) -> list | None:
    """Per-row ``[(start, end), ...]`` of the packed sequences in a padding-free batch, or ``None``.

    Segments start where ``position_ids [B, S]`` is 0. They are returned only when ``attention_mask``
    (``[B, 1, S, S]`` bool, True = attend; or the additive float mask of eager attention, 0 = attend and
    the dtype's minimum = masked, nothing else) is *exactly* the block-diagonal causal mask of those
    segments (what transformers builds for packed rows), so attention restricted to each segment with a
    causal mask is the same computation. The check (one ``[B, S, S]`` comparison and a host read of the
    boundaries) runs once per mask object: the decoder blocks of one forward share it.
    """
    if (
        not isinstance(attention_mask, torch.Tensor)
        or not (attention_mask.dtype == torch.bool or attention_mask.is_floating_point())
        or not isinstance(position_ids, torch.Tensor)
        or attention_mask.dim() != 4
        or attention_mask.shape[1] != 1
        or position_ids.dim() != 2
        or attention_mask.shape[0] != position_ids.shape[0]
        or attention_mask.shape[2:] != (position_ids.shape[1], position_ids.shape[1])
    ):
        return None
    for mask_ref, positions_ref, hit in _SEGMENTS:
        if mask_ref() is attention_mask and positions_ref() is position_ids:
            return hit
    seg = torch.cumsum(position_ids == 0, dim=-1)  # [B, S] segment id (rows may start mid-sequence: id 0)
    n = position_ids.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=seg.device).tril_()
    expected = (seg[:, :, None] == seg[:, None, :]) & causal
    allowed = attention_mask[:, 0]
    if allowed.is_floating_point():  # additive: only 0 (attend) and the minimum (masked) qualify
        masked = allowed == torch.finfo(allowed.dtype).min
        allowed = allowed == 0
        if not torch.equal(allowed, ~masked):
            allowed = None
    segments = None
    if allowed is not None and torch.equal(expected, allowed):
        segments = []
        for row in (position_ids == 0).tolist():
            starts = sorted({0, *(i for i, z in enumerate(row) if z)})
            segments.append(list(zip(starts, starts[1:] + [n])))
    _SEGMENTS[:] = [*_SEGMENTS[-1:], (weakref.ref(attention_mask), weakref.ref(position_ids), segments)]
    return segments


def packed_causal_attention(q, k, v, segments: list, scale: float) -> torch.Tensor:
    """Causal attention within each packed segment: ``q [B, Hq, S, D]``, ``k, v [B, Hk, S, D]``
    (``Hq`` a multiple of ``Hk``) -> ``[B, S, Hq, D]``, with :func:`packed_segments`' ``segments``.

    The cost is ``sum_i s_i^2`` instead of the ``S^2`` of one masked attention over the whole packed
    row (4 x 450 tokens: 4x less), and no mask is read. What flash-attention's varlen kernels do on
    GPUs, here as one SDPA call per segment (CPU).
    """
    gqa = q.shape[1] != k.shape[1]
    rows = []
    for b, row in enumerate(segments):
        outs = [
            F.scaled_dot_product_attention(
                q[b : b + 1, :, s:e],
                k[b : b + 1, :, s:e],
                v[b : b + 1, :, s:e],
                is_causal=True,
                scale=scale,
                enable_gqa=gqa,
            )
            for s, e in row
        ]
        rows.append(outs[0] if len(outs) == 1 else torch.cat(outs, dim=2))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    return out.transpose(1, 2)


def packed_eager_attention(
    q, k, v, segments: list, scale: float, softcap: float | None = None
) -> torch.Tensor:
    """HF's eager attention within each packed segment: ``q [B, Hq, S, D]``, ``k, v [B, Hk, S, D]``
    -> ``[B, S, Hq, D]``, with :func:`packed_segments`' ``segments``.

    Per segment, HF's ``eager_attention_forward`` ops in HF's order: ``scores = q k^T * scale``; with
    ``softcap``, ``tanh(scores / softcap) * softcap`` (Gemma2's logit soft-capping); the causal mask (the
    dtype's minimum, as HF's additive mask); softmax in fp32 cast back to ``q``'s dtype; ``@ v``. Masked
    scores get weight exactly 0 either way, so this is HF's computation over the whole packed row minus
    the cross-segment blocks: ``sum_i s_i^2`` instead of ``S^2`` work and memory.
    """
    groups = q.shape[1] // k.shape[1]
    masks: dict = {}
    rows = []
    for b, row in enumerate(segments):
        outs = []
        for s, e in row:
            qs, ks, vs = q[b : b + 1, :, s:e], k[b : b + 1, :, s:e], v[b : b + 1, :, s:e]
            if groups > 1:  # HF's repeat_kv
                ks, vs = ks.repeat_interleave(groups, dim=1), vs.repeat_interleave(groups, dim=1)
            scores = torch.matmul(qs, ks.transpose(2, 3)) * scale
            if softcap is not None:
                scores = torch.tanh(scores / softcap) * softcap
            n = e - s
            if n not in masks:
                masks[n] = torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1)
            scores = scores.masked_fill(masks[n], torch.finfo(scores.dtype).min)
            weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            outs.append(torch.matmul(weights, vs))
        rows.append(outs[0] if len(outs) == 1 else torch.cat(outs, dim=2))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    return out.transpose(1, 2)
