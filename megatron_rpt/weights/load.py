"""Put weights into the live Megatron model chunks of this rank.

Owns:
  * :func:`load_hf_into_model`: Hugging Face safetensors -> this rank's parameters. Each rank
    reads only its tensor-parallel slice of each HF tensor (``get_slice``) and only the layers
    of its pipeline stage(s), so peak extra memory is one (sliced) tensor. The trainer calls it
    when ``model.hf_checkpoint`` is set.
  * :func:`load_megatron_checkpoint`: a Megatron distributed checkpoint (``tools/convert.py
    hf-to-mcore`` or a training checkpoint) -> the chunks, at any TP/PP (re-sharded by
    ``megatron.core.dist_checkpointing``).
  * :func:`back_parameters_with_files`: moves parameter storage onto memory-mapped scratch
    files (CPU only), used by the converter so a rank's anonymous RAM does not grow with its shard.

Names come from :mod:`megatron_rpt.bridge.name_maps`, the slicing maths from
:mod:`megatron_rpt.bridge.layouts`, the parallel layout from :class:`megatron_rpt.topology.Topology`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_rpt.bridge.layouts import (
    expected_hf_shapes,
    to_mcore_shard,
    tp_slice_ranges,
)
from megatron_rpt.bridge.name_maps import (
    NameMap,
    TensorMap,
    named_parameters_global,
    unwrap,
)
from megatron_rpt.model.hf_config import ArchConfig, load_hf_config
from megatron_rpt.topology import Topology
from megatron_rpt.weights.hf_io import CheckpointError, HFCheckpointReader
from megatron_rpt.weights.megatron_ckpt import load_model_checkpoint


def validate_hf_checkpoint(reader: HFCheckpointReader, arch: ArchConfig) -> int:
    """Check that every tensor ``arch`` needs is present with the right shape (headers only).

    Returns the number of HF tensors checked. Raises :class:`CheckpointError` listing the problems.
    """
    problems: list[str] = []
    checked = 0
    for tmap, layer, expert in NameMap(arch).iter_all():
        names = tmap.format(layer, expert)[1]
        for name, shape in zip(names, expected_hf_shapes(tmap, arch)):
            checked += 1
            if name not in reader:
                problems.append(f"missing tensor {name}")
            elif reader.shape(name) != shape:
                problems.append(f"{name} has shape {list(reader.shape(name))}, config.json implies {list(shape)}")
    if problems:
        more = f"; ... ({len(problems) - 10} more)" if len(problems) > 10 else ""
        raise CheckpointError(
            f"the weights in {reader.dir} do not match its config.json ({arch.hf_architecture}): "
            + "; ".join(problems[:10]) + more
            + " — the checkpoint is incomplete or config.json belongs to another model"
        )
    return checked


def _tp_rank_size(tmap: TensorMap, topo: Topology) -> tuple[int, int]:
    """(rank, size) of the tensor-parallel split of ``tmap``: expert-TP for experts."""
    if tmap.per_expert:
        return topo.etp_rank, topo.etp_size
    return topo.tp_rank, topo.tp_size


def read_mcore_shard(reader: HFCheckpointReader, tmap: TensorMap, layer: int | None, expert: int | None,
                     arch: ArchConfig, padded_vocab: int, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's shard of one Megatron tensor, reading only the needed HF slices."""
    hf_names = tmap.format(layer, expert)[1]
    ranges = tp_slice_ranges(tmap, arch, padded_vocab, tp_rank, tp_size)
    slices = [reader.read(name, rows) for name, rows in zip(hf_names, ranges)]
    return to_mcore_shard(tmap, slices, arch, padded_vocab, tp_rank, tp_size)


@torch.no_grad()
def load_hf_into_model(
    model_chunks: Sequence[torch.nn.Module],
    hf_dir: str | Path,
    arch: ArchConfig | None = None,
    *,
    progress: bool = False,
    validate: bool = True,
    topo: Topology | None = None,
) -> int:
    """Copy the HF checkpoint in ``hf_dir`` into this rank's model chunks; return the tensors loaded.

    Call on every rank after :func:`megatron_rpt.distributed.init_distributed` and building the
    chunks (``build_model_chunks``; pass ``config_overrides={"perform_initialization": False}``
    to skip the random init that would be overwritten). Works for any TP / PP / VP / EP layout
    and both the local and the Transformer-Engine layer specs. Weights are cast to each
    parameter's dtype. ``topo``: the trainer's :class:`Topology` (default: read from Megatron).
    """
    arch = arch or load_hf_config(hf_dir)
    topo = topo if topo is not None else Topology.current()
    params: list[tuple[torch.nn.Module, NameMap, str, torch.nn.Parameter]] = []
    for chunk in model_chunks:
        inner = unwrap(chunk)
        names = NameMap.for_model(arch, inner)
        offset = topo.expert_offset(arch.num_experts)
        params += [(inner, names, n, p) for n, p in named_parameters_global(inner, offset)]
    with HFCheckpointReader(hf_dir) as reader:
        if validate:
            validate_hf_checkpoint(reader, arch)
        bar = None
        if progress:
            bar = tqdm(total=len(params), desc=f"loading {Path(hf_dir).name}", unit="tensor", dynamic_ncols=True)
        for inner, names, name, param in params:
            tmap, layer, expert = names.lookup(name)
            tp_rank, tp_size = _tp_rank_size(tmap, topo)
            padded_vocab = inner.vocab_size
            shard = read_mcore_shard(reader, tmap, layer, expert, arch, padded_vocab, tp_rank, tp_size)
            if tuple(shard.shape) != tuple(param.shape):
                raise CheckpointError(
                    f"{name}: the HF weights give a shard of shape {list(shard.shape)} but the model's parameter "
                    f"is {list(param.shape)} (TP rank {tp_rank}/{tp_size}); the model was built for another config"
                )
            param.copy_(shard)
            del shard
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    return len(params)


def back_parameters_with_files(model_chunks: Sequence[torch.nn.Module], scratch: str | Path) -> int:
    """Re-home every CPU parameter onto a memory-mapped file in ``scratch``; return bytes mapped.

    The pages are shared file-backed memory: the kernel writes them back and evicts them under
    pressure, so a whole model shard can be filled and saved while the process's *anonymous*
    memory stays at a few tensors. Build the model with ``perform_initialization=False`` first
    (never-touched ``torch.empty`` pages are not resident). The files are scratch: delete
    ``scratch`` when done. No-op for parameters that are not on the CPU.
    """
    scratch = Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    total = 0
    for c, chunk in enumerate(model_chunks):
        for name, param in unwrap(chunk).named_parameters():
            if param.device.type != "cpu" or param.numel() == 0:
                continue
            nbytes = param.numel() * param.element_size()
            path = scratch / f"chunk{c}.{name}.bin"
            storage = torch.UntypedStorage.from_file(str(path), shared=True, nbytes=nbytes)
            mapped = torch.empty(0, dtype=param.dtype).set_(storage, 0, param.shape)
            param.data = mapped
            total += nbytes
    return total


# ------------------------------------------------------------------------ Megatron checkpoints


def load_megatron_checkpoint(
    model_chunks: Sequence[torch.nn.Module], ckpt_dir: str | Path, strict: bool = True
) -> None:
    """Load model weights from a Megatron dist checkpoint into this rank's chunks (any TP/PP)."""
    load_model_checkpoint(model_chunks, ckpt_dir, strict=strict)
