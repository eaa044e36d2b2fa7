"""Block-level fused LoRA for Llama-family decoder blocks, with GRIT's statistics inside.

``report = gk.fuse(peft_model)`` routes every decoder block it can through three autograd Functions
(QKV sharing X, O, SwiGLU MLP; :mod:`.functions`) over plain or bitsandbytes 4-bit base weights
(:mod:`.weights`); ``gk.unfuse(peft_model)`` restores PEFT's path. Works with or without a
:class:`~grit_kernels.GritPreconditioner` (created before or after ``fuse``).
"""

from .patch import FusionReport, fuse, unfuse

__all__ = ["FusionReport", "fuse", "unfuse"]
