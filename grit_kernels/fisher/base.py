"""What every curvature model of ``GritConfig(fisher=...)`` is: the contract
:class:`~grit_kernels.GritPreconditioner` drives (:class:`CurvatureModel`) and the gradient-level KL-clip their
steps share (``_kl_clip_``)."""

from __future__ import annotations

import abc

import torch


class CurvatureModel(abc.ABC):
    """A Fisher option that takes over :meth:`GritPreconditioner.step` (``preconditioner._fisher``).

    The preconditioner calls ``step(lr=None, loss_scale=None)`` in place of its own step (it preconditions the
    LoRA gradients in place and advances ``preconditioner.step_count``), ``state_dict()`` /
    ``load_state_dict(state)`` inside its own (under ``"fisher_state"``), and, where a model has them,
    ``remove()`` (take its hooks off the model) and ``on_resize(indices)`` (the ranks of those modules
    changed, :func:`grit_kernels.compress_adapter`).
    """

    @abc.abstractmethod
    def step(self, lr=None, loss_scale=None) -> None:
        """Fold this step's statistics and precondition the LoRA gradients in place."""

    @abc.abstractmethod
    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue bit-for-bit (clones)."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output onto this model's device."""


def _kl_clip_(grads: list[torch.Tensor], raw: list[torch.Tensor], kl_clip: float | None, lr) -> None:
    """Scale the preconditioned ``grads`` by ``min(1, sqrt(kl_clip / (lr^2 |sum g_pre . g|)))`` (device)."""
    if kl_clip is None or lr is None or not grads:
        return
    dot = torch.stack([(g * r).sum() for g, r in zip(grads, raw)]).sum()
    quad = (dot.abs() * lr**2).clamp_min(torch.finfo(torch.float32).tiny)
    torch._foreach_mul_(grads, torch.sqrt(kl_clip / quad).clamp(max=1.0))
