"""Screen: what do K-FAC's large factors buy? ``bench_convergence.py`` with ``fisher="kfac_full"`` whose
``d x d`` factors ``X = E[x x^T]`` (input side of lora_A) and ``G = E[g g^T]`` (output side of lora_B) are
replaced by their diagonals (``--large-factors diagonal``) or by the identity (``--large-factors identity``:
rank-space K-FAC, but on ``FullKFAC``'s path: no graft, and under ``GritOptimizer`` the KL-clip on the step
taken, so that only the large factors differ from ``--large-factors full``); ``input-only`` keeps ``X`` and drops ``G`` (``G = I``),
``output-only`` the reverse. ``lowrank`` keeps the top ``--factor-rank k`` eigenpairs of each large factor and
replaces the rest of the spectrum by its mean (``U diag(s) U^T + s_rest (I - U U^T)``: what a scalable sketch
would store, ``O(d k)`` per factor); ``lowrank-diagonal`` by the diagonal of the rest; ``nystrom`` is
``lowrank`` with the eigenpairs from a Nystrom sketch of ``--sketch-size`` test vectors (what
``fisher="kfac_lowrank"`` computes). ``--sample-rows F`` (any mode) forms the ``d x d`` sums from every F-th
carrying row only, scaled by F (an unbiased estimate at 1/F of the Gram cost). ``--refresh-every N`` refreshes
the large factors (of ``kfac_full`` or ``kfac_lowrank``) every N-th step only; ``as-is`` swaps nothing.

An experiment, not a feature: it swaps ``FullKFAC._damped_inverse`` in this process, then runs
``bench_convergence.main`` with the remaining arguments (every GRIT variant must use
``{"fisher": "kfac_full"}``). Results: ``bench/results/cpu/convergence_screen9_kfac_diag.json`` (diagonal),
``convergence_screen11_kfac_identity.json`` (identity), ``convergence_screen10_kfac_full_ext.json`` (full)::

    python bench/screen_large_factors.py --large-factors diagonal --arms loraplus --lrs loraplus=0.002 \\
        --seeds 1 --steps 150 --eval-every 25 --threads 1 \\
        --variant 'kfac_diagX=adamw:{"fisher":"kfac_full"}:0.016,0.032,0.064,0.128,0.256' --out DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def diagonal_inverse(factor: torch.Tensor, damping: float, eps_abs: float) -> torch.Tensor:
    """``diag(1 / (diag(C) + lam))`` with ``FullKFAC``'s ``lam = damping * tr(C) / d + eps_abs``."""
    c = factor.double()
    lam = damping * torch.trace(c) / c.shape[0] + eps_abs
    return torch.diag(1.0 / (torch.diagonal(c) + lam)).float()


def identity_inverse(factor: torch.Tensor, damping: float, eps_abs: float) -> torch.Tensor:
    """``I``: the large factors ignored (rank-space K-FAC)."""
    return torch.eye(factor.shape[0], dtype=torch.float32, device=factor.device)


def lowrank_inverse(k: int):
    """``(U diag(s) U^T + s_rest (I - U U^T) + lam I)^-1`` from the top-``k`` eigenpairs of ``C``, ``s_rest`` the
    mean of the other ``d - k`` eigenvalues, ``lam`` as in ``FullKFAC``."""

    def inverse(factor: torch.Tensor, damping: float, eps_abs: float) -> torch.Tensor:
        c = factor.double()
        d = c.shape[0]
        lam = damping * torch.trace(c) / d + eps_abs
        values, vectors = torch.linalg.eigh(c)  # ascending
        top_values, top = values[d - k :].clamp_min(0.0), vectors[:, d - k :]
        rest = values[: d - k].clamp_min(0.0).mean() if d > k else values.new_zeros(())
        eye = torch.eye(d, dtype=c.dtype, device=c.device)
        inv = (eye - top @ top.T) / (rest + lam) + (top / (top_values + lam)) @ top.T
        return inv.float()

    return inverse


def lowrank_diagonal_inverse(k: int):
    """``(U diag(s) U^T + diag(c - U diag(s) U^T)_+ + lam I)^-1``: the top-``k`` eigenpairs of ``C`` plus the
    diagonal of what they leave (clamped at 0), ``lam`` as in ``FullKFAC`` (Woodbury would apply it in
    ``O(d k)``; computed densely here)."""

    def inverse(factor: torch.Tensor, damping: float, eps_abs: float) -> torch.Tensor:
        c = factor.double()
        d = c.shape[0]
        lam = damping * torch.trace(c) / d + eps_abs
        values, vectors = torch.linalg.eigh(c)
        low = (vectors[:, d - k :] * values[d - k :].clamp_min(0.0)) @ vectors[:, d - k :].T
        residual = (torch.diagonal(c) - torch.diagonal(low)).clamp_min(0.0)
        return torch.linalg.inv(low + torch.diag(residual + lam)).float()

    return inverse


