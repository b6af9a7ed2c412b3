"""megatron-rpt: Reinforcement Pre-Training (arXiv 2506.08007) on Megatron-Core."""

import logging
import warnings

__version__ = "0.1.0"


def quiet_megatron_import() -> None:
    """Hide what megatron-core prints on import: warnings where Transformer Engine / Apex are missing
    (every CPU machine; its torch fallbacks are what runs there) and its INFO log lines.

    Called when this package is imported, i.e. before any of its modules imports megatron-core, in
    every process: the command lines and the ranks they spawn (a spawned rank re-imports its target's
    module, and so megatron-core, before any of our code runs in it)."""
    warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    for name in ("megatron", "megatron.core"):
        logging.getLogger(name).setLevel(logging.WARNING)


quiet_megatron_import()
