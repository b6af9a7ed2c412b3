"""Megatron checkpoints across model classes: GPTModel (megatron-core 0.16) <-> HybridModel (0.19).

Owns: which class a checkpoint holds, and aiming a model chunk's sharded state dict at a
checkpoint of either class, so that ``dist_checkpointing.load`` reads it directly (at any
TP / PP, nothing rewritten on disk).

* A checkpoint states its class: ``model_class`` in its content metadata (written by
  :func:`content_metadata`). Checkpoints without it (older ones, Megatron-LM's) are told
  apart by their final norm: GPTModel stores ``decoder.final_layernorm``, HybridModel
  ``decoder.final_norm``.
* HybridModel reading a GPTModel checkpoint: megatron-core's own retargeting
  (``dist_checkpointing.gpt_checkpoint_interop``, 0.19): hybrid layer keys are rewritten onto
  GPT's stacked layer axis (decoder layer ``i`` = the ``i``-th attention and the ``i``-th MLP
  layer of the pattern).
* GPTModel reading a HybridModel checkpoint (0.16 has no such module): the GPTModel's sharded
  state dict is taken in its non-homogeneous form (one key per layer, no stacked layer axis:
  the form HybridModel stores) and decoder layer ``g``'s attention keys are renamed to the
  ``g``-th attention layer found in the checkpoint, its MLP keys to the ``g``-th MLP layer.
Only storage keys and offsets change; the state dict keeps the model's own parameter names.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
from megatron.core.dist_checkpointing.mapping import ShardedBase
from torch.distributed.checkpoint import FileSystemReader

from megatron_rpt.model.mcore_compat import (
    ModelClass,
    model_class_of,
    read_common_state_in_torch_dist,
    version_string,
)
from megatron_rpt.weights.hf_io import CheckpointError

MODEL_CLASS_KEY = "model_class"
MCORE_VERSION_KEY = "megatron_core"
FINAL_NORM_KEYS = {ModelClass.GPT: "decoder.final_layernorm.weight", ModelClass.HYBRID: "decoder.final_norm.weight"}


class ModelClassMismatch(CheckpointError):
    """A training checkpoint of the other model class (it cannot resume here; its weights can load)."""


_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_ATTENTION_PARTS = ("input_layernorm.", "self_attention.")
_MLP_PARTS = ("pre_mlp_layernorm.", "mlp.")


def content_metadata(model_chunks: list[Any], sharding: dict[str, Any]) -> dict[str, Any]:
    """Content metadata for saving ``model_chunks``: the sharding settings plus the model class."""
    return {**sharding, MODEL_CLASS_KEY: model_class_of(model_chunks[0]).value, MCORE_VERSION_KEY: version_string()}


def stored_keys(path: str | Path) -> set[str]:
    """The tensor / object keys stored in a dist checkpoint (its ``.metadata``, no data read)."""
    return {key.split("/shard_")[0] for key in FileSystemReader(str(path)).read_metadata().state_dict_metadata}


def stored_model_class(path: str | Path, metadata: dict[str, Any] | None, keys: set[str]) -> ModelClass:
    """The class a checkpoint holds: its content metadata, else its final-norm key."""
    recorded = (metadata or {}).get(MODEL_CLASS_KEY)
    if recorded is not None:
        try:
            return ModelClass(recorded)
        except ValueError:
            raise CheckpointError(f"{path} holds a {recorded!r}; megatron-rpt reads only "
                                  f"{[c.value for c in ModelClass]} checkpoints") from None
    for cls, key in FINAL_NORM_KEYS.items():
        if key in keys:
            return cls
    return ModelClass.GPT  # no final norm (a model without its last stage is not loadable anyway)


def require_model_class(path: str | Path, own: ModelClass) -> None:
    """Refuse, in one line, to resume a training checkpoint (``path``: its ``dist/``) of another class.

    Its optimizer state is laid out per parameter buffer of the class that wrote it, which
    megatron-core does not retarget; its model weights do load into the other class
    (``model.load``), so that is the fix offered.
    """
    read_common_state_in_torch_dist()
    content = dist_checkpointing.load_content_metadata(str(path)) or {}
    stored = stored_model_class(path, content, stored_keys(path))
    if stored is not own:
        writer = content.get(MCORE_VERSION_KEY, "an older megatron-core")
        raise ModelClassMismatch(
            f"{path} holds a {stored.value} training state (written by {writer}) but this {version_string()} "
            f"trains a {own.value}; resume it with the megatron-core that wrote it, or start a new run from its "
            f"weights with --resume none --set model.load={path}")


def sharded_state_dict_for(chunk: torch.nn.Module, metadata: dict[str, Any], stored: ModelClass,
                           keys: set[str], path: str | Path) -> dict[str, Any]:
    """``chunk.sharded_state_dict`` aimed at a checkpoint of class ``stored`` (stored ``keys``)."""
    own = model_class_of(chunk)
    if own is stored:
        return chunk.sharded_state_dict(metadata=metadata)
    if own is ModelClass.HYBRID:
        # lazy: the module exists from megatron-core 0.19 on, the only version that builds HybridModel
        from megatron.core.dist_checkpointing.gpt_checkpoint_interop import (
            gpt_compatible_layer_maps,
            retarget_sharded_state_dict_to_gpt_checkpoint,
        )

        state = chunk.sharded_state_dict(metadata=metadata)
        retarget_sharded_state_dict_to_gpt_checkpoint(state, gpt_compatible_layer_maps(chunk.hybrid_layer_pattern))
        return state
    return _gpt_state_for_hybrid_checkpoint(chunk, metadata, keys, path)


def _gpt_state_for_hybrid_checkpoint(chunk: torch.nn.Module, metadata: dict[str, Any], keys: set[str],
                                     path: str | Path) -> dict[str, Any]:
    attention, mlp = hybrid_layer_indices(keys)
    num_layers = chunk.config.num_layers
    if len(attention) != num_layers or len(mlp) != num_layers:
        raise CheckpointError(
            f"{path} is a HybridModel checkpoint with {len(attention)} attention and {len(mlp)} MLP layers; "
            f"this GPTModel has {num_layers} decoder layers, each one attention and one MLP layer: it is a "
            "checkpoint of another model (or of layer kinds GPTModel does not have)")
    state = chunk.sharded_state_dict(metadata={**metadata, "non_homogeneous_layers": True})

    def retarget(entry: Any) -> Any:
        if not isinstance(entry, ShardedBase):
            return entry
        match = _LAYER_KEY.match(entry.key)
        if match:
            layer, rest = int(match.group(1)), match.group(2)
            hybrid = attention[layer] if rest.startswith(_ATTENTION_PARTS) else mlp[layer]
            entry.key = f"decoder.layers.{hybrid}.{rest}"
        elif entry.key.startswith("decoder.final_layernorm."):
            entry.key = "decoder.final_norm." + entry.key[len("decoder.final_layernorm."):]
        return entry

    dict_list_map_inplace(retarget, state)
    return state


def hybrid_layer_indices(keys: set[str]) -> tuple[list[int], list[int]]:
    """Sorted HybridModel layer indices holding attention and holding an MLP / MoE, from stored keys."""
    attention: set[int] = set()
    mlp: set[int] = set()
    for key in keys:
        match = _LAYER_KEY.match(key)
        if match and match.group(2).startswith(_ATTENTION_PARTS):
            attention.add(int(match.group(1)))
        elif match and match.group(2).startswith(_MLP_PARTS):
            mlp.add(int(match.group(1)))
    return sorted(attention), sorted(mlp)