def nystrom_low_rank(c: torch.Tensor, test: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` eigenpairs ``(values [k], vectors [d, k])`` of PSD ``c`` from the sketch ``Y = c @ test`` only
    (``test [d, m]`` orthonormal, ``m >= k``): the stabilised single-view Nystrom approximation
    ``Y (test^T Y)^+ Y^T`` (shift ``nu``, Cholesky, SVD), as a streaming sketch of an EMA factor would form it."""
    y = c @ test
    nu = torch.finfo(torch.float32).eps * torch.linalg.matrix_norm(y)
    y_nu = y + nu * test
    core = test.T @ y_nu
    chol = torch.linalg.cholesky(0.5 * (core + core.T))
    b = torch.linalg.solve_triangular(chol, y_nu.T, upper=False).T  # y_nu chol^-T
    u, sigma, _ = torch.linalg.svd(b, full_matrices=False)
    values = (sigma**2 - nu).clamp_min(0.0)
    return values[:k], u[:, :k]


def nystrom_inverse(k: int, m: int):
    """``lowrank_inverse`` with the top-``k`` pairs from a Nystrom sketch of ``m`` fixed Gaussian test vectors
    (one test matrix per dimension, seed 0) and the rest of the spectrum from the exact trace."""
    tests: dict[int, torch.Tensor] = {}

    def inverse(factor: torch.Tensor, damping: float, eps_abs: float) -> torch.Tensor:
        c = factor.double()
        d = c.shape[0]
        if d not in tests:
            g = torch.Generator().manual_seed(0)
            tests[d] = torch.linalg.qr(torch.randn(d, m, generator=g, dtype=torch.float64))[0].to(c.device)
        trace = torch.trace(c)
        lam = damping * trace / d + eps_abs
        values, top = nystrom_low_rank(c, tests[d], k)
        rest = ((trace - values.sum()) / (d - k)).clamp_min(0.0)
        eye = torch.eye(d, dtype=c.dtype, device=c.device)
        inv = (eye - top @ top.T) / (rest + lam) + (top / (values + lam)) @ top.T
        return inv.float()

    return inverse


def sampled_capture(every: int):
    """``FullKFAC._capture`` on every ``every``-th row, the sums scaled by ``every`` (row count unchanged)."""
    from grit_kernels.layers import ZERO_ROW_TOLERANCE

    def capture(self, index: int, x: torch.Tensor, grad: torch.Tensor, weight: float) -> None:
        x, grad = x.reshape(-1, x.shape[-1]).float(), grad.reshape(-1, grad.shape[-1]).float()
        row_max = grad.abs().amax(dim=1)
        carries = (row_max > ZERO_ROW_TOLERANCE * row_max.amax()).float()
        self._accumulate(index, x[::every] * every**0.5, grad[::every], carries[::every], weight * every)
        self.rows[index] += carries.sum()

    return capture


def _every(refresh, n: int):
    """``refresh`` run on the 1st, (n+1)th, ... call per object only."""

    def wrapped(self, damping, eps_abs):
        calls = getattr(self, "_screen_refresh_calls", 0)
        self._screen_refresh_calls = calls + 1
        if calls % n == 0:
            refresh(self, damping, eps_abs)

    return wrapped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    parser.add_argument(
        "--large-factors", choices=("full", "diagonal", "identity", "input-only", "output-only", "lowrank", "lowrank-diagonal", "nystrom", "as-is"),
        required=True,
    )
    parser.add_argument("--factor-rank", type=int, default=16, help="eigenpairs kept by --large-factors lowrank")
    parser.add_argument("--sketch-size", type=int, default=32, help="test vectors of --large-factors nystrom")
    parser.add_argument("--refresh-every", type=int, default=1,
                        help="refresh the large factors' inverses (kfac_full) / eigenpairs (kfac_lowrank) every N steps "
                        "only (the rank-space factors still every update_freq)")
    parser.add_argument("--sample-rows", type=int, default=1, help="form the d x d sums from every F-th row")
    args, rest = parser.parse_known_args(argv)
    from grit_kernels import fisher

    swap = {"diagonal": diagonal_inverse, "identity": identity_inverse}.get(args.large_factors)
    if args.large_factors == "lowrank":
        swap = lowrank_inverse(args.factor_rank)
    if args.large_factors == "lowrank-diagonal":
        swap = lowrank_diagonal_inverse(args.factor_rank)
    if args.large_factors == "nystrom":
        swap = nystrom_inverse(args.factor_rank, args.sketch_size)
    if args.refresh_every > 1:
        for cls in (fisher.FullKFAC, fisher.LowRankKFAC):
            cls._refresh = _every(cls._refresh, args.refresh_every)
    if args.sample_rows > 1:
        fisher.FullKFAC._capture = sampled_capture(args.sample_rows)
    if swap is not None:
        fisher.FullKFAC._damped_inverse = staticmethod(swap)
    if args.large_factors in ("input-only", "output-only"):
        dropped = "output_inverse" if args.large_factors == "input-only" else "input_inverse"
        refresh = fisher.FullKFAC._refresh

        def refresh_one_side(self, damping, eps_abs):
            refresh(self, damping, eps_abs)
            setattr(self, dropped, [torch.eye(t.shape[0], device=t.device) for t in getattr(self, dropped)])

        fisher.FullKFAC._refresh = refresh_one_side
    import bench_convergence

    return bench_convergence.main(rest)


if __name__ == "__main__":
    sys.exit(main())
