"""Megatron distributed checkpoints of model weights (``torch_dist`` format).

Owns saving / loading the *model* part of a checkpoint with
``megatron.core.dist_checkpointing``, which stores every tensor with its global shape and
offsets so it can be re-loaded at any other TP / PP / VP layout.

Layout conventions (the same as Megatron-LM's ``--ckpt-format torch_dist``, so model weights of
Megatron-LM checkpoints load too):
  * the state dict is ``{"model": chunk.sharded_state_dict()}`` (``"model0"``, ``"model1"``, ...
    with virtual pipelining); tensor keys are ``embedding.word_embeddings.weight``,
    ``decoder.layers.self_attention.linear_qkv.weight`` (layers stacked along a leading global
    layer axis), ``decoder.final_layernorm.weight``, ``output_layer.weight``;
  * the sharding metadata passed to ``sharded_state_dict`` is stored as the checkpoint's
    ``content_metadata`` and re-used on load, so a checkpoint written with other settings
    (e.g. ``singleton_local_shards``) still loads;
  * a directory with ``latest_checkpointed_iteration.txt`` resolves to its ``iter_XXXXXXX``;
  * the content metadata also records the model class (``GPTModel`` / ``HybridModel``); a
    checkpoint of the other class loads through :mod:`megatron_rpt.weights.interop`.
HybridModel keys carry the hybrid layer index instead of a stacked layer axis
(``decoder.layers.0.self_attention...``, ``decoder.layers.1.mlp...``) and the final norm is
``decoder.final_norm.weight``.
"""

from __future__ import annotations

import functools
import multiprocessing.managers as managers
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.multiprocessing as mp
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch.distributed.checkpoint.api import CheckpointException

from megatron_rpt.bridge.name_maps import unwrap
from megatron_rpt.model.mcore_compat import checkpoint_save_kwargs, read_common_state_in_torch_dist
from megatron_rpt.processes import die_with_parent
from megatron_rpt.weights.hf_io import CheckpointError
from megatron_rpt.weights.interop import (
    content_metadata,
    sharded_state_dict_for,
    stored_keys,
    stored_model_class,
)

# Sharding metadata used when *we* save; Megatron's defaults (stacked, homogeneous layers).
SHARDED_METADATA: dict[str, Any] = {"singleton_local_shards": False}


def resolve_checkpoint_dir(ckpt_dir: str | Path) -> Path:
    """The directory holding ``metadata.json`` (follows Megatron-LM's latest-iteration marker)."""
    path = Path(ckpt_dir)
    if not path.is_dir():
        raise CheckpointError(f"Megatron checkpoint directory {path} does not exist")
    marker = path / "latest_checkpointed_iteration.txt"
    if marker.is_file() and not (path / "metadata.json").is_file():
        text = marker.read_text().strip()
        sub = path / ("release" if text == "release" else f"iter_{int(text):07d}")
        path = sub
    if not (path / "metadata.json").is_file():
        raise CheckpointError(
            f"{path} is not a Megatron distributed checkpoint (no metadata.json); "
            "create one with `python tools/convert.py hf-to-mcore`"
        )
    return path


def _model_keys(count: int) -> list[str]:
    return ["model"] if count == 1 else [f"model{i}" for i in range(count)]


def model_sharded_state_dict(model_chunks: Sequence[torch.nn.Module], metadata: dict[str, Any] | None = None) -> dict:
    metadata = dict(SHARDED_METADATA if metadata is None else metadata)
    return {
        key: unwrap(chunk).sharded_state_dict(metadata=metadata)
        for key, chunk in zip(_model_keys(len(model_chunks)), model_chunks)
    }


def tie_checkpoint_writer_to_this_process() -> None:
    """Start Megatron's checkpoint-writer result queue ourselves, in a process that dies with this one.

    Every ``torch_dist`` save (synchronous ones too) goes through Megatron's async file writer,
    which reports through a ``multiprocessing`` manager process started on first use. Started by
    Megatron, that process (and the resource tracker it keeps alive) survives a SIGKILL of the
    trainer or of a conversion rank. Call before the first save; later calls do nothing.
    """
    if getattr(filesystem_async, "_results_queue", None) is None:
        manager = managers.SyncManager(ctx=mp.get_context("spawn"))
        manager.start(initializer=functools.partial(die_with_parent, os.getpid()))
        filesystem_async._results_queue = manager.Queue()


