"""Fisher-guided rank truncation of LoRA adapters that makes them *really* smaller, periodic
reprojection / rank adaptation during training, and rank-budget schedules.

The cut (docs/design.md §10). A LoRA module adds ``dW x = s B h`` with ``h = A x``. Its best
rank-``k`` replacement under ``E||.||^2`` over the data is ``C h`` with ``C`` the best rank-``k``
approximation of ``B`` in the metric of ``H = E[h h^T]``: with ``S = (H + lam I)^{1/2}`` and ``V`` the
eigenvectors of ``S B^T B S`` (eigenvalues ``e_1 >= ... >= e_r``: the output energy ``s^2 E||B h||^2``
split into orthogonal directions)::

    A' = V_k^T S^-1 A      (k x d_in)          B' = B S V_k      (d_out x k)
    B' A' = B S V_k V_k^T S^-1 A,   E||s(B - B'A')h||^2 / E||s B h||^2 = sum_{i>k} e_i / sum_i e_i

(exact up to the small damping ``lam`` that keeps ``S`` invertible when ``H`` is singular, and at
``k = r`` an exact reparametrisation: the function does not change). This is the **one-sided** metric
(inputs weighted by ``H``, outputs Euclidean). The **two-sided** metric also weights outputs by the
output Fisher: ``B^T B`` is replaced by the rank-space backward factor ``D = E[delta delta^T]``
(``delta = s B^T g``), i.e. the eigenvectors of ``S D S``; the fold is the same.

The preconditioner follows: its factors are carried into the new basis (``H' = T H T^T`` with
``T = V_k^T S^-1``, ``D' = U^T D U`` with ``U = S V_k``), its bank is rebuilt at the new ranks and its
inverses are refreshed, so training continues without a new warm-up.

Optimizer state on a basis change: by default the state of every re-based LoRA parameter is
**reset** (Adam's moments are dropped and its step counter restarts for those tensors). ``"rotate"``
(``GritConfig.reprojection_optimizer_state``, ``compress_adapter(optimizer_state=...)``) carries it
instead: first moments map exactly like gradients (``dL/dA' = (S V_k)^T dL/dA``,
``dL/dB' = dL/dB (V_k^T S^-1)^T``), ``exp_avg_sq`` -- an element-wise statistic with no exact rotation --
by the element-wise squared maps (a diagonal approximation). Resized tensors are new Parameters (autograd caches a leaf's
shape); an optimizer passed in gets them in place of the old ones in its ``param_groups`` (so LR
schedulers and wrappers sharing the groups follow). Unfuse fused blocks (``gk.unfuse``) first.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .bank import BACKWARD, FORWARD, FactorBank
from .layers import CaptureSlot, patch_lora_layer, unpatch_lora_layer

SIDES = ("one_sided", "two_sided")
RANK_SCHEDULES = ("linear", "cosine", "adaptive")
TRUNCATION_DAMPING = 1e-6  #: relative damping of H used for the cut (lam = this * tr(H)/r)


# --------------------------------------------------------------------------------------------- the math
@dataclass
class Truncation:
    """Spectrum and change of basis of one module (float64).

    ``energies [r]``: descending, in output units (``s^2`` included); ``to_new [r, r]`` (``V^T S^-1``:
    ``h' = to_new[:k] h``, ``A' = to_new[:k] A``); ``from_new [r, r]`` (``S V``: ``B' = B from_new[:, :k]``).
    """

    energies: torch.Tensor
    to_new: torch.Tensor
    from_new: torch.Tensor

    def rank_for_energy(self, energy: float) -> int:
        """Smallest ``k`` whose kept energy is at least ``energy`` of the total (``energy >= 1``: all
        directions of non-zero energy, with a 1e-10 relative tolerance). 0 if the total is 0."""
        e = self.energies.clamp_min(0)
        total = float(e.sum())
        if total <= 0:
            return 0
        discarded = total - torch.cumsum(e, 0)  # discarded[k-1]: energy left out keeping k
        allowed = max(1.0 - energy, 0.0) * total + 1e-10 * total
        return int((discarded > allowed).sum().item()) + 1


def truncation_basis(
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    forward_factor: torch.Tensor | None,
    scaling: float,
    backward_factor: torch.Tensor | None = None,
    damping: float = TRUNCATION_DAMPING,
) -> Truncation:
    """The Fisher-weighted spectrum and basis of one LoRA module.

    Args:
        lora_A: ``[r, d_in]``; lora_B: ``[d_out, r]``; scaling: ``s``.
        forward_factor: ``H = E[h h^T]`` ``[r, r]``; ``None`` (or all zero: no statistics yet) uses the
            identity, i.e. the plain SVD of ``B A``'s rank-space factor ``B``.
        backward_factor: ``D = E[delta delta^T]`` ``[r, r]`` for the two-sided metric; ``None``: one-sided
            (``B^T B``).
        damping: relative damping of ``H`` (``lam = damping * tr(H)/r``) so that ``S`` is invertible.
    """
    r = lora_A.shape[0]
    A, B = lora_A.detach().double(), lora_B.detach().double()
    eye = torch.eye(r, dtype=torch.float64, device=A.device)
    H = forward_factor.detach().double() if forward_factor is not None else None
    if H is None or not bool(torch.isfinite(H).all()) or float(torch.trace(H)) <= 0:
        H = eye.clone()
    H = 0.5 * (H + H.T)
    lam = damping * float(torch.trace(H)) / r + 1e-30
    w, Q = torch.linalg.eigh(H + lam * eye)
    w = w.clamp_min(lam)
    sqrt_h = (Q * w.sqrt()) @ Q.T
    inv_sqrt_h = (Q * w.rsqrt()) @ Q.T
    if backward_factor is None:
        out = (scaling**2) * (B.T @ B)
    else:
        out = backward_factor.detach().double()
        out = 0.5 * (out + out.T)
    M = sqrt_h @ out @ sqrt_h
    e, V = torch.linalg.eigh(0.5 * (M + M.T))
    e, V = e.flip(0), V.flip(1)
    return Truncation(energies=e.clamp_min(0), to_new=V.T @ inv_sqrt_h, from_new=sqrt_h @ V)


# --------------------------------------------------------------------------------------------- modules
@dataclass
class _Target:
    """One LoRA layer to resize: its name relative to the base model, layer and adapter."""

    key: str
    layer: nn.Module
    adapter: str
    index: int | None  # index in its preconditioner's bank, if preconditioned
    owner: object = None  # that preconditioner (a group's, under a GroupedGritPreconditioner)

    @property
    def lora_A(self) -> nn.Parameter:
        return self.layer.lora_A[self.adapter].weight

    @property
    def lora_B(self) -> nn.Parameter:
        return self.layer.lora_B[self.adapter].weight

    @property
    def scaling(self) -> float:
        return float(self.layer.scaling[self.adapter])


def _check_not_fused(targets: list[_Target]) -> None:
    fused = [t.key for t in targets if "_grit_fused" in t.layer.__dict__]
    if fused:
        raise ValueError(
            f"resizing LoRA ranks needs unfused layers ({fused[0]} is fused): call gk.unfuse(model) first"
        )


def _peft_key(name: str) -> str:
    """Module name as PEFT's ``rank_pattern`` sees it (relative to the base model)."""
    for prefix in ("base_model.model.", "base_model."):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def _targets(model: nn.Module, preconditioner) -> list[_Target]:
    from .layers import is_lora_layer

    owners = (
        []
        if preconditioner is None
        else list(getattr(preconditioner, "groups", {}).values()) or [preconditioner]
    )
    index = {id(m.layer): (owner, m.index) for owner in owners for m in owner.modules}
    out = []
    for name, layer in model.named_modules():
        if not is_lora_layer(layer) or not hasattr(layer, "lora_A"):
            continue
        adapters = list(layer.active_adapters)
        if len(adapters) != 1 or adapters[0] not in layer.lora_A:
            continue
        if not isinstance(layer.lora_A[adapters[0]], nn.Linear):
            continue
        owner, i = index.get(id(layer), (None, None))
        out.append(_Target(_peft_key(name), layer, adapters[0], i, owner))
    if not out:
        raise ValueError("compress_adapter: no PEFT LoRA (Linear) layer with one active adapter in the model")
    return out


def _factor(preconditioner, index: int | None, which: int) -> torch.Tensor | None:
    if preconditioner is None or index is None:
        return None
    bank = preconditioner.bank
    if not bool(bank.initialized[which, index]):
        return None
    r = bank.module_ranks[index]
    return bank.factor[which, index, :r, :r]


def _resize_layer(target: _Target, basis: Truncation, k: int) -> dict[nn.Parameter, tuple]:
    """Replace the module's A, B by new Parameters holding their rank-``k`` fold; keep ``s``.

    Returns ``{old Parameter: (new Parameter, left, right)}`` (autograd caches a leaf's shape, so a
    resized tensor must be a new Parameter); ``left @ g @ right`` maps a gradient-like tensor ``g`` of the
    old Parameter into the new basis (``None`` = identity): ``dL/dA' = (S V_k)^T dL/dA``,
    ``dL/dB' = dL/dB (V_k^T S^-1)^T``."""
    layer, adapter = target.layer, target.adapter
    A, B = target.lora_A, target.lora_B
    new_A = (basis.to_new[:k] @ A.detach().double()).to(A.dtype).contiguous()
    new_B = (B.detach().double() @ basis.from_new[:, :k]).to(B.dtype).contiguous()
    scaling = target.scaling
    lin_A, lin_B = layer.lora_A[adapter], layer.lora_B[adapter]
    lin_A.weight = nn.Parameter(new_A, requires_grad=A.requires_grad)
    lin_B.weight = nn.Parameter(new_B, requires_grad=B.requires_grad)
    lin_A.out_features = k
    lin_B.in_features = k
    layer.r[adapter] = k
    rslora = bool(getattr(layer, "use_rslora", {}).get(adapter, False))
    layer.lora_alpha[adapter] = scaling * (math.sqrt(k) if rslora else k)  # keeps s = alpha / r (or / sqrt r)
    layer.scaling[adapter] = scaling
    grad_left_a = basis.from_new[:, :k].T.contiguous()  # [k, r]
    grad_right_b = basis.to_new[:k].T.contiguous()  # [r, k]
    return {A: (lin_A.weight, grad_left_a, None), B: (lin_B.weight, None, grad_right_b)}


def _map_state(value: torch.Tensor, left, right, squared: bool) -> torch.Tensor:
    out = value.double()
    if left is not None:
        out = (left * left if squared else left) @ out
    if right is not None:
        out = out @ (right * right if squared else right)
    return out.to(value.dtype).contiguous()


OPTIMIZER_STATES = ("reset", "rotate")


def swap_optimizer_parameters(optimizer, replaced: dict[nn.Parameter, tuple], state: str = "reset") -> None:
    """Put the new Parameters where the old ones were in ``optimizer.param_groups`` (in place, so
    wrappers sharing the groups follow), and handle their state:

    * ``"reset"``: drop it (Adam restarts its moments and bias correction for those tensors);
    * ``"rotate"``: carry it into the new basis. Tensors shaped like the parameter are mapped like its
      gradient (``exp_avg``, momentum: ``left @ m @ right``, exact for a first moment); second moments
      (keys containing ``"sq"``) with the element-wise squared maps (a diagonal approximation: there is no
      exact rotation of an element-wise statistic); scalars such as ``step`` are kept.
    """
    if state not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer state handling must be one of {OPTIMIZER_STATES}, got {state!r}")
    if optimizer is None or not replaced:
        return
    for group in optimizer.param_groups:
        params = group["params"]
        for i, p in enumerate(params):
            if p in replaced:
                params[i] = replaced[p][0]
    for p, (new, left, right) in replaced.items():
        old_state = optimizer.state.pop(p, None)
        if state == "rotate" and old_state:
            optimizer.state[new] = {
                key: _map_state(v, left, right, "sq" in key)
                if isinstance(v, torch.Tensor) and v.shape == p.shape
                else v
                for key, v in old_state.items()
            }


def _update_peft_config(model: nn.Module, targets: list[_Target]) -> dict[str, int]:
    """Write every module's rank and alpha into the PEFT config (longest names first: PEFT matches
    pattern keys as name suffixes and takes the first match)."""
    ranks = {t.key: int(t.layer.r[t.adapter]) for t in targets}
    alphas = {t.key: float(t.layer.lora_alpha[t.adapter]) for t in targets}
    order = sorted(ranks, key=lambda n: (-len(n), n))
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict):
        for adapter in {t.adapter for t in targets}:
            if adapter in configs:
                cfg = configs[adapter]
                keys = [n for n in order if any(t.key == n and t.adapter == adapter for t in targets)]
                cfg.rank_pattern = {n: ranks[n] for n in keys}
                cfg.alpha_pattern = {n: alphas[n] for n in keys}
    return {n: ranks[n] for n in order}


