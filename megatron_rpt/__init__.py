"""megatron-rpt: Reinforcement Pre-Training (arXiv 2506.08007) on Megatron-Core."""

import logging
import warnings

__version__ = "0.1.0"


def quiet_dependency_imports() -> None:
    """Hide what our dependencies print when they are imported on a CPU machine: megatron-core's warnings
    where Transformer Engine / Apex are missing (its torch fallbacks are what runs there) and its INFO log
    lines, and the CUDA build of torch's "No CUDA runtime is found" line.

    Called when this package is imported, i.e. before any of its modules imports them, in every process:
    the command lines and the ranks and writers they spawn (a spawned process re-imports its target's
    module, and so megatron-core, before any of our code runs in it; without this, such a line could land
    after a command line's one error line)."""
    warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    for name in ("megatron", "megatron.core"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


quiet_dependency_imports()