def sharding_metadata(content: dict[str, Any] | None) -> dict[str, Any]:
    """The ``sharded_state_dict`` settings a checkpoint was saved with (from its content metadata)."""
    return {k: v for k, v in (content or SHARDED_METADATA).items() if k in ("singleton_local_shards",
                                                                          "non_homogeneous_layers")}


def checkpoint_sharded_state_dict(model_chunks: Sequence[torch.nn.Module], path: Path) -> dict:
    """The chunks' sharded state dict aimed at the checkpoint at ``path`` (its sharding settings
    and model class, which may differ from the chunks' own class)."""
    read_common_state_in_torch_dist()  # a checkpoint written by megatron-core >= 0.19 on an older one
    content = dist_checkpointing.load_content_metadata(str(path))
    keys = stored_keys(path)
    stored = stored_model_class(path, content, keys)
    return {
        key: sharded_state_dict_for(unwrap(chunk), sharding_metadata(content), stored, keys, path)
        for key, chunk in zip(_model_keys(len(model_chunks)), model_chunks)
    }


def save_model_checkpoint(model_chunks: Sequence[torch.nn.Module], ckpt_dir: str | Path) -> None:
    """Collective: write this rank's shards of the model weights into ``ckpt_dir`` (must exist)."""
    tie_checkpoint_writer_to_this_process()
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state = model_sharded_state_dict(model_chunks)
    dist_checkpointing.save(state, str(ckpt_dir), content_metadata=content_metadata(model_chunks, SHARDED_METADATA),
                            **checkpoint_save_kwargs())


def load_model_checkpoint(model_chunks: Sequence[torch.nn.Module], ckpt_dir: str | Path, strict: bool = True) -> None:
    """Collective: load the model weights of a dist checkpoint into the chunks of this rank.

    Re-shards to this rank's TP / PP layout. ``strict`` fails on tensors the model needs but
    the checkpoint lacks (tensors only in the checkpoint, e.g. optimizer state, are ignored).
    """
    path = resolve_checkpoint_dir(ckpt_dir)
    # Megatron's "unexpected" = asked for by the model but absent from the checkpoint; tensors
    # present only in the checkpoint (optimizer state, ...) are never an error.
    handling = StrictHandling.RAISE_UNEXPECTED if strict else StrictHandling.LOG_UNEXPECTED
    try:
        # megatron-core >= 0.19 reads the common state from the shards already here, so a
        # damaged shard can fail before the load itself.
        state = checkpoint_sharded_state_dict(model_chunks, path)
        _drop_absent_extra_state(state, path)
        loaded = dist_checkpointing.load(state, str(path), strict=handling)
    except CheckpointError:
        raise  # already names the problem (e.g. another model class)
    except (Exception, CheckpointException) as exc:  # DCP's CheckpointException is a BaseException
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        raise CheckpointError(f"could not load model weights from {path}: {reason}") from exc
    for key, chunk in zip(_model_keys(len(model_chunks)), model_chunks):
        missing, unexpected = unwrap(chunk).load_state_dict(loaded[key], strict=False)
        missing = [m for m in missing if not m.endswith("_extra_state")]
        if strict and missing:
            raise CheckpointError(f"{path} lacks model weights {missing[:8]}{' ...' if len(missing) > 8 else ''}")


def _drop_absent_extra_state(state: dict, path: Path) -> None:
    """Do not ask for ``_extra_state`` objects the checkpoint lacks (in place).

    Transformer-Engine modules carry extra state (FP8 scaling metadata) that the local spec
    does not, so a checkpoint converted on a CPU has none of it; TE re-creates it on the fly.
    """
    prefixes = stored_keys(path)
    for chunk_state in state.values():
        for name in [n for n, v in chunk_state.items() if isinstance(v, ShardedObject) and v.key not in prefixes]:
            del chunk_state[name]
