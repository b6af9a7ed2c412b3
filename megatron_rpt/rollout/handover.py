"""GPU memory handover between training and the rollout engine.

Owns: :func:`wake_engine` and :func:`sleep_engine`, which the trainer and the evaluation call
around every rollout phase, and :func:`release_cuda_cache`.

Why: PyTorch's caching allocator keeps the blocks training freed (activations, gradients of
the last micro-batch: tens of GiB at 8k-token sequences) reserved for itself. vLLM's
sleep-mode allocator wakes its weights and KV cache into memory outside that cache and cannot
use those blocks, so without emptying the cache first a wake-up can run out of memory that is
free in all but name (verl and NeMo-RL empty it before each wake-up). After the rollouts the
engine's temporary blocks are handed back the same way before training allocates again.
"""

from __future__ import annotations

from typing import Any

import torch


def release_cuda_cache() -> int:
    """Return PyTorch's cached, unused CUDA blocks to the driver; the bytes released (0 on CPU)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0
    before = torch.cuda.memory_reserved()
    torch.cuda.empty_cache()
    return max(0, before - torch.cuda.memory_reserved())


def wake_engine(engine: Any) -> None:
    """Empty PyTorch's CUDA cache, then wake ``engine`` (None: a rank without an engine)."""
    release_cuda_cache()
    if engine is not None and hasattr(engine, "wake_up"):
        engine.wake_up()


def sleep_engine(engine: Any, sleep: bool) -> None:
    """Put ``engine`` to sleep when ``sleep`` (``rollout.sleep_between_phases``), then empty the cache."""
    if sleep and engine is not None and hasattr(engine, "sleep"):
        engine.sleep()
    release_cuda_cache()
