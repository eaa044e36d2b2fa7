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

import math
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



def rank_statistics(
    stat_sum: torch.Tensor, rows: torch.Tensor, indices: Sequence[int], h: torch.Tensor, delta: torch.Tensor, tolerance: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(stat_sum, rows)`` after adding modules ``indices``' statistics, one module and one row at a time.

    ``h, delta [N, K*r]``: module ``k`` owns columns ``k*r .. k*r+r-1``. Row ``t`` carries gradient when
    ``|delta_t| > tolerance * max_t |delta_t|``; ``stat_sum[0, m] += sum_{carrying} h_t h_t^T``,
    ``stat_sum[1, m] += sum_t delta_t delta_t^T``, ``rows[m] += #carrying`` (in ``stat_sum``'s dtype).
    """
    total, count = stat_sum.clone(), rows.clone()
    r = h.shape[1] // len(indices)
    for k, m in enumerate(indices):
        hm = h[:, k * r : (k + 1) * r].to(stat_sum.dtype)
        dm = delta[:, k * r : (k + 1) * r].to(stat_sum.dtype)
        norms = [float(torch.linalg.vector_norm(dm[t])) for t in range(dm.shape[0])]
        top = max(norms, default=0.0)
        for t in range(dm.shape[0]):
            if norms[t] > tolerance * top:
                total[0, m, :r, :r] += torch.outer(hm[t], hm[t])
                count[m] += 1
            total[1, m, :r, :r] += torch.outer(dm[t], dm[t])
    return total, count



def kl_clip_update(
    params_a: Sequence[torch.Tensor],
    params_b: Sequence[torch.Tensor],
    before_a: Sequence[torch.Tensor],
    before_b: Sequence[torch.Tensor],
    factor_d: torch.Tensor,
    factor_h: torch.Tensor,
    kl_clip: float,
) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    """Return ``(new_a, new_b, nu)``: the step ``Delta = p - before`` scaled by ``nu = min(1, sqrt(kl_clip / q))``,
    ``q = sum_m tr(Delta_A^T D_m Delta_A) + tr(Delta_B H_m Delta_B^T)`` (leading ``r x r`` factor blocks)."""
    q = 0.0
    for m, (pa, pb, ba, bb) in enumerate(zip(params_a, params_b, before_a, before_b)):
        r = pa.shape[0]
        da, db = (pa - ba).double(), (pb - bb).double()
        q += float(torch.trace(da.T @ factor_d[m, :r, :r].double() @ da))
        q += float(torch.trace(db @ factor_h[m, :r, :r].double() @ db.T))
    nu = min(1.0, (kl_clip / max(abs(q), torch.finfo(torch.float32).tiny)) ** 0.5)
    new_a = [(b.double() + nu * (p.double() - b.double())).to(p.dtype) for p, b in zip(params_a, before_a)]
    new_b = [(b.double() + nu * (p.double() - b.double())).to(p.dtype) for p, b in zip(params_b, before_b)]
    return new_a, new_b, nu


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


def floored_damping(mat: torch.Tensor, damping: float, eps_abs: float, floor_frac: float, scale_max: float) -> torch.Tensor:
    """``lam = damping * max(tr(mat)/r, floor_frac * scale_max) + eps_abs`` for one ``r x r`` factor
    (``GritConfig.damping_floor``; ``scale_max``: the running maximum of ``tr(C_t)/r`` over the refreshes so
    far, this one included)."""
    r = mat.shape[-1]
    scale = torch.diagonal(mat).sum() / r
    return damping * torch.maximum(scale, torch.as_tensor(floor_frac * scale_max, dtype=mat.dtype)) + eps_abs


def eigenbasis(mat: torch.Tensor) -> torch.Tensor:
    """Eigenvectors (columns) of one symmetric ``r x r`` factor in descending eigenvalue order, float64."""
    values, vectors = torch.linalg.eigh(0.5 * (mat.double() + mat.double().T))
    return vectors[:, torch.argsort(values, descending=True)]


def eigen_adam_rebase(
    state: dict,
    q_d_old: torch.Tensor,
    q_d_new: torch.Tensor,
    q_h_old: torch.Tensor,
    q_h_new: torch.Tensor,
    second_moment: str = "keep",
) -> dict:
    """Map one module's EigenAdamW moments into new bases (returns a new state dict).

    ``state``: ``{"m_a", "v_a"}`` ``[r, d_in]`` in ``Q_D^T`` coordinates and ``{"m_b", "v_b"}`` ``[d_out, r]`` in
    ``Q_H`` coordinates (plus ``"step"``). First moments: back to the original coordinates with the old basis
    and into the new one (``m_a <- Q_D_new^T Q_D_old m_a``, ``m_b <- m_b Q_H_old^T Q_H_new``). Second moments:
    kept (``"keep"``) or mapped by the element-wise square of the same transition (``"rotate"``).
    """
    t_d = q_d_new.T @ q_d_old
    t_h = q_h_new.T @ q_h_old
    out = dict(state)
    out["m_a"] = t_d @ state["m_a"]
    out["m_b"] = state["m_b"] @ t_h.T
    if second_moment == "rotate":
        out["v_a"] = (t_d * t_d) @ state["v_a"]
        out["v_b"] = state["v_b"] @ (t_h * t_h).T
    return out


def eigen_adam_step(
    a: torch.Tensor,
    b: torch.Tensor,
    grad_a: torch.Tensor,
    grad_b: torch.Tensor,
    q_d: torch.Tensor,
    q_h: torch.Tensor,
    state: dict,
    lr_a: float,
    lr_b: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One EigenAdamW step of one LoRA module, the obvious way (returns new ``a``, ``b`` and state).

    ``a`` ``[r, d_in]``, ``b`` ``[d_out, r]``, their gradients; ``q_d`` / ``q_h``: ``[r, r]`` orthogonal eigenbases
    of the backward / forward factor (identity: plain AdamW). Rotate (``Q_D^T G_A``, ``G_B Q_H``), Adam with bias
    correction in the rotated coordinates, rotate the direction back, decoupled weight decay in the original
    coordinates: ``p <- p (1 - lr wd) - lr/(1 - beta1^t) * Q (m / (sqrt(v / (1 - beta2^t)) + eps))``.
    ``state``: ``{"step": int, "m_a", "v_a", "m_b", "v_b"}`` (zeros and 0 before the first step).
    """
    beta1, beta2 = betas
    t = state["step"] + 1
    new = {"step": t}
    rotated = {"a": q_d.T @ grad_a, "b": grad_b @ q_h}
    params = {"a": a, "b": b}
    lrs = {"a": lr_a, "b": lr_b}
    out = {}
    for k in ("a", "b"):
        g = rotated[k]
        m = beta1 * state["m_" + k] + (1 - beta1) * g
        v = beta2 * state["v_" + k] + (1 - beta2) * g * g
        direction = m / (torch.sqrt(v / (1 - beta2**t)) + eps)
        direction = q_d @ direction if k == "a" else direction @ q_h.T
        out[k] = params[k] * (1 - lrs[k] * weight_decay) - lrs[k] / (1 - beta1**t) * direction
        new["m_" + k], new["v_" + k] = m, v
    return out["a"], out["b"], new


# ----------------------------------------------------------------------------- base stack (gk.fuse)
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dim, row by row; ``x [..., d]``, ``weight [d]``."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    for t in range(rows.shape[0]):
        out[t] = weight * rows[t] / torch.sqrt((rows[t] * rows[t]).sum() / rows.shape[1] + eps)
    return out.reshape(x.shape)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's RoPE of ``x [..., D]`` as a rotation by angle ``theta_j`` of each pair ``(x_j, x_{j + D/2})``:
    ``(x_j cos - x_{j+D/2} sin, x_{j+D/2} cos + x_j sin)`` with ``cos, sin [..., D]`` (broadcast to ``x``;
    their halves agree, as HF builds them) read at ``j``."""
    half = x.shape[-1] // 2
    cos, sin = torch.broadcast_to(cos, x.shape), torch.broadcast_to(sin, x.shape)
    out = torch.empty_like(x)
    for j in range(half):
        c, s = cos[..., j], sin[..., j]
        out[..., j] = x[..., j] * c - x[..., j + half] * s
        out[..., j + half] = x[..., j + half] * c + x[..., j] * s
    return out


def lora_linear(
    x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, bias=None
):
    """``x W^T (+ bias) + scale * (x A^T) B^T`` for ``x [..., d_in]``."""
    y = x @ weight.T + scale * (x @ a.T) @ b.T
    return y if bias is None else y + bias


def swiglu_mlp(x: torch.Tensor, gate: tuple, up: tuple, down: tuple) -> torch.Tensor:
    """``down(silu(gate(x)) * up(x))`` with each projection a ``(weight, a, b, scale)`` tuple of
    :func:`lora_linear`; ``silu(z) = z / (1 + exp(-z))``."""
    g = lora_linear(x, *gate)
    return lora_linear(g / (1 + torch.exp(-g)) * lora_linear(x, *up), *down)


def geglu_mlp(
    x: torch.Tensor, gate: tuple, up: tuple, down: tuple, approximate: str = "tanh"
) -> torch.Tensor:
    """``down(gelu(gate(x)) * up(x))`` (Gemma's MLP), projections as in :func:`swiglu_mlp`;
    ``gelu(z) = z/2 (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3)))`` (``approximate="tanh"``) or
    ``z/2 (1 + erf(z / sqrt(2)))`` (``"none"``)."""
    g = lora_linear(x, *gate)
    if approximate == "tanh":
        act = 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))
    else:
        act = 0.5 * g * (1 + torch.erf(g / math.sqrt(2)))
    return lora_linear(act * lora_linear(x, *up), *down)


def packed_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_ids: torch.Tensor,
    scale: float,
    softcap: float | None = None,
):
    """Softmax attention where token ``i`` sees token ``j`` iff ``j <= i`` and both carry the same id in
    ``segment_ids [B, S]``; ``q [B, Hq, S, D]``, ``k, v [B, Hk, S, D]`` (query head ``h`` reads kv head
    ``h // (Hq / Hk)``); returns ``[B, Hq, S, D]``. With ``softcap`` the scores ``z`` become
    ``softcap * tanh(z / softcap)`` (Gemma2). One query at a time."""
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    for bi in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in range(q.shape[2]):
                keep = (segment_ids[bi, : i + 1] == segment_ids[bi, i]).nonzero().flatten()
                scores = (k[bi, h // group, keep] @ q[bi, h, i]) * scale
                if softcap is not None:
                    scores = softcap * torch.tanh(scores / softcap)
                weights = torch.exp(scores - scores.max())
                out[bi, h, i] = (weights / weights.sum()) @ v[bi, h // group, keep]
    return out


def nystrom_approximation(c: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """``Y (V^T Y)^+ Y^T`` with ``Y = c @ test``: the Nystrom approximation of a PSD ``c [d, d]`` from the test
    matrix ``test [d, m]``, by pseudo-inverse (float64 in, float64 out)."""
    y = c @ test
    return y @ torch.linalg.pinv(test.T @ y, hermitian=True) @ y.T


def low_rank_damped_inverse(approx: torch.Tensor, trace: torch.Tensor, k: int, damping: float, eps_abs: float):
    """``(U diag(s) U^T + s_rest (I - U U^T) + lam I)^-1`` from the top-``k`` eigenpairs ``(s, U)`` of
    ``approx [d, d]``, with ``s_rest = (trace - sum s) / (d - k)`` (clamped at 0) and
    ``lam = damping * trace / d + eps_abs`` (``fisher="kfac_lowrank"``'s large-factor inverse)."""
    d = approx.shape[0]
    values, vectors = torch.linalg.eigh(approx)
    s, u = values[d - k :].clamp_min(0.0), vectors[:, d - k :]
    rest = ((trace - s.sum()) / (d - k)).clamp_min(0.0)
    lam = damping * trace / d + eps_abs
    eye = torch.eye(d, dtype=approx.dtype, device=approx.device)
    return torch.linalg.inv(u @ torch.diag(s) @ u.T + rest * (eye - u @ u.T) + lam * eye)
