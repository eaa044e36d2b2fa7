"""GRIT for vision-language models: LoRA + rank-space K-FAC with one configuration per modality group.

``create_vlm_grit_adapter(model_or_path, config)`` finds the ``nn.Linear`` layers of the three modality
groups of LLaVA-, Idefics3- and Qwen2-VL-style models by module name:

=============  ====================================================================================
group          module name contains
=============  ====================================================================================
``projector``  ``multi_modal_projector`` (LLaVA), ``connector`` (Idefics3), ``visual.merger``
               (Qwen2-VL), ``mm_projector``
``vision``     ``vision_tower`` (LLaVA), ``vision_model`` (Idefics3), ``visual`` (Qwen2-VL),
               ``vision_encoder``, ``image_encoder`` -- minus the projector
``language``   everything else (``language_model`` / ``text_model``), except ``lm_head``
=============  ====================================================================================

Each group has its own LoRA rank and alpha (PEFT ``rank_pattern`` / ``alpha_pattern``: the adapter
saves and loads with plain PEFT) and its own GRIT damping and update frequency: the returned
:class:`GroupedGritPreconditioner` holds one :class:`~grit_kernels.GritPreconditioner` per group (one
bank, one inversion launch and one preconditioning launch per group) and behaves as one preconditioner
for :class:`~grit_kernels.GritOptimizer` and :class:`~grit_kernels.GritTrainer`. The KL-clip, if on, is
applied per group. The Trainer logs every group's damping, condition number and traces as
``grit/<group>/...``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import GritConfig
from .interface import Preconditioner
from .preconditioner import GritPreconditioner

GROUPS = ("vision", "projector", "language")
PROJECTOR_MARKERS = ("multi_modal_projector", "connector", "visual.merger", "mm_projector")
VISION_MARKERS = ("vision_tower", "vision_model", "visual", "vision_encoder", "image_encoder")


@dataclass
class ModalityGroup:
    """LoRA and GRIT settings of one modality group.

    Attributes:
        r: LoRA rank (>= 1). lora_alpha: LoRA alpha (default ``2 * r``).
        damping, update_freq: GRIT relative damping and inversion period of this group (default: the
            base :class:`GritConfig`'s).
        target_modules: leaf names to adapt in this group (e.g. ``["q_proj", "v_proj"]``); ``None``: every
            ``nn.Linear`` of the group.
        enabled: ``False`` leaves the group without LoRA.
    """

    r: int = 16
    lora_alpha: float | None = None
    damping: float | None = None
    update_freq: int | None = None
    target_modules: Sequence[str] | None = None
    enabled: bool = True

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"ModalityGroup.r must be an integer >= 1, got {self.r!r}")
        if isinstance(self.target_modules, str):
            raise ValueError("ModalityGroup.target_modules must be a list of names, not a string")

    @property
    def alpha(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else 2 * self.r)


@dataclass
class VLMGritConfig:
    """Per-group LoRA/GRIT settings plus the shared :class:`GritConfig` (warm-up, EMA, KL-clip, ...).

    Defaults: vision tower r=8, projector r=16, language model r=16; ``lm_head`` excluded.
    """

    vision: ModalityGroup = field(default_factory=lambda: ModalityGroup(r=8))
    projector: ModalityGroup = field(default_factory=lambda: ModalityGroup(r=16))
    language: ModalityGroup = field(default_factory=lambda: ModalityGroup(r=16))
    grit: GritConfig = field(default_factory=GritConfig)
    lora_dropout: float = 0.0
    exclude_modules: Sequence[str] = ("lm_head",)

    def group(self, name: str) -> ModalityGroup:
        return getattr(self, name)


def modality_group(name: str) -> str:
    """``"vision"``, ``"projector"`` or ``"language"`` for a module name."""
    if any(m in name for m in PROJECTOR_MARKERS):
        return "projector"
    if any(m in name for m in VISION_MARKERS):
        return "vision"
    return "language"


def _group_linears(model: nn.Module, config: VLMGritConfig) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {g: [] for g in GROUPS}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not name:
            continue
        leaf = name.split(".")[-1]
        if any(name == e or name.endswith("." + e) or leaf == e for e in config.exclude_modules):
            continue
        group = modality_group(name)
        spec = config.group(group)
        if not spec.enabled or (spec.target_modules is not None and leaf not in spec.target_modules):
            continue
        found[group].append(name)
    return found


def _load(model_or_path, kwargs):
    if isinstance(model_or_path, nn.Module):
        if kwargs:
            raise TypeError(f"from_pretrained keyword arguments given with a model object: {sorted(kwargs)}")
        return model_or_path
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(model_or_path, **kwargs)


class GroupedGritPreconditioner(Preconditioner):
    """One :class:`GritPreconditioner` per modality group, composed behind the :class:`Preconditioner`
    contract (:mod:`grit_kernels.interface`): each method runs on every group.

    Attributes:
        groups: ``{group: GritPreconditioner}`` (groups without modules are absent).
        group_modules: ``{group: [module names]}`` -- the report of which layers each group holds.
        modules: all groups' modules (each ``index`` is within its group's bank).
        config: the shared base config (what the optimizer reads: ``nonfinite_grads``, KL-clip mode).

    :class:`GritOptimizer` and :class:`GritTrainer` accept any :class:`Preconditioner`; FSDP2-sharded LoRA
    weights are refused here (one bank per group is not reduced across ranks).
    """

    def __init__(self, model: nn.Module, configs: dict[str, GritConfig], base: GritConfig | None = None):
        if not configs:
            raise ValueError("GroupedGritPreconditioner needs at least one group")
        self.groups = {name: GritPreconditioner(model, cfg) for name, cfg in configs.items()}
        self.config = base if base is not None else next(iter(configs.values()))
        self.group_modules = {g: [m.name for m in p.modules] for g, p in self.groups.items()}
        if any(p.sharded_layout is not None for p in self.groups.values()):
            raise NotImplementedError(
                "per-modality GRIT groups under FSDP2 are not supported; use one GritPreconditioner (a plain "
                "GritConfig) with FSDP2, or DDP with the modality groups"
            )
        self._removed = False

    # ------------------------------------------------------------------ attributes, derived from the groups
    @property
    def modules(self):
        return [m for p in self.groups.values() for m in p.modules]

    @property
    def sharded_layout(self):
        """Always ``None``: sharded groups are refused at construction."""
        return None

    @property
    def num_modules(self) -> int:
        return sum(p.num_modules for p in self.groups.values())

    @property
    def skipped(self):
        return {k: v for p in self.groups.values() for k, v in p.skipped.items()}

    @property
    def bank_owner(self) -> GritPreconditioner:
        """The language group (else the first group): its bank and backend stand for the whole."""
        return self.groups.get("language", next(iter(self.groups.values())))

    @property
    def bank(self):
        """The language group's bank (else the first group's): device and refresh count for callers that
        expect one bank. Each group's bank is ``groups[name].bank``."""
        return self.bank_owner.bank

    @property
    def backend(self):
        return self.bank_owner.backend

    @property
    def step_count(self) -> int:
        return self.bank_owner.step_count

    @property
    def rank_adapter(self):
        adapters = [p.rank_adapter for p in self.groups.values() if p.rank_adapter is not None]
        return _AllAdapters(adapters) if adapters else None

    @property
    def preconditioning_active(self) -> bool:
        return any(p.preconditioning_active for p in self.groups.values())

    # ------------------------------------------------------------------ the step
    def parameters(self) -> list[nn.Parameter]:
        return [q for p in self.groups.values() for q in p.parameters()]

    def check_active_adapter(self) -> None:
        for p in self.groups.values():
            p.check_active_adapter()

    def step(self, lr=None, loss_scale=None) -> None:
        """Each group's step (fold, refresh at its own ``update_freq``, precondition with its damping)."""
        self._check_not_removed()
        for p in self.groups.values():
            p.step(lr=lr, loss_scale=loss_scale)

    def update_factors(self, loss_scale=None) -> None:
        self._check_not_removed()
        for p in self.groups.values():
            p.update_factors(loss_scale=loss_scale)

    def discard_step(self) -> None:
        for p in self.groups.values():
            p.discard_step()

    def snapshot_adapters(self) -> list[torch.Tensor]:
        return [t for p in self.groups.values() for t in p.snapshot_adapters()]

    def clip_update_(self, before: list[torch.Tensor]) -> None:
        start = 0
        for p in self.groups.values():
            n = len(p.parameters())
            p.clip_update_(before[start : start + n])
            start += n

    # ------------------------------------------------------------------ observability
    def curvature_summary(self) -> dict[str, torch.Tensor]:
        """Over all groups: mean damping and traces (module-weighted), max condition, summed failures."""
        parts = {g: p.curvature_summary() for g, p in self.groups.items()}
        weights = {g: float(p.num_modules) for g, p in self.groups.items()}
        total = sum(weights.values())
        out = {}
        for key in ("damping_mean", "trace_forward_mean", "trace_backward_mean"):
            out[key] = sum(parts[g][key] * (weights[g] / total) for g in parts)
        out["condition_max"] = torch.stack([parts[g]["condition_max"] for g in parts]).max()
        out["inverse_failures"] = sum(parts[g]["inverse_failures"] for g in parts)
        return out

    def group_summaries(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{group: curvature_summary()}`` (device tensors; the Trainer logs them as ``grit/<group>/...``)."""
        return {g: p.curvature_summary() for g, p in self.groups.items()}

    # ------------------------------------------------------------------ state and lifetime
    def state_dict(self) -> dict:
        return {"groups": {g: p.state_dict() for g, p in self.groups.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._check_not_removed()
        if set(state.get("groups", {})) != set(self.groups):
            raise ValueError(
                f"GroupedGritPreconditioner.load_state_dict: groups {sorted(state.get('groups', {}))} "
                f"do not match {sorted(self.groups)}"
            )
        for g, p in self.groups.items():
            p.load_state_dict(state["groups"][g])

    def remove(self) -> None:
        for p in self.groups.values():
            p.remove()
        self._removed = True

    def _check_not_removed(self) -> None:
        if self._removed:
            raise RuntimeError("this GroupedGritPreconditioner was removed; create a new one")

    def __repr__(self) -> str:
        sizes = ", ".join(f"{g}={p.num_modules}" for g, p in self.groups.items())
        return f"GroupedGritPreconditioner({sizes})"


class _AllAdapters:
    def __init__(self, adapters):
        self.adapters = adapters

    def after_step(self, optimizer=None) -> None:
        for a in self.adapters:
            a.after_step(optimizer)


def create_vlm_grit_adapter(model_or_path, config: VLMGritConfig | None = None, **from_pretrained_kwargs):
    """Wrap a vision-language model with per-modality LoRA and a grouped GRIT preconditioner.

    Args:
        model_or_path: a ``transformers`` VLM (LLaVA-, Idefics3-, Qwen2-VL-style) or a local path /
            hub name loaded with ``AutoModelForImageTextToText.from_pretrained(path, **from_pretrained_kwargs)``.
        config: :class:`VLMGritConfig` (defaults if ``None``), or grit-vlm's
            :class:`~grit_kernels.compat.GRITLoRAConfig` (one rank/alpha for every group).

    Returns:
        ``(peft_model, preconditioner)``: the PEFT model (``rank_pattern`` / ``alpha_pattern`` per layer)
        and a :class:`GroupedGritPreconditioner`; ``preconditioner.group_modules`` lists each group's
        layers. Use ``GritOptimizer(torch.optim.AdamW(peft_model.parameters()), preconditioner)`` or
        ``GritTrainer(model=peft_model, grit_preconditioner=preconditioner, ...)``.
    """
    from peft import LoraConfig, get_peft_model

    config = config if config is not None else VLMGritConfig()
    if hasattr(config, "to_vlm_config"):  # grit_kernels.compat.GRITLoRAConfig (grit-vlm's config)
        config = config.to_vlm_config()
    if not isinstance(config, VLMGritConfig):
        raise TypeError(f"config must be a VLMGritConfig, got {type(config).__name__}")
    model = _load(model_or_path, from_pretrained_kwargs)
    grouped = _group_linears(model, config)
    names = [n for g in GROUPS for n in grouped[g]]
    if not names:
        raise ValueError("create_vlm_grit_adapter: no nn.Linear layer found in any enabled modality group")
    group_of = {n: g for g in GROUPS for n in grouped[g]}
    order = sorted(
        names, key=lambda n: (-len(n), n)
    )  # PEFT matches pattern keys as suffixes, first match wins
    base_group = config.language if grouped["language"] else config.group(group_of[names[0]])
    lora = LoraConfig(
        r=base_group.r,
        lora_alpha=base_group.alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(names),
        rank_pattern={n: config.group(group_of[n]).r for n in order},
        alpha_pattern={n: config.group(group_of[n]).alpha for n in order},
    )
    peft_model = get_peft_model(model, lora)
    configs = {}
    for g in GROUPS:
        if not grouped[g]:
            continue
        spec = config.group(g)
        changes = {"target_modules": tuple(grouped[g])}
        if spec.damping is not None:
            changes["damping"] = spec.damping
        if spec.update_freq is not None:
            changes["update_freq"] = spec.update_freq
        configs[g] = dataclasses.replace(config.grit, **changes)
    return peft_model, GroupedGritPreconditioner(peft_model, configs, base=config.grit)


__all__ = [
    "GROUPS",
    "GroupedGritPreconditioner",
    "ModalityGroup",
    "VLMGritConfig",
    "create_vlm_grit_adapter",
    "modality_group",
]
