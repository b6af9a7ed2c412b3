"""Hugging Face <-> Megatron-Core checkpoint conversion (the engine behind ``tools/convert.py``).

Owns the per-rank workers and the orchestration (validation, atomic output, side files):

* :func:`hf_to_mcore`: launches TP*PP ranks (gloo on CPU, NCCL on GPU); each builds its model
  chunk(s) without random init, reads only its slices of the HF safetensors
  (:func:`~megatron_rpt.weights.load.load_hf_into_model`) and writes them with
  ``dist_checkpointing`` (``torch_dist``), so the result loads at any other TP/PP.
  Memory: on CPU every parameter is first re-homed onto a memory-mapped scratch file
  (:func:`~megatron_rpt.weights.load.back_parameters_with_files`, in ``<out>.scratch-XXXX``
  next to the output, deleted at the end), so the shard a rank fills is page cache the kernel
  can write back and evict. A rank's anonymous memory is the framework plus a few of the
  largest tensors (the slice being read and its fused copy while loading, the save's staging),
  independent of the shard size: for an 800 MB float32 model at TP=PP=1 the measured peak was
  566 MB (1284 MB without the file backing; the framework alone is ~290 MB). On GPU the shard
  lives in GPU memory and host RAM holds one tensor at a time.
* :func:`mcore_to_hf`: one process (world of 1). The TP=PP=1 model is built on the *meta*
  device only to obtain Megatron's sharded-state-dict description (checkpoint key and layer
  offset of every parameter); the ``.distcp`` files are then read one layer slab at a time with
  ``torch.distributed.checkpoint`` and streamed through ``layouts.from_mcore`` straight to
  their offsets in pre-planned ``model-0000x-of-0000y.safetensors`` shards (peak: one layer).

Output layout of ``hf-to-mcore``::

    <out>/metadata.json, .metadata, common.pt, __*_*.distcp   the dist checkpoint
    <out>/hf/config.json, generation_config.json, tokenizer*  copied from the HF directory
    <out>/rpt_meta.json                                       family, model class, megatron-core version,
                                                              tp/pp used, dtype, vocab, source
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, TensorStorageMetadata
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from tqdm import tqdm

from megatron_rpt.atomic import atomic_output_dir, check_output_dir, scratch_dir
from megatron_rpt.bridge.layouts import expected_hf_shapes, from_mcore
from megatron_rpt.bridge.name_maps import NameMap, global_param_name
from megatron_rpt.config import Config, ConfigError, ModelConfig, ParallelConfig, validate
from megatron_rpt.distributed import init_distributed, spawn
from megatron_rpt.model.build import build_model, build_model_chunks
from megatron_rpt.model.dtypes import DTYPES
from megatron_rpt.model.hf_config import ArchConfig, load_hf_config, padded_vocab_size, read_hf_config_dict
from megatron_rpt.model.mcore_compat import policy_model_class, version_string
from megatron_rpt.weights.hf_io import (
    CONFIG_FILES,
    TOKENIZER_FILES,
    CheckpointError,
    HFCheckpointReader,
    HFShardWriter,
    copy_model_files,
)
from megatron_rpt.weights.load import back_parameters_with_files, load_hf_into_model, validate_hf_checkpoint
from megatron_rpt.weights.megatron_ckpt import (
    checkpoint_sharded_state_dict,
    resolve_checkpoint_dir,
    save_model_checkpoint,
)

META_NAME = "rpt_meta.json"
HF_SUBDIR = "hf"
# Conversions of large models run for hours; dead ranks are still detected by spawn's exit-code polling.
NO_TIMEOUT = float("inf")


@dataclass(frozen=True)
class ConvertSettings:
    """How ``hf-to-mcore`` lays out the conversion (the result loads at any layout)."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline: int | None = None
    dtype: str | None = None  # None: the HF checkpoint's own dtype (lossless round trips)
    make_vocab_size_divisible_by: int = 128
    progress: bool = True


# ----------------------------------------------------------------------------- validation


