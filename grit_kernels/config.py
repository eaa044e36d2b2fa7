"""GritConfig: every knob of rank-space K-FAC (GRIT), validated and documented.

See docs/design.md §2 and §4 for the math the knobs control.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

BACKENDS = ("auto", "torch", "triton", "cpp", "cuda")
NONFINITE_POLICIES = ("skip", "raise", "ignore")
FISHERS = ("kfac", "diagonal", "kfac_full", "kfac_lowrank")
REPROJECTIONS = ("off", "one_sided", "two_sided")
RANK_SCHEDULES = ("linear", "cosine", "adaptive")
OPTIMIZER_STATES = ("reset", "rotate")


def _knob(default, brief: str, choices: tuple[str, ...] | None = None):
    """A :class:`GritConfig` field with its one-line ``brief`` help (and allowed ``choices``) in the field's
    metadata: :mod:`grit_kernels.arguments` builds the Trainer's ``grit_*`` arguments and the CLI's
    ``--grit-*`` flags from them. The class docstring holds the long description (docs/configuration.md)."""
    metadata = {"brief": brief}
    if choices is not None:
        metadata["choices"] = choices
    return field(default=default, metadata=metadata)


@dataclass
class GritConfig:
    """Configuration of :class:`grit_kernels.GritPreconditioner`.

    Attributes:
        update_freq: invert the factors every ``update_freq`` optimizer steps (>= 1; default 1: every
            step, one batched r x r inversion, cheap at r <= 64). Statistics are folded into the EMA at
            every step. Until the first scheduled refresh after warm-up the inverses are refreshed every
            step, so the first step that has statistics (PEFT's B = 0 gives none at step 0) is
            preconditioned.
        damping: relative damping. Each r x r factor ``C`` is inverted as ``C + lam*I`` with
            ``lam = damping * trace(C) / r + eps_abs``. Relative damping keeps the update invariant to
            reparametrisations ``(A, B) -> (cA, B/c)``. Range [0, 1e6].
        damping_floor: a damping floor anchored to the running maximum of each factor's scale, as a fraction
            in [0, 1]: ``lam = damping * max(tr(C)/r, damping_floor * max_t tr(C_t)/r) + eps_abs``, the maximum
            taken over the refreshes so far (``fisher="kfac"`` only). ``0`` (default) turns it off. It keeps
            ``lam`` from vanishing with the factor (PEFT's ``B = 0``, a shrinking gradient). Trade-off: where the
            floor is active the step is no longer invariant to reparametrisations that change traces (general
            ``(A, B) -> (QA, BQ^-1)`` applied mid-training); it stays invariant to rotations and to scalings
            applied from the start (traces and their running maxima transform alike). Unscreened as a default
            (bench/README.md, "Variants screened").
        eps_abs: absolute damping floor added to ``lam`` (> 0 unless ``damping`` > 0 and factors are
            never zero), in the units of the factor. Range [0, inf).
        ema_decay: ``beta`` of the factor EMA ``C <- beta*C + (1-beta)*C_step``; the first step
            initialises ``C`` directly. Range [0, 1).
        retry_damping_factor: if the Cholesky factorisation fails, retry once with ``lam`` multiplied
            by this (> 1). Then keep the previous inverse, else fall back to ``I/lam``.
        warmup_steps: optimizer steps during which gradients pass through unpreconditioned while the
            factors are already being estimated. PEFT initialises ``B = 0`` so the backward factor is
            ~0 at first. Range [0, inf).
        kl_clip: trust region on the step, in units of the Fisher quadratic form (~2 x the per-token
            KL). With :class:`GritOptimizer` it bounds the step the inner optimizer actually took --
            after its momentum, with each parameter group's own lr (LoRA+ groups):
            ``Delta <- min(1, sqrt(kl_clip / sum(<D Delta_A, Delta_A> + <Delta_B H, Delta_B>))) Delta``,
            on the device. Calling ``GritPreconditioner.step(lr=...)`` directly instead estimates it
            from the gradient (``lr^2 * sum(g_pre . g)``, one lr, no momentum). ``None`` disables it.
            Default 0.1: measured (bench/results/cpu/convergence_screen*.json) as inactive for AdamW at
            its best lr and a safety net for SGD; 1e-2 and 1e-3 on the step taken cost 0.02-0.1 nats of
            held-out loss with AdamW.
        backend: ``"auto"`` (the fastest available backend measured for the device: Triton on CUDA, the
            C++ kernels on CPU when built, else torch), ``"torch"``, ``"triton"``, ``"cpp"`` (C++ CPU
            kernels of ``csrc/``) or ``"cuda"`` (CUDA C++ kernels of ``csrc/``).
        target_modules: optional names or name suffixes of LoRA layers to precondition (for example
            ``["q_proj", "v_proj"]``); ``None`` preconditions every supported LoRA layer.
        exclude_modules: names or name suffixes of LoRA layers to leave unpreconditioned.
        graft: take each LoRA tensor's step direction from GRIT and its norm from the raw gradient
            (``g <- P g * |g| / |P g|``, per tensor, on the device), as Distributed Shampoo grafts onto
            another optimizer. Default ``True``. Why: with PEFT's ``B = 0`` the backward factor grows
            like ``|B|^2`` while grad_A grows like ``|B|``, so the plain natural-gradient grad_A grows
            like ``1/|B|`` (``|A|`` x 3e4 in 30 SGD steps, tests/test_stability.py) and its scale jumps
            as the factors refresh; grafting keeps the inner optimizer's scale (SGD from PEFT init is
            bounded) at no measured cost with AdamW. Trade-off: the per-tensor norm is not invariant
            to reparametrisations ``(A, B) -> (QA, BQ^-1)``; the direction is. ``False`` gives the
            exactly invariant natural-gradient step (the invariance tests use it).
        nonfinite_grads: what :class:`GritOptimizer` does when a LoRA gradient is NaN/Inf, or all of
            them are exactly zero (no supervised token): ``"skip"`` (skip the step, discard its
            statistics, warn; costs one device->host scalar read per step, like ``GradScaler``), ``"raise"`` (raise ``FloatingPointError``), or
            ``"ignore"`` (no check, no host sync; the bank still refuses non-finite statistics).
        fisher: the curvature model (:mod:`grit_kernels.fisher`). ``"kfac"`` (default): rank-space K-FAC,
            the r x r factors above. ``"diagonal"``: EMA (``ema_decay``) of the squared gradient of every
            LoRA entry, ``g <- g / (v + lam)`` with ``lam = damping * mean(v) + eps_abs`` per tensor.
            ``"kfac_full"``: full K-FAC with the ``d_in x d_in`` input and ``d_out x d_out`` output
            factors as well (a reference for small models; per-module loops, refused above
            ``kfac_full_max_bytes``). ``"kfac_lowrank"``: those large factors kept as streaming Nystrom
            sketches, ``top-k eigenpairs + the mean of the rest of the spectrum`` (``O(d m)`` memory per
            factor; any model size). Measured on the convergence benchmark in ``bench/README.md``.
        kfac_full_max_bytes: memory limit of ``fisher="kfac_full"``'s large factors (sum, EMA and
            inverse of every module's ``d_in^2 + d_out^2`` fp32 entries). Range [1, inf).
        large_factor_rank: ``fisher="kfac_lowrank"``: eigenpairs ``k`` kept of each large factor (cut to
            ``d - 1``). Integer >= 1, default 16.
        large_factor_sketch: ``fisher="kfac_lowrank"``: test vectors ``m`` of each sketch (cut to ``d``),
            ``None`` (default) for ``2 * large_factor_rank``. Integer >= ``large_factor_rank``.
        reprojection: periodic re-basing of every module onto its Fisher eigenbasis
            (:class:`grit_kernels.compress.RankAdapter`): ``"off"``, ``"one_sided"`` (eigenvectors of
            ``H^1/2 B^T B H^1/2``) or ``"two_sided"`` (of ``H^1/2 D H^1/2``). Applied after the optimizer
            step every ``reprojection_freq`` steps from step ``reprojection_start``; without a
            ``rank_schedule`` it keeps the rank (and the function).
        reprojection_freq, reprojection_start: integers >= 1 and >= 0.
        rank_schedule: ``None`` (keep ranks), ``"linear"``, ``"cosine"`` or ``"adaptive"``: at each
            reprojection module ``m`` of initial rank ``r0`` gets rank
            ``k_t = r0 * (rank_start + (rank_end - rank_start) * schedule(t))`` (rounded, >= ``min_rank``),
            ``t = (step - reprojection_start) / (rank_schedule_steps - reprojection_start)`` clamped to
            [0, 1], ``schedule`` = ``t`` (linear) or ``(1 - cos(pi t)) / 2`` (cosine). ``"adaptive"``: the
            smallest rank keeping ``rank_energy`` of the module's current Fisher-weighted spectrum, but at
            least the cosine ``k_t``. Ranks never grow. Needs ``reprojection != "off"``.
        rank_start, rank_end: fractions of the initial rank in (0, 1], ``rank_end <= rank_start``.
        rank_schedule_steps: step at which ``k_t`` reaches ``rank_end`` (> ``reprojection_start``).
        rank_energy: energy kept by the ``"adaptive"`` schedule, in (0, 1].
        min_rank: no module is cut below this rank (>= 1).
        reprojection_optimizer_state: what happens to the optimizer state of re-based tensors:
            ``"reset"`` (dropped; Adam restarts its moments for them) or ``"rotate"`` (first moments
            mapped into the new basis exactly, second moments by the element-wise squared map).
    """

    update_freq: int = _knob(1, "invert the r x r factors every N optimizer steps (>= 1)")
    damping: float = _knob(1e-3, "relative damping: lam = damping * tr(C)/r + eps_abs, in [0, 1e6]")
    damping_floor: float = _knob(
        0.0, "damping floor as a fraction in [0, 1] of the running maximum of tr(C)/r (fisher=kfac; 0: off)"
    )
    eps_abs: float = _knob(1e-12, "absolute damping added to lam, >= 0")
    ema_decay: float = _knob(0.95, "EMA decay of the factors, in [0, 1)")
    retry_damping_factor: float = _knob(100.0, "damping multiplier of the inversion retry, > 1")
    warmup_steps: int = _knob(10, "optimizer steps with unpreconditioned gradients while the factors warm up (>= 0)")
    kl_clip: float | None = _knob(0.1, "KL-clip trust region on the step taken, > 0 (none: off)")
    backend: str = _knob("auto", "kernels of the GRIT step", choices=BACKENDS)
    target_modules: Sequence[str] | None = _knob(
        None, "names or name suffixes of LoRA layers to precondition (none: all)"
    )
    exclude_modules: Sequence[str] = _knob((), "names or name suffixes of LoRA layers to leave unpreconditioned")
    nonfinite_grads: str = _knob("skip", "what a NaN/Inf (or all-zero) LoRA gradient does", choices=NONFINITE_POLICIES)
    graft: bool = _knob(True, "GRIT's direction with the raw gradient's norm, per tensor")
    fisher: str = _knob("kfac", "the curvature model", choices=FISHERS)
    kfac_full_max_bytes: int = _knob(2**30, "memory limit of fisher=kfac_full's d x d factors (>= 1)")
    large_factor_rank: int = _knob(16, "fisher=kfac_lowrank: eigenpairs kept per large factor (>= 1)")
    large_factor_sketch: int | None = _knob(
        None, "fisher=kfac_lowrank: sketch test vectors per large factor (>= large_factor_rank; none: 2 x rank)"
    )
    reprojection: str = _knob("off", "periodic re-basing onto the Fisher eigenbasis", choices=REPROJECTIONS)
    reprojection_freq: int = _knob(100, "reproject every N optimizer steps (>= 1)")
    reprojection_start: int = _knob(0, "first optimizer step that may reproject (>= 0)")
    rank_schedule: str | None = _knob(
        None, "rank budget schedule (needs reprojection; none: keep ranks)", choices=RANK_SCHEDULES
    )
    rank_start: float = _knob(1.0, "scheduled rank at the start, fraction of the initial rank, in (0, 1]")
    rank_end: float = _knob(0.5, "scheduled rank at the end, fraction of the initial rank, in (0, 1]")
    rank_schedule_steps: int = _knob(1000, "step at which the schedule reaches rank_end")
    rank_energy: float = _knob(0.99, "spectral energy kept by the adaptive schedule, in (0, 1]")
    min_rank: int = _knob(1, "no module is cut below this rank (>= 1)")
    reprojection_optimizer_state: str = _knob(
        "reset", "optimizer state of re-based tensors", choices=OPTIMIZER_STATES
    )

    def __post_init__(self) -> None:
        self._check_int("update_freq", 1)
        self._check_int("warmup_steps", 0)
        self._check_range("damping", 0.0, 1e6)
        self._check_range("eps_abs", 0.0, math.inf)
        self._check_range("damping_floor", 0.0, 1.0)
        self._check_range("ema_decay", 0.0, 1.0, hi_open=True)
        self._check_range("retry_damping_factor", 1.0, math.inf, lo_open=True)
        if self.kl_clip is not None:
            self._check_range("kl_clip", 0.0, math.inf, lo_open=True)
        if self.damping == 0.0 and self.eps_abs == 0.0:
            raise ValueError("GritConfig: damping and eps_abs cannot both be 0 (the factors may be singular)")
        if not isinstance(self.graft, bool):
            raise ValueError(f"GritConfig.graft must be True or False, got {self.graft!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"GritConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.nonfinite_grads not in NONFINITE_POLICIES:
            raise ValueError(
                f"GritConfig.nonfinite_grads must be one of {NONFINITE_POLICIES}, got {self.nonfinite_grads!r}"
            )
        self._check_fisher_and_ranks()
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise ValueError(f"GritConfig.{name} must be a list of names, not the string {value!r}")
            if value is not None:
                setattr(self, name, tuple(value))

    def _check_fisher_and_ranks(self) -> None:
        if self.fisher not in FISHERS:
            raise ValueError(f"GritConfig.fisher must be one of {FISHERS}, got {self.fisher!r}")
        if self.reprojection not in REPROJECTIONS:
            raise ValueError(f"GritConfig.reprojection must be one of {REPROJECTIONS}, got {self.reprojection!r}")
        if self.rank_schedule is not None and self.rank_schedule not in RANK_SCHEDULES:
            raise ValueError(f"GritConfig.rank_schedule must be None or one of {RANK_SCHEDULES}, got {self.rank_schedule!r}")
        for name, lo in (("kfac_full_max_bytes", 1), ("reprojection_freq", 1), ("reprojection_start", 0), ("min_rank", 1)):
            self._check_int(name, lo)
        self._check_int("large_factor_rank", 1)
        if self.large_factor_sketch is not None:
            self._check_int("large_factor_sketch", self.large_factor_rank)
        self._check_int("rank_schedule_steps", self.reprojection_start + 1 if self.rank_schedule is not None else 1)
        for name in ("rank_start", "rank_end", "rank_energy"):
            self._check_range(name, 0.0, 1.0, lo_open=True)
        if self.rank_schedule is not None and self.rank_end > self.rank_start:
            raise ValueError(
                f"GritConfig.rank_end ({self.rank_end}) must be <= rank_start ({self.rank_start}): ranks only shrink"
            )
        if self.rank_schedule is not None and self.reprojection == "off":
            raise ValueError("GritConfig.rank_schedule needs reprojection='one_sided' or 'two_sided'")
        if self.reprojection_optimizer_state not in OPTIMIZER_STATES:
            raise ValueError(
                "GritConfig.reprojection_optimizer_state must be 'reset' or 'rotate', "
                f"got {self.reprojection_optimizer_state!r}"
            )
        if self.fisher != "kfac" and self.damping_floor > 0:
            raise ValueError("GritConfig.damping_floor needs fisher='kfac' (it floors the rank-space factors' damping)")
        if self.fisher != "kfac" and self.reprojection != "off":
            raise ValueError("GritConfig.reprojection needs fisher='kfac' (it re-bases the rank-space factors)")

    def _check_int(self, name: str, lo: int) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"GritConfig.{name} must be an integer >= {lo}, got {value!r}")

    def _check_range(self, name: str, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> None:
        value = getattr(self, name)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) or (
            value == math.inf and hi == math.inf
        )
        if ok:
            ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
        if not ok:
            left = "(" if lo_open else "["
            right = ")" if hi_open or hi == math.inf else "]"
            raise ValueError(f"GritConfig.{name} must be in {left}{lo}, {hi}{right}, got {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> GritConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"GritConfig: unknown fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)
