"""Slow, obvious, float64-capable oracle for every GRIT op (docs/design.md §2).

Everything here loops over matrices / modules in Python and uses plain torch linear algebra. The
``torch`` and ``triton`` backends in :mod:`grit_kernels.ops` are tested against these functions.
Nothing here modifies its inputs; every function returns new tensors in the dtype of the inputs
(pass float64 tensors to get the float64 oracle).

Shapes: ``n`` matrices padded to ``R x R``; matrix ``i`` uses its leading ``ranks[i] x ranks[i]``
block, the rest of the block is ignored on input and written as the identity (inverses) or left as
is (factors).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .status import InverseStatus


def accumulate_gram(out: torch.Tensor, x: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """Return ``out + weight * x2^T x2`` where ``x2`` is ``x`` flattened to rows ``[-1, r]``.

    ``out``: ``[r, r]``; ``x``: ``[..., r]`` of any float dtype (upcast to ``out.dtype`` first).
    """
    rows = x.reshape(-1, x.shape[-1]).to(out.dtype)
    total = out.clone()
    for t in range(rows.shape[0]):
        total += weight * torch.outer(rows[t], rows[t])
    return total


def accumulate_grams(outs: Sequence[torch.Tensor], xs: Sequence[torch.Tensor], weight: float = 1.0) -> list[torch.Tensor]:
    """:func:`accumulate_gram` of every pair ``(outs[i], xs[i])``; returns the new accumulators."""
    return [accumulate_gram(out, x, weight) for out, x in zip(outs, xs)]


def ema_fold(
    factor: torch.Tensor,
    stat_sum: torch.Tensor,
    weight: torch.Tensor,
    decay: float,
    initialized: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one step's statistics into the factor EMA.

    ``C_step[i] = weight[i] * stat_sum[i]`` (the scale normalisation: ``1/rows`` for the forward
    factor, ``rows / loss_scale^2`` for the backward factor). Matrix ``i`` becomes
    ``C_step`` if it was not initialised, else ``decay * C + (1 - decay) * C_step``. A matrix whose
    weight is 0 (no rows this step) or whose ``C_step`` is not finite is left unchanged.

    Returns ``(new_factor, new_initialized)``.
    """
    new_factor = factor.clone()
    new_init = initialized.clone()
    for i in range(factor.shape[0]):
        step = weight[i].to(factor.dtype) * stat_sum[i].to(factor.dtype)
        if weight[i] == 0 or not bool(torch.isfinite(step).all()):
            continue
        new_factor[i] = decay * factor[i] + (1.0 - decay) * step if bool(initialized[i]) else step
        new_init[i] = True
    return new_factor, new_init


def damping_of(mat: torch.Tensor, damping: float, eps_abs: float) -> torch.Tensor:
    """``lam = damping * trace(mat) / r + eps_abs`` for one ``r x r`` matrix."""
    r = mat.shape[-1]
    return damping * torch.diagonal(mat).sum() / r + eps_abs


def damped_cholesky_inverse(
    mats: torch.Tensor,
    damping: float,
    eps_abs: float = 1e-12,
    ranks: Sequence[int] | None = None,
    previous: torch.Tensor | None = None,
    previous_valid: torch.Tensor | None = None,
    retry_factor: float = 100.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert ``C + lam*I`` for each matrix with the fallback chain of docs/design.md §4.

    ``mats``: ``[n, R, R]``; ``ranks``: per-matrix rank (default ``R``); ``previous``: ``[n, R, R]``
    inverses from the last refresh and ``previous_valid``: ``[n]`` bool saying which of them hold a
    real inverse. Returns ``(inverses [n, R, R], status [n] int32)``; padding is the identity and
    every inverse is exactly symmetric.
    """
    n, R, _ = mats.shape
    ranks = [R] * n if ranks is None else list(ranks)
    inverses = torch.eye(R, dtype=mats.dtype, device=mats.device).repeat(n, 1, 1)
    status = torch.empty(n, dtype=torch.int32)
    for i in range(n):
        r = ranks[i]
        c = mats[i, :r, :r]
        lam = damping_of(c, damping, eps_abs)
        eye = torch.eye(r, dtype=mats.dtype, device=mats.device)
        result = None
        for attempt, lam_try in enumerate((lam, lam * retry_factor)):
            if not bool(torch.isfinite(c).all()) or not bool(torch.isfinite(lam_try)):
                break
            chol, info = torch.linalg.cholesky_ex(c + lam_try * eye)
            if int(info) == 0 and bool(torch.isfinite(chol).all()):
                result = torch.cholesky_inverse(chol)
                status[i] = InverseStatus.OK if attempt == 0 else InverseStatus.RETRIED
                break
        if result is None and previous is not None and previous_valid is not None and bool(previous_valid[i]):
            result = previous[i, :r, :r].to(mats.dtype)
            status[i] = InverseStatus.KEPT_PREVIOUS
        elif result is None:
            finite_positive = bool(torch.isfinite(lam)) and float(lam) > 0
            result = eye / lam if finite_positive else eye.clone()
            status[i] = InverseStatus.SCALED_IDENTITY
        inverses[i, :r, :r] = 0.5 * (result + result.T)
    return inverses, status.to(mats.device)


def precondition(
    grads_a: Sequence[torch.Tensor],
    grads_b: Sequence[torch.Tensor],
    inv_d: torch.Tensor,
    inv_h: torch.Tensor,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Rank-space K-FAC preconditioning of every LoRA module.

    ``grads_a[i]``: ``[r_i, d_in_i]`` (lora_A grad) -> ``inv_d[i, :r_i, :r_i] @ grads_a[i]``;
    ``grads_b[i]``: ``[d_out_i, r_i]`` (lora_B grad) -> ``grads_b[i] @ inv_h[i, :r_i, :r_i]``.
    ``inv_d`` is the inverse of the damped backward factor ``D = E[delta delta^T]``, ``inv_h`` that
    of the forward factor ``H = E[h h^T]``. Products are taken in float64, results cast back to each
    gradient's dtype. Also returns ``sum_i <new_i, old_i>`` over all gradients (float64 scalar), the
    quantity the KL-clip trust region needs.
    """
    new_a, new_b = [], []
    dot = torch.zeros((), dtype=torch.float64)
    for i, (ga, gb) in enumerate(zip(grads_a, grads_b)):
        r = ga.shape[0]
        pa = inv_d[i, :r, :r].double() @ ga.double()
        pb = gb.double() @ inv_h[i, :r, :r].double()
        dot = dot + (pa * ga.double()).sum().cpu() + (pb * gb.double()).sum().cpu()
        new_a.append(pa.to(ga.dtype))
        new_b.append(pb.to(gb.dtype))
    return new_a, new_b, dot
