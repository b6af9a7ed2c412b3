"""The megatron-core version facts megatron-rpt depends on, in one place.

Supported and tested: megatron-core 0.16.x (the newest release for Python 3.11) and 0.19.x
(Python 3.12). What differs between them, each a named switch here, not a ``hasattr`` at the
call site:

* ``HYBRID_MODEL_SINCE``: 0.19 ships ``HybridModel`` (``megatron/core/models/hybrid``) and
  deprecates ``GPTModel`` ("GPTModel IS DEPRECATED ... HybridModel"). A Llama / Qwen decoder
  layer becomes two HybridModel layers, an attention layer ("*") and an MLP ("-") or MoE ("E")
  layer, and ``dist_checkpointing/gpt_checkpoint_interop.py`` retargets GPTModel checkpoints
  at it. On older versions the policy stays a ``GPTModel``.
* ``CP_SPLIT_TAKES_HYBRID_CP_SINCE``: ``get_batch_on_this_cp_rank`` gained a required
  ``is_hybrid_cp`` argument (and no longer defaults its group to parallel_state's CP group).
* ``COMMON_STATE_IN_TORCH_DIST_SINCE``: 0.19 writes a checkpoint's common state (content
  metadata, non-tensor objects) into the torch_dist files as a ``common_state`` object instead
  of ``common.pt``; :func:`read_common_state_in_torch_dist` teaches older versions to read it.
* ``ASYNC_STRATEGY_SINCE``: 0.19's ``dist_checkpointing.save`` takes ``async_strategy`` and
  defaults it to "nvrx" (nvidia-resiliency-ext, not a dependency here); megatron-rpt keeps
  megatron-core's own writer ("mcore", the one 0.16 uses). 0.19 logs "MCore's async save is
  deprecated" for it, and for every *synchronous* save too (its sync save runs the same writer);
  :func:`checkpoint_save_kwargs` silences that one record, nothing else.
* ``CROSS_ENTROPY_TAKES_TP_GROUP_SINCE``: ``vocab_parallel_cross_entropy`` takes the
  tensor-parallel group (``tp_group``); before, it always reduces over parallel_state's TP group.
* The CUDA streams and events of 0.19's gradient sync live in :mod:`cpu_compat` (covered for
  every version: the shim is a superset).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib.metadata
import io
import logging
import os
import re
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from megatron.core import package_info, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.utils import get_batch_on_this_cp_rank as megatron_cp_split

HYBRID_MODEL_SINCE = (0, 19)
CP_SPLIT_TAKES_HYBRID_CP_SINCE = (0, 19)
COMMON_STATE_IN_TORCH_DIST_SINCE = (0, 19)
ASYNC_STRATEGY_SINCE = (0, 19)
CROSS_ENTROPY_TAKES_TP_GROUP_SINCE = (0, 19)


class ModelClass(str, enum.Enum):
    """The Megatron-Core language-model class a policy (and its checkpoints) is built from."""

    GPT = "GPTModel"
    HYBRID = "HybridModel"


@functools.cache
def mcore_version() -> tuple[int, int, int]:
    """(major, minor, patch) of the installed megatron-core."""
    try:
        text = importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:  # a source checkout on PYTHONPATH
        text = package_info.__version__
    numbers = [int(n) for n in re.findall(r"\d+", text)[:3]]
    return tuple(numbers + [0] * (3 - len(numbers)))  # type: ignore[return-value]


def version_string() -> str:
    return "megatron-core " + ".".join(str(n) for n in mcore_version())


def policy_model_class() -> ModelClass:
    """The class megatron-core maintains on this version: HybridModel from 0.19, else GPTModel."""
    return ModelClass.HYBRID if mcore_version() >= HYBRID_MODEL_SINCE else ModelClass.GPT


def buildable_model_classes() -> tuple[ModelClass, ...]:
    """Classes this megatron-core can build (GPTModel stays available, deprecated, on 0.19)."""
    if mcore_version() >= HYBRID_MODEL_SINCE:
        return (ModelClass.GPT, ModelClass.HYBRID)
    return (ModelClass.GPT,)


def model_class_of(model: Any) -> ModelClass:
    """The class of a (possibly DDP / Float16Module wrapped) model chunk."""
    while hasattr(model, "module"):
        model = model.module
    name = type(model).__name__
    for cls in ModelClass:
        if cls.value == name:
            return cls
    raise TypeError(f"{name} is neither of {[c.value for c in ModelClass]}; megatron-rpt builds only those")


def get_batch_on_this_cp_rank(batch: dict[str, Any], cp_group: Any) -> dict[str, Any]:
    """Megatron's own load-balanced CP split of ``batch`` over ``cp_group`` (reference for ours), on any version."""
    if mcore_version() >= CP_SPLIT_TAKES_HYBRID_CP_SINCE:
        return megatron_cp_split(batch, is_hybrid_cp=False, cp_group=cp_group)
    return megatron_cp_split(batch, cp_group=cp_group)


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, tp_group: Any) -> torch.Tensor:
    """Megatron's cross entropy of vocab-parallel ``logits`` (overwritten in place) over ``tp_group``.

    Before 0.19 megatron-core reduces over its own TP group, which is the policy's
    (:class:`~megatron_rpt.topology.Topology` reads it from there), so the argument is dropped.
    """
    if mcore_version() >= CROSS_ENTROPY_TAKES_TP_GROUP_SINCE:
        return tensor_parallel.vocab_parallel_cross_entropy(logits, labels, tp_group=tp_group)
    return tensor_parallel.vocab_parallel_cross_entropy(logits, labels)


