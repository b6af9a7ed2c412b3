"""Training checkpoints: save, find the latest good one, and resume exactly.

Owns the on-disk layout::

    <checkpoint.dir>/
      latest                  # text: name of the newest complete checkpoint (atomically replaced)
      iter_0000010/
        dist/                 # megatron.core.dist_checkpointing: model (+ optimizer) sharded tensors
        trainer/rank_00000.pt # per rank: step, data-stream position, RNG states, scheduler
        complete.json         # written last; a checkpoint without it is partial and never loaded

``dist/`` records the model class (GPTModel / HybridModel) and megatron-core version in its
content metadata; resuming into the other class stops with one line (its weights still load
with ``model.load``, see :mod:`megatron_rpt.checkpoint.interop`).

A checkpoint is written into ``iter_X.tmp`` and renamed when every rank has finished, so a
crash mid-save leaves the previous one intact. Loading walks back from ``latest`` to the
newest checkpoint that is complete and loads cleanly, logging why any newer one was skipped.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_rpt.atomic import write_text_atomic
from megatron_rpt.bridge.name_maps import unwrap
from megatron_rpt.checkpoint.interop import ModelClassMismatch, content_metadata, require_model_class
from megatron_rpt.model.mcore_compat import checkpoint_save_kwargs, model_class_of

log = logging.getLogger(__name__)

COMPLETE = "complete.json"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def sharded_state_dict(model_chunks: list[Any], optimizer: Any | None, is_loading: bool = False) -> dict[str, Any]:
    state: dict[str, Any] = {}
    if len(model_chunks) == 1:
        state["model"] = unwrap(model_chunks[0]).sharded_state_dict()
    else:
        for i, chunk in enumerate(model_chunks):
            state[f"model{i}"] = unwrap(chunk).sharded_state_dict()
    if optimizer is not None:
        # dp_reshardable: each rank writes its own optimizer shard, no gathering. (megatron-core 0.16's
        # model-space formats fail with torch Adam: flattened_range removed, "step" missing on load.)
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "dp_reshardable"}
        )
    return state


def _data_parallel_group() -> Any:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return group if dist.get_world_size(group) > 1 else None


def _save_strategy() -> Any:
    """Fully parallel save: data-parallel replicas split the writing of replicated shards
    instead of one replica writing everything."""
    group = _data_parallel_group()
    if group is None:
        return None
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), group)


def _load_strategy(checkpoint_dir: Path) -> Any:
    """Fully parallel load: each replica reads a part and they exchange it."""
    group = _data_parallel_group()
    if group is None:
        return None
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

    return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(str(checkpoint_dir)), group)


def save_checkpoint(ckpt_dir: str | Path, step: int, model_chunks: list[Any], optimizer: Any, scheduler: Any,
                    trainer_state: dict[str, Any], keep_last: int = 3, async_queue: Any = None) -> Path:
    """Save everything needed for an exact resume at ``step``; returns the checkpoint path.

    With ``async_queue`` (a Megatron ``AsyncCallsQueue``) the sharded tensors are written by a
    background process (forked, so it sees the weights as of this call) and the checkpoint is
    finalised — ``complete.json``, rename, ``latest`` — when the queue is polled after the write
    finished; until then the previous checkpoint stays the latest.
    """
    from megatron.core import dist_checkpointing

    root = Path(ckpt_dir)
    final = root / iter_name(step)
    tmp = root / (iter_name(step) + ".tmp")
    start = time.perf_counter()
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "dist").mkdir(parents=True)
        (tmp / "trainer").mkdir()
    _barrier()
    request = dist_checkpointing.save(sharded_state_dict(model_chunks, optimizer), str(tmp / "dist"),
                                      sharded_strategy=_save_strategy(), async_sharded_save=async_queue is not None,
                                      content_metadata=content_metadata(model_chunks, {}), **checkpoint_save_kwargs())
    per_rank = dict(trainer_state, rng=rng_state(), scheduler=scheduler.state_dict(), step=step,
                    adam_step=adam_step(optimizer))
    torch.save(per_rank, tmp / "trainer" / f"rank_{_rank():05d}.pt")

    def finalize() -> None:
        _barrier()
        if _rank() == 0:
            world = dist.get_world_size() if dist.is_initialized() else 1
            (tmp / COMPLETE).write_text(json.dumps({"step": step, "world_size": world, "time": time.time()}))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_text_atomic(root / "latest", final.name + "\n")
            _prune(root, keep_last)
            log.info("saved checkpoint %s in %.1fs%s", final, time.perf_counter() - start,
                     " (async)" if async_queue is not None else "")
        _barrier()

    if async_queue is None:
        finalize()
    else:
        request.add_finalize_fn(finalize)
        async_queue.schedule_async_request(request)
    return final


def new_async_queue() -> Any:
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    return AsyncCallsQueue()


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    done = sorted(p for p in root.glob("iter_*") if p.is_dir() and (p / COMPLETE).exists())
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def candidates(ckpt_dir: str | Path) -> list[Path]:
    """Checkpoints to try, newest first: the one named by ``latest``, then older complete ones."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = sorted((p for p in root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp")), reverse=True)
    latest_file = root / "latest"
    if latest_file.is_file():
        named = root / latest_file.read_text().strip()
        if named in found:
            found.remove(named)
            found.insert(0, named)
        else:
            log.warning("checkpoint pointer %s names %s, which does not exist; looking for older ones", latest_file, named)
    return found


