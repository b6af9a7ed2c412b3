"""The weight bridge's bucket plan: which tensors travel together, over which group, from which stage.

Owns :func:`plan_buckets`, a pure function (no collectives: it is tested without
``torch.distributed``). Every parameter of the full model gets an owner pipeline stage and a
:class:`Transfer`: ``WHOLE`` (the owner holds all of it: replicated, or TP=1), ``TP_GATHER``
(its shards are gathered over the tensor-parallel group) or ``EXPERT_GATHER`` (over the
expert-TP x expert-parallel group: one slot carries local expert ``j`` of every EP rank). Shard
shapes come from the architecture and the padded vocabulary, so receivers need no metadata.
Tensors of one owner stage, transfer and transport dtype are packed, in HF export order, into
buckets of at most ``bucket_bytes`` (a tensor larger than that gets a bucket of its own). Every
rank computes the same plan, so all ranks run the same sequence of collectives.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from megatron_rpt.bridge.layouts import mcore_full_shape, shard_shape
from megatron_rpt.bridge.name_maps import NameMap, TensorMap, named_parameters_global
from megatron_rpt.model.hf_config import ArchConfig
from megatron_rpt.topology import Topology

Key = tuple[str, int | None, int | None]  # (map template, HF layer, global expert)


class Transfer(enum.Enum):
    """How a tensor reaches every rank."""

    WHOLE = "whole"
    TP_GATHER = "tp"
    EXPERT_GATHER = "expert"


@dataclass
class Slot:
    """One Megatron tensor carried by a bucket (each group member contributes ``shape``)."""

    tmap: TensorMap
    layer: int | None
    expert: int | None  # global index; for EXPERT_GATHER the local index j (expert = ep_rank * n_local + j)
    shape: tuple[int, ...]
    source: torch.Tensor | None  # this rank's parameter (owner stage only)
    offset: int = 0  # element offset inside each member's segment

    @property
    def numel(self) -> int:
        return torch.Size(self.shape).numel()


@dataclass
class Bucket:
    stage: int  # owner pipeline stage
    kind: Transfer
    dtype: torch.dtype  # transport dtype
    group_size: int  # members contributing a segment
    slots: list[Slot] = field(default_factory=list)
    member_numel: int = 0
    staged: bool = True  # False: zero-copy views of the parameters (no collective)

    @property
    def nbytes(self) -> int:
        return self.member_numel * self.group_size * self.dtype.itemsize


def local_tensors(chunks: Iterable[torch.nn.Module], names: NameMap, topo: Topology) -> dict[Key, torch.Tensor]:
    """This rank's parameters by (map template, HF layer, global expert); the last stage's copy of
    tied embeddings is left out (the first stage's is exported)."""
    offset = topo.expert_offset(names.arch.num_experts)
    local: dict[Key, torch.Tensor] = {}
    for chunk in chunks:
        for name, param in named_parameters_global(chunk, expert_offset=offset):
            if names.is_tied_copy(name):
                continue
            tmap, layer, expert = names.lookup(name)
            local[(tmap.mcore, layer, expert)] = param  # detached at use: DDP may re-point .data
    return local


def stage_holdings(local: Mapping[Key, torch.Tensor]) -> list[tuple[str, int | None, str]]:
    """(map template, layer, dtype name) of every tensor this stage holds (what the stages exchange)."""
    return sorted({(key[0], key[1], str(t.dtype).removeprefix("torch.")) for key, t in local.items()},
                  key=lambda k: (k[0], -1 if k[1] is None else k[1]))


def owners_from_stages(
    stages: list[list[tuple[str, int | None, str]]],
) -> dict[tuple[str, int | None], tuple[int, str]]:
    """(map template, layer) -> (owner pipeline stage, dtype name), from every stage's holdings."""
    owners: dict[tuple[str, int | None], tuple[int, str]] = {}
    for stage, keys in enumerate(stages):
        for template, layer, dtype in keys:
            if (template, layer) in owners and owners[(template, layer)][0] != stage:
                raise RuntimeError(f"{template} (layer {layer}) is held by pipeline stages "
                                   f"{owners[(template, layer)][0]} and {stage}")
            owners[(template, layer)] = (stage, dtype)
    return owners


def transfer_of(tmap: TensorMap, topo: Topology) -> tuple[Transfer, int]:
    """(transfer, how many ranks the tensor is split over) for this layout."""
    if tmap.per_expert:
        if topo.expert_world == 1:
            return Transfer.WHOLE, 1
        return Transfer.EXPERT_GATHER, topo.etp_size if tmap.tp_dim is not None else 1
    if tmap.tp_dim is None or topo.tp_size == 1:
        return Transfer.WHOLE, 1
    return Transfer.TP_GATHER, topo.tp_size


def group_size(kind: Transfer, topo: Topology) -> int:
    """Members of the group a bucket of ``kind`` is gathered over."""
    return {Transfer.TP_GATHER: topo.tp_size, Transfer.EXPERT_GATHER: topo.expert_world}.get(kind, 1)


def tp_split(tmap: TensorMap, topo: Topology) -> int:
    """How many tensor-parallel shards one HF tensor of ``tmap`` is split into."""
    return topo.etp_size if tmap.per_expert else topo.tp_size


def plan_buckets(names: NameMap, padded_vocab: int, topo: Topology,
                 owners: Mapping[tuple[str, int | None], tuple[int, str]], local: Mapping[Key, torch.Tensor],
                 bucket_bytes: int, dtype: torch.dtype | None) -> list[Bucket]:
    """The buckets of one sync, identical on every rank (sources filled on the owner stage only).

    ``owners``: :func:`owners_from_stages` of all stages; ``local``: :func:`local_tensors` of this
    rank; ``dtype``: transport dtype (None: each tensor's own).
    """
    arch = names.arch
    slots = _slots(names, arch, padded_vocab, topo, owners, local)
    groups: dict[tuple[int, Transfer, torch.dtype], list[Slot]] = {}
    for stage, kind, transport, slot in slots:
        groups.setdefault((stage, kind, dtype or transport), []).append(slot)
    buckets: list[Bucket] = []
    for (stage, kind, transport), members in groups.items():
        size = group_size(kind, topo)
        bucket = Bucket(stage, kind, transport, size)
        for slot in members:
            if bucket.slots and (bucket.member_numel + slot.numel) * size * transport.itemsize > bucket_bytes:
                buckets.append(bucket)
                bucket = Bucket(stage, kind, transport, size)
            slot.offset = bucket.member_numel
            bucket.slots.append(slot)
            bucket.member_numel += slot.numel
        buckets.append(bucket)
    for bucket in buckets:  # a cast alone needs no staging: the engine's copy casts
        bucket.staged = topo.pp_size > 1 or bucket.group_size > 1 or any(s.source is None for s in bucket.slots)
    return buckets


def _slots(names: NameMap, arch: ArchConfig, padded_vocab: int, topo: Topology,
           owners: Mapping[tuple[str, int | None], tuple[int, str]], local: Mapping[Key, torch.Tensor]
           ) -> list[tuple[int, Transfer, torch.dtype, Slot]]:
    """(owner stage, transfer, tensor dtype, slot) in HF export order; checks this rank's shapes."""
    n_local = arch.num_experts // topo.ep_size if arch.num_experts else 0
    out, missing = [], []
    for tmap, layer, expert in names.iter_all():
        owner = owners.get((tmap.mcore, layer))
        if owner is None:
            missing.append(tmap.format(layer, expert)[0])
            continue
        stage, dtype_name = owner
        kind, parts = transfer_of(tmap, topo)
        if kind is Transfer.EXPERT_GATHER:
            if expert >= n_local:
                continue  # arrives with local slot expert % n_local from its EP rank
            source_key = (tmap.mcore, layer, topo.ep_rank * n_local + expert)
        else:
            source_key = (tmap.mcore, layer, expert)
        what = tmap.format(layer, expert)[0]
        shape = shard_shape(mcore_full_shape(tmap, arch, padded_vocab), tmap.tp_dim, parts, what)
        source = local.get(source_key) if stage == topo.pp_rank else None
        if stage == topo.pp_rank:
            if source is None:
                raise RuntimeError(f"pipeline stage {stage} lacks {source_key} that its peers expect")
            if tuple(source.shape) != shape:
                raise ValueError(f"{what} has shape {tuple(source.shape)} on this rank, the architecture implies "
                                 f"{shape}; the model was built from a different config.json")
        out.append((stage, kind, getattr(torch, dtype_name), Slot(tmap, layer, expert, shape, source)))
    if missing:
        raise RuntimeError(
            f"{len(missing)} parameters of the {arch.hf_architecture} are on no pipeline stage (first: "
            f"{missing[0]}); the model chunks were built with a different architecture than {arch.model_type}"
        )
    return out
