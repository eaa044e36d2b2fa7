"""Statistics-capturing LoRA path and the patching of PEFT LoRA layers.

A patched layer computes ``y = base(x) + s * B(h)``, ``h = A(dropout(x))``, with a gradient pre-hook on the
autograd node that made ``h`` (:meth:`CaptureSlot.watch`; under ``torch.compile`` the identity autograd Function
:class:`RankStatsCapture` instead). It receives ``delta = dL/dh`` (the rank-space gradient autograd forms
anyway) and adds both ``h^T h`` and ``delta^T delta`` (fp32) to the
module's bank slice, over the rows that carry gradient (padding has ``delta = 0`` and is left out). Capturing *both* statistics in backward means a micro-batch is counted exactly
once: forwards without backward (evaluation, the no-grad first pass of reentrant activation
checkpointing) add nothing, and a recomputed forward only regenerates saved tensors.

Supported: PEFT ``lora.Linear`` over ``nn.Linear`` and the bitsandbytes ``Linear4bit`` /
``Linear8bitLt`` LoRA layers, one active adapter, any dropout, rsLoRA. Everything else is reported
by :func:`unsupported_reason` and left alone.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch
from torch import nn

from . import ops
from .ops.statistics import rank_statistics, torch_accumulate_rank_statistics_

ZERO_ROW_TOLERANCE = 1e-6  #: a row of delta below this fraction of the micro-batch's largest is "no gradient"


class CaptureSlot:
    """Where one module's statistics go: views into the :class:`~grit_kernels.bank.FactorBank`.

    With ``bank`` and ``index`` given (what :class:`~grit_kernels.GritPreconditioner` does), backward
    only *records* ``(h, delta)`` and :data:`RECORDER` forms every module's mask and Grams in one
    op at the end of backward; without them, :meth:`capture` runs at once (per module).
    """

    __slots__ = ("backend", "backward_stat", "bank", "forward_stat", "index", "rows")

    def __init__(
        self,
        forward_stat: torch.Tensor,
        backward_stat: torch.Tensor,
        rows: torch.Tensor,
        backend: str,
        bank: Any = None,
        index: int | None = None,
    ):
        self.forward_stat, self.backward_stat, self.rows, self.backend = (
            forward_stat,
            backward_stat,
            rows,
            backend,
        )
        self.bank, self.index = bank, index

    def capture(self, h: torch.Tensor, delta: torch.Tensor) -> None:
        """Add ``sum h h^T``, ``sum delta delta^T`` and the row count over rows that carry gradient.

        Rows whose ``delta`` is zero -- padding, positions no loss term reaches -- are left out of ``H``
        and of the count, so the factors do not depend on how a batch is padded. "Zero" means a norm
        ``|delta_t|`` below ``ZERO_ROW_TOLERANCE`` times the micro-batch's largest: a gradient that is zero in
        exact arithmetic (query of position 0, whose softmax is over one key) comes out of the attention
        kernels as rounding noise ~1e-8 of the signal, and must be counted the same way whatever the
        batch split. Decided on the device (a mask), no host sync.
        """
        r = h.shape[-1]
        h, delta = h.reshape(-1, r), delta.reshape(-1, r)
        row_sq = (delta * delta).sum(dim=1)
        carries = row_sq > ZERO_ROW_TOLERANCE**2 * row_sq.amax()
        ops.accumulate_gram_(self.forward_stat, h * carries[:, None], backend=self.backend)
        ops.accumulate_gram_(self.backward_stat, delta, backend=self.backend)
        self.rows.add_(carries.sum())

    def watch(self, h: torch.Tensor) -> None:
        """Record ``(h, dL/dh)`` when backward reaches ``h`` (eager mode; ``h`` must have a ``grad_fn``).

        The cheap form of :class:`RankStatsCapture` (no extra autograd node): a pre-hook on the node that
        made ``h`` (about 4 us cheaper per module and micro-batch to register than a tensor hook on ``h``)
        holds a detached alias of ``h`` (storage lora_B's product saves anyway; no reference cycle through
        ``h.grad_fn``) and hands it with ``delta`` to :data:`RECORDER` (one Python call; the Grams are formed
        at the end of backward). Without a bank: a tensor hook that captures at once.
        """
        values = h.detach()
        if self.bank is None:
            h.register_hook(lambda delta: self.capture(values, delta))
        else:
            h.grad_fn.register_prehook(
                functools.partial(RECORDER.record_output, self.bank, (self.index,), values, h.output_nr)
            )

    def record(self, h: torch.Tensor, delta: torch.Tensor) -> None:
        """Batched :meth:`capture`: deferred to the end of backward when the slot knows its bank."""
        if self.bank is None:
            self.capture(h, delta)
        else:
            RECORDER.record(self.bank, (self.index,), h, delta)


class StatsRecorder:
    """Collects the rank-space statistics of many modules during one backward and adds them to the bank
    when that backward ends, with one op per bank.

    :meth:`record` only keeps ``(h, delta)``; at the end of backward :meth:`flush` forms every mask and
    Gram: on the CPU with one :func:`grit_kernels.ops.accumulate_rank_statistics_many_` call (one C++ op
    over all modules with the ``cpp`` backend, parallel over modules; the backend is the bank's
    ``backend`` attribute, set by :class:`~grit_kernels.GritPreconditioner`), elsewhere with one batched
    pass per ``(bank, rank, rows)`` group. On the CPU the statistics are the same bit for bit as those of
    one :func:`grit_kernels.ops.accumulate_rank_statistics_` call per record (each module's Grams are formed
    on their own). The flush is queued on the running backward with the autograd engine's final-callback
    hook (``Variable._execution_engine.queue_callback``), so it runs once per ``backward()`` call (under
    reentrant activation checkpointing: once per recomputed segment); a backward that raised leaves its
    records to the next flush. Called outside a backward, :meth:`record` adds at once. With
    ``eager_grams=True`` every record is added at once (one op per record); ``batched=True`` / ``False``
    forces the batched pass / the per-module op on every device.

    Under ``torch.compile`` (dynamo traces the backward of :class:`RankStatsCapture` and of the fused
    Functions into the compiled backward graph) there is no Python state to keep: :meth:`record`
    forms the Grams with the same ops and adds them into bank views in place, inside that graph.
    """

    def __init__(self, eager_grams: bool = False, batched: bool | None = None):
        self._pending: list = []
        self._queued = False  #: a flush is queued on the backward ``_queued_task``
        self._queued_task = -1
        self.eager_grams = eager_grams  #: add to the bank at record time (one op per record)
        self.batched = batched  #: flush with the batched torch pass (None: on non-CPU devices)

    def record(self, bank: Any, indices: tuple[int, ...], h: torch.Tensor, delta: torch.Tensor) -> None:
        """Queue ``h, delta [..., len(indices) * r]`` (rows: the leading dims; modules side by side, equal rank)
        of bank ``indices`` for the flush at the end of the running backward (at once outside a backward)."""
        if torch.compiler.is_compiling():  # traced (torch.compile): no Python state, add at once
            torch_accumulate_rank_statistics_(bank.stat_sum, bank.rows, indices, h, delta, ZERO_ROW_TOLERANCE)
            return
        self._pending.append((bank, indices, h, delta))
        if self.eager_grams:
            self.flush()
            return
        task = torch._C._current_graph_task_id()
        if self._queued and (task < 0 or task == self._queued_task):
            return
        if task < 0:  # not inside a backward pass
            self.flush()
            return
        torch.autograd.Variable._execution_engine.queue_callback(self.flush)
        self._queued, self._queued_task = True, task

    def record_output(
        self, bank: Any, indices: tuple[int, ...], h: torch.Tensor, output_nr: int, grads: tuple
    ) -> None:
        """:meth:`record` as a pre-hook of the autograd node that made ``h`` (its output ``output_nr``):
        ``grads[output_nr]`` is ``dL/dh``; ``None`` (no gradient reached ``h``) records nothing."""
        delta = grads[output_nr]
        if delta is not None:
            self.record(bank, indices, h, delta)

    def flush(self) -> None:
        """Form and add every pending statistic (a no-op when nothing is pending)."""
        pending, self._pending, self._queued = self._pending, [], False
        if not pending:
            return
        banks: dict = {}
        for bank, indices, h, delta in pending:
            banks.setdefault((id(bank), h.device), (bank, []))[1].append((indices, h, delta))
        for (_, device), (bank, items) in banks.items():
            if not (self.batched if self.batched is not None else device.type != "cpu"):
                ops.accumulate_rank_statistics_many_(
                    bank.stat_sum, bank.rows, items, ZERO_ROW_TOLERANCE, backend=getattr(bank, "backend", "auto")
                )
            else:
                self._flush_batched(bank, items)

    @staticmethod
    def _flush_batched(bank: Any, items: list) -> None:
        """One :func:`rank_statistics` pass per ``(rank, rows)`` group (CUDA: a handful of launches)."""
        groups: dict = {}
        for indices, h, delta in items:
            h, delta = h.reshape(-1, h.shape[-1]), delta.reshape(-1, delta.shape[-1])
            groups.setdefault((h.shape[1] // len(indices), h.shape[0]), []).append((indices, h, delta))
        for (r, n), group in groups.items():
            group.sort(key=lambda item: item[0][0])
            indices = tuple(i for item in group for i in item[0])
            h = torch.cat([item[1] for item in group], dim=1) if len(group) > 1 else group[0][1]
            delta = torch.cat([item[2] for item in group], dim=1) if len(group) > 1 else group[0][2]
            grams, rows = rank_statistics(h.reshape(n, -1, r), delta.reshape(n, -1, r), ZERO_ROW_TOLERANCE)
            bank.add_statistics_(indices, grams, rows)


RECORDER = StatsRecorder()  #: the process-wide recorder used by patched and fused LoRA layers


class RankStatsCapture(torch.autograd.Function):
    """Identity on ``h [..., r]``; its backward records ``sum h h^T`` and ``sum delta delta^T``."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, slot: CaptureSlot) -> torch.Tensor:
        ctx.slot = slot
        ctx.save_for_backward(h)
        return h.view_as(h)

    @staticmethod
    def backward(ctx: Any, delta: torch.Tensor):
        (h,) = ctx.saved_tensors
        ctx.slot.record(h, delta)
        return delta, None


