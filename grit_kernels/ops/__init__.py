"""Public GRIT ops. Each picks a backend per device (``_backend.KERNELS``: ``torch``, ``triton``, ...);
each is also a ``torch.library`` custom op ``torch.ops.grit_kernels.<name>`` for ``torch.compile``.

See :mod:`grit_kernels.reference` for the slow oracle of each op.
"""

from .._device import interpreter_active
from ._backend import resolve_backend, triton_available
from ._fallback import fallback_counts, fallback_reasons, reset_fallback_counts
from .fold import ema_fold_
from .gram import accumulate_gram_, accumulate_grams_
from .inverse import damped_cholesky_inverse
from .precondition import precondition_, precondition_grafted_
from .statistics import accumulate_rank_statistics_, accumulate_rank_statistics_many_
from .step import clone_tensors, copy_tensors_, kl_clip_update_, sum_of_squares

__all__ = [
    "accumulate_gram_",
    "accumulate_grams_",
    "accumulate_rank_statistics_",
    "accumulate_rank_statistics_many_",
    "clone_tensors",
    "copy_tensors_",
    "damped_cholesky_inverse",
    "ema_fold_",
    "fallback_counts",
    "fallback_reasons",
    "interpreter_active",
    "kl_clip_update_",
    "precondition_",
    "precondition_grafted_",
    "reset_fallback_counts",
    "resolve_backend",
    "sum_of_squares",
    "triton_available",
]
