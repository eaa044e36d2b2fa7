"""GRIT under FSDP2 (``torch.distributed.fsdp.fully_shard``): preconditioning of row-sharded LoRA gradients.

``fully_shard`` turns every lora_A ``[r, d_in]`` and lora_B ``[d_out, r]`` into a ``DTensor`` sharded on dim 0
(rank ``k`` of ``W`` holds rows ``[k c, min(n, (k + 1) c))``, ``c = ceil(n / W)``, as ``torch.chunk``); their
gradients arrive the same way, already averaged over ranks by FSDP's reduce-scatter. GRIT's own state (the
:class:`~grit_kernels.bank.FactorBank`: statistics, factors, inverses) is replicated: the statistics are all-reduced
once per step exactly as under DDP (:func:`grit_kernels.distributed.all_reduce_statistics`, same ``1/W^2``), so
every rank folds and inverts the same matrices.

* ``grad_B <- grad_B (H + lam I)^-1`` acts on rows: each rank preconditions its local rows.
* ``grad_A <- (D + lam I)^-1 grad_A`` mixes rows: every module's local rows are packed into one buffer and
  gathered with **one** ``all_gather`` (``sum_m ceil(r_m / W) d_in_m`` floats per rank: the size of the
  adapters' A half); each rank preconditions the whole ``grad_A`` and keeps its rows. The same gather carries
  each module's partial ``|grad_B|^2``, ``|P grad_B|^2`` and ``<P grad_B, grad_B>`` over the local rows, so the
  grafting norms and the gradient KL-clip's dot product are global sums on every rank.
* The KL-clip of the step taken (:class:`~grit_kernels.GritOptimizer`'s default) needs
  ``<D Delta_A, Delta_A>``, which mixes rows too: one more gather of the ``Delta_A`` rows, carrying each rank's
  partial ``sum <Delta_B H, Delta_B>``.
* The non-finite / all-zero check of :class:`~grit_kernels.GritOptimizer` all-reduces its sum of squares
  (one float64 scalar) before reading it, so every rank skips or takes the same step.

Collectives per optimizer step: the statistics' all-reduce (as DDP), the ``grad_A`` gather, the ``Delta_A``
gather when ``kl_clip`` is set, and the scalar all-reduce of the gradient check (unless
``nonfinite_grads="ignore"``). None per module; no host sync besides the gradient check's read (as without FSDP).

Why gather rather than keep the LoRA weights out of the sharding: ``bench/bench_fsdp_grad_a.py`` (CPU, gloo,
2 ranks, ``bench/results/cpu/fsdp_grad_a.json``) measured the ``grad_A`` gather at 8.2 ms for 1 MiB against
13.6 ms for the all-reduce of every LoRA gradient (2 MiB) that replicated adapters need, which also doubles
the adapters' and their optimizer state's memory per rank and, run at the step, comes after the Trainer's
gradient clipping (unreduced gradients); accelerate's FSDP2 shards LoRA weights with the rest anyway.

Supported: ``fisher="kfac"`` with any ``graft`` / ``kl_clip`` / damping; one 1-D mesh over all ranks (FSDP2's
default). Refused with the reason: HSDP / multi-dimensional meshes, the other Fisher options, reprojection and
rank schedules, :class:`~grit_kernels.EigenAdamW`, FSDP1, and 4-bit weights FSDP would corrupt
(:func:`check_4bit_sharding`).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from .bank import BACKWARD, FORWARD

TINY = torch.finfo(torch.float32).tiny


def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def is_sharded(t) -> bool:
    """Whether ``t`` is a ``DTensor`` (an FSDP2-sharded parameter or gradient)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a ``DTensor`` (shares its storage), else ``t`` itself."""
    return t.to_local() if is_sharded(t) else t


def check_config(config, optimizer: str = "wrap") -> None:
    """Raise ``NotImplementedError`` for the :class:`~grit_kernels.GritConfig` options (and the Trainer's
    ``grit_optimizer``) that do not run on sharded LoRA weights."""
    unsupported = [
        (config.fisher != "kfac", f"fisher={config.fisher!r} (its state is per LoRA entry or d x d; only 'kfac' is sharding-aware)"),
        (config.reprojection != "off", f"reprojection={config.reprojection!r} (it rewrites whole lora_A / lora_B tensors)"),
        (optimizer == "eigen_adamw", "grit_optimizer='eigen_adamw' (EigenAdamW rotates whole lora_A / lora_B tensors)"),
    ]
    for bad, what in unsupported:
        if bad:
            raise NotImplementedError(
                f"GRIT under FSDP2 (fully_shard) does not support {what}; use GritConfig(fisher='kfac', "
                "reprojection='off') with GritOptimizer over AdamW there (the Trainer's grit_optimizer='wrap', "
                "enable_grit(..., optimizer='wrap')), or DDP, which runs every option"
            )


class ShardedLayout:
    """Row sharding of the preconditioned LoRA weights under ``fully_shard`` (validated at construction).

    Attributes: ``group`` (process group of the mesh), ``world`` (its size), ``rank`` (this rank's index).
    """

    def __init__(self, preconditioner):
        from torch.distributed.tensor import Shard

        check_config(preconditioner.config)
        params = [(m.name, p) for m in preconditioner.modules for p in (m.lora_A, m.lora_B)]
        plain = [name for name, p in params if not is_sharded(p)]
        if plain:
            raise NotImplementedError(
                f"GRIT under FSDP2: {len(plain)} of {len(params)} LoRA weights are not sharded (e.g. {plain[0]!r}); "
                "shard all of them (fully_shard every decoder layer and the root, as accelerate does) or none"
            )
        mesh = params[0][1].device_mesh
        for name, p in params:
            if p.device_mesh is not mesh and p.device_mesh != mesh:
                raise NotImplementedError(f"GRIT under FSDP2: LoRA weights on different device meshes (e.g. {name!r})")
            if mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
                raise NotImplementedError(
                    f"GRIT under FSDP2 needs a 1-D mesh with LoRA weights sharded on dim 0 (fully_shard's default); "
                    f"{name!r} has placements {tuple(p.placements)} on a {mesh.ndim}-D mesh (HSDP and custom "
                    "shard_placement_fn are not supported): use a 1-D mesh, or DDP"
                )
        self.group = mesh.get_group()
        self.world = mesh.size()
        self.rank = mesh.get_local_rank()
        if dist.get_world_size() != self.world:
            raise NotImplementedError(
                f"GRIT under FSDP2: the mesh spans {self.world} of {dist.get_world_size()} ranks; the statistics are "
                "reduced over all ranks, so the mesh must cover them all (1-D FSDP over the world)"
            )

    def rows(self, n: int) -> tuple[int, int, int]:
        """``(chunk, first, last)``: ``torch.chunk``'s chunk size of ``n`` rows and this rank's row range."""
        chunk = math.ceil(n / self.world)
        first = min(n, self.rank * chunk)
        return chunk, first, min(n, first + chunk)

    def gather_rows(self, parts: list[torch.Tensor], full_rows: list[int], extra: torch.Tensor):
        """One ``all_gather`` of every ``parts[i]`` (this rank's rows ``[rows_i, d_i]`` of an ``[full_rows[i], d_i]``
        tensor) and of ``extra`` (1-D fp32). Returns (the whole tensors, fp32, in order; ``extra`` summed over ranks).
        """
        for p, n in zip(parts, full_rows):
            _, first, last = self.rows(n)
            if p.shape[0] != last - first:  # FSDP2 shards like torch.chunk; anything else would be mis-placed
                raise RuntimeError(
                    f"GRIT under FSDP2: a local shard has {p.shape[0]} of {n} rows, expected rows [{first}, {last}) "
                    f"of torch.chunk over {self.world} ranks; this FSDP sharding is not supported"
                )
        slots = [self.rows(n)[0] * p.shape[1] for p, n in zip(parts, full_rows)]
        size = sum(slots) + extra.numel()
        device = extra.device
        send = torch.zeros(size, dtype=torch.float32, device=device)
        views, at = [], 0
        for p, slot in zip(parts, slots):
            views.append(send[at : at + p.numel()].view(p.shape))
            at += slot
        if parts:
            torch._foreach_copy_(views, list(parts))
        send[at:].copy_(extra)
        recv = torch.empty(self.world * size, dtype=torch.float32, device=device)
        dist.all_gather_single(recv, send, group=self.group)
        recv = recv.view(self.world, size)
        whole, at = [], 0
        for p, n, slot in zip(parts, full_rows, slots):
            chunk = slot // p.shape[1] if p.shape[1] else 0
            whole.append(recv[:, at : at + slot].reshape(self.world * chunk, p.shape[1])[:n])
            at += slot
        return whole, recv[:, at:].sum(dim=0)


def sharded_layout(preconditioner) -> ShardedLayout | None:
    """The :class:`ShardedLayout` of the preconditioner's LoRA weights, or ``None`` when none is a ``DTensor``."""
    if not any(is_sharded(p) for m in preconditioner.modules for p in (m.lora_A, m.lora_B)):
        return None
    return ShardedLayout(preconditioner)


# ---------------------------------------------------------------------------------------------- batched products
def _by_shape(tensors: list[torch.Tensor]) -> dict:
    groups: dict = {}
    for i, t in enumerate(tensors):
        groups.setdefault(tuple(t.shape), []).append(i)
    return groups


def _index(bank, indices: tuple[int, ...]) -> torch.Tensor:
    """Bank rows ``indices`` as a device index tensor, made once per tuple (no upload per step)."""
    cache = bank.__dict__.setdefault("_fsdp_index_cache", {})
    if indices not in cache:
        cache[indices] = torch.tensor(indices, device=bank.device)
    return cache[indices]


def _multiply(bank, which: int, mats: torch.Tensor, tensors: list[torch.Tensor], modules: list[int], left: bool):
    """``mats[which, m_i, :r, :r] @ t_i`` (``left``) or ``t_i @ mats[...]`` in fp32, batched per shape. Returns
    ``(products, squared norms [n] of the inputs, of the products, <product, input> [n])``, all fp32."""
    n = len(tensors)
    out: list = [None] * n
    stats = torch.zeros(3, n, dtype=torch.float32, device=bank.device)
    for shape, members in _by_shape(tensors).items():
        r = shape[0] if left else shape[1]
        x = torch.stack([tensors[i] for i in members]).float()
        p = mats[which].index_select(0, _index(bank, tuple(modules[i] for i in members)))[:, :r, :r]
        y = torch.bmm(p, x) if left else torch.bmm(x, p)
        at = _index(bank, tuple(members))
        stats[0].index_copy_(0, at, x.square().sum(dim=(1, 2)))
        stats[1].index_copy_(0, at, y.square().sum(dim=(1, 2)))
        stats[2].index_copy_(0, at, (y * x).sum(dim=(1, 2)))
        for j, i in enumerate(members):
            out[i] = y[j]
    return out, stats


# ---------------------------------------------------------------------------------------------- the step
def precondition_sharded_(preconditioner, lr) -> None:
    """:meth:`GritPreconditioner._precondition_grads` on row-sharded gradients (same math: grafting per whole
    tensor, the gradient KL-clip on the global dot product). One ``all_gather`` (see the module docstring)."""
    pre, layout, bank, cfg = preconditioner, preconditioner._sharded, preconditioner.bank, preconditioner.config
    modules = [m for m in pre.modules if m.lora_A.grad is not None and m.lora_B.grad is not None]
    if not modules:
        return
    index = [m.index for m in modules]
    with torch.no_grad():
        grads_a = [local(m.lora_A.grad) for m in modules]
        grads_b = [local(m.lora_B.grad) for m in modules]
        new_b, stats_b = _multiply(bank, FORWARD, bank.inverse, grads_b, index, left=False)
        whole_a, stats_b = layout.gather_rows(grads_a, [m.lora_A.shape[0] for m in modules], stats_b.reshape(-1))
        stats_b = stats_b.view(3, -1)
        new_a, stats_a = _multiply(bank, BACKWARD, bank.inverse, whole_a, index, left=True)
        ones = torch.ones(len(modules), device=bank.device)
        ratio_a = ratio_b = ones
        if cfg.graft:  # GRIT's direction with the raw gradient's norm, per (whole) tensor
            ratio_a = stats_a[0].sqrt() / stats_a[1].sqrt().clamp_min(TINY)
            ratio_b = stats_b[0].sqrt() / stats_b[1].sqrt().clamp_min(TINY)
        scale_a, scale_b = ratio_a, ratio_b
        if cfg.kl_clip is not None and lr is not None:
            dot = (ratio_a * stats_a[2]).sum() + (ratio_b * stats_b[2]).sum()
            nu = torch.sqrt(cfg.kl_clip / (dot.abs() * lr**2).clamp_min(TINY)).clamp(max=1.0)
            scale_a, scale_b = ratio_a * nu, ratio_b * nu
        results = []
        for m, y in zip(modules, new_a):
            _, first, last = layout.rows(m.lora_A.shape[0])
            results.append(y[first:last])
        torch._foreach_mul_(results, list(scale_a.unbind()))
        torch._foreach_mul_(new_b, list(scale_b.unbind()))
        torch._foreach_copy_(grads_a + grads_b, results + new_b)


def clip_update_sharded_(preconditioner, before: list[torch.Tensor]) -> None:
    """:meth:`GritPreconditioner.clip_update_` on row-sharded adapters: ``before`` holds the local shards
    (``lora_A, lora_B`` per module, bank order). One ``all_gather`` of the ``Delta_A`` rows (and of each rank's
    partial ``sum <Delta_B H, Delta_B>``)."""
    pre, layout, bank = preconditioner, preconditioner._sharded, preconditioner.bank
    with torch.no_grad():
        params = [local(p) for p in pre.parameters()]
        delta = torch._foreach_sub(params, before)
        index = [m.index for m in pre.modules]
        _, stats_b = _multiply(bank, FORWARD, bank.factor, delta[1::2], index, left=False)
        whole_a, quad_b = layout.gather_rows(delta[0::2], [m.lora_A.shape[0] for m in pre.modules], stats_b[2].sum()[None])
        _, stats_a = _multiply(bank, BACKWARD, bank.factor, whole_a, index, left=True)
        quad = stats_a[2].sum() + quad_b[0]
        nu = torch.sqrt(pre.config.kl_clip / quad.abs().clamp_min(TINY)).clamp(max=1.0)
        torch._foreach_mul_(delta, nu)
        torch._foreach_add_(delta, before)
        torch._foreach_copy_(params, delta)


def global_sum_of_squares(local_sum: torch.Tensor, layout: ShardedLayout) -> torch.Tensor:
    """All-reduce a rank's sum of squares of its gradient shards (float64, one collective)."""
    total = local_sum.to(torch.float64).reshape(1)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=layout.group)
    return total[0]


