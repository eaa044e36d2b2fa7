"""``GritConfig(fisher="kfac_full")``: :class:`FullKFAC`.

The textbook K-FAC of the LoRA parameters, with the large factors kept:
``grad_A <- (D + lam I)^-1 grad_A (X + lam I)^-1`` (``X = E[x x^T]``, ``d_in x d_in``, over the rows that
carry gradient) and ``grad_B <- (G + lam I)^-1 grad_B (H + lam I)^-1`` (``G = E[g g^T]``, ``d_out x d_out``,
``g = dL/dy`` scaled like ``D``: ``rows * sum g g^T / loss_scale^2``). With ``X = G = I`` it reduces to
rank-space K-FAC. A reference for small models: per-module Python loops and forward/tensor hooks,
refused above ``kfac_full_max_bytes``. Under DDP the sums of ``X`` and ``G`` are all-reduced with the bank.
"""

from __future__ import annotations

import torch

from .large_factor import _LargeFactorKFAC


class FullKFAC(_LargeFactorKFAC):
    """Full K-FAC with ``d x d`` factors (see :mod:`grit_kernels.fisher.kfac_full`).

    Attributes (per module, bank order): ``input_sum [d_in, d_in]``, ``output_sum [d_out, d_out]``,
    ``rows``; EMA factors ``input_factor`` (``X``) and ``output_factor`` (``G``); inverses of the
    damped factors ``input_inverse``, ``output_inverse`` (identity until the first refresh).
    """

    _INPUT_FOLDS = (("input_factor", "input_sum"),)
    _OUTPUT_FOLDS = (("output_factor", "output_sum"),)
    _STATE_LISTS = ("input_sum", "output_sum", "input_factor", "output_factor", "input_inverse", "output_inverse")

    def __init__(self, preconditioner):
        super().__init__(preconditioner)
        cfg = preconditioner.config
        dims = self._dims(preconditioner)
        need = 3 * 4 * sum(d_in * d_in + d_out * d_out for d_in, d_out in dims)
        if need > cfg.kfac_full_max_bytes:
            raise ValueError(
                f"fisher='kfac_full' would need {need / 2**20:.1f} MiB for the d x d factors of "
                f"{len(dims)} modules (sum, EMA and inverse in fp32), above kfac_full_max_bytes="
                f"{cfg.kfac_full_max_bytes / 2**20:.1f} MiB; it is a reference for small models -- use "
                "fisher='kfac_lowrank' or 'kfac', or raise the limit"
            )
        device = preconditioner.bank.device
        self.memory_bytes = need
        self.input_sum = [torch.zeros(d, d, device=device) for d, _ in dims]
        self.output_sum = [torch.zeros(d, d, device=device) for _, d in dims]
        self.input_factor = [torch.zeros_like(t) for t in self.input_sum]
        self.output_factor = [torch.zeros_like(t) for t in self.output_sum]
        self.input_inverse = [torch.eye(d, device=device) for d, _ in dims]
        self.output_inverse = [torch.eye(d, device=device) for _, d in dims]
        self._register_hooks()

    def _accumulate(self, index: int, x: torch.Tensor, grad: torch.Tensor, carries: torch.Tensor, weight: float) -> None:
        self.input_sum[index].addmm_(x.T, x * carries[:, None])
        self.output_sum[index].addmm_(grad.T, grad, alpha=weight)

    @staticmethod
    def _damped_inverse(factor: torch.Tensor, damping: float, eps_abs: float) -> torch.Tensor:
        d = factor.shape[0]
        c = factor.double()
        lam = damping * torch.trace(c) / d + eps_abs
        eye = torch.eye(d, dtype=torch.float64, device=c.device)
        chol, info = torch.linalg.cholesky_ex(c + lam * eye)
        if int(info) != 0:  # a reference: a host sync is fine here
            chol = torch.linalg.cholesky(c + (100.0 * lam + 1e-12) * eye)
        return torch.cholesky_inverse(chol).float()

    def _refresh(self, damping: float, eps_abs: float) -> None:
        for i in range(len(self.input_factor)):
            self.input_inverse[i] = self._damped_inverse(self.input_factor[i], damping, eps_abs)
            self.output_inverse[i] = self._damped_inverse(self.output_factor[i], damping, eps_abs)

    def _input_side(self, index: int, t: torch.Tensor) -> torch.Tensor:
        return t @ self.input_inverse[index]

    def _output_side(self, index: int, t: torch.Tensor) -> torch.Tensor:
        return self.output_inverse[index] @ t
