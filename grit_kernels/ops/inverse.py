"""``damped_cholesky_inverse``: every factor of the model inverted in one batched call."""

from __future__ import annotations

import torch

from .._device import to_device
from ..status import InverseStatus
from . import _library
from ._backend import kernel, resolve_backend, triton_impl


def rank_mask(ranks: torch.Tensor | None, n: int, R: int, device: torch.device) -> torch.Tensor:
    """``[n, R]`` bool: True on the leading ``ranks[i]`` entries of matrix ``i``."""
    if ranks is None:
        return torch.ones(n, R, dtype=torch.bool, device=device)
    return torch.arange(R, device=device)[None, :] < ranks.to(device)[:, None]


def damped_cholesky_inverse(
    mats: torch.Tensor,
    damping: float,
    eps_abs: float = 1e-12,
    ranks: torch.Tensor | None = None,
    previous: torch.Tensor | None = None,
    previous_valid: torch.Tensor | None = None,
    retry_factor: float = 100.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert ``C_i + lam_i I`` (``lam_i = damping * tr(C_i)/r_i + eps_abs``) for all ``i`` at once.

    Args:
        mats: ``[n, R, R]`` float32 symmetric factors (matrix ``i`` uses its ``r_i x r_i`` block).
        ranks: ``[n]`` int tensor of per-matrix ranks (mixed PEFT ``rank_pattern``); default ``R``.
        previous, previous_valid: ``[n, R, R]`` inverses of the last refresh and ``[n]`` bool.
        retry_factor: the failed first attempt is retried with ``lam * retry_factor``.
    Returns ``(inverses [n, R, R], status [n] int32)`` with the fallback chain and status codes of
    :class:`grit_kernels.status.InverseStatus`; padding is the identity, inverses are symmetric.
    Decided on the device: no host synchronisation. Oracle:
    :func:`grit_kernels.reference.damped_cholesky_inverse`.
    """
    if mats.dim() != 3 or mats.shape[1] != mats.shape[2]:
        raise ValueError(f"damped_cholesky_inverse: mats must be [n, R, R], got {tuple(mats.shape)}")
    name = resolve_backend(backend, mats.device)
    if name == "triton" and not triton_impl("inverse", "handles")(mats):
        name = "torch"  # R > 64 or float64: beyond the Triton kernel's register tile; the torch batched path
    if ranks is not None and not torch.is_tensor(ranks):
        ranks = to_device([int(r) for r in ranks], torch.int32, mats.device)
    args = (mats, float(damping), float(eps_abs), ranks, previous, previous_valid, float(retry_factor))
    if torch.compiler.is_compiling():
        return _library.damped_cholesky_inverse(*args, name)
    return kernel(name, "damped_cholesky_inverse")(*args)


def torch_damped_cholesky_inverse(mats, damping, eps_abs, ranks, previous, previous_valid, retry_factor):
    """Torch backend of :func:`damped_cholesky_inverse`: batched ``cholesky_ex`` + ``cholesky_inverse``."""
    n, R, _ = mats.shape
    work = mats.to(torch.float32) if mats.dtype not in (torch.float32, torch.float64) else mats
    mask = rank_mask(ranks, n, R, mats.device)
    block = mask[:, :, None] & mask[:, None, :]
    c = torch.where(block, work, torch.zeros((), dtype=work.dtype, device=work.device))
    r = mask.sum(dim=1).to(work.dtype)
    lam = damping * torch.diagonal(c, dim1=1, dim2=2).sum(dim=1) / r + eps_abs
    finite = torch.isfinite(c).all(dim=2).all(dim=1) & torch.isfinite(lam)
    c = torch.where(finite[:, None, None], c, torch.zeros((), dtype=work.dtype, device=work.device))
    eye = torch.diag_embed(mask.to(work.dtype))
    pad = torch.diag_embed((~mask).to(work.dtype))

    result = pad.clone()
    status = torch.full((n,), int(InverseStatus.SCALED_IDENTITY), dtype=torch.int32, device=mats.device)
    done = torch.zeros(n, dtype=torch.bool, device=mats.device)
    for code, lam_try in ((InverseStatus.OK, lam), (InverseStatus.RETRIED, lam * retry_factor)):
        chol, info = torch.linalg.cholesky_ex(c + lam_try[:, None, None] * eye + pad)
        # a failed factor may hold a zero pivot, on which cholesky_inverse raises: swap it for I first
        chol = torch.where((info == 0)[:, None, None], chol, eye + pad)
        inv = torch.cholesky_inverse(chol)
        ok = finite & (info == 0) & torch.isfinite(inv).all(dim=2).all(dim=1) & ~done
        result = torch.where(ok[:, None, None], inv, result)
        status = torch.where(ok, torch.full_like(status, int(code)), status)
        done = done | ok

    if previous is not None and previous_valid is not None:
        keep = ~done & previous_valid.to(mats.device)
        result = torch.where(keep[:, None, None], torch.where(block, previous.to(work.dtype), pad), result)
        status = torch.where(keep, torch.full_like(status, int(InverseStatus.KEPT_PREVIOUS)), status)
        done = done | keep

    usable = torch.isfinite(lam) & (lam > 0)
    scale = torch.where(usable, 1.0 / torch.where(usable, lam, torch.ones_like(lam)), torch.ones_like(lam))
    fallback = eye * scale[:, None, None] + pad
    result = torch.where(done[:, None, None], result, fallback)
    result = 0.5 * (result + result.transpose(1, 2))
    return result.to(mats.dtype), status
