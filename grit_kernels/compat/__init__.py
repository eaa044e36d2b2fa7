"""Migration layers for code written against other GRIT implementations, one module per source API.

* :mod:`grit_kernels.compat.notebook`: the published GRIT notebook (``GRITConfig``, ``GRITManager``,
  ``GritTrainer(grit_manager=...)``, ``GritCallback``);
* :mod:`grit_kernels.compat.grit_vlm`: grit-vlm (``GRITLoRAConfig``, ``GRITTrainingArguments``,
  ``create_grit_trainer``).

Every name is re-exported here (``from grit_kernels.compat import GRITManager`` keeps working). Note that
``grit_kernels.compat.GritTrainer`` is the notebook's signature (``GritTrainer(grit_manager, ...)``), a
subclass of :class:`grit_kernels.GritTrainer`, not the same class.
"""

from .grit_vlm import GRITLoRAConfig, GRITTrainingArguments, create_grit_trainer
from .notebook import PAIRING_WARNING, GritCallback, GRITConfig, GRITManager, GritTrainer

__all__ = [
    "PAIRING_WARNING",
    "GRITConfig",
    "GRITLoRAConfig",
    "GRITManager",
    "GRITTrainingArguments",
    "GritCallback",
    "GritTrainer",
    "create_grit_trainer",
]
