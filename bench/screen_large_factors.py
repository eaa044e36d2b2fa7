"""Screen: what do K-FAC's large factors buy? ``bench_convergence.py`` with ``fisher="kfac_full"`` whose
``d x d`` factors ``X = E[x x^T]`` (input side of lora_A) and ``G = E[g g^T]`` (output side of lora_B) are
replaced by their diagonals (``--large-factors diagonal``) or by the identity (``--large-factors identity``:
rank-space K-FAC, but on ``FullKFAC``'s path: no graft, and under ``GritOptimizer`` the KL-clip on the step
taken, so that only the large factors differ from ``--large-factors full``); ``input-only`` keeps ``X`` and drops ``G`` (``G = I``),
``output-only`` the reverse.

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    parser.add_argument(
        "--large-factors", choices=("full", "diagonal", "identity", "input-only", "output-only"), required=True
    )
    args, rest = parser.parse_known_args(argv)
    from grit_kernels import fisher

    swap = {"diagonal": diagonal_inverse, "identity": identity_inverse}.get(args.large_factors)
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
