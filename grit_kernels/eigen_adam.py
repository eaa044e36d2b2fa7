"""EigenAdamW: Adam run in the eigenbasis of the rank-space K-FAC factors (SOAP-style, in rank space).

For LoRA module ``m`` with backward factor ``D = Q_D diag Q_D^T`` and forward factor ``H = Q_H diag Q_H^T``
(the EMA factors of the :class:`~grit_kernels.bank.FactorBank`, ``r x r``)::

    lora_A grad  G_A [r, d_in]   ->  G~_A = Q_D^T G_A      (left side, like D^-1 in GRIT)
    lora_B grad  G_B [d_out, r]  ->  G~_B = G_B Q_H        (right side, like H^-1)

Adam's moments of the LoRA tensors live in these rotated coordinates; Adam's direction ``U~ = m^ / (sqrt(v^) + eps)``
is rotated back (``U_A = Q_D U~_A``, ``U_B = U~_B Q_H^T``) and applied with decoupled weight decay in the
original coordinates, ``p <- p (1 - lr wd) - lr U`` (torch's AdamW arithmetic, bias-corrected per tensor, each
parameter group's own lr and betas). Parameters that are not preconditioned LoRA tensors get plain AdamW.
The large side (``d_in`` of A, ``d_out`` of B) stays diagonal, as in one-sided SOAP.

**Bases.** Refreshed at the first step and then every ``basis_freq`` steps (default 1: every step, measured
better than SOAP's 10 in bench/results/cpu/convergence_screen_eigen*.json) by one batched float64
``torch.linalg.eigh`` over all ``2M`` padded factors (on CUDA eigh checks its convergence flag: one host sync per
refresh; unmeasured on GPU) (eigenvectors in descending eigenvalue order; a module
of rank ``r < R`` uses the leading ``r x r`` block, the padding is the identity; factors without statistics
keep the identity, i.e. plain AdamW). On a refresh the first moment is mapped into the new basis exactly
(``m~ <- T m~`` with ``T = Q_new^T Q_old``, as SOAP does); the second moment is kept as is (``"keep"``, SOAP's
choice) or mapped by the element-wise squared transition ``T * T`` (``"rotate"``).

**Properties** (tests/test_eigen_adam.py): with identity bases it is AdamW; the update is equivariant under
``(A, B) -> (Q A, B Q^T)`` for orthogonal ``Q`` once the bases are built from statistics (the factors
become ``Q D Q^T``, ``Q H Q^T``, so the rotated gradients, Adam's state and the function-space step are
unchanged; eigenvector signs cancel), not before (the identity basis at PEFT's ``B = 0`` is plain Adam). It
needs no damping, grafting or trust region: Adam's step is bounded per coordinate. ``GritConfig.kl_clip``
still applies to the step taken when set (``GritOptimizer`` runs it); ``damping``, ``update_freq``,
``graft`` and ``warmup_steps`` do not apply.

Use it inside :class:`~grit_kernels.GritOptimizer`, which folds the factor EMA before each step (and skips
steps with non-finite gradients, divides out the AMP scale, checkpoints both)::

    pre = gk.GritPreconditioner(peft_model, gk.GritConfig(kl_clip=None))
    opt = gk.GritOptimizer(gk.EigenAdamW(peft_model.parameters(), pre, lr=2e-3), pre)

Oracle: :func:`grit_kernels.reference.eigen_adam_step`, :func:`grit_kernels.reference.eigenbasis`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from . import ops
from .bank import BACKWARD, FORWARD

SECOND_MOMENT_MODES = ("keep", "rotate")


def batched_eigenbasis(factors: torch.Tensor, ranks: torch.Tensor, initialized: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of every factor in one float64 ``eigh`` call.

    Args:
        factors: ``[n, R, R]`` symmetric factors; matrix ``i`` uses its leading ``ranks[i]`` block.
        ranks: ``[n]`` int ranks.
        initialized: ``[n]`` bool; matrices without statistics (or with non-finite entries) get the identity.
    Returns ``[n, R, R]`` float32 ``Q``: columns are eigenvectors, descending eigenvalues, ``Q[:r, :r]``
    orthogonal, zero off the block, identity on the padding. No host synchronisation.
    """
    n, R, _ = factors.shape
    device = factors.device
    mask = torch.arange(R, device=device)[None, :] < ranks.to(device)[:, None]
    block = mask[:, :, None] & mask[:, None, :]
    c = torch.where(block, factors.double(), torch.zeros((), dtype=torch.float64, device=device))
    usable = initialized.to(device) & torch.isfinite(c).all(dim=2).all(dim=1)
    c = torch.where(usable[:, None, None], 0.5 * (c + c.transpose(1, 2)), torch.zeros((), dtype=c.dtype, device=device))
    # padding eigenvalues -(1 + trace|.|): below every eigenvalue of the PSD block, so after the descending
    # flip the block's eigenvectors are the leading r columns
    shift = 1.0 + torch.diagonal(c, dim1=1, dim2=2).abs().sum(dim=1)
    c = c - torch.diag_embed((~mask).to(c.dtype) * shift[:, None])
    q = torch.linalg.eigh(c)[1].flip(-1)
    eye = torch.eye(R, dtype=q.dtype, device=device).expand(n, R, R)
    q = torch.where(block, q, eye)
    return torch.where(usable[:, None, None], q, eye).float()


