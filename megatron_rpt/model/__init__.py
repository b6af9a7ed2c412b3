"""The policy model: HF architecture parsing, Megatron-Core HybridModel / GPTModel build, layer specs,
megatron-core version switches, CPU shim.

:func:`quiet_megatron_import` lives here, free of megatron-core, because the command lines must call
it before any module that imports megatron-core (the other modules of this package import it at the top).
"""

from __future__ import annotations

import logging
import warnings


def quiet_megatron_import() -> None:
    """Hide what megatron-core prints on import: warnings where Transformer Engine / Apex are missing
    (every CPU machine; its torch fallbacks are what runs there) and its INFO log lines. The
    command lines call this before they import it."""
    warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    for name in ("megatron", "megatron.core"):
        logging.getLogger(name).setLevel(logging.WARNING)