def _follow(preconditioner, changes: dict[int, tuple[Truncation, int]]) -> None:
    """Rebuild the preconditioner's bank at the new ranks; factors carried into the new basis."""
    if preconditioner is None or not changes:
        return
    old = preconditioner.bank
    ranks = list(old.module_ranks)
    for i, (_, k) in changes.items():
        ranks[i] = k
    new = FactorBank(ranks, device=old.device)
    M = old.num_modules
    for i in range(M):
        r_old, r_new = old.module_ranks[i], ranks[i]
        if i in changes:
            basis, k = changes[i]
            to_new = basis.to_new[:k]  # h' = to_new h
            from_new = basis.from_new[:, :k]  # delta' = from_new^T delta
            for which, (left, right) in ((FORWARD, (to_new, to_new.T)), (BACKWARD, (from_new.T, from_new))):
                for store_old, store_new in ((old.factor, new.factor), (old.stat_sum, new.stat_sum)):
                    mat = store_old[which, i, :r_old, :r_old].double()
                    store_new[which, i, :r_new, :r_new] = (left @ mat @ right).float()
        else:
            new.factor[:, i, :r_new, :r_new] = old.factor[:, i, :r_old, :r_old]
            new.stat_sum[:, i, :r_new, :r_new] = old.stat_sum[:, i, :r_old, :r_old]
            new.inverse[:, i, :r_new, :r_new] = old.inverse[:, i, :r_old, :r_old]
    new.rows.copy_(old.rows)
    views = {"storage", "accumulators", "stat_sum", "rows", "factor", "inverse", "ranks"}
    for name, value in vars(old).items():  # status, flags, and per-module state other code may add
        mine = vars(new).get(name)
        tensors = isinstance(value, torch.Tensor) and isinstance(mine, torch.Tensor)
        if name not in views and tensors and mine.shape == value.shape:
            mine.copy_(value)
    new.refresh_count = old.refresh_count
    preconditioner.bank = new
    preconditioner.modules = [
        dataclasses.replace(
            m,
            lora_A=m.layer.lora_A[m.layer.active_adapters[0]].weight,
            lora_B=m.layer.lora_B[m.layer.active_adapters[0]].weight,
        )
        for m in preconditioner.modules
    ]
    for m in preconditioner.modules:
        unpatch_lora_layer(m.layer)
        slot = CaptureSlot(*new.stat_views(m.index), backend=preconditioner.backend, bank=new, index=m.index)
        patch_lora_layer(m.layer, slot)
    cfg = preconditioner.config
    floor = None
    scale_max = getattr(preconditioner, "_scale_max", None)  # the damping floor's running scale ([2, M])
    if isinstance(scale_max, torch.Tensor) and changes:
        scale = torch.diagonal(new.factor, dim1=2, dim2=3).sum(dim=2) / new.ranks.view(2, -1)
        index = torch.tensor(sorted(changes), device=new.device)
        scale_max[:, index] = scale[:, index]  # the new basis has its own scale
        if getattr(cfg, "damping_floor", 0) > 0:
            floor = cfg.damping_floor * scale_max
    if new.refresh_count > 0:
        kwargs = {"floor": floor} if floor is not None else {}
        new.refresh_inverses(
            cfg.damping, cfg.eps_abs, cfg.retry_damping_factor, backend=preconditioner.backend, **kwargs
        )
        new.refresh_count -= 1  # a re-basing, not a scheduled refresh
    fisher = getattr(preconditioner, "_fisher", None)
    if fisher is not None and hasattr(fisher, "on_resize"):
        fisher.on_resize(sorted(changes))