def _supported_classes() -> tuple[type, ...]:
    from peft.tuners.lora import layer as lora_layer

    classes: list[type] = [lora_layer.Linear]
    try:
        from peft.tuners.lora import bnb as lora_bnb

        classes += [getattr(lora_bnb, n) for n in ("Linear4bit", "Linear8bitLt") if hasattr(lora_bnb, n)]
    except Exception:  # bitsandbytes missing or broken: plain LoRA still works
        pass
    return tuple(classes)


def is_lora_layer(module: nn.Module) -> bool:
    from peft.tuners.lora.layer import LoraLayer

    return isinstance(module, LoraLayer)


def unsupported_reason(module: nn.Module) -> str | None:
    """``None`` if GRIT can precondition this PEFT LoRA layer, else what is wrong and what to change."""
    kind = type(module).__name__
    if not isinstance(module, _supported_classes()):
        return f"{kind} LoRA is not supported (only Linear / bnb Linear4bit / Linear8bitLt LoRA layers)"
    adapters = list(module.active_adapters)
    if len(adapters) != 1:
        return f"{len(adapters)} active adapters {adapters}; activate exactly one (model.set_adapter(name))"
    adapter = adapters[0]
    if adapter not in module.lora_A:
        return f"active adapter {adapter!r} has no LoRA weights in this layer"
    if adapter in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(adapter, False):
        return "DoRA / LoRA variants are not supported; use plain LoRA (use_dora=False)"
    if not isinstance(module.lora_A[adapter], nn.Linear) or not isinstance(module.lora_B[adapter], nn.Linear):
        return "lora_A / lora_B are not nn.Linear"
    return None