def load_checkpoint(ckpt: str | Path, model_chunks: list[Any], optimizer: Any | None, scheduler: Any | None,
                    load_optimizer: bool = True) -> dict[str, Any]:
    """Load one checkpoint directory (``iter_X``) and return this rank's trainer state."""
    from megatron.core import dist_checkpointing

    path = Path(ckpt)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE}); it was interrupted mid-save")
    require_model_class(path / "dist", model_class_of(model_chunks[0]))
    opt = optimizer if load_optimizer else None
    if opt is not None:
        _materialize_optimizer_state(opt)
    state = dist_checkpointing.load(sharded_state_dict(model_chunks, opt, is_loading=True), str(path / "dist"),
                                    sharded_strategy=_load_strategy(path / "dist"))
    if len(model_chunks) == 1:
        unwrap(model_chunks[0]).load_state_dict(state["model"])
    else:
        for i, chunk in enumerate(model_chunks):
            unwrap(chunk).load_state_dict(state[f"model{i}"])
    if opt is not None:
        # With fp32 params Megatron's main params are views of the (grad-requiring) model params,
        # and its loader copies into them in place: that must happen outside autograd.
        with torch.no_grad():
            opt.load_state_dict(state["optimizer"])
    rank_file = path / "trainer" / f"rank_{_rank():05d}.pt"
    if not rank_file.is_file():
        raise FileNotFoundError(
            f"{rank_file} is missing: the checkpoint was written by a different world size; "
            "resume with the same number of ranks (model weights alone can be loaded at any TP/PP via model.load)"
        )
    trainer_state = torch.load(rank_file, weights_only=False)
    if opt is not None:
        set_adam_step(opt, trainer_state.get("adam_step"))
    if scheduler is not None:
        scheduler.load_state_dict(trainer_state["scheduler"])
    set_rng_state(trainer_state["rng"])
    return trainer_state


def _adam_states(optimizer: Any) -> list[dict[str, Any]]:
    states = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", opt)
        states.extend(getattr(inner, "state", {}).values())
    return states


def adam_step(optimizer: Any) -> float | None:
    """Adam's step count (bias correction), or None before the first step."""
    steps = {float(s["step"]) for s in _adam_states(optimizer) if "step" in s}
    return max(steps) if steps else None


def set_adam_step(optimizer: Any, step: float | None) -> None:
    """Megatron-core 0.16's dp_reshardable loader overwrites torch Adam's per-parameter ``step``
    with the local placeholder value; put the saved count back (one tensor per parameter)."""
    if step is None:
        return
    for state in _adam_states(optimizer):
        if "step" in state:
            state["step"] = torch.tensor(float(step), dtype=torch.float32)


def _materialize_optimizer_state(optimizer: Any) -> None:
    """A fresh distributed optimizer has no Adam state yet, and Megatron's loading path asserts on
    it; create placeholder state (overwritten by the load) the way Megatron-LM does."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if hasattr(opt, "_init_optimizer_states_with_dummy_values") and inner is not None and not inner.state:
            opt._init_optimizer_states_with_dummy_values()


def resume(ckpt_dir: str | Path, model_chunks: list[Any], optimizer: Any, scheduler: Any) -> dict[str, Any] | None:
    """Load the newest good checkpoint under ``ckpt_dir``; None when there is none."""
    for path in candidates(ckpt_dir):
        try:
            state = load_checkpoint(path, model_chunks, optimizer, scheduler)
        except ModelClassMismatch:
            raise  # older checkpoints of the run hold the same class: falling back would restart silently
        except Exception as exc:  # noqa: BLE001 - any failure means: try the previous checkpoint
            if _rank() == 0:
                log.warning("checkpoint %s is unusable (%s: %s); falling back to the previous one",
                            path, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            continue
        if _rank() == 0:
            log.info("resumed from %s (step %d)", path, state["step"])
        return state
    return None
