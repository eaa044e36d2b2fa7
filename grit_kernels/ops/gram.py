"""``accumulate_gram_``: ``out[r, r] += weight * x^T x`` in fp32, the statistic of both factors."""

from __future__ import annotations

import torch

from ._backend import resolve_backend, triton_impl


def accumulate_gram_(out: torch.Tensor, x: torch.Tensor, weight: float = 1.0, backend: str = "auto") -> torch.Tensor:
    """Add ``weight * x2^T x2`` to ``out`` in place, ``x2 = x.reshape(-1, r)``.

    Args:
        out: ``[r, r]`` float32 accumulator (a bank slice; may be a non-contiguous view).
        x: ``[..., r]`` rank-space activations ``h`` or gradients ``delta``; float32, float16 or
            bfloat16. Products are accumulated in float32 whatever the input dtype.
        weight: Python float multiplier.
    Returns ``out``.
    """
    r = out.shape[-1]
    if out.dim() != 2 or out.shape[0] != r or x.shape[-1] != r:
        raise ValueError(f"accumulate_gram_: out must be [r, r] and x [..., r]; got {tuple(out.shape)}, {tuple(x.shape)}")
    if out.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"accumulate_gram_: out must be float32 (or float64 for tests), got {out.dtype}")
    if x.numel() == 0:
        return out
    if resolve_backend(backend, x.device) == "triton":
        return triton_impl("gram", "accumulate_gram_")(out, x, weight)
    rows = x.reshape(-1, r)
    if rows.dtype != out.dtype:
        rows = rows.to(out.dtype)
    return out.addmm_(rows.T, rows, alpha=weight)