def _grit_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The statistics-capturing PEFT LoRA forward (bound to the layer instance)."""
    state = self._grit_state
    adapter = state["adapter"]
    if (
        self.disable_adapters
        or self.merged
        or kwargs.get("adapter_names") is not None
        or list(self.active_adapters) != [adapter]
    ):
        return self._grit_previous_forward(x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    if state["quantized"] == "4bit":  # PEFT clones the bitsandbytes 4-bit output defensively; so do we
        result = result.clone()
    result_dtype = result.dtype
    lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
    autocast = torch.is_autocast_enabled()
    if not (state["quantized"] and autocast):
        x = self._cast_input_dtype(x, lora_A.weight.dtype)
    h = lora_A(self.lora_dropout[adapter](x))
    if torch.is_grad_enabled() and h.requires_grad:
        if torch.compiler.is_compiling():  # dynamo traces the Function's backward into the compiled graph
            h = RankStatsCapture.apply(h, state["slot"])
        else:
            state["slot"].watch(h)
    output = lora_B(h) * self.scaling[adapter]
    # the same dtype handling as PEFT's forward, so patched and plain layers agree bit for bit
    if state["quantized"]:
        return result + (output if autocast else output.to(result_dtype))
    return (result + output).to(result_dtype)


def _dispatch_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Instance ``forward`` of a LoRA layer that GRIT patched and/or a fused block owns.

    A fused block (:mod:`grit_kernels.fused`) puts a callable in ``_grit_fused``: called with
    ``(layer, x)`` it returns the layer's output (computed with its siblings') or ``None`` when it
    does not apply (adapters switched, extra arguments). Otherwise: the statistics-capturing path if
    a preconditioner patched the layer, else the forward the layer had before.
    """
    fused = self.__dict__.get("_grit_fused")
    if fused is not None and not args and not kwargs:
        out = fused(self, x)
        if out is not None:
            return out
    if "_grit_state" in self.__dict__:
        return _grit_forward(self, x, *args, **kwargs)
    return self._grit_previous_forward(x, *args, **kwargs)


