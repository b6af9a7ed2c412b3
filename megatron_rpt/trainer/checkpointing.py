"""Training checkpoints: save, verify, load, prune.

Owns the on-disk layout::

    <checkpoint.dir>/
      .rpt-lock               # held by the live trainer (megatron_rpt.trainer.run_lock)
      latest                  # text: name of the newest complete checkpoint (atomically replaced)
      iter_0000010/
        dist/                 # megatron.core.dist_checkpointing: model (+ optimizer) sharded tensors
        trainer/rank_00000.pt # per rank: step, data-stream position, RNG states, scheduler
        complete.json         # written last: step, parallel layout, run id, config, and the size and
                              # sha256 of every file above; without it a checkpoint is never loaded
      iter_0000008.rejected   # set aside by a resume: failed verification (kept for inspection)

``dist/`` records the model class (GPTModel / HybridModel) and megatron-core version in its
content metadata; resuming into the other class stops with one line (its weights still load
with ``model.load``, see :mod:`megatron_rpt.weights.interop`).

A checkpoint is written into ``iter_X.tmp``, checksummed (:mod:`.ckpt_manifest`) and renamed
when every rank has finished, so a crash mid-save leaves the previous one intact. Which
checkpoint a starting trainer loads is decided by :mod:`megatron_rpt.trainer.resume`, which
verifies candidates before anything is loaded; :func:`load_checkpoint` then loads one.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.serialization import (
    get_default_load_sharded_strategy,
    get_default_save_sharded_strategy,
)
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelLoadStrategyWrapper,
    FullyParallelSaveStrategyWrapper,
)
from torch.distributed.checkpoint.api import CheckpointException

from megatron_rpt.atomic import write_text_atomic
from megatron_rpt.bridge.name_maps import unwrap
from megatron_rpt.model.mcore_compat import checkpoint_save_kwargs, model_class_of
from megatron_rpt.processes import die_with_parent
from megatron_rpt.trainer.ckpt_manifest import COMPLETE, collect_manifest
from megatron_rpt.weights.hf_io import CheckpointError
from megatron_rpt.weights.interop import content_metadata, require_model_class
from megatron_rpt.weights.megatron_ckpt import tie_checkpoint_writer_to_this_process

log = logging.getLogger(__name__)

_ITER = re.compile(r"iter_(\d{7})")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def iter_step(path: Path) -> int | None:
    """The step of a checkpoint directory name ``iter_XXXXXXX``; None for any other name."""
    m = _ITER.fullmatch(path.name)
    return int(m.group(1)) if m else None


def read_complete(path: Path) -> dict[str, Any] | None:
    """The ``complete.json`` of a checkpoint, or None when it is absent or unreadable."""
    try:
        data = json.loads((path / COMPLETE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def rng_state() -> dict[str, Any]:
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


def _replicas(dp_cp_group: Any) -> Any:
    """The data x context-parallel group when it has several ranks to share the I/O, else None."""
    return dp_cp_group if dp_cp_group is not None and dist.get_world_size(dp_cp_group) > 1 else None


def _save_strategy(dp_cp_group: Any) -> Any:
    """Fully parallel save: data-parallel replicas split the writing of replicated shards
    instead of one replica writing everything."""
    group = _replicas(dp_cp_group)
    if group is None:
        return None
    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), group)


def _load_strategy(checkpoint_dir: Path, dp_cp_group: Any) -> Any:
    """Fully parallel load: each replica reads a part and they exchange it."""
    group = _replicas(dp_cp_group)
    if group is None:
        return None
    return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(str(checkpoint_dir)), group)


def save_checkpoint(ckpt_dir: str | Path, step: int, model_chunks: list[Any], optimizer: Any, scheduler: Any,
                    trainer_state: dict[str, Any], keep_last: int = 3, async_queue: Any = None,
                    info: dict[str, Any] | None = None, dp_cp_group: Any = None) -> Path:
    """Save everything needed for an exact resume at ``step``; returns the checkpoint path.

    ``info`` (JSON: the run id, parallel layout, config) goes into ``complete.json`` next to the
    checksums of every file. With ``async_queue`` (a Megatron ``AsyncCallsQueue``) the sharded
    tensors are written by a background process (forked, so it sees the weights as of this
    call) and the checkpoint is finalised — checksums, ``complete.json``, rename, ``latest`` —
    when the queue is polled after the write finished; until then the previous checkpoint stays
    the latest. ``dp_cp_group`` (the topology's data x context-parallel group) shares the writing.
    """
    root = Path(ckpt_dir)
    final = root / iter_name(step)
    tmp = root / (iter_name(step) + ".tmp")
    start = time.perf_counter()
    tie_checkpoint_writer_to_this_process()
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "dist").mkdir(parents=True)
        (tmp / "trainer").mkdir()
    _barrier()
    request = dist_checkpointing.save(sharded_state_dict(model_chunks, optimizer), str(tmp / "dist"),
                                      sharded_strategy=_save_strategy(dp_cp_group),
                                      async_sharded_save=async_queue is not None,
                                      content_metadata=content_metadata(model_chunks, {}), **checkpoint_save_kwargs())
    per_rank = dict(trainer_state, rng=rng_state(), scheduler=scheduler.state_dict(), step=step,
                    adam_step=adam_step(optimizer))
    torch.save(per_rank, tmp / "trainer" / f"rank_{_rank():05d}.pt")

    def finalize() -> None:
        _barrier()
        files = collect_manifest(tmp)  # collective: every rank hashes its share
        if _rank() == 0:
            world = dist.get_world_size() if dist.is_initialized() else 1
            meta = {"step": step, "world_size": world, "time": time.time(), **(info or {}), "files": files}
            (tmp / COMPLETE).write_text(json.dumps(meta))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_text_atomic(root / "latest", final.name + "\n")
            prune(root, keep_last, step)
            log.info("saved checkpoint %s in %.1fs%s", final, time.perf_counter() - start,
                     " (async)" if async_queue is not None else "")
        _barrier()

    if async_queue is None:
        finalize()
    else:
        # The forked writer must not outlive a trainer killed with SIGKILL.
        if request.async_fn is not None:
            request = request._replace(async_fn=functools.partial(_dying_with, os.getpid(), request.async_fn))
        request.add_finalize_fn(finalize)
        async_queue.schedule_async_request(request)
    return final


def _dying_with(parent_pid: int, fn: Any, *args: Any, **kwargs: Any) -> Any:
    die_with_parent(parent_pid, group=True)  # with the per-bucket writers it forks
    return fn(*args, **kwargs)


def new_async_queue() -> Any:
    """Megatron's queue of asynchronous saves (``checkpoint.async_save``)."""
    return AsyncCallsQueue()


def prune(root: Path, keep_last: int, current: int) -> None:
    """Delete old checkpoints: keep ``current`` and the ``keep_last - 1`` newest older ones.

    Never touches checkpoints newer than ``current`` (a resume sets those aside first) nor the
    one just written, whatever step numbers an older run left behind; 0 keeps everything.
    Leftover ``.tmp`` directories of earlier, interrupted saves go too.
    """
    for tmp in root.glob("iter_*.tmp"):
        step = iter_step(tmp.with_suffix(""))
        if step is not None and step < current:
            shutil.rmtree(tmp, ignore_errors=True)
    if keep_last <= 0:
        return
    older = sorted((p for p in root.iterdir() if p.is_dir() and (s := iter_step(p)) is not None and s < current
                    and (p / COMPLETE).exists()), key=iter_step)
    for old in older[:max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def candidates(ckpt_dir: str | Path) -> list[Path]:
    """Checkpoint directories (``iter_XXXXXXX``) under ``ckpt_dir``, newest step first.

    By step, not by the ``latest`` pointer: a crash between a checkpoint's rename and the
    pointer's update leaves the newer checkpoint complete but unnamed.
    """
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and iter_step(p) is not None), key=iter_step,
                  reverse=True)


