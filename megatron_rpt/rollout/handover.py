"""GPU memory handover between training and the rollout engine.

Owns: :func:`engine_awake`, the one context the trainer and the evaluation put every rollout
phase in (:func:`wake_engine` before, :func:`sleep_engine` after), and :func:`release_cuda_cache`.

Why: PyTorch's caching allocator keeps the blocks training freed (activations, gradients of
the last micro-batch: tens of GiB at 8k-token sequences) reserved for itself. vLLM's
sleep-mode allocator wakes its weights and KV cache into memory outside that cache and cannot
use those blocks, so without emptying the cache first a wake-up can run out of memory that is
free in all but name (verl and NeMo-RL empty it before each wake-up). After the rollouts the
engine's temporary blocks are handed back the same way before training allocates again.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from megatron_rpt.rollout.base import RolloutEngine


def release_cuda_cache() -> int:
    """Return PyTorch's cached, unused CUDA blocks to the driver; the bytes released (0 on CPU)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0
    before = torch.cuda.memory_reserved()
    torch.cuda.empty_cache()
    return max(0, before - torch.cuda.memory_reserved())


def wake_engine(engine: RolloutEngine | None) -> None:
    """Empty PyTorch's CUDA cache, then wake ``engine`` (None: a rank without an engine)."""
    release_cuda_cache()
    if engine is not None:
        engine.wake_up()


def sleep_engine(engine: RolloutEngine | None, sleep: bool) -> None:
    """Put ``engine`` to sleep when ``sleep`` (``rollout.sleep_between_phases``), then empty the cache."""
    if sleep and engine is not None:
        engine.sleep()
    release_cuda_cache()


@contextmanager
def engine_awake(engine: RolloutEngine | None, sleep_after: bool) -> Iterator[Any]:
    """The engine awake for the body (the cache emptied first), asleep again after it when
    ``sleep_after`` (``rollout.sleep_between_phases``), also when the body raises."""
    wake_engine(engine)
    try:
        yield engine
    finally:
        sleep_engine(engine, sleep_after)
