"""GRIT done the prior way: a faithful model of how published GRIT code preconditions LoRA.

This is the ``grit-prior`` arm of ``grit-kernels bench e2e`` (:mod:`grit_kernels.bench.e2e`). It runs the same rank-space K-FAC math
as :class:`grit_kernels.GritPreconditioner` (same factors, scale normalisation, EMA, relative
damping, warm-up) but engineered the way the published GRIT implementation and its derivatives do
it (docs/design.md §8 "the per-module way" column, §11):

* **Module hooks, per LoRA module.** A forward hook on every ``lora_A`` keeps ``h = A x~``; a full
  backward hook on every ``lora_B`` receives ``delta = dL/dh`` (the gradient w.r.t. ``lora_B``'s
  input) and adds the Gram matrices of ``h`` and ``delta``. That is ``2 x M`` Python hook calls per
  micro-batch, plus the ``BackwardHookFunction`` nodes autograd inserts for full backward hooks
  (which also keep extra tensors alive: the arm's peak memory is higher). Like ours, only rows whose
  ``delta`` is non-zero are counted (padding and the last position of a sequence carry none).
* **Statistics stored in fp16.** Each micro-batch's normalised Gram matrices are cast to fp16 and
  accumulated in fp16 buffers; the EMA factors are kept in fp16 too. (Here they are normalised per
  micro-batch -- ``h^T h / n`` and ``n * delta^T delta`` -- so they are O(1) and do not underflow;
  raw ``sum delta delta^T`` of a mean loss underflows to 0 in fp16, the bug docs/design.md §11 recalls.)
* **Per-module CPU inversion with device-host copies.** Every ``update_freq`` steps each factor is
  copied to the host, inverted there with ``torch.linalg.inv`` (damping from its trace) and copied
  back, one module at a time.
* **``.item()`` per module per step.** The EMA fold checks each module's statistics for NaN/Inf
  with a host read (a device synchronisation on GPUs), module by module.
* **Per-module preconditioning.** Two small matmuls per module in a Python loop (``2 x M`` launches).

What it does *not* copy by default is the published **factor pairing**: that code preconditions
``lora_A``'s gradient with the forward factor ``H = E[h h^T]`` and ``lora_B``'s with the backward
factor ``D = E[delta delta^T]`` -- the wrong way round (docs/design.md §2: the update then is not
reparametrisation invariant). ``pairing="published"`` reproduces it; the default ``"correct"`` uses
the right pairing so the speed comparison runs identical math. The pairing costs nothing in time.

Other bookkeeping differences, kept because they are how hook-based code behaves:
* The micro-batch statistics are averaged over micro-batches (not weighted by rows), and the
  ``1/grad_accum`` a training loop puts on the loss is not divided out of ``D``; with one
  micro-batch per step the factors equal :class:`~grit_kernels.bank.FactorBank`'s (to fp16
  precision), which ``tests/test_cli.py`` checks.
* Under activation checkpointing the forward hook fires again in the recomputation and overwrites
  the kept ``h`` (harmless here, a double count in code that adds the statistic in the forward hook).
* No AMP loss-scale handling, no KL-clip, failures of the inversion raise on the host.
"""

from __future__ import annotations

import torch
from torch import nn

PAIRINGS = ("correct", "published")
ZERO_ROW_TOLERANCE = 1e-6  # as grit_kernels.layers: rows with |delta| below this x the largest carry no gradient


class _PriorModule:
    """Hook state and fp16 statistics of one LoRA module."""

    def __init__(self, name: str, lora_A: nn.Linear, lora_B: nn.Linear):
        self.name = name
        self.lora_A, self.lora_B = lora_A, lora_B
        r = lora_A.weight.shape[0]
        dev = lora_A.weight.device
        self.rank = r
        self.sum_forward = torch.zeros(r, r, dtype=torch.float16, device=dev)  # sum_k h_k^T h_k / n_k
        self.sum_backward = torch.zeros(r, r, dtype=torch.float16, device=dev)  # sum_k n_k delta_k^T delta_k
        self.micro_batches = 0
        self.saved_h: torch.Tensor | None = None
        self.forward_factor: torch.Tensor | None = None  # H, fp16
        self.backward_factor: torch.Tensor | None = None  # D, fp16
        self.inv_forward = torch.eye(r, device=dev)
        self.inv_backward = torch.eye(r, device=dev)
        self.handles: list = []