def load_checkpoint(ckpt: str | Path, model_chunks: list[Any], optimizer: Any | None, scheduler: Any | None,
                    load_optimizer: bool = True, dp_cp_group: Any = None) -> dict[str, Any]:
    """Load one verified checkpoint directory (``iter_X``) and return this rank's trainer state.

    A failure here happens after parts of the checkpoint may already be in the model or the
    optimizer, so it is never a reason to try another checkpoint: it raises
    :class:`CheckpointError` and the run stops. ``dp_cp_group`` as in :func:`save_checkpoint`.
    """
    path = Path(ckpt)
    # Another model class (GPTModel <-> HybridModel) is a user decision, stated before anything loads.
    require_model_class(path / "dist", model_class_of(model_chunks[0]))
    try:
        return _load(path, model_chunks, optimizer if load_optimizer else None, scheduler, dp_cp_group)
    except (Exception, CheckpointException) as exc:  # DCP's CheckpointException is a BaseException
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        raise CheckpointError(f"checkpoint {path} passed verification but could not be loaded ({type(exc).__name__}: "
                              f"{reason[:300]}); the model may hold part of it, so the run stops instead of "
                              "falling back to another checkpoint") from exc


def _load(path: Path, model_chunks: list[Any], opt: Any | None, scheduler: Any | None,
          dp_cp_group: Any) -> dict[str, Any]:
    if opt is not None:
        _materialize_optimizer_state(opt)
    state = dist_checkpointing.load(sharded_state_dict(model_chunks, opt, is_loading=True), str(path / "dist"),
                                    sharded_strategy=_load_strategy(path / "dist", dp_cp_group))
    if len(model_chunks) == 1:
        unwrap(model_chunks[0]).load_state_dict(state["model"])
    else:
        for i, chunk in enumerate(model_chunks):
            unwrap(chunk).load_state_dict(state[f"model{i}"])
    if opt is not None:
        configured = _configured_hyperparameters(opt)
        _adopt_configured_lr(state["optimizer"], configured)
        # With fp32 params Megatron's main params are views of the (grad-requiring) model params,
        # and its loader copies into them in place: that must happen outside autograd.
        with torch.no_grad():
            opt.load_state_dict(state["optimizer"])
        for group, values in zip(opt.param_groups, configured):
            group.update(values)
    trainer_state = torch.load(path / "trainer" / f"rank_{_rank():05d}.pt", weights_only=False)
    if opt is not None:
        set_adam_step(opt, trainer_state.get("adam_step"))
    if scheduler is not None:
        scheduler.load_state_dict(trainer_state["scheduler"])
    set_rng_state(trainer_state["rng"])
    return trainer_state