def check_parallel_layout(hf_dir: str | Path, tp: int, pp: int, vp: int | None = None) -> ArchConfig:
    """Validate TP/PP/VP against the architecture with the config tree's own messages."""
    arch = load_hf_config(hf_dir)
    if tp < 1 or pp < 1:
        raise ConfigError(f"--tp {tp} / --pp {pp} must be >= 1")
    cfg = Config(
        model=ModelConfig(hf_config=str(hf_dir)),
        parallel=ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, virtual_pipeline=vp),
    )
    try:
        validate(cfg)
    except ConfigError as exc:  # same checks as the trainer; name the CLI flags instead of the config keys
        message = str(exc)
        for key, flag in (("parallel.tensor_parallel", "--tp"), ("parallel.pipeline_parallel", "--pp"),
                          ("parallel.virtual_pipeline", "--vp"), ("virtual_pipeline", "--vp")):
            message = message.replace(key, flag)
        raise ConfigError(message) from None
    ffn = arch.moe_intermediate_size if arch.num_experts else arch.intermediate_size
    if ffn % tp:
        raise ConfigError(f"--tp {tp} does not divide the MLP width {ffn} of {hf_dir}; choose a divisor of it")
    world = tp * pp
    if torch.cuda.is_available() and torch.cuda.device_count() < world:
        raise ConfigError(f"--tp {tp} x --pp {pp} needs {world} GPUs on this node, found {torch.cuda.device_count()}")
    return arch


def _check_not_inside(out: str | Path, source: str | Path, flag: str) -> None:
    out_path, source_path = Path(out).resolve(), Path(source).resolve()
    if out_path == source_path or source_path in out_path.parents or out_path in source_path.parents:
        raise ConfigError(f"--out {out} overlaps {flag} {source}; write the result to a separate directory")


def _resolve_dtype(name: str | None, fallback: str) -> str:
    name = name or fallback
    if name not in DTYPES:
        name = "bfloat16" if "bf" in str(name) else "float32" if "32" in str(name) else name
    if name not in DTYPES:
        raise ConfigError(f"--dtype {name!r} is not one of {sorted(DTYPES)}")
    return name


# ----------------------------------------------------------------------------- HF -> Megatron


def hf_to_mcore_rank(hf_dir: str, out_dir: str, scratch: str, settings: ConvertSettings) -> dict[str, Any]:
    """Per-rank worker: build this rank's chunks, fill them from HF, save the dist checkpoint."""
    init_distributed(settings.tensor_parallel, settings.pipeline_parallel, virtual_pipeline=settings.virtual_pipeline)
    rank = dist.get_rank()
    arch = load_hf_config(hf_dir)
    model_cfg = ModelConfig(params_dtype=settings.dtype or "float32",
                            make_vocab_size_divisible_by=settings.make_vocab_size_divisible_by)
    parallel_cfg = ParallelConfig(tensor_parallel=settings.tensor_parallel,
                                  pipeline_parallel=settings.pipeline_parallel,
                                  virtual_pipeline=settings.virtual_pipeline)
    chunks = build_model_chunks(arch, model_cfg, parallel_cfg, {"perform_initialization": False})
    mapped = 0
    if not torch.cuda.is_available():
        mapped = back_parameters_with_files(chunks, Path(scratch) / f"rank{rank}")
    loaded = load_hf_into_model(chunks, hf_dir, arch, progress=settings.progress and rank == 0, validate=False)
    save_model_checkpoint(chunks, out_dir)
    return {"rank": rank, "tensors": loaded, "file_backed_bytes": mapped}


def hf_to_mcore(hf_dir: str | Path, out: str | Path, settings: ConvertSettings, force: bool = False) -> Path:
    """Convert a HF model directory into a Megatron dist checkpoint at ``out`` (all or nothing)."""
    hf_dir = Path(hf_dir)
    check_output_dir(out, force)
    _check_not_inside(out, hf_dir, "--hf")
    arch = check_parallel_layout(hf_dir, settings.tensor_parallel, settings.pipeline_parallel,
                                 settings.virtual_pipeline)
    with HFCheckpointReader(hf_dir) as reader:
        validate_hf_checkpoint(reader, arch)
    dtype = _resolve_dtype(settings.dtype, arch.torch_dtype)
    settings = replace(settings, dtype=dtype)
    world = settings.tensor_parallel * settings.pipeline_parallel
    started = time.time()
    with atomic_output_dir(out, force) as tmp, scratch_dir(out) as scratch:
        results = spawn(hf_to_mcore_rank, world, str(hf_dir), str(tmp), str(scratch), settings, timeout=NO_TIMEOUT)
        copy_model_files(hf_dir, tmp / HF_SUBDIR, CONFIG_FILES + TOKENIZER_FILES)
        meta = {
            "format": "megatron-rpt/mcore-torch_dist/v1",
            "family": arch.family,
            "hf_architecture": arch.hf_architecture,
            "model_class": policy_model_class().value,
            "megatron_core": version_string(),
            "tensor_parallel": settings.tensor_parallel,
            "pipeline_parallel": settings.pipeline_parallel,
            "virtual_pipeline": settings.virtual_pipeline,
            "dtype": dtype,
            "vocab_size": arch.vocab_size,
            "make_vocab_size_divisible_by": settings.make_vocab_size_divisible_by,
            "padded_vocab_size": padded_vocab_size(arch.vocab_size, settings.make_vocab_size_divisible_by,
                                                   settings.tensor_parallel),
            "source": str(hf_dir.absolute()),
            "tensors_per_rank": [r["tensors"] for r in results],
            "seconds": round(time.time() - started, 2),
        }
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(out)


