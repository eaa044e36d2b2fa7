"""Capture for the large-factor K-FAC models: each LoRA layer's input ``x`` and output gradient ``g``.

On PEFT's path by hooks on ``lora_A`` (input ``x``) and ``lora_B`` (output gradient); under
:func:`grit_kernels.fuse` inside the fused blocks' backward, which have both (``capture_output_gradient``).

Memory under activation checkpointing: both large-factor options need each LoRA layer's input ``x`` in backward.
Without checkpointing (and under reentrant checkpointing) they hold it from forward to backward, as autograd
does anyway; under non-reentrant ``torch.utils.checkpoint`` (transformers' default) they hold nothing after
forward and take ``x`` from the recomputation in backward, so checkpointing keeps its savings
(``_checkpoint_phase`` tells the two apart).
"""

from __future__ import annotations

import torch

from ..layers import ZERO_ROW_TOLERANCE


class _LargeFactorCapture:
    """The capture half of :class:`~grit_kernels.fisher.large_factor._LargeFactorKFAC`: hooks that hand each
    module's ``x [..., d_in]`` and ``grad [..., d_out]`` (with the weight of its output-side sums) to
    ``_accumulate``, which a subclass implements, and count the rows that carry gradient in ``rows``."""

    def __init__(self, preconditioner):
        self.pre = preconditioner
        self.rows = torch.zeros(len(preconditioner.modules), device=preconditioner.bank.device)
        self._inputs: dict[int, torch.Tensor | None] = {}  # module -> x from its forward (None: recomputed later)
        self._meeting: dict[tuple[int, int], tuple] = {}  # (backward, module) -> the first of x / (g, weight)
        self._handles = []

    def _register_hooks(self) -> None:
        """Hooks on PEFT's ``lora_A`` / ``lora_B`` (PEFT's path), and the module's entry in its layer's GRIT state
        that the fused blocks of :func:`grit_kernels.fuse` look up (they call :meth:`capture_output_gradient`)."""
        for m in self.pre.modules:
            adapter = m.layer.active_adapters[0]
            self._handles.append(m.layer.lora_A[adapter].register_forward_hook(self._input_hook(m.index)))
            self._handles.append(m.layer.lora_B[adapter].register_forward_hook(self._output_hook(m)))
            m.layer._grit_state["large_factors"] = (self, m.index)

    def capture_output_gradient(self, index: int, x: torch.Tensor, grad: torch.Tensor) -> None:
        """Add module ``index``'s sums from its LoRA input ``x [..., d_in]`` and the gradient of its whole
        output ``grad = dL/dy [..., d_out]`` (what a fused block has in backward; PEFT's path gets these from
        the hooks)."""
        self._capture(index, x, grad, 1.0)

    # Under non-reentrant activation checkpointing the forward of a checkpointed block drops its activations and
    # backward recomputes them. Holding x from that forward would keep what checkpointing frees, so there the
    # input hook only notes the module (None) and takes x from the recomputation, which runs in backward around
    # the time g arrives: whichever of the two comes second is captured with the first (keyed by the running
    # backward, so micro-batches never mix). The recomputed graph is never backpropagated: no hook on it.
    def _input_hook(self, index: int):
        def hook(module, args, output):
            if not (torch.is_grad_enabled() and output.requires_grad):
                return
            phase = _checkpoint_phase()
            if phase == "recompute":
                self._meet(index, x=args[0].detach())
            else:
                self._inputs[index] = None if phase == "forward" else args[0].detach()

        return hook

    def _output_hook(self, m):
        def hook(module, args, output):
            if not (torch.is_grad_enabled() and output.requires_grad) or _checkpoint_phase() == "recompute":
                return
            if m.index not in self._inputs:
                return
            x = self._inputs.pop(m.index)
            weight = 1.0 / float(m.layer.scaling[m.layer.active_adapters[0]]) ** 2
            if x is None:
                output.register_hook(lambda grad: self._meet(m.index, grad=(grad, weight)))
            else:
                output.register_hook(lambda grad: self._capture(m.index, x, grad, weight))

        return hook

    def _meet(self, index: int, x: torch.Tensor | None = None, grad: tuple | None = None) -> None:
        """A recomputed ``x`` or an output gradient ``(g, weight)`` of module ``index`` (in backward): capture
        when its partner from the same backward is here, else wait for it."""
        key = (torch._C._current_graph_task_id(), index)
        partner = self._meeting.pop(key, None)
        if partner is None:
            self._meeting[key] = (x,) if x is not None else grad
        elif x is not None:
            self._capture(index, x, *partner)
        else:
            self._capture(index, partner[0], *grad)

    def _capture(self, index: int, x: torch.Tensor, grad: torch.Tensor, weight: float) -> None:
        """``x [..., d_in]``: the layer's LoRA input (after dropout); ``grad [..., d_out]``: the gradient of
        lora_B's output, ``g = grad / scaling`` so the output-side sums take ``weight = 1 / scaling^2``. Rows
        whose gradient is zero (padding, masked labels) do not count and contribute no ``x``."""
        x, grad = x.reshape(-1, x.shape[-1]).float(), grad.reshape(-1, grad.shape[-1]).float()
        row_norm = torch.linalg.vector_norm(grad, dim=1)  # (the 2-norm: 5x faster than abs().amax() on CPU)
        carries = (row_norm > ZERO_ROW_TOLERANCE * row_norm.amax()).float()
        self._accumulate(index, x, grad, carries, weight)
        self.rows[index] += carries.sum()

    def _accumulate(self, index: int, x: torch.Tensor, grad: torch.Tensor, carries: torch.Tensor, weight: float) -> None:
        """Add this micro-batch's sums: ``x [N, d_in]`` (rows to count where ``carries [N]`` is 1),
        ``grad [N, d_out]`` (every row; zero rows add nothing) weighted by ``weight``."""
        raise NotImplementedError

    def remove(self) -> None:
        """Take the hooks off the model and the module entries out of the layers' GRIT state."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for m in self.pre.modules:
            m.layer.__dict__.get("_grit_state", {}).pop("large_factors", None)


def _checkpoint_phase() -> str | None:
    """``"forward"`` inside the forward of a block under non-reentrant ``torch.utils.checkpoint`` (its saved
    tensors go to the checkpoint's hooks and are recomputed in backward), ``"recompute"`` inside that
    recomputation, else None (plain forward, reentrant checkpointing). Read from the innermost saved-tensor hooks
    (a private torch API: without it, None, and x is held as without checkpointing)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    hooks = top(False) if top is not None else None
    name = getattr(hooks[0], "__qualname__", "") if hooks else ""
    if name.startswith("_checkpoint_hook."):
        return "forward"
    if name.startswith("_recomputation_hook."):
        return "recompute"
    return None