# Per-group settings that come from the config (optim.*); the loaded state must not replace them.
_CONFIGURED = ("max_lr", "min_lr", "betas", "eps", "lr_mult", "wd_mult")


def _saved_param_groups(state: Any) -> list[dict[str, Any]]:
    """Every saved param group of a loaded optimizer state, in the order of ``optimizer.param_groups``
    (a chained optimizer's states are nested per inner optimizer, in chain order)."""
    if isinstance(state, dict):
        if isinstance(state.get("param_groups"), list):
            return state["param_groups"]
        return [g for key in state for g in _saved_param_groups(state[key])]
    if isinstance(state, (list, tuple)):
        return [g for item in state for g in _saved_param_groups(item)]
    return []


def _adopt_configured_lr(saved_state: Any, configured: list[dict[str, Any]]) -> None:
    """Give the saved param groups the configured ``max_lr``/``min_lr`` before the optimizer loads them.

    megatron-core >= 0.19 pairs saved and current param groups by a tuple of their settings that
    includes ``max_lr`` and ``min_lr`` (``param_group_identifier_keys``), so a changed ``optim.lr``
    would find no saved group (KeyError). Both lists come from the same parameter grouping code, in
    the same order; the configured values are re-applied after the load anyway.
    """
    saved = _saved_param_groups(saved_state)
    if len(saved) != len(configured):
        return  # a different grouping: let the optimizer's own matching report it
    for group, values in zip(saved, configured):
        group.update({k: values[k] for k in ("max_lr", "min_lr") if k in values and k in group})


def _configured_hyperparameters(optimizer: Any) -> list[dict[str, Any]]:
    """The configured settings of every param group; re-applied after a load so that a changed
    ``optim.*`` applies on resume (the scheduler then recomputes lr and weight decay from them)."""
    return [{k: group[k] for k in _CONFIGURED if k in group} for group in optimizer.param_groups]


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
