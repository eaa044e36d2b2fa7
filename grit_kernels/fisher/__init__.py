"""Fisher options beside rank-space K-FAC: ``GritConfig(fisher="diagonal" | "kfac_full" | "kfac_lowrank")``.

``"kfac"`` (the default) is :class:`~grit_kernels.GritPreconditioner`'s own step. The options here
take over its ``step()`` (it dispatches to ``fisher.step``), keep its warm-up and the rank-space bank
(folded every step, so logging and ``curvature_summary`` stay meaningful). KL-clip: under
:class:`~grit_kernels.GritOptimizer` (which calls ``step()`` without ``lr``) the clip is the one on the step
taken, with the rank-space quadratic form (``GritPreconditioner.clip_update_``); the gradient-level clip here
runs only when ``step(lr=...)`` is called directly.

The rooms (every name defined in them is importable from ``grit_kernels.fisher`` itself)::

    base.py          CurvatureModel: the contract the preconditioner drives; the gradient-level KL-clip
    diagonal.py      DiagonalFisher ("diagonal"): the EMA of g^2 per LoRA entry
    capture.py       each LoRA layer's input and output gradient for the large-factor models (hooks on PEFT's
                     path, capture_output_gradient for gk.fuse); the activation-checkpointing phase
    large_factor.py  the step, fold, DDP reduction and state the two large-factor models share
    kfac_full.py     FullKFAC ("kfac_full"): d x d factors, a reference for small models
    nystrom.py       the Nystrom maths: test matrix, eigenpairs from a sketch, the closed-form damped inverse
    kfac_lowrank.py  LowRankKFAC ("kfac_lowrank"): the large factors as streaming Nystrom sketches

Every option's state (the diagonal moments; the ``d x d`` or sketched sums, factors and inverses) is part of
``GritPreconditioner.state_dict()`` under ``"fisher_state"``, with the kind under ``"fisher"``: a resumed
run continues bit-for-bit.
"""

from __future__ import annotations

# the private names (tests/test_private_apis.py imports _checkpoint_phase) are re-exported as themselves;
# monkeypatch a name in the module that defines it, which is where it is looked up
from .base import CurvatureModel
from .base import _kl_clip_ as _kl_clip_
from .capture import _checkpoint_phase as _checkpoint_phase
from .capture import _LargeFactorCapture as _LargeFactorCapture
from .diagonal import DiagonalFisher
from .kfac_full import FullKFAC
from .kfac_lowrank import LowRankKFAC
from .kfac_lowrank import _group_by as _group_by
from .kfac_lowrank import _SketchGroup as _SketchGroup
from .large_factor import _LargeFactorKFAC as _LargeFactorKFAC
from .nystrom import _apply_input_side as _apply_input_side
from .nystrom import _apply_output_side as _apply_output_side
from .nystrom import nystrom_eigenpairs, sketch_test_matrix

__all__ = [
    "CurvatureModel",
    "DiagonalFisher",
    "FullKFAC",
    "LowRankKFAC",
    "make_fisher",
    "nystrom_eigenpairs",
    "sketch_test_matrix",
]


def make_fisher(preconditioner):
    """The step implementation for ``preconditioner.config.fisher`` (``None`` for ``"kfac"``)."""
    kind = preconditioner.config.fisher
    if kind == "kfac":
        return None
    if kind == "diagonal":
        return DiagonalFisher(preconditioner)
    if kind == "kfac_full":
        return FullKFAC(preconditioner)
    if kind == "kfac_lowrank":
        return LowRankKFAC(preconditioner)
    raise ValueError(f"unknown fisher {kind!r}")
