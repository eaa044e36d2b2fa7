"""Backend choice shared by every op: ``auto`` -> Triton on CUDA tensors, torch elsewhere."""

from __future__ import annotations

import importlib
import os

import torch

from ..config import BACKENDS


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the platform
        return False
    return True


def interpreter_active() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """Return ``"torch"`` or ``"triton"`` for tensors on ``device``; raise on an impossible request."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' requested but triton is not importable")
        if device.type != "cuda" and not interpreter_active():
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors (got {device}); set TRITON_INTERPRET=1 before importing "
                "grit_kernels to run the kernels on the CPU interpreter, or use backend='torch'"
            )
    return backend


def triton_impl(module: str, name: str):
    """Import ``grit_kernels.triton.<module>.<name>`` lazily (Triton is optional on CPU)."""
    return getattr(importlib.import_module(f"grit_kernels.triton.{module}"), name)
