"""Backend choice shared by every op: ``auto`` -> Triton on CUDA tensors, torch elsewhere.

Every op's implementations are listed in :data:`KERNELS`, a table keyed by backend name, then op name
(``"module:function"``, imported lazily so that Triton stays optional on the CPU). All
implementations of one op share one signature, the one of its ``torch`` entry.
"""

from __future__ import annotations

import functools
import importlib
import logging

import torch

from .._device import interpreter_active
from ..config import BACKENDS

_OPS = ("accumulate_gram_", "accumulate_grams_", "ema_fold_", "damped_cholesky_inverse", "precondition_")
#: optimizer-step and capture helpers: C++ on the CPU (``cpp``), the torch form on every other backend
_STEP_OPS = {
    "accumulate_rank_statistics_": "grit_kernels.ops.statistics:torch_accumulate_rank_statistics_",
    "accumulate_rank_statistics_many_": "grit_kernels.ops.statistics:torch_accumulate_rank_statistics_many_",
    "precondition_grafted_": "grit_kernels.ops.precondition:torch_precondition_grafted_",
    "kl_clip_update_": "grit_kernels.ops.step:torch_kl_clip_update_",
    "clone_tensors": "grit_kernels.ops.step:torch_clone_tensors",
    "copy_tensors_": "grit_kernels.ops.step:torch_copy_tensors_",
    "sum_of_squares": "grit_kernels.ops.step:torch_sum_of_squares",
}

#: backend name -> op name -> "module:function" implementing it
KERNELS: dict[str, dict[str, str]] = {
    "torch": {
        "accumulate_gram_": "grit_kernels.ops.gram:torch_accumulate_gram_",
        "accumulate_grams_": "grit_kernels.ops.gram:torch_accumulate_grams_",
        "ema_fold_": "grit_kernels.ops.fold:torch_ema_fold_",
        "damped_cholesky_inverse": "grit_kernels.ops.inverse:torch_damped_cholesky_inverse",
        "precondition_": "grit_kernels.ops.precondition:torch_precondition_",
        **_STEP_OPS,
    },
    "triton": {
        "accumulate_gram_": "grit_kernels.triton.gram:accumulate_gram_",
        "accumulate_grams_": "grit_kernels.triton.gram:accumulate_grams_",
        "ema_fold_": "grit_kernels.triton.fold:ema_fold_",
        "damped_cholesky_inverse": "grit_kernels.triton.inverse:damped_cholesky_inverse",
        "precondition_": "grit_kernels.triton.precondition:precondition_",
        **_STEP_OPS,
    },
    # csrc/ kernels (torch.ops.grit_kernels_cpp), one set of wrappers for both devices
    "cpp": {op: f"grit_kernels.ops._cpp:{op}" for op in (*_OPS, *_STEP_OPS)},
    "cuda": {**{op: f"grit_kernels.ops._cpp:{op}" for op in _OPS}, **_STEP_OPS},
}

#: ``auto``: the first available backend per device type, fastest first, as measured side by side by
#: bench/bench_kernels.py (CPU: bench/results/cpu/kernels-cpp.json). CUDA kernels vs Triton: unmeasured,
#: so Triton stays first there.
AUTO_ORDER = {"cpu": ("cpp", "torch"), "cuda": ("triton", "cuda", "torch")}


def triton_available() -> bool:
    """Whether ``import triton`` works. Not installed: ``False``, quietly (Triton is optional). Installed but
    broken (the import raises anything else): ``False``, and the error is logged once."""
    try:
        import triton  # noqa: F401
    except ModuleNotFoundError as error:
        if error.name != "triton":  # triton is there, one of its own imports is missing: broken
            _report_broken_triton(error)
        return False
    except Exception as error:  # noqa: BLE001 - any failure of an installed triton: logged, then unavailable
        _report_broken_triton(error)
        return False
    return True


_triton_import_error: str | None = None  #: the first error of a broken Triton install (logged once)


def _report_broken_triton(error: BaseException) -> None:
    global _triton_import_error
    if _triton_import_error is None:
        _triton_import_error = f"{type(error).__name__}: {error}"
        logging.getLogger("grit_kernels.ops").warning(
            "grit_kernels: triton is installed but `import triton` fails (%s); the triton backend is "
            "unavailable (backend='auto' uses the next one)",
            _triton_import_error,
        )


def resolve_backend(backend: str, device: torch.device) -> str:
    """Return the backend name (a key of :data:`KERNELS`) for tensors on ``device``; raise on an impossible request."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ("torch",)):
            if name == "torch" or _usable(name, device, jit=False):
                return name
    if backend in ("cpp", "cuda"):
        want = "cpu" if backend == "cpp" else "cuda"
        if device.type != want:
            raise RuntimeError(f"backend={backend!r} needs {want} tensors (got {device}); use backend='auto'")
        if not _usable(backend, device, jit=None):
            from .. import _ext

            raise RuntimeError(
                f"backend={backend!r}: compiled kernels unavailable ({_ext.load_error()}); build them with "
                "`pip install --no-build-isolation -e .` or set GRIT_KERNELS_JIT=1 to JIT-compile csrc/"
            )
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' requested but triton is not importable")
        if device.type != "cuda" and not interpreter_active():
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors (got {device}); set TRITON_INTERPRET=1 before importing "
                "grit_kernels to run the kernels on the CPU interpreter, or use backend='torch'"
            )
    return backend


def _usable(backend: str, device: torch.device, jit: bool | None) -> bool:
    if backend == "triton":
        return triton_available()
    from .. import _ext

    return _ext.cpu_available(jit) if backend == "cpp" else _ext.cuda_available(jit)


@functools.lru_cache(maxsize=None)
@functools.cache
def kernel(backend: str, op: str):
    """The implementation of ``op`` for the resolved ``backend`` (see :data:`KERNELS`; looked up once per pair:
    this runs on every op call)."""
    try:
        target = KERNELS[backend][op]
    except KeyError:
        raise ValueError(f"no {op!r} implementation for backend {backend!r}") from None
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def triton_impl(module: str, name: str):
    """Import ``grit_kernels.triton.<module>.<name>`` lazily (Triton is optional on CPU)."""
    return getattr(importlib.import_module(f"grit_kernels.triton.{module}"), name)
