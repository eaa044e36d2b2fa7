"""Public GRIT ops. Each picks a backend per device (``_backend.KERNELS``: ``torch``, ``triton``, ...);
each is also a ``torch.library`` custom op ``torch.ops.grit_kernels.<name>`` for ``torch.compile``.

See :mod:`grit_kernels.reference` for the slow oracle of each op.
"""

from ._backend import interpreter_active, resolve_backend, triton_available
from .fold import ema_fold_
from .gram import accumulate_gram_, accumulate_grams_
from .inverse import damped_cholesky_inverse
from .precondition import precondition_

__all__ = [
    "accumulate_gram_",
    "accumulate_grams_",
    "damped_cholesky_inverse",
    "ema_fold_",
    "interpreter_active",
    "precondition_",
    "resolve_backend",
    "triton_available",
]