def _allocate_budget(spectra: list[torch.Tensor], budget: int, min_rank: int, caps: list[int]) -> list[int]:
    """Global rank allocation: every module gets ``min_rank`` (capped by its rank), the remaining units
    go to the largest energies over all modules (which minimises the total discarded energy)."""
    floor = [min(min_rank, c) for c in caps]
    left = budget - sum(floor)
    if left < 0:
        raise ValueError(f"compress_adapter: budget={budget} is below min_rank x modules = {sum(floor)}")
    candidates = []
    for m, (e, cap) in enumerate(zip(spectra, caps)):
        for j in range(floor[m], cap):
            candidates.append((float(e[j]), m))
    candidates.sort(key=lambda t: -t[0])
    ranks = list(floor)
    for _, m in candidates[:left]:
        ranks[m] += 1
    return ranks


# --------------------------------------------------------------------------------------------- public
def compress_adapter(
    model: nn.Module,
    preconditioner=None,
    energy: float = 0.99,
    min_rank: int = 1,
    budget: int | None = None,
    sides: str = "one_sided",
    optimizer: torch.optim.Optimizer | None = None,
    damping: float = TRUNCATION_DAMPING,
    optimizer_state: str = "reset",
) -> dict[str, int]:
    """Truncate every LoRA module of ``model`` to the rank that keeps ``energy`` of its Fisher-weighted
    output energy (see the module docstring for the cut). The adapter becomes really smaller.

    Args:
        model: a PEFT model (its ``peft_config``'s ``rank_pattern`` / ``alpha_pattern`` are rewritten, so
            ``save_pretrained`` + ``PeftModel.from_pretrained`` rebuild the smaller adapter).
        preconditioner: the model's :class:`~grit_kernels.GritPreconditioner` (its ``H``, and ``D`` for
            ``sides="two_sided"``, weight the cut; it follows the new ranks). ``None``: ``H = I`` (plain
            SVD truncation of ``B``).
        energy: fraction of the energy to keep, in (0, 1]. ``1.0`` drops only zero-energy directions
            (the function does not change).
        min_rank: no module goes below this rank (nor above its current one).
        budget: total rank units over all modules; allocated by energy (largest first) and overriding
            ``energy``.
        sides: ``"one_sided"`` (``S B^T B S``, the default) or ``"two_sided"`` (``S D S``).
        optimizer: an optimizer already built over the model: it gets the new Parameters, their state
            reset (``optimizer_state="reset"``) or carried into the new basis (``"rotate"``; see
            :func:`swap_optimizer_parameters`). An optimizer built afterwards sees the smaller parameters.
        damping: relative damping of ``H`` for the square root (keeps singular ``H`` usable).

    Returns:
        ``{module name (relative to the base model): new rank}`` -- also the PEFT ``rank_pattern``.
    """
    if not (isinstance(energy, (int, float)) and 0.0 < energy <= 1.0):
        raise ValueError(f"compress_adapter: energy must be in (0, 1], got {energy!r}")
    if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 1:
        raise ValueError(f"compress_adapter: min_rank must be an integer >= 1, got {min_rank!r}")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise ValueError(f"compress_adapter: budget must be a positive integer, got {budget!r}")
    if sides not in SIDES:
        raise ValueError(f"compress_adapter: sides must be one of {SIDES}, got {sides!r}")
    if optimizer_state not in OPTIMIZER_STATES:
        raise ValueError(f"compress_adapter: optimizer_state must be one of {OPTIMIZER_STATES}, got {optimizer_state!r}")
    targets = _targets(model, preconditioner)
    _check_not_fused(targets)
    bases = []
    with torch.no_grad():
        for t in targets:
            back = _factor(t.owner, t.index, BACKWARD) if sides == "two_sided" else None
            if sides == "two_sided" and back is None:
                warnings.warn(
                    f"compress_adapter: {t.key} has no backward factor yet; one-sided cut used", stacklevel=2
                )
            bases.append(
                truncation_basis(
                    t.lora_A, t.lora_B, _factor(t.owner, t.index, FORWARD), t.scaling, back, damping
                )
            )
        caps = [t.lora_A.shape[0] for t in targets]
        if budget is not None:
            ranks = _allocate_budget([b.energies for b in bases], budget, min_rank, caps)
        else:
            ranks = [min(cap, max(min_rank, b.rank_for_energy(energy))) for b, cap in zip(bases, caps)]
        changes, replaced = {}, {}
        for t, b, k in zip(targets, bases, ranks):
            replaced.update(_resize_layer(t, b, k))
            if t.index is not None:
                changes.setdefault(id(t.owner), (t.owner, {}))[1][t.index] = (b, k)
        for owner, owner_changes in changes.values():
            _follow(owner, owner_changes)
        swap_optimizer_parameters(optimizer, replaced, optimizer_state)
    return _update_peft_config(model, targets)


