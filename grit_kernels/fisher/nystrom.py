"""The Nystrom maths of :class:`~grit_kernels.fisher.LowRankKFAC`: the fixed test matrix, the top eigenpairs
of a PSD matrix from its sketch, and the closed-form inverse ``(C + lam I)^-1`` of
``C ~ U diag(s) U^T + s_rest (I - U U^T)`` applied on either side of a gradient. Pure functions of tensors."""

from __future__ import annotations

import torch


def sketch_test_matrix(d: int, m: int, device=None) -> torch.Tensor:
    """The fixed orthonormal test matrix ``V [d, m]`` of :class:`LowRankKFAC` (seeded by ``(d, m)``, so a
    resumed run and every module of width ``d`` get the same one). fp32."""
    gen = torch.Generator().manual_seed(1_000_003 * d + m)
    test = torch.linalg.qr(torch.randn(d, m, generator=gen, dtype=torch.float64))[0]
    return test.float().to(device)


def nystrom_eigenpairs(sketch: torch.Tensor, test: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` eigenpairs of the Nystrom approximation ``Y (V^T Y)^+ Y^T`` of a PSD ``C`` from its sketch
    ``Y = C V`` only (``sketch [..., d, m]``, ``test [d, m]`` orthonormal, ``k <= m``), in float32 with the
    shift ``nu = eps32 * |Y|`` that makes that stable (Tropp et al. 2017; float64 costs 2.5x on a CPU, far more
    on consumer GPUs), a Cholesky of ``V^T Y`` and one ``m x m``
    eigh (no ``d x m`` SVD): ``values [..., k]`` (descending, >= 0; a pair that is not finite comes back as 0),
    ``vectors [..., d, k]``. With ``m = d`` it is the eigendecomposition of ``C`` (up to the shift)."""
    y, v = sketch.float(), test.float()
    nu = torch.finfo(torch.float32).eps * torch.linalg.matrix_norm(y)[..., None, None]
    y = y + nu * v
    core = v.T @ y  # V^T C V + nu I: positive definite for PSD C
    chol, info = torch.linalg.cholesky_ex(0.5 * (core + core.transpose(-1, -2)))
    b = torch.linalg.solve_triangular(chol, y.transpose(-1, -2), upper=False).transpose(-1, -2)  # y L^-T
    # a failed factorisation (non-finite or indefinite sketch) gives no eigenpairs: the factor is then
    # treated as isotropic (tr C / d) by the caller -- decided on the device, no host sync
    ok = (info == 0) & torch.isfinite(b.sum(dim=(-2, -1)))
    b = torch.where(ok[..., None, None], b, 0.0)
    values, w = torch.linalg.eigh(b.transpose(-1, -2) @ b)  # C_nys = b b^T: eigenpairs from the m x m Gram
    values, w = values.flip(-1)[..., :k], w.flip(-1)[..., :k]
    vectors = b @ (w * values.clamp_min(torch.finfo(torch.float32).tiny).rsqrt()[..., None, :])
    return torch.where(ok[..., None], (values - nu[..., 0]).clamp_min(0.0), 0.0), vectors



def _apply_input_side(t: torch.Tensor, u: torch.Tensor, gain: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """``t (X + lam I)^-1 = t * rest + ((t U) * gain) U^T`` (``t [..., r, d]``, ``u [..., d, k]``, ``gain [..., k]``,
    ``rest [...]``)."""
    return t * rest[..., None, None] + ((t @ u) * gain[..., None, :]) @ u.transpose(-1, -2)


def _apply_output_side(t: torch.Tensor, u: torch.Tensor, gain: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """``(G + lam I)^-1 t = t * rest + U (gain * (U^T t))`` (``t [..., d, r]``, ``u [..., d, k]``)."""
    return t * rest[..., None, None] + u @ (gain[..., :, None] * (u.transpose(-1, -2) @ t))