@functools.cache
def read_common_state_in_torch_dist() -> None:
    """On megatron-core < 0.19, read the common state of checkpoints written by 0.19 and later.

    Those have no ``common.pt``: 0.19 stores the common state dict as the ``common_state``
    object of the torch_dist files and reads it from there. Installs that reading as the
    fallback of the older common-load strategy when ``common.pt`` is absent (once; a no-op on
    0.19, where ``common.pt`` is the legacy case and both are read natively).
    """
    if mcore_version() >= COMMON_STATE_IN_TORCH_DIST_SINCE:
        return
    # lazy: TorchCommonLoadStrategy exists only in megatron-core < 0.19
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME, TorchCommonLoadStrategy

    legacy_load_common = TorchCommonLoadStrategy.load_common

    def load_common(self: Any, checkpoint_dir: Any) -> Any:
        if os.path.exists(os.path.join(str(checkpoint_dir), COMMON_STATE_FNAME)):
            return legacy_load_common(self, checkpoint_dir)
        return _common_state_from_torch_dist(str(checkpoint_dir))

    TorchCommonLoadStrategy.load_common = load_common


def _common_state_from_torch_dist(checkpoint_dir: str) -> Any:
    """The ``common_state`` object of a 0.19 checkpoint (as 0.19's ``load_common_state_dict`` reads it)."""
    key = ShardedObject("common_state", None, (1,), (0,)).unique_key
    request: dict[str, Any] = {key: io.BytesIO()}
    dcp.load(request, storage_reader=dcp.FileSystemReader(checkpoint_dir), no_dist=True)
    loaded = request[key]
    if isinstance(loaded, io.BytesIO):
        loaded.seek(0)
        loaded = torch.load(loaded, weights_only=True)
    return loaded[0]


def transformer_config_kwargs(config_cls: type) -> dict[str, Any]:
    """``TransformerConfig`` fields this version needs set to stay quiet: megatron-core defaults its CUDA
    graph scope to "full" (``cuda_graph_scope`` in 0.16, ``cuda_graph_modules`` in 0.19), which its own
    ``__post_init__`` warns is deprecated ("use empty ..."); empty means the same (and no CUDA graph is
    captured: ``cuda_graph_impl`` stays none)."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    for name in ("cuda_graph_modules", "cuda_graph_scope"):  # 0.19 keeps cuda_graph_scope as a deprecated alias
        if name in names:
            return {name: []}
    return {}


def checkpoint_save_kwargs() -> dict[str, Any]:
    """Extra ``dist_checkpointing.save`` arguments for this version (megatron-core's own async writer)."""
    if mcore_version() < ASYNC_STRATEGY_SINCE:
        return {}
    _silence_writer_deprecation()
    return {"async_strategy": "mcore"}


class _WriterDeprecationFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("MCore's async save is deprecated")


@functools.cache
def _silence_writer_deprecation() -> None:
    logging.getLogger("megatron.core.dist_checkpointing.strategies.torch").addFilter(_WriterDeprecationFilter())