def fisher_weighted_error(
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    new_A,
    new_B,
    new_scaling: float,
    h_inputs: torch.Tensor,
) -> float:
    """``sum_t ||s B A x_t - s' B' A' x_t||^2 / sum_t ||s B A x_t||^2`` over the rows ``h_inputs = x [N, d_in]``
    (float64): the measured relative output error of a truncation (for tests and the benchmark)."""
    x = h_inputs.double()
    ref = scaling * (x @ lora_A.double().T) @ lora_B.double().T
    new = new_scaling * (x @ new_A.double().T) @ new_B.double().T
    return float(((ref - new) ** 2).sum() / (ref**2).sum().clamp_min(1e-300))


def lora_parameter_count(model: nn.Module) -> int:
    """Number of LoRA adapter parameters (``lora_`` in the name) that require grad."""
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n and p.requires_grad)


# --------------------------------------------------------------------------------------------- schedules
def schedule_fraction(kind: str, t: float) -> float:
    """``schedule(t)`` in [0, 1] for ``t`` in [0, 1]: linear ``t``; cosine ``(1 - cos(pi t)) / 2``."""
    t = min(max(float(t), 0.0), 1.0)
    if kind == "linear":
        return t
    if kind in ("cosine", "adaptive"):
        return 0.5 * (1.0 - math.cos(math.pi * t))
    raise ValueError(f"unknown rank schedule {kind!r}; one of {RANK_SCHEDULES}")


