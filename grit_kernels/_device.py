"""Device helpers shared by the op front ends (``ops/``) and the kernels (``triton/``, ``bank.py``): a leaf
module, importing nothing from grit_kernels, so that the kernels never import the ops that dispatch to them.

* :func:`interpreter_active`: whether Triton kernels run in the CPU interpreter;
* :func:`check_same_device`: the pointer check every launcher runs before launching;
* :func:`capturing`, :func:`host_table`, :func:`upload_`, :func:`to_device`: host -> device copies of small
  tables (kernel pointer tables, index lists) without a host sync.

A pageable ``torch.tensor(..., device="cuda")`` or ``.to("cuda")`` blocks the host until the copy is
done, and is illegal during CUDA-graph capture. Every table the ops build goes through
:func:`upload_` instead: the host data is staged in pinned memory and copied with
``non_blocking=True``. PyTorch's pinned-memory caching allocator records the copy on the current
stream and does not hand the staging block out again before the copy has finished, so reusing it is
safe without waiting.

Under CUDA-graph capture the captured copy node reads the staging block again at every replay, so
the staging tensor is kept alive for the life of the process (:data:`_graph_staging`); captures are
few (one per captured step function), so this is bounded in practice.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch


def interpreter_active() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_same_device(op: str, device: torch.device, **tensors) -> None:
    """Raise ``ValueError`` unless every given tensor (``None`` skipped) is on ``device``.

    A kernel handed a pointer from another device reads host memory or another GPU's address space: an
    illegal address that poisons the process's CUDA context. Launchers call this before launching anything.
    """
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but the op runs on {device}; move every tensor of the call to one device"
            )


# ------------------------------------------------------------------------ host -> device tables
_graph_staging: list[torch.Tensor] = []  #: staging buffers read by captured graphs: never freed


def capturing(device: torch.device) -> bool:
    """Whether the current CUDA stream of ``device`` is capturing a CUDA graph (False off CUDA)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def host_table(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A CPU tensor of ``values``, in pinned memory when it is bound for a CUDA ``device``."""
    return torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")


def upload_(dst: torch.Tensor, host: torch.Tensor) -> torch.Tensor:
    """Copy the CPU tensor ``host`` into ``dst`` (same numel) without blocking the host; returns ``dst``.

    ``host`` should come from :func:`host_table` (pinned for CUDA); a pageable CUDA-bound ``host`` is
    pinned first. On the CPU this is a plain copy.
    """
    if dst.device.type != "cuda":
        return dst.copy_(host.view(dst.shape))
    if not host.is_pinned():
        host = host.pin_memory()
    if capturing(dst.device):
        _graph_staging.append(host)
    return dst.copy_(host.view(dst.shape), non_blocking=True)


def to_device(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A new device tensor holding ``values``, filled by :func:`upload_` (no host sync)."""
    host = host_table(values, dtype, device)
    if device.type != "cuda":
        return host
    return upload_(torch.empty(host.shape, dtype=dtype, device=device), host)