class PriorArtGrit:
    """Rank-space K-FAC the prior way, for every PEFT LoRA layer of ``model``.

    Usage mirrors ours: ``prior = PriorArtGrit(model)``; after ``loss.backward()`` call
    ``prior.step()`` and then the inner optimizer's ``step()``. ``prior.remove()`` drops the hooks.
    """

    def __init__(
        self,
        model: nn.Module,
        update_freq: int = 10,
        damping: float = 1e-3,
        eps_abs: float = 1e-12,
        ema_decay: float = 0.95,
        warmup_steps: int = 10,
        pairing: str = "correct",
    ):
        if pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
        from peft.tuners.lora.layer import LoraLayer

        self.update_freq, self.damping, self.eps_abs = update_freq, damping, eps_abs
        self.ema_decay, self.warmup_steps, self.pairing = ema_decay, warmup_steps, pairing
        self.step_count = 0
        self.modules: list[_PriorModule] = []
        for name, layer in model.named_modules():
            if not isinstance(layer, LoraLayer) or not hasattr(layer, "lora_A"):
                continue
            adapter = layer.active_adapters[0]
            if adapter not in layer.lora_A:
                continue
            mod = _PriorModule(name, layer.lora_A[adapter], layer.lora_B[adapter])
            mod.handles.append(mod.lora_A.register_forward_hook(self._forward_hook(mod)))
            mod.handles.append(mod.lora_B.register_full_backward_hook(self._backward_hook(mod)))
            self.modules.append(mod)
        if not self.modules:
            raise ValueError("PriorArtGrit found no PEFT LoRA layer")

    @property
    def num_modules(self) -> int:
        return len(self.modules)

    # ---------------------------------------------------------------- hooks (2 per module)
    @staticmethod
    def _forward_hook(mod: _PriorModule):
        def hook(module, inputs, h):
            if module.training and torch.is_grad_enabled():
                mod.saved_h = h.detach()  # kept alive until the backward hook (activation memory)

        return hook

    @staticmethod
    def _backward_hook(mod: _PriorModule):
        def hook(module, grad_input, grad_output):
            delta, h = grad_input[0], mod.saved_h
            mod.saved_h = None
            if delta is None or h is None:
                return
            r = delta.shape[-1]
            h, delta = h.reshape(-1, r).float(), delta.reshape(-1, r).float()
            # the same rows as FactorBank: those whose delta is not zero (padding, last positions carry none)
            row_max = delta.abs().amax(dim=1)
            carries = (row_max > ZERO_ROW_TOLERANCE * row_max.amax()).float()
            n = carries.sum().clamp_min(1.0)
            h = h * carries[:, None]
            mod.sum_forward += (h.T @ h / n).half()
            mod.sum_backward += (delta.T @ delta * n).half()
            mod.micro_batches += 1

        return hook

    # ---------------------------------------------------------------- the step
    def step(self) -> None:
        """EMA fold, per-module host inversion when due, per-module preconditioning."""
        self._fold()
        since = self.step_count - self.warmup_steps
        if since >= 0:
            if since % self.update_freq == 0:
                self._invert_on_host()
            self._precondition()
        self.step_count += 1

    def _fold(self) -> None:
        beta = self.ema_decay
        for mod in self.modules:
            if mod.micro_batches == 0:
                continue
            h_step = mod.sum_forward.float() / mod.micro_batches
            d_step = mod.sum_backward.float() / mod.micro_batches
            mod.sum_forward.zero_()
            mod.sum_backward.zero_()
            mod.micro_batches = 0
            if not bool(torch.isfinite(h_step).all().item()) or not bool(torch.isfinite(d_step).all().item()):
                continue  # one host read per module per step
            if mod.forward_factor is None:
                mod.forward_factor, mod.backward_factor = h_step.half(), d_step.half()
            else:
                mod.forward_factor = (beta * mod.forward_factor.float() + (1 - beta) * h_step).half()
                mod.backward_factor = (beta * mod.backward_factor.float() + (1 - beta) * d_step).half()

    def _invert_on_host(self) -> None:
        for mod in self.modules:
            if mod.forward_factor is None:
                continue
            device = mod.forward_factor.device
            mod.inv_forward = self._damped_inverse_cpu(mod.forward_factor).to(device)
            mod.inv_backward = self._damped_inverse_cpu(mod.backward_factor).to(device)

    def _damped_inverse_cpu(self, factor: torch.Tensor) -> torch.Tensor:
        c = factor.detach().float().cpu()
        r = c.shape[0]
        lam = self.damping * c.trace().item() / r + self.eps_abs
        return torch.linalg.inv(c + lam * torch.eye(r))

    def _precondition(self) -> None:
        for mod in self.modules:
            grad_a, grad_b = mod.lora_A.weight.grad, mod.lora_B.weight.grad
            if grad_a is None or grad_b is None:
                continue
            left, right = mod.inv_backward, mod.inv_forward
            if self.pairing == "published":
                left, right = mod.inv_forward, mod.inv_backward
            grad_a.copy_(left @ grad_a.float())
            grad_b.copy_(grad_b.float() @ right)

    # ---------------------------------------------------------------- bookkeeping
    def discard_step(self) -> None:
        for mod in self.modules:
            mod.sum_forward.zero_()
            mod.sum_backward.zero_()
            mod.micro_batches = 0

    def remove(self) -> None:
        for mod in self.modules:
            for handle in mod.handles:
                handle.remove()
            mod.handles.clear()


class PriorArtGritOptimizer:
    """``prior.step()`` then the inner optimizer's step; ``zero_grad`` passes through.

    Prior code called its preconditioner from the training loop (or a Trainer callback) before
    ``optimizer.step()``; this tiny wrapper is that call, nothing more.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, prior: PriorArtGrit):
        self.optimizer, self.prior = optimizer, prior

    def step(self) -> None:
        self.prior.step()
        self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