def scheduled_rank(initial_rank: int, step: int, config) -> int:
    """``k_t = round(r0 * (rank_start + (rank_end - rank_start) * schedule(t)))``,
    ``t = (step - reprojection_start) / (rank_schedule_steps - reprojection_start)`` clamped to [0, 1]."""
    span = max(config.rank_schedule_steps - config.reprojection_start, 1)
    t = (step - config.reprojection_start) / span
    frac = config.rank_start + (config.rank_end - config.rank_start) * schedule_fraction(
        config.rank_schedule, t
    )
    return max(1, min(initial_rank, round(initial_rank * frac)))


class RankAdapter:
    """Periodic reprojection and rank adaptation during training (``GritConfig.reprojection``).

    Every ``reprojection_freq`` optimizer steps from step ``reprojection_start``, after the optimizer
    step, each module is re-based onto its Fisher eigenbasis (one- or two-sided, as in
    :func:`compress_adapter`) and cut to its target rank:

    * ``rank_schedule=None``: no cut (a pure reprojection: the function is unchanged);
    * ``"linear"`` / ``"cosine"``: ``k_t = r0 * (rank_start + (rank_end - rank_start) * schedule(t))``;
    * ``"adaptive"``: the smallest rank keeping ``rank_energy`` of the module's current spectrum, but not
      below the cosine-scheduled ``k_t`` (so the budget never shrinks faster than the schedule).

    Ranks only shrink; with a schedule, only modules whose rank is cut are re-based (the others, and
    their optimizer state, are left alone). The factor bank follows; the optimizer state of re-based
    tensors is reset or rotated (``reprojection_optimizer_state``, module docstring). ``history``: ``[(step, total rank)]`` of each adaptation.

    Built by :class:`~grit_kernels.GritPreconditioner` when ``config.reprojection != "off"``; driven by
    :class:`~grit_kernels.GritOptimizer` (``after_step``). Usable by hand: ``adapter.reproject(optimizer)``.
    """

    def __init__(self, model: nn.Module, preconditioner):
        self.model, self.preconditioner = model, preconditioner
        self.initial_ranks = {m.index: m.lora_A.shape[0] for m in preconditioner.modules}
        self.history: list[tuple[int, int]] = []

    def state_dict(self) -> dict:
        """The schedule's position: ``initial_ranks`` (``r0`` per module, bank order; the schedule's
        reference even after cuts) and ``history``. The step itself is the preconditioner's ``step_count``."""
        n = len(self.preconditioner.modules)
        return {"initial_ranks": [self.initial_ranks[i] for i in range(n)], "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        ranks = [int(r) for r in state["initial_ranks"]]
        current = [m.lora_A.shape[0] for m in self.preconditioner.modules]
        if len(ranks) != len(current) or any(r < c for r, c in zip(ranks, current)):
            raise ValueError(
                f"RankAdapter.load_state_dict: saved initial ranks {ranks[:8]}... ({len(ranks)} modules) do not fit "
                f"this model's current ranks {current[:8]}... ({len(current)} modules); ranks only shrink"
            )
        self.initial_ranks = dict(enumerate(ranks))
        self.history = [(int(s), int(r)) for s, r in state["history"]]

    def due(self, step: int) -> bool:
        cfg = self.preconditioner.config
        return step >= cfg.reprojection_start and (step - cfg.reprojection_start) % cfg.reprojection_freq == 0

    def after_step(self, optimizer=None) -> None:
        """Call once after each optimizer step (``preconditioner.step_count`` is the steps taken)."""
        step = self.preconditioner.step_count
        if step > 0 and self.due(step):
            self.reproject(optimizer, step)

    def target_rank(self, index: int, basis: Truncation, current: int, step: int) -> int:
        cfg = self.preconditioner.config
        if cfg.rank_schedule is None:
            return current
        k = scheduled_rank(self.initial_ranks[index], step, cfg)
        if cfg.rank_schedule == "adaptive":
            k = max(k, basis.rank_for_energy(cfg.rank_energy))
        return max(cfg.min_rank, min(current, k))

    def reproject(self, optimizer=None, step: int | None = None) -> dict[str, int]:
        """Re-base (and cut) every preconditioned module now; returns the PEFT ``rank_pattern``."""
        pre = self.preconditioner
        step = pre.step_count if step is None else step
        two = pre.config.reprojection == "two_sided"
        targets = [t for t in _targets(self.model, pre) if t.owner is pre]
        _check_not_fused(targets)
        changes, replaced = {}, {}
        with torch.no_grad():
            for t in targets:
                back = _factor(pre, t.index, BACKWARD) if two else None
                basis = truncation_basis(t.lora_A, t.lora_B, _factor(pre, t.index, FORWARD), t.scaling, back)
                k = self.target_rank(t.index, basis, t.lora_A.shape[0], step)
                if pre.config.rank_schedule is not None and k == t.lora_A.shape[0]:
                    continue  # a schedule re-bases only the modules it cuts (their state is kept)
                replaced.update(_resize_layer(t, basis, k))
                changes[t.index] = (basis, k)
            _follow(pre, changes)
            swap_optimizer_parameters(optimizer, replaced, pre.config.reprojection_optimizer_state)
        self.history.append((step, sum(t.lora_A.shape[0] for t in targets)))
        return _update_peft_config(self.model, _targets(self.model, pre))


__all__ = [
    "RankAdapter",
    "Truncation",
    "compress_adapter",
    "fisher_weighted_error",
    "lora_parameter_count",
    "schedule_fraction",
    "scheduled_rank",
    "truncation_basis",
]
