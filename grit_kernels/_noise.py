"""Silence known, harmless third-party messages at the package's entry points (CLI, bench scripts).

* bitsandbytes >= 0.48 on CPUs with AVX512-BF16 logs "Failed to load CPU gemm_4bit_forward from
  kernels-community" when the optional ``kernels`` package (which downloads hub kernels) is absent;
  it then uses its own CPU NF4 kernel, which is what we want (no downloads at run time).
* transformers >= 5 warns (FutureWarning) that ``is_gradient_checkpointing`` is deprecated; PEFT
  reads that attribute in ``get_peft_model``. Nothing for a user to do.

Only these two messages are filtered, by their text; library code never calls this (a user's own
program keeps every warning).
"""

from __future__ import annotations

import logging
import warnings

_BNB_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_TEXT = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.text)


def silence_known_noise() -> None:
    """Filter the two messages above (idempotent)."""
    logger = logging.getLogger(_BNB_LOGGER)
    if not any(isinstance(f, _DropMessage) for f in logger.filters):
        logger.addFilter(_DropMessage(_BNB_TEXT))
    warnings.filterwarnings(
        "ignore", message=r".*`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )
