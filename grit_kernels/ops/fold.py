"""``ema_fold_``: fold one optimizer step's statistics into the factor EMA, all matrices at once."""

from __future__ import annotations

import torch

from . import _library
from ._backend import kernel, resolve_backend


def ema_fold_(
    factor: torch.Tensor,
    stat_sum: torch.Tensor,
    weight: torch.Tensor,
    decay: float,
    initialized: torch.Tensor,
    backend: str = "auto",
) -> None:
    """In place: ``factor[i] <- C_step`` (first time) or ``decay*factor[i] + (1-decay)*C_step``.

    Args:
        factor: ``[n, R, R]`` float32 EMA of the factors.
        stat_sum: ``[n, R, R]`` float32 sums of outer products of this step.
        weight: ``[n]`` float32, ``C_step = weight * stat_sum`` (scale normalisation). Matrices with
            weight 0 or a non-finite ``C_step`` are left unchanged (skipped on the device).
        initialized: ``[n]`` bool, set where a fold happened.
    Never synchronises the host. Oracle: :func:`grit_kernels.reference.ema_fold`.
    """
    if not (factor.shape == stat_sum.shape and factor.dim() == 3 and weight.shape == factor.shape[:1]):
        raise ValueError(f"ema_fold_: shapes {tuple(factor.shape)}, {tuple(stat_sum.shape)}, {tuple(weight.shape)}")
    name = resolve_backend(backend, factor.device)
    if torch.compiler.is_compiling():
        _library.ema_fold_(factor, stat_sum, weight, float(decay), initialized, name)
    else:
        kernel(name, "ema_fold_")(factor, stat_sum, weight, decay, initialized)


def torch_ema_fold_(factor, stat_sum, weight, decay, initialized) -> None:
    """Torch backend of :func:`ema_fold_` (a few batched elementwise ops)."""
    step = stat_sum * weight[:, None, None]
    ok = (weight != 0) & torch.isfinite(step).all(dim=2).all(dim=1)
    blended = torch.where(initialized[:, None, None], decay * factor + (1.0 - decay) * step, step)
    factor.copy_(torch.where(ok[:, None, None], blended, factor))
    initialized.logical_or_(ok)