def install_dispatch_forward(module: nn.Module) -> None:
    """Give ``module`` the instance forward :func:`_dispatch_forward` (idempotent)."""
    if "_grit_previous_forward" not in module.__dict__:
        module._grit_previous_forward = module.forward
        module.forward = types.MethodType(_dispatch_forward, module)


def release_dispatch_forward(module: nn.Module) -> None:
    """Restore the layer's previous forward once neither a preconditioner nor a fused block uses it."""
    d = module.__dict__
    if "_grit_state" in d or "_grit_fused" in d or "_grit_previous_forward" not in d:
        return
    previous = d.pop("_grit_previous_forward")
    d.pop("forward", None)
    if getattr(previous, "__func__", None) is not type(module).forward:  # someone else's instance forward
        module.forward = previous


def patch_lora_layer(module: nn.Module, slot: CaptureSlot) -> None:
    """Route ``module``'s LoRA path through :class:`RankStatsCapture` (instance-level forward)."""
    if hasattr(module, "_grit_state"):
        raise RuntimeError("this LoRA layer is already patched by a GritPreconditioner; call .remove() first")
    module._grit_state = {
        "adapter": module.active_adapters[0],
        "slot": slot,
        "quantized": {"Linear4bit": "4bit", "Linear8bitLt": "8bit"}.get(type(module).__name__),
    }
    install_dispatch_forward(module)


def unpatch_lora_layer(module: nn.Module) -> None:
    """Restore the plain PEFT forward (or the fused block's, if one owns the layer)."""
    if "_grit_state" in module.__dict__:
        del module._grit_state
        release_dispatch_forward(module)
