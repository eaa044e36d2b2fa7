"""Optimizer-step helpers over every LoRA tensor at once: the KL-clip of the step taken, the snapshot it
needs (a copy, or a refill of buffers kept across steps), and the gradient check's sum of squares. ``cpp`` runs each as one C++ op on the CPU; the torch form
(``torch._foreach_*``, one small kernel per tensor on the CPU) runs everywhere else and under ``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._backend import kernel, resolve_backend


def _impl(op: str, tensors: Sequence[torch.Tensor], backend: str):
    if torch.compiler.is_compiling() or not tensors:  # dynamo traces the torch form (not the lru_cache lookup)
        return _TORCH_FORMS[op]
    return kernel(resolve_backend(backend, tensors[0].device), op)


def clone_tensors(tensors: Sequence[torch.Tensor], backend: str = "auto") -> list[torch.Tensor]:
    """Contiguous copies of ``tensors`` (e.g. the adapters before the inner optimizer step)."""
    return _impl("clone_tensors", tensors, backend)(list(tensors))


def copy_tensors_(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor], backend: str = "auto") -> bool:
    """``dst[i].copy_(src[i])`` for every ``i`` if every pair has one shape and dtype (and, for the ``cpp`` op, both
    are contiguous); otherwise copy nothing and return ``False``. Refills snapshot buffers kept across steps."""
    return bool(_impl("copy_tensors_", src, backend)(list(dst), list(src)))


def sum_of_squares(tensors: Sequence[torch.Tensor], backend: str = "auto") -> torch.Tensor:
    """``sum_i |t_i|^2`` as a float64 0-dim tensor on the device: NaN/Inf iff an element is, 0 iff all are."""
    return _impl("sum_of_squares", tensors, backend)(list(tensors))


def kl_clip_update_(
    params_a: Sequence[torch.Tensor],
    params_b: Sequence[torch.Tensor],
    before_a: Sequence[torch.Tensor],
    before_b: Sequence[torch.Tensor],
    factor_d: torch.Tensor,
    factor_h: torch.Tensor,
    kl_clip: float,
    backend: str = "auto",
) -> torch.Tensor:
    """KL-clip the step just taken, in place on the (detached) adapters.

    ``Delta = p - before``; ``q = sum_m <D_m Delta_A, Delta_A> + <Delta_B H_m, Delta_B>`` (leading ``r x r``
    blocks of ``factor_d, factor_h [M, R, R]``: the Fisher quadratic form, ~2 x the per-token KL of the step);
    ``p <- before + nu Delta`` with ``nu = min(1, sqrt(kl_clip / q))``.

    Args:
        params_a, params_b: ``M`` lora_A ``[r, d_in]`` and lora_B ``[d_out, r]`` tensors (modified in place).
        before_a, before_b: their values before the step (same shapes and dtypes; the torch form updates them too).
    Returns ``nu`` (0-dim float32). No host synchronisation. Oracle: :func:`grit_kernels.reference.kl_clip_update`.
    """
    if not (len(params_a) == len(params_b) == len(before_a) == len(before_b)):
        raise ValueError("kl_clip_update_: one lora_A, one lora_B and their snapshots per module")
    if factor_d.dim() != 3 or factor_d.shape != factor_h.shape or factor_d.shape[0] < len(params_a):
        raise ValueError(f"kl_clip_update_: factors must be [M, R, R], got {tuple(factor_d.shape)}, {tuple(factor_h.shape)}")
    return _impl("kl_clip_update_", params_a, backend)(
        list(params_a), list(params_b), list(before_a), list(before_b), factor_d, factor_h, float(kl_clip)
    )


def torch_clone_tensors(tensors):
    """Torch backend of :func:`clone_tensors`."""
    return list(torch._foreach_mul(tensors, 1.0))


def torch_copy_tensors_(dst, src):
    """Torch backend of :func:`copy_tensors_`."""
    if len(dst) != len(src) or any(d.shape != t.shape or d.dtype != t.dtype for d, t in zip(dst, src)):
        return False
    torch._foreach_copy_(dst, src)
    return True


def torch_sum_of_squares(tensors):
    """Torch backend of :func:`sum_of_squares` (per-tensor norms, squared and summed in float64)."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    wide = [t if t.dtype in (torch.float32, torch.float64) else t.float() for t in tensors]
    return torch.stack(torch._foreach_norm(wide)).double().square().sum()


def torch_kl_clip_update_(params_a, params_b, before_a, before_b, factor_d, factor_h, kl_clip):
    """Torch backend of :func:`kl_clip_update_` (``before_*`` are overwritten with the clipped values)."""
    from .precondition import precondition_

    params, before = [*params_a, *params_b], [*before_a, *before_b]
    m = len(params_a)
    delta = torch._foreach_sub(params, before)
    work = torch._foreach_sub(params, before)
    quad = precondition_(work[:m], work[m:], factor_d, factor_h, compute_dot=True, backend="torch")
    nu = torch.sqrt(kl_clip / quad.abs().clamp_min(torch.finfo(torch.float32).tiny)).clamp(max=1.0)
    torch._foreach_mul_(delta, nu)
    torch._foreach_add_(before, delta)
    torch._foreach_copy_(params, before)
    return nu


_TORCH_FORMS = {
    "clone_tensors": torch_clone_tensors,
    "copy_tensors_": torch_copy_tensors_,
    "sum_of_squares": torch_sum_of_squares,
    "kl_clip_update_": torch_kl_clip_update_,
}
