"""Frozen base weights of one fused decoder block: plain tensors, or bitsandbytes 4-bit weights
dequantised *once per block* into one reusable buffer.

At :func:`~grit_kernels.fused.fuse` time the packed 4-bit data of a block's projections (q, k, v, o,
gate, up, down) is concatenated into one flat uint8 tensor (each ``Params4bit`` is re-pointed to its
slice, so no memory is duplicated) and their block scales (``absmax``, un-nested) into one fp32
tensor. Plain weights of a group (q, k, v; gate, up) are likewise re-pointed to row slices of one
stacked tensor. A single dequantisation then yields every weight of the block; the result is kept in a
per-device cache until another block needs it, so the forward of a block dequantises once and the
backward once more (recompute instead of store; nothing weight-sized is saved for backward).

Under FSDP2 (``fully_shard``) the layers' weights are replaced: sharded ``DTensor`` s between forwards, FSDP's
gathered tensors inside them. :class:`BlockWeights` then reads the weights the layers hold at each call (*live*:
one concatenation of a group's plain weights, or one dequantisation per 4-bit layer, per use) and drops the
stacked / packed copies, which would otherwise pin a full copy of the weights on every rank. It switches when
it sees a layer's weight is no longer the tensor it stacked (``fuse`` before ``fully_shard``, as a Trainer does)
or a ``DTensor`` at construction (``fuse`` after ``fully_shard``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

_CACHE: dict = {}  #: device -> (owner BlockWeights, dtype, flat dequantised weights)


def quant_state(base: nn.Module):
    """A bitsandbytes ``Linear4bit``'s quantisation state: its weight's, else the module's (FSDP2 replaces the
    ``Params4bit`` by a plain tensor; bitsandbytes keeps a copy on the module), else ``None``."""
    state = getattr(getattr(base, "weight", None), "quant_state", None)
    return state if state is not None else getattr(base, "quant_state", None)


def is_4bit(base: nn.Module) -> bool:
    """Whether ``base`` is a bitsandbytes ``Linear4bit``."""
    return type(base).__name__ == "Linear4bit" and quant_state(base) is not None


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def _absmax_fp32(quant_state) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    if quant_state.nested:  # double quantisation: the block scales are themselves 8-bit quantised
        absmax = bnbf.dequantize_blockwise(quant_state.absmax, quant_state.state2)
        return (absmax + quant_state.offset).float()
    return quant_state.absmax.float()


def weights_unsupported_reason(bases: Sequence[nn.Module]) -> str | None:
    """``None`` if these base layers can be fused together, else why not."""
    kinds = {is_4bit(b) for b in bases}
    if len(kinds) > 1:
        return "mixed plain and 4-bit base weights in one block"
    for b in bases:
        if not isinstance(b, nn.Linear) and not is_4bit(b):
            return f"base layer {type(b).__name__} (fuse supports nn.Linear and bitsandbytes Linear4bit)"
        if b.weight.requires_grad or (b.bias is not None and b.bias.requires_grad):
            return "trainable base weight or bias (fuse needs frozen base layers)"
    if kinds == {True}:
        states = [quant_state(b) for b in bases]
        if len({(s.quant_type, s.blocksize, s.dtype) for s in states}) != 1:
            return "4-bit weights with different quant types / block sizes / dtypes in one block"
        if any(s.shape.numel() % s.blocksize for s in states):
            return "a 4-bit weight whose size is not a multiple of its block size"
        if any(getattr(s, "packing_format_for_cpu", False) for s in states):
            return "4-bit weights in bitsandbytes' CPU inference packing format"
    return None


class BlockWeights:
    """The frozen base weights (and biases) of a block's fused projection groups.

    Args:
        groups: ``{group name: [base layers]}``, e.g. ``{"qkv": [q, k, v], "o": [o]}``; the layers of
            a group share ``in_features`` and are stacked along the output dimension.
    """

    def __init__(self, groups: dict[str, list[nn.Module]]):
        self.groups = {name: list(layers) for name, layers in groups.items()}
        bases = [b for layers in self.groups.values() for b in layers]
        self.quantized = is_4bit(bases[0])
        self.shapes = {
            name: (sum(b.out_features for b in layers), layers[0].in_features)
            for name, layers in self.groups.items()
        }
        self.stacked = self.packed = self.absmax = None  #: the stacked / packed copies (None when live)
        self._bases = bases
        self._bound = [b._parameters["weight"] for b in bases]  #: the weights stacked / packed at construction
        self.live = any(_is_dtensor(w) for w in self._bound)  #: read the layers' weights at each call (FSDP2)
        if self.live:
            return
        if self.quantized:
            self._pack(bases)
        else:
            self._stack()

    def _check_live(self) -> bool:
        """Switch to live weights (and free the stacked / packed copies) once a layer's weight was replaced."""
        if not self.live and any(b._parameters["weight"] is not w for b, w in zip(self._bases, self._bound)):
            self.live, self.stacked, self.packed, self.absmax = True, None, None, None
            _CACHE.clear()
        return self.live

    def _live_weight(self, group: str, dtype: torch.dtype) -> torch.Tensor:
        parts = []
        for b in self.groups[group]:
            w = b._parameters["weight"]
            if self.quantized:
                import bitsandbytes.functional as bnbf

                data = w.data if w.dtype == torch.uint8 else w.data.view(torch.uint8)
                w = bnbf.dequantize_4bit(data, quant_state(b))
            parts.append(w if w.dtype == dtype else w.to(dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _stack(self) -> None:
        """Plain weights: re-point each group's weights to row slices of one ``[sum o_k, d]`` tensor
        (no copy per call, no extra memory); :meth:`release` gives them their own storage back."""
        self.stacked = {}
        for name, layers in self.groups.items():
            if len(layers) == 1:
                self.stacked[name] = layers[0].weight
                continue
            stacked = torch.cat([b.weight.data for b in layers])
            at = 0
            for b in layers:
                b.weight.data = stacked[at : at + b.out_features]
                at += b.out_features
            self.stacked[name] = stacked

    def release(self) -> None:
        """Undo the storage sharing of plain weights (each ``weight`` gets its own tensor again)."""
        if not self.quantized and not self._check_live():
            for layers in self.groups.values():
                if len(layers) > 1:
                    for b in layers:
                        b.weight.data = b.weight.data.clone()

    def _pack(self, bases: list[nn.Module]) -> None:
        states = [quant_state(b) for b in bases]
        self.quant_type, self.blocksize = states[0].quant_type, states[0].blocksize
        self.packed = torch.cat([b.weight.data.reshape(-1) for b in bases])
        self.absmax = torch.cat([_absmax_fp32(s) for s in states])
        self.numel = sum(s.shape.numel() for s in states)
        self.offsets, at, packed_at = {}, 0, 0
        for name, layers in self.groups.items():
            self.offsets[name] = at
            for b in layers:
                n = b.weight.data.numel()
                b.weight.data = self.packed[packed_at : packed_at + n].view_as(b.weight.data)  # share storage
                packed_at += n
                at += quant_state(b).shape.numel()

    def _dequantised(self, dtype: torch.dtype) -> torch.Tensor:
        device = self.packed.device
        hit = _CACHE.get(device)
        if hit is not None and hit[0] is self and hit[1] == dtype:
            return hit[2]
        _CACHE.pop(device, None)  # free the previous block's weights first
        flat = torch.ops.bitsandbytes.dequantize_4bit(
            self.packed, self.absmax, self.blocksize, self.quant_type, (self.numel,), dtype
        ).reshape(-1)
        _CACHE[device] = (self, dtype, flat)
        return flat

    def weight(self, group: str, dtype: torch.dtype) -> torch.Tensor:
        """``[sum out_features, in_features]`` weights of ``group`` in ``dtype`` (do not modify or keep)."""
        if self._check_live():
            return self._live_weight(group, dtype)
        if self.quantized:
            out, inp = self.shapes[group]
            at = self.offsets[group]
            return self._dequantised(dtype)[at : at + out * inp].view(out, inp)
        w = self.stacked[group]
        return w if w.dtype == dtype else w.to(dtype)

    def bias(self, group: str, dtype: torch.dtype) -> torch.Tensor | None:
        """``[sum out_features]`` bias of ``group`` (zeros where a projection has none), or ``None``."""
        biases = [b.bias for b in self.groups[group]]  # read at each call (FSDP2 replaces them too)
        if all(b is None for b in biases):
            return None
        layers = self.groups[group]
        parts = [b if b is not None else torch.zeros(l.out_features) for b, l in zip(biases, layers)]
        return torch.cat([p.to(device=parts[0].device, dtype=dtype) for p in parts])


def clear_cache() -> None:
    """Drop the cached dequantised weights (after unfuse, or to free memory)."""
    _CACHE.clear()
