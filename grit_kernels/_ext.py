"""Loader of the compiled kernels in ``csrc/`` (ops ``torch.ops.grit_kernels_cpp.*``; backends ``cpp`` and ``cuda``).

Order: the extension built by ``pip install`` (``grit_kernels._C``); else, when asked (``jit=True``, or
the environment variable ``GRIT_KERNELS_JIT=1``) and the sources are present (a working tree), a JIT
build with :func:`torch.utils.cpp_extension.load` (about a minute, cached by torch under
``~/.cache/torch_extensions``); else nothing, and the ``torch`` backend is used. The fake (meta)
implementations that ``torch.compile`` needs are registered here, on the Python side.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

NAMESPACE = "grit_kernels_cpp"
SOURCE_DIR = Path(__file__).resolve().parent.parent / "csrc"
CPU_SOURCE = SOURCE_DIR / "grit_cpu.cpp"
CUDA_SOURCE = SOURCE_DIR / "grit_cuda.cu"

_state: dict[str, object] = {"loaded": False, "import_tried": False, "jit_tried": False, "error": None}


def _registered(key: str = "CPU") -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::precondition_", key)
    except RuntimeError:  # the operator is not defined at all
        return False


def load(jit: bool | None = None) -> bool:
    """Make the ``grit_kernels_cpp`` ops available; return whether they are.

    Args:
        jit: JIT-build from ``csrc/`` when the installed extension is missing. ``None`` reads
            ``GRIT_KERNELS_JIT`` (``1`` = yes). A failed build is reported once as a warning.
    """
    if _state["loaded"]:
        return True
    if jit is None:
        jit = os.environ.get("GRIT_KERNELS_JIT", "0") == "1"
    if _state["import_tried"] and (not jit or _state["jit_tried"]):
        return False  # a failed attempt is not repeated on every op call
    if not _state["import_tried"]:
        _state["import_tried"] = True
        try:
            from . import _C  # noqa: F401  (registers the ops)
        except ImportError as exc:
            _state["error"] = f"grit_kernels._C not built ({exc})"
    if jit and not _state["jit_tried"] and not _registered():
        _state["jit_tried"] = True
        _jit_build()
    if _registered():
        _register_fakes()
        _state["loaded"] = True
        return True
    return False


def cpu_available(jit: bool | None = None) -> bool:
    """Whether the C++ CPU kernels (backend ``cpp``) are loaded (or could be JIT-built now)."""
    return load(jit)


def cuda_available(jit: bool | None = None) -> bool:
    """Whether the CUDA kernels (backend ``cuda``) are loaded and a CUDA device is present."""
    if not torch.cuda.is_available() or not load(jit):
        return False
    return _registered("CUDA")


def load_error() -> str | None:
    """Why the extension is not available (``None`` if it is)."""
    return None if _state["loaded"] else _state["error"]


def _jit_build() -> None:
    if not CPU_SOURCE.exists():
        _state["error"] = f"no compiled extension and no sources at {SOURCE_DIR}"
        return
    from torch.utils import cpp_extension

    sources = [str(CPU_SOURCE)]
    with_cuda = bool(torch.version.cuda) and CUDA_SOURCE.exists() and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        sources.append(str(CUDA_SOURCE))
    try:
        cpp_extension.load(
            name="grit_kernels_C" + ("_cuda" if with_cuda else ""),
            sources=sources,
            extra_cflags=["-O3", "-fopenmp"],
            extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr"] if with_cuda else None,
            is_python_module=False,
            # the compiler's command lines and output (not part of the build's hash: a verbose build is reused)
            verbose=os.environ.get("GRIT_KERNELS_JIT_VERBOSE", "0") == "1",
        )
    except Exception as exc:  # noqa: BLE001 -- a broken toolchain must not break the package: torch remains
        _state["error"] = f"JIT build of {SOURCE_DIR} failed: {exc}"
        warnings.warn(f"grit_kernels: {_state['error']}; using the torch backend", stacklevel=3)


_fakes_registered = False


def _register_fakes() -> None:
    """Meta implementations: shapes and dtypes of every op's outputs, for ``torch.compile`` / FakeTensor."""
    global _fakes_registered
    if _fakes_registered:
        return
    _fakes_registered = True
    lib = torch.library

    @lib.register_fake(f"{NAMESPACE}::accumulate_gram_")
    def _gram_fake(out, x, weight):
        return None

    @lib.register_fake(f"{NAMESPACE}::ema_fold_")
    def _fold_fake(factor, stat_sum, weight, decay, initialized):
        return None

    @lib.register_fake(f"{NAMESPACE}::damped_cholesky_inverse")
    def _inverse_fake(mats, damping, eps_abs, ranks, previous, previous_valid, retry_factor):
        return torch.empty_like(mats), mats.new_empty((mats.shape[0],), dtype=torch.int32)

    @lib.register_fake(f"{NAMESPACE}::precondition_")
    def _precondition_fake(grads_a, grads_b, inv_d, inv_h, compute_dot):
        return inv_d.new_empty((), dtype=torch.float32)
