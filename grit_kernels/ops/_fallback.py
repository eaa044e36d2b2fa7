"""Backend fallbacks, made visible: a compiled kernel that rejects an input hands the call to the ``torch``
implementation, and every such hand-over is counted and logged (once per op and backend).

A fallback is for inputs a kernel does not take (a dtype, a layout, mixed devices) that the ``torch`` form
handles: if the ``torch`` form rejects the input as well, the input is wrong (a shape or dtype error in the
caller), and its error is raised, chained to the kernel's. Read the counts with
:func:`grit_kernels.ops.fallback_counts` (a metric); the log goes to the ``grit_kernels.ops`` logger.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("grit_kernels.ops")

_counts: Counter[str] = Counter()  #: "<backend>:<op>" -> calls that ran the fallback
_reasons: dict[str, str] = {}  #: "<backend>:<op>" -> the first reason (what was logged)


def record(backend: str, op: str, reason: BaseException | str, fallback: str = "torch") -> None:
    """Count one fallback of ``op`` from ``backend``; log it the first time (with ``reason``)."""
    key = f"{backend}:{op}"
    _counts[key] += 1
    if key not in _reasons:
        _reasons[key] = str(reason).strip().splitlines()[0] if str(reason).strip() else type(reason).__name__
        logger.warning(
            "grit_kernels: %s backend rejected an input of %s (%s); running the %s implementation "
            "(logged once; counted in grit_kernels.ops.fallback_counts())",
            backend, op, _reasons[key], fallback,
        )


def run_fallback(backend: str, op: str, error: BaseException, fallback: Callable[..., Any], *args: Any) -> Any:
    """``fallback(*args)`` after ``backend``'s ``op`` raised ``error``: counted and logged when it succeeds;
    when it raises too, the input is wrong and its error propagates (chained to ``error``)."""
    try:
        out = fallback(*args)
    except Exception as caller_error:
        raise caller_error from error
    record(backend, op, error)
    return out


def fallback_counts() -> dict[str, int]:
    """``{"<backend>:<op>": calls}`` that ran a fallback implementation in this process (empty: none)."""
    return dict(_counts)


def fallback_reasons() -> dict[str, str]:
    """``{"<backend>:<op>": reason}``: the first error that sent each op to its fallback."""
    return dict(_reasons)


def reset_fallback_counts() -> None:
    """Forget counts and reasons (the next fallback of each op is logged again)."""
    _counts.clear()
    _reasons.clear()


__all__ = ["fallback_counts", "fallback_reasons", "record", "reset_fallback_counts", "run_fallback"]