# ---------------------------------------------------------------------------------------------- QLoRA
def _mp_param_dtypes(model: nn.Module) -> dict[int, torch.dtype | None]:
    """``{id(sharded parameter): FSDP's all-gather dtype (MixedPrecisionPolicy.param_dtype, None: its own)}``."""
    from torch.distributed.fsdp import FSDPModule

    out: dict[int, torch.dtype | None] = {}
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        group = getattr(module._get_fsdp_state(), "_fsdp_param_group", None)
        if group is None:
            continue
        for fsdp_param in group.fsdp_params:
            out[id(fsdp_param.sharded_param)] = group.mp_policy.param_dtype
    return out


def check_4bit_sharding(model: nn.Module) -> None:
    """Refuse FSDP2-sharded bitsandbytes 4-bit weights that FSDP would corrupt or bitsandbytes could not use.

    FSDP2 all-gathers a sharded 4-bit weight's packed bytes as a tensor of their storage dtype
    (``bnb_4bit_quant_storage``): a float storage is cast to ``MixedPrecisionPolicy.param_dtype`` when the two
    differ (the bytes are then garbage); an integer storage (uint8) is never cast. And the gathered weight is a
    plain tensor: bitsandbytes finds its quantisation state only on the module (``Linear4bit.quant_state``, which
    ``Params4bit(..., module=layer)`` and transformers' ``BitsAndBytesConfig`` loading set).
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # bitsandbytes not installed: no 4-bit weights
        return
    sharded = [(n, m) for n, m in model.named_modules() if isinstance(m, Linear4bit) and is_sharded(m.weight)]
    if not sharded:
        return
    dtypes = _mp_param_dtypes(model)
    for name, layer in sharded:
        if getattr(layer, "quant_state", None) is None:
            raise NotImplementedError(
                f"GRIT under FSDP2: the 4-bit weight of {name!r} is sharded but its layer has no quant_state; FSDP2 "
                "replaces bitsandbytes' Params4bit by a plain tensor, and bitsandbytes then recovers the quantisation "
                "state from the module only. Load with transformers' BitsAndBytesConfig (it registers it), or build "
                "the weight with bnb.nn.Params4bit(..., module=layer)"
            )
        storage = layer.weight.dtype
        gather = dtypes.get(id(layer.weight))
        if storage.is_floating_point and gather is not None and gather != storage:
            raise NotImplementedError(
                f"GRIT under FSDP2: {name!r} stores its 4-bit weight as {storage} (bnb_4bit_quant_storage) but FSDP's "
                f"MixedPrecisionPolicy casts it to {gather} for the all-gather, which corrupts the packed bytes. Use "
                f"BitsAndBytesConfig(bnb_4bit_quant_storage={gather}) (the FSDP-QLoRA recipe: storage = the "
                "param_dtype), or uint8 storage, which FSDP never casts"
            )


__all__ = [
    "ShardedLayout",
    "check_4bit_sharding",
    "check_config",
    "clip_update_sharded_",
    "global_sum_of_squares",
    "is_sharded",
    "local",
    "precondition_sharded_",
    "sharded_layout",
]