# ----------------------------------------------------------------------------- Megatron -> HF


def read_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / META_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def _layer_group(name: str, num_layers: int) -> int:
    """Stream order: embedding, layer 0 .. L-1 (Megatron layers), then final norm / output layer."""
    if name.startswith("embedding."):
        return 0
    if name.startswith("decoder.layers."):
        return 1 + int(name.split(".")[2])
    return num_layers + 1


def _first_sharded_tensor(entry: Any) -> Any:
    """The (first) ShardedTensor behind a sharded-state-dict entry (factories are built)."""
    while not isinstance(entry, ShardedTensor):
        if isinstance(entry, ShardedTensorFactory):
            entry = entry.build()
        elif isinstance(entry, dict):
            entry = next(iter(entry.values()))
        elif isinstance(entry, (list, tuple)):
            entry = entry[0]
        else:
            raise TypeError(f"unexpected sharded state dict entry {type(entry).__name__}")
    return entry


def _slab_planner(offsets: dict[str, tuple[int, ...]]) -> Any:
    """A DCP load planner that fills each destination from ``offsets[key]`` of the stored global tensor.

    Megatron stores a pipeline's layers stacked along leading axes ("prepended" layer / expert
    axes); this reads one layer's slab instead of the whole stack.
    """
    class SlabLoadPlanner(DefaultLoadPlanner):
        def create_local_plan(self) -> LoadPlan:
            requests = []
            for key, tensor in self.state_dict.items():
                chunk = ChunkStorageMetadata(offsets=torch.Size(offsets[key]), sizes=tensor.size())
                requests += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
            return LoadPlan(requests)

        def lookup_tensor(self, index):  # destinations are plain tensors standing for an offset slab
            return self.state_dict[index.fqn]

    return SlabLoadPlanner(allow_partial_load=True)


def iter_mcore_tensors(ckpt_dir: str | Path, arch: ArchConfig, divisible_by: int):
    """Yield ``(global Megatron name, full tensor)`` from a dist checkpoint, one layer in memory at a time.

    The names and stored keys come from Megatron itself: a TP=PP=1 model is built on the meta
    device (nothing allocated) and its ``sharded_state_dict`` says which checkpoint key and which
    layer offset hold each parameter. The data is read with ``torch.distributed.checkpoint``
    straight from the ``.distcp`` files, at the dtype it was saved in, and vocabulary rows as
    stored (padding included). Must run with Megatron's parallel state initialised at TP=PP=1.
    """
    path = resolve_checkpoint_dir(ckpt_dir)
    stored = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    # Local spec + CPU-style allocation (no explicit device) so that every parameter lands on the meta
    # device: the model only describes the checkpoint, nothing is allocated. Keys are spec-independent.
    model_cfg = ModelConfig(make_vocab_size_divisible_by=divisible_by, transformer_impl="local")
    overrides = {"perform_initialization": False, "use_cpu_initialization": True}
    with torch.device("meta"):
        model = build_model(arch, model_cfg, ParallelConfig(), config_overrides=overrides)
    sharded = checkpoint_sharded_state_dict([model], path)["model"]  # a checkpoint of either model class
    groups: dict[int, list[tuple[str, str, tuple[int, ...], tuple[int, ...], int]]] = {}
    for name, _ in model.named_parameters():
        tensor = _first_sharded_tensor(sharded[name])
        md = stored.get(tensor.key)
        if not isinstance(md, TensorStorageMetadata):
            raise CheckpointError(
                f"{path} has no tensor {tensor.key!r} (model parameter {name}); it is not a checkpoint of "
                f"this {arch.hf_architecture} architecture, or --hf-config describes another model"
            )
        lead = tensor.prepend_axis_num
        if len(md.size) != lead + tensor.data.dim():
            raise CheckpointError(f"{path}: {tensor.key} is stored with shape {list(md.size)}, "
                                  f"which does not fit parameter {name} {list(tensor.data.shape)}")
        offsets = tuple(tensor.global_offset[:lead]) + (0,) * (len(md.size) - lead)
        sizes = (1,) * lead + tuple(md.size[lead:])
        groups.setdefault(_layer_group(name, len(model.decoder.layers)), []).append(
            (name, tensor.key, offsets, sizes, lead))
    reader = FileSystemReader(str(path))
    for group in sorted(groups):
        # Experts of a layer share one stored key (an expert axis is prepended too): one read per round.
        rounds: list[list[tuple[str, str, tuple[int, ...], tuple[int, ...], int]]] = []
        for item in groups[group]:
            target = next((r for r in rounds if all(other[1] != item[1] for other in r)), None)
            if target is None:
                rounds.append(target := [])
            target.append(item)
        for items in rounds:
            request = {key: torch.empty(sizes, dtype=stored[key].properties.dtype) for _, key, _, sizes, _ in items}
            offsets = {key: off for _, key, off, _, _ in items}
            try:
                dcp_load(request, storage_reader=reader, planner=_slab_planner(offsets), no_dist=True)
            except (Exception, CheckpointException) as exc:  # DCP's CheckpointException is a BaseException
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
                raise CheckpointError(f"could not read {sorted(request)} from {path}: {reason}") from exc
            for name, key, _, sizes, lead in items:
                yield global_param_name(model, name), request[key].reshape(sizes[lead:])
            del request


def mcore_to_hf_rank(ckpt_dir: str, hf_config_dir: str, out_dir: str, dtype: str,
                     divisible_by: int, max_shard_bytes: int, progress: bool) -> dict[str, Any]:
    """Single-rank worker: stream the checkpoint into HF safetensors shards under ``out_dir``."""
    init_distributed(1, 1)
    arch = load_hf_config(hf_config_dir)
    names = NameMap(arch)
    plan = [
        (hf_name, shape)
        for tmap, layer, expert in names.iter_all()
        for hf_name, shape in zip(tmap.format(layer, expert)[1], expected_hf_shapes(tmap, arch))
    ]
    writer = HFShardWriter(out_dir, plan, DTYPES[dtype], max_shard_bytes)
    bar = None
    if progress:
        bar = tqdm(total=sum(1 for _ in names.iter_all()), desc="exporting", unit="tensor", dynamic_ncols=True)
    written = 0
    for mcore_name, full in iter_mcore_tensors(ckpt_dir, arch, divisible_by):
        tmap, layer, expert = names.lookup(mcore_name)
        for hf_name, tensor in zip(tmap.format(layer, expert)[1], from_mcore(tmap, full, arch)):
            writer.write(hf_name, tensor)
            written += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    files = writer.finish()
    return {"tensors": written, "files": [f.name for f in files]}


def mcore_to_hf(ckpt_dir: str | Path, out: str | Path, dtype: str | None = None, hf_config: str | Path | None = None,
                max_shard_size: int = 5 << 30, force: bool = False, progress: bool = True) -> Path:
    """Export a Megatron dist checkpoint to a HF model directory at ``out`` (all or nothing)."""
    ckpt_dir = Path(ckpt_dir)
    check_output_dir(out, force)
    _check_not_inside(out, ckpt_dir, "--ckpt")
    resolve_checkpoint_dir(ckpt_dir)
    meta = read_meta(ckpt_dir)
    hf_config_dir = Path(hf_config) if hf_config else ckpt_dir / HF_SUBDIR
    if not (hf_config_dir / "config.json").is_file() and not hf_config_dir.name.endswith(".json"):
        raise CheckpointError(
            f"no HF config.json at {hf_config_dir}; pass --hf-config DIR (the HF model directory this "
            "checkpoint was trained from)"
        )
    arch = load_hf_config(hf_config_dir)  # fail here, not in the worker, on an unsupported architecture
    dtype = _resolve_dtype(dtype, meta.get("dtype", arch.torch_dtype))
    divisible_by = int(meta.get("make_vocab_size_divisible_by", 128))
    config_dict = read_hf_config_dict(hf_config_dir)
    with atomic_output_dir(out, force) as tmp:
        spawn(mcore_to_hf_rank, 1, str(ckpt_dir), str(hf_config_dir), str(tmp), dtype, divisible_by,
              int(max_shard_size), progress, timeout=NO_TIMEOUT)
        src = hf_config_dir if hf_config_dir.is_dir() else hf_config_dir.parent
        copy_model_files(src, tmp, ("generation_config.json",) + TOKENIZER_FILES)
        for key in ("torch_dtype", "dtype"):
            if key in config_dict:
                config_dict[key] = dtype
        config_dict.setdefault("torch_dtype", dtype)
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    return Path(out)
