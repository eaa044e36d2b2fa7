"""``accumulate_gram_`` / ``accumulate_grams_``: ``out[r, r] += weight * x^T x`` in fp32, the statistic
of both factors; the grouped form does every module of a micro-batch in one launch."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _library
from ._backend import kernel, resolve_backend


def accumulate_gram_(out: torch.Tensor, x: torch.Tensor, weight: float = 1.0, backend: str = "auto") -> torch.Tensor:
    """Add ``weight * x2^T x2`` to ``out`` in place, ``x2 = x.reshape(-1, r)``.

    Args:
        out: ``[r, r]`` float32 accumulator (a bank slice; may be a non-contiguous view).
        x: ``[..., r]`` rank-space activations ``h`` or gradients ``delta``; float32, float16 or
            bfloat16. Products are accumulated in float32 whatever the input dtype.
        weight: Python float multiplier.
    Returns ``out``. Oracle: :func:`grit_kernels.reference.accumulate_gram`.
    """
    _check_pair(out, x, "accumulate_gram_")
    if x.numel() == 0:
        return out
    name = resolve_backend(backend, x.device)
    if torch.compiler.is_compiling():
        _library.accumulate_gram_(out, x, float(weight), name)
    else:
        kernel(name, "accumulate_gram_")(out, x, weight)
    return out


def accumulate_grams_(
    outs: Sequence[torch.Tensor], xs: Sequence[torch.Tensor], weight: float = 1.0, backend: str = "auto"
) -> Sequence[torch.Tensor]:
    """Grouped :func:`accumulate_gram_`: ``outs[i] += weight * xs[i]^T xs[i]`` for every ``i``.

    Args:
        outs: ``K`` float32 accumulators ``[r_i, r_i]`` (bank slices; any strides; distinct).
        xs: ``K`` inputs ``[..., r_i]`` (float32/float16/bfloat16; row counts may differ).
        weight: Python float multiplier, shared.
    One launch per input dtype on the Triton backend (one launch per micro-batch for the usual model),
    no host synchronisation. Returns ``outs``. Oracle: :func:`grit_kernels.reference.accumulate_grams`.
    """
    if len(outs) != len(xs):
        raise ValueError(f"accumulate_grams_: {len(outs)} accumulators for {len(xs)} inputs")
    for out, x in zip(outs, xs):
        _check_pair(out, x, "accumulate_grams_")
    if not outs:
        return outs
    name = resolve_backend(backend, xs[0].device)
    if torch.compiler.is_compiling():
        _library.accumulate_grams_(list(outs), list(xs), float(weight), name)
    else:
        kernel(name, "accumulate_grams_")(outs, xs, weight)
    return outs


def _check_pair(out: torch.Tensor, x: torch.Tensor, op: str) -> None:
    r = out.shape[-1]
    if out.dim() != 2 or out.shape[0] != r or x.dim() < 1 or x.shape[-1] != r:
        raise ValueError(f"{op}: out must be [r, r] and x [..., r]; got {tuple(out.shape)}, {tuple(x.shape)}")
    if out.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: out must be float32 (or float64 for tests), got {out.dtype}")


def torch_accumulate_gram_(out: torch.Tensor, x: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """Torch backend of :func:`accumulate_gram_`: one ``addmm``."""
    r = out.shape[-1]
    rows = x.reshape(-1, r)
    if rows.dtype != out.dtype:
        rows = rows.to(out.dtype)
    return out.addmm_(rows.T, rows, alpha=weight)


def torch_accumulate_grams_(outs, xs, weight=1.0):
    """Torch backend of :func:`accumulate_grams_`: one ``addmm`` per module."""
    for out, x in zip(outs, xs):
        if x.numel():
            torch_accumulate_gram_(out, x, weight)
    return outs
