"""grit-kernels: rank-space K-FAC (GRIT) natural-gradient fine-tuning for PEFT LoRA / QLoRA.

Two lines on top of PEFT::

    pre = gk.GritPreconditioner(peft_model, gk.GritConfig())
    opt = gk.GritOptimizer(torch.optim.AdamW(peft_model.parameters(), lr=2e-4), pre)
"""

from . import ops, reference
from .bank import FactorBank
from .compress import compress_adapter
from .config import GritConfig
from .eigen_adam import EigenAdamW
from .fused import FusionReport, fuse, unfuse
from .model_files import load_causal_lm, resolve_model_path
from .optim import GritOptimizer
from .preconditioner import GritPreconditioner
from .status import InverseStatus
from .vlm import ModalityGroup, VLMGritConfig, create_vlm_grit_adapter

__version__ = "0.1.0"

_TRAINER_NAMES = ("GritTrainer", "GritTrainingArguments", "disable_grit", "enable_grit")


def __getattr__(name):  # the Trainer integration imports transformers.Trainer: load it on first use
    if name in _TRAINER_NAMES:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'grit_kernels' has no attribute {name!r}")


__all__ = [
    "EigenAdamW",
    "FactorBank",
    "FusionReport",
    "GritConfig",
    "GritOptimizer",
    "GritPreconditioner",
    "InverseStatus",
    "load_causal_lm",
    "resolve_model_path",
    "ModalityGroup",
    "VLMGritConfig",
    "compress_adapter",
    "create_vlm_grit_adapter",
    "ops",
    "reference",
    "__version__",
    "fuse",
    "unfuse",
    *_TRAINER_NAMES,
]