def _grad_or_zeros(p: torch.Tensor) -> torch.Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


class EigenAdamW(torch.optim.Optimizer):
    """AdamW with the moments of every LoRA tensor in the eigenbasis of its rank-space factor.

    Args:
        params: iterable of parameters or parameter groups (as for ``torch.optim.AdamW``; LoRA+-style groups
            with their own ``lr`` work). Must contain every lora_A / lora_B of ``preconditioner``.
        preconditioner: the :class:`~grit_kernels.GritPreconditioner` whose bank holds the factors
            (``fisher="kfac"``, no reprojection).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (weight decay decoupled, original coordinates).
        basis_freq: refresh the eigenbases every ``basis_freq`` optimizer steps (first at step 1), >= 1; with LoRA+
            groups, 1 gave held-out 1.6745 and 10 gave 1.6813 (LoRA+ 1.6816; bench README "Variants screened").
        second_moment: ``"keep"`` (SOAP) or ``"rotate"``: what a basis change does to the second moment.

    State: per parameter ``step`` (int), ``exp_avg``, ``exp_avg_sq`` (rotated coordinates for LoRA tensors,
    the parameter's dtype); per optimizer the bases ``[2, M, R, R]`` (``[FORWARD] = Q_H``,
    ``[BACKWARD] = Q_D``) and the step count, saved by ``state_dict()``.
    """

    uses_grit_factors = True  #: GritOptimizer folds the factor EMA only (no inversion, no preconditioning)

    def __init__(
        self,
        params: Iterable,
        preconditioner,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        basis_freq: int = 1,
        second_moment: str = "keep",
    ):
        from .preconditioner import GritPreconditioner
        from .vlm import GroupedGritPreconditioner

        # one bank: its factors are indexed by module.index (a grouped preconditioner has one bank per group)
        one_bank = not isinstance(preconditioner, GroupedGritPreconditioner)
        if not (isinstance(preconditioner, GritPreconditioner) and one_bank):
            raise TypeError(f"EigenAdamW needs a GritPreconditioner, got {type(preconditioner).__name__}")
        cfg = preconditioner.config
        if cfg.fisher != "kfac" or cfg.reprojection != "off":
            raise ValueError(
                "EigenAdamW uses the rank-space K-FAC factors: needs GritConfig(fisher='kfac', reprojection='off'), "
                f"got fisher={cfg.fisher!r}, reprojection={cfg.reprojection!r}"
            )
        if not (isinstance(lr, (int, float)) and lr >= 0) or not (isinstance(eps, (int, float)) and eps >= 0):
            raise ValueError(f"EigenAdamW: lr and eps must be >= 0, got lr={lr!r}, eps={eps!r}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"EigenAdamW: betas must be two numbers in [0, 1), got {betas!r}")
        if weight_decay < 0:
            raise ValueError(f"EigenAdamW: weight_decay must be >= 0, got {weight_decay!r}")
        if isinstance(basis_freq, bool) or not isinstance(basis_freq, int) or basis_freq < 1:
            raise ValueError(f"EigenAdamW: basis_freq must be an integer >= 1, got {basis_freq!r}")
        if second_moment not in SECOND_MOMENT_MODES:
            raise ValueError(f"EigenAdamW: second_moment must be one of {SECOND_MOMENT_MODES}, got {second_moment!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        owned = {id(p) for g in self.param_groups for p in g["params"]}
        missing = [m.name for m in preconditioner.modules if id(m.lora_A) not in owned or id(m.lora_B) not in owned]
        if missing:
            raise ValueError(
                f"EigenAdamW: {len(missing)} preconditioned LoRA modules are not in its parameters (e.g. {missing[:3]})"
            )
        self.preconditioner = preconditioner
        self.basis_freq = basis_freq
        self.second_moment = second_moment
        bank = preconditioner.bank
        R, M = bank.max_rank, bank.num_modules
        self.basis = torch.eye(R, device=bank.device).expand(2, M, R, R).clone()
        self.steps = 0  #: optimizer steps taken (host integer)
        for m in preconditioner.modules:  # LoRA moments exist from the start: a refresh maps them all
            for p in (m.lora_A, m.lora_B):
                self.state[p] = self._fresh_state(p)

    @staticmethod
    def _fresh_state(p: torch.Tensor) -> dict:
        zeros = lambda: torch.zeros_like(p, memory_format=torch.preserve_format)  # noqa: E731
        return {"step": 0, "exp_avg": zeros(), "exp_avg_sq": zeros()}

    # ------------------------------------------------------------------ bases
    def _rotate_(self, tensors_a, tensors_b, left: torch.Tensor, right: torch.Tensor) -> None:
        """In place ``a_m <- left[:, m] @ a_m``, ``b_m <- b_m @ right[:, m]`` over every module (one grouped op)."""
        ops.precondition_(tensors_a, tensors_b, left, right, backend=self.preconditioner.backend)

    def _moments(self, key: str):
        mods = self.preconditioner.modules
        return [self.state[m.lora_A][key] for m in mods], [self.state[m.lora_B][key] for m in mods]

    def refresh_basis(self) -> None:
        """Recompute every eigenbasis from the bank's factors; map the moments into the new bases."""
        bank = self.preconditioner.bank
        flat = lambda t: t.reshape(-1, *t.shape[2:])  # noqa: E731
        new = batched_eigenbasis(flat(bank.factor), bank.ranks, bank.initialized.view(-1)).view_as(self.basis)
        transition = torch.matmul(new.transpose(-1, -2), self.basis)  # T = Q_new^T Q_old, [2, M, R, R]
        t_d, t_h_right = transition[BACKWARD], transition[FORWARD].transpose(-1, -2)
        # A's moments are [r, d_in] in Q_D^T coordinates (left); B's are [d_out, r] in Q_H coordinates (right)
        self._rotate_(*self._moments("exp_avg"), t_d, t_h_right)
        if self.second_moment == "rotate":
            self._rotate_(*self._moments("exp_avg_sq"), t_d * t_d, t_h_right * t_h_right)
        self.basis.copy_(new)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pre = self.preconditioner
        if pre.step_count != self.steps + 1:
            raise RuntimeError(
                "EigenAdamW.step: the factors were not updated for this step; step it through "
                "GritOptimizer(EigenAdamW(params, pre, ...), pre), which folds the statistics first"
            )
        if self.steps % self.basis_freq == 0:
            self.refresh_basis()
        self.steps += 1
        q_d, q_h = self.basis[BACKWARD], self.basis[FORWARD]
        mods = pre.modules
        lora = {}  # id(param) -> rotated gradient (a copy: .grad is left as it came)
        if any(m.lora_A.grad is not None or m.lora_B.grad is not None for m in mods):
            grads_a = torch._foreach_mul([_grad_or_zeros(m.lora_A) for m in mods], 1.0)
            grads_b = torch._foreach_mul([_grad_or_zeros(m.lora_B) for m in mods], 1.0)
            self._rotate_(grads_a, grads_b, q_d.transpose(-1, -2), q_h)
            for m, ga, gb in zip(mods, grads_a, grads_b):
                lora[id(m.lora_A)], lora[id(m.lora_B)] = ga, gb
        pending = []  # per group: (group, params, Adam directions m / (sqrt(v^) + eps), -lr / bias1 per tensor)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [lora.get(id(p), p.grad) for p in params]
            states = []
            for p in params:
                if not self.state[p]:
                    self.state[p] = self._fresh_state(p)
                state = self.state[p]
                state["step"] += 1
                states.append(state)
            exp_avg = [s["exp_avg"] for s in states]
            exp_avg_sq = [s["exp_avg_sq"] for s in states]
            torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sq, beta2)
            torch._foreach_addcmul_(exp_avg_sq, grads, grads, 1 - beta2)
            denom = torch._foreach_sqrt(exp_avg_sq)
            torch._foreach_div_(denom, [math.sqrt(1 - beta2 ** s["step"]) for s in states])
            torch._foreach_add_(denom, group["eps"])
            scale = [-group["lr"] / (1 - beta1 ** s["step"]) for s in states]
            pending.append((group, params, torch._foreach_div(exp_avg, denom), scale))
        if lora:  # back to the original coordinates, in place: U_A = Q_D U~_A, U_B = U~_B Q_H^T
            direction = {id(p): d for _, params, dirs, _ in pending for p, d in zip(params, dirs)}
            ua = [direction[id(m.lora_A)] if id(m.lora_A) in direction else torch.zeros_like(m.lora_A) for m in mods]
            ub = [direction[id(m.lora_B)] if id(m.lora_B) in direction else torch.zeros_like(m.lora_B) for m in mods]
            self._rotate_(ua, ub, q_d, q_h.transpose(-1, -2))
        for group, params, dirs, scale in pending:
            if group["weight_decay"] != 0:
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            torch._foreach_mul_(dirs, scale)
            torch._foreach_add_(params, dirs)
        return loss

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["eigen_adam"] = {"basis": self.basis.clone(), "steps": self.steps}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("eigen_adam", None)
        if extra is None:
            raise ValueError("EigenAdamW.load_state_dict: no 'eigen_adam' entry (bases, step count) in the state")
        super().load_state_dict(state_dict)
        self.basis.copy_(extra["basis"])
        self.steps = int(extra["steps"])
