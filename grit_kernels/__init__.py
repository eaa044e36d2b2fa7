"""grit-kernels: rank-space K-FAC (GRIT) natural-gradient fine-tuning for PEFT LoRA / QLoRA."""

from . import ops, reference
from .config import GritConfig
from .status import InverseStatus

__version__ = "0.1.0"

__all__ = ["GritConfig", "InverseStatus", "ops", "reference", "__version__"]
