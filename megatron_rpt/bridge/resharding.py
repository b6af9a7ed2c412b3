"""Stream the live Megatron policy into a rollout engine, in Hugging Face names and layout.

Owns :class:`WeightBridge`: from this rank's Megatron shards (tensor / pipeline / virtual
pipeline / expert parallel) to the stream of HF-named tensors an engine's
``update_weights`` takes. All name and layout knowledge comes from
:mod:`megatron_rpt.bridge.name_maps`; this module only moves bytes.

How a sync moves a tensor (every rank runs the same sequence of collectives):
  1. Plan (once, at construction). Every parameter of the full model gets an owner pipeline
     stage (one ``all_gather_object`` of parameter names over the pipeline group) and a
     *kind*: ``whole`` (this rank holds all of it: replicated, or TP=1), ``tp`` (gathered over
     the tensor-parallel group) or ``expert`` (gathered over the expert-TP x expert-parallel
     group, global expert indices from ``named_parameters_global(expert_offset=...)``). Shapes
     come from :class:`ArchConfig` and the padded vocabulary, so receivers need no metadata.
     Parameters of one owner stage and kind are packed into buckets of at most ``bucket_mb``.
  2. Per bucket: the owner stage packs its shards into one flat staging buffer, casting to
     the engine dtype in the same copy; one ``all_gather_into_tensor`` (in place: each rank's
     input is its slot of the output; with gloo one broadcast per member, ~10x faster there)
     gathers the TP / expert shards; with PP > 1 one ``broadcast`` over the pipeline group
     hands the bucket to the other stages.
  3. Every rank un-fuses the bucket into HF tensors (q/k/v, gate/up, vocabulary padding
     removed) writing each HF tensor once, straight from the gathered shards.
No collective needed (TP=1, PP=1, EP=1): tensors are yielded as views of the parameters, in
the parameters' dtype (zero copy; the engine's own copy casts to its dtype, one pass instead of a
cast into a buffer and a second copy out of it). Only q/k/v need a copy to un-interleave.
Every rank receives the *full* HF tensors: a tensor-parallel engine (vLLM) narrows them to its
rank itself in its weight loaders.

Memory: one staging buffer (the largest bucket, ``<= bucket_mb`` unless a single tensor is
larger) is reused for every bucket, plus one un-fuse buffer the size of the largest HF
tensor group written from shards (e.g. lm_head merged over TP, or one layer's q/k/v): about
one bucket plus one tensor, reported as ``SyncStats.peak_extra_bytes``. On CPU both buffers
are kept between syncs (a fresh page costs a page fault, which would halve the throughput;
``release_buffers()`` frees them); on an accelerator they are dropped after each sync (the
caching allocator keeps the blocks).

Lifetime: by default a yielded tensor is valid only until the next item is requested (the
buffers behind it are reused); the engine copies it before asking for the next one (the
built-in engine does). An engine that keeps references to pushed tensors and reads them later
declares ``retains_pushed_tensors = True`` (vLLM's in-place reload buffers every tensor of a
layer until the layer is complete, then loads and post-processes them together). For such an
engine the bridge never reuses memory a yielded tensor may view: every bucket gets a fresh
staging buffer and every un-fused tensor fresh memory, freed by reference counting once the
engine drops its references. Peak memory is then about one bucket plus the buckets holding the
layers the engine has not finished (one layer, or one MoE layer's experts, when tensors come
in layer order as here), and ``peak_extra_bytes`` counts every such buffer while it is alive.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
from torch import nn

from megatron_rpt.bridge.name_maps import (
    NameMap,
    TensorMap,
    expected_hf_shapes,
    from_mcore,
    named_parameters_global,
    qkv_grouped_views,
    unwrap,
    uses_grouped_experts,
    uses_te_layout,
)
from megatron_rpt.model.hf_config import ArchConfig
from megatron_rpt.model.mcore_compat import model_class_of

WHOLE, TP_GATHER, EXPERT_GATHER = "whole", "tp", "expert"


@dataclass(frozen=True)
class SyncStats:
    """What one sync moved and what it cost on this rank."""

    seconds: float
    bytes: int  # bytes of the HF tensors delivered, counted in the engine dtype
    gb_per_s: float
    num_tensors: int
    num_buckets: int  # staging buffers filled (collective rounds or casting copies)
    max_bucket_bytes: int  # size of the staging buffer (the largest bucket)
    peak_extra_bytes: int  # most bytes the bridge had allocated at once (staging, un-fuse, retained buckets)


# --------------------------------------------------------------------------- shard -> HF layout


def tp_local_arch(arch: ArchConfig, tp_size: int) -> ArchConfig:
    """The architecture one TP shard of ``linear_qkv`` looks like (whole query groups)."""
    return replace(arch, num_attention_heads=arch.num_attention_heads // tp_size,
                   num_key_value_heads=arch.num_key_value_heads // tp_size)


def hf_slice_of_shard(tmap: TensorMap, shard: torch.Tensor, arch: ArchConfig, tp_size: int) -> list[torch.Tensor]:
    """HF tensors (``tmap.hf`` order) of one TP shard: rank r's shard gives chunk r of each HF
    tensor along ``tmap.tp_dim``. Not defined for the padded vocabulary (shard edges differ)."""
    if tmap.layout == "vocab" and tp_size > 1:
        raise ValueError("a vocabulary shard is not a slice of the HF tensor (Megatron pads the vocabulary)")
    if tmap.layout == "qkv":
        return [t.reshape(-1, *shard.shape[1:]) for t in qkv_grouped_views(shard, tp_local_arch(arch, tp_size))]
    return from_mcore(tmap, shard, arch)  # gate_up: [gate_r; up_r] halves; copy: the shard itself


def writes_hf_tensors(tmap: TensorMap, num_shards: int) -> bool:
    """Whether the HF tensors of ``tmap`` must be written (merged from several shards, or q/k/v
    un-interleaved) rather than being views of one shard."""
    return tmap.tp_dim is not None and (num_shards > 1 or tmap.layout == "qkv")


def hf_from_tp_shards(tmap: TensorMap, shards: Sequence[torch.Tensor], arch: ArchConfig,
                      out: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """HF tensors (``tmap.hf`` order) from all TP ranks' shards (rank order).

    Equals ``from_mcore(tmap, tp_merge(tmap, shards), arch)``, but writes each HF tensor once
    into its final buffer (``out`` when given, shaped as :func:`expected_hf_shapes`; fresh
    memory otherwise) instead of materialising the merged Megatron tensor first. When nothing
    must be written (one shard that is not q/k/v, or a replicated tensor) the result is
    ``from_mcore`` of the shard: views.
    """
    n = len(shards)
    if not writes_hf_tensors(tmap, n):
        return from_mcore(tmap, shards[0], arch)
    ref = shards[0]
    outs = list(out) if out is not None else [
        torch.empty(shape, dtype=ref.dtype, device=ref.device) for shape in expected_hf_shapes(tmap, arch)
    ]
    if tmap.layout == "vocab":
        rows = ref.shape[0]
        for r, shard in enumerate(shards):
            start = r * rows
            keep = max(0, min(rows, arch.vocab_size - start))
            if keep:
                outs[0].narrow(0, start, keep).copy_(shard.narrow(0, 0, keep))
        return outs
    if tmap.layout == "qkv":  # strided copies straight out of each shard's per-group layout
        local = tp_local_arch(arch, n)
        for r, shard in enumerate(shards):
            for dst, part in zip(outs, qkv_grouped_views(shard, local)):
                rows = part.shape[0] * part.shape[1]
                dst.narrow(0, r * rows, rows).view(part.shape).copy_(part)
        return outs
    for r, shard in enumerate(shards):
        for dst, part in zip(outs, hf_slice_of_shard(tmap, shard, arch, n)):
            width = part.shape[tmap.tp_dim]
            dst.narrow(tmap.tp_dim, r * width, width).copy_(part)
    return outs


def mcore_full_shape(tmap: TensorMap, arch: ArchConfig, padded_vocab: int) -> tuple[int, ...]:
    """Shape of the full (unsharded) Megatron tensor of ``tmap``, from the architecture alone."""
    hf = expected_hf_shapes(tmap, arch)
    if tmap.layout == "qkv":
        return (sum(s[0] for s in hf), *hf[0][1:])
    if tmap.layout == "gate_up":
        return (2 * hf[0][0], *hf[0][1:])
    if tmap.layout == "vocab":
        return (padded_vocab, *hf[0][1:])
    return hf[0]


def _shard_shape(full: tuple[int, ...], dim: int | None, parts: int, what: str) -> tuple[int, ...]:
    if dim is None or parts == 1:
        return full
    if full[dim] % parts:
        raise ValueError(f"{what}: dimension {dim} of size {full[dim]} does not split over {parts} ranks")
    return tuple(s // parts if i == dim else s for i, s in enumerate(full))


# --------------------------------------------------------------------------- parallel layout


def _all_gather_in_place(flat: torch.Tensor, mine: torch.Tensor, member_numel: int, group: object) -> None:
    """Gather every member's segment of ``flat`` (``mine`` is this rank's, already filled).

    NCCL: one ``all_gather_into_tensor``. Gloo's all-gather is ~10x slower than its broadcast
    (0.25 vs 2.4 GB/s on loopback), so on CPU each member broadcasts its own segment instead.
    """
    if flat.device.type == "cpu" and "gloo" in str(dist.get_backend(group)):
        works = [dist.broadcast(flat.narrow(0, m * member_numel, member_numel), group=group, group_src=m,
                                async_op=True) for m in range(dist.get_world_size(group))]
        for work in works:
            work.wait()
    else:
        dist.all_gather_into_tensor(flat, mine, group=group)


@dataclass
class _Topology:
    """This rank's place in Megatron's parallel groups (all sizes 1 without torch.distributed)."""

    tp_size: int = 1
    tp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0
    ep_size: int = 1
    ep_rank: int = 0
    etp_size: int = 1
    etp_rank: int = 0
    tp_group: object = None
    pp_group: object = None
    expert_group: object = None  # expert-TP x expert-parallel group of this stage
    expert_index: int = 0  # this rank's index in expert_group
    expert_members: list[tuple[int, int]] = field(default_factory=lambda: [(0, 0)])  # (etp_rank, ep_rank)

    @classmethod
    def current(cls, has_experts: bool) -> "_Topology":
        if not dist.is_initialized():
            return cls()
        from megatron.core import parallel_state as ps

        if not ps.model_parallel_is_initialized():
            raise RuntimeError("WeightBridge needs Megatron's parallel state; call init_distributed() first")
        topo = cls(
            tp_size=ps.get_tensor_model_parallel_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
            pp_size=ps.get_pipeline_model_parallel_world_size(), pp_rank=ps.get_pipeline_model_parallel_rank(),
            tp_group=ps.get_tensor_model_parallel_group(), pp_group=ps.get_pipeline_model_parallel_group(),
        )
        if has_experts:
            topo.ep_size, topo.ep_rank = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
            topo.etp_size = ps.get_expert_tensor_parallel_world_size()
            topo.etp_rank = ps.get_expert_tensor_parallel_rank()
            if topo.ep_size * topo.etp_size > 1:
                topo.expert_group = ps.get_expert_tensor_and_model_parallel_group()
                topo.expert_index = dist.get_rank(topo.expert_group)
                # Rank order inside the combined group is Megatron's business; ask once.
                members: list[tuple[int, int] | None] = [None] * dist.get_world_size(topo.expert_group)
                dist.all_gather_object(members, (topo.etp_rank, topo.ep_rank), group=topo.expert_group)
                topo.expert_members = [tuple(m) for m in members]  # type: ignore[misc]
        return topo


@dataclass
class _Slot:
    """One Megatron tensor carried by a bucket (each group member contributes ``shape``)."""

    tmap: TensorMap
    layer: int | None
    expert: int | None  # global index; for EXPERT_GATHER the local index j (expert = ep_rank * n_local + j)
    shape: tuple[int, ...]
    source: torch.Tensor | None  # this rank's parameter (owner stage only)
    offset: int = 0  # element offset inside each member's segment

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class _Bucket:
    stage: int
    kind: str
    dtype: torch.dtype
    group_size: int
    slots: list[_Slot] = field(default_factory=list)
    member_numel: int = 0
    staged: bool = True  # False: zero-copy views of the parameters (no collective)

    @property
    def nbytes(self) -> int:
        return self.member_numel * self.group_size * self.dtype.itemsize


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


_ALIGN = 64  # bytes; keeps every carved tensor aligned for vectorised copies


def _carved_bytes(shapes: Sequence[tuple[int, ...]], dtype: torch.dtype) -> int:
    total = 0
    for shape in shapes:
        total += -(-torch.Size(shape).numel() * dtype.itemsize // _ALIGN) * _ALIGN
    return total


def _carve(buffer: torch.Tensor | None, shapes: Sequence[tuple[int, ...]], dtype: torch.dtype
           ) -> list[torch.Tensor] | None:
    """Tensors of ``shapes`` laid out back to back (aligned) in a byte ``buffer`` (None: none)."""
    if buffer is None:
        return None
    out, offset = [], 0
    for shape in shapes:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        out.append(buffer[offset: offset + nbytes].view(dtype).view(shape))
        offset += -(-nbytes // _ALIGN) * _ALIGN
    return out


# --------------------------------------------------------------------------- the bridge


class WeightBridge:
    """Megatron shards of this rank -> the full HF-named tensor stream, on every rank.

    ``model_chunks``: this rank's model chunks (one per virtual pipeline stage; DDP /
    Float16Module wrappers are fine). ``bucket_mb``: staging-buffer size per collective.
    ``dtype``: engine dtype (None: the parameters' own); collectives move it (the packing copy
    casts), tensors that need no collective come in the parameters' dtype and the engine's own
    copy casts them. ``te_layout``: the Transformer-Engine spec's fused norm names (None:
    detect from the model).

    Construction (one ``all_gather_object`` over the pipeline group, and over the expert
    group with MoE), :meth:`iter_hf_tensors` and :meth:`sync` are collective: every rank of
    the job calls them, in the same order.
    """

    def __init__(
        self,
        model_chunks: Sequence[nn.Module],
        arch: ArchConfig,
        bucket_mb: float,
        dtype: torch.dtype | None = None,
        te_layout: bool | None = None,
    ):
        if not model_chunks:
            raise ValueError("WeightBridge needs at least one model chunk")
        if not bucket_mb or bucket_mb <= 0:
            raise ValueError(f"bucket_mb={bucket_mb} must be > 0 (rollout.bucket_mb: staging buffer size in MB)")
        self.arch = arch
        self.dtype = dtype
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.chunks = [unwrap(c) for c in model_chunks]
        if te_layout is None:
            te_layout = any(uses_te_layout(c) for c in self.chunks)
        self.names = NameMap(arch, te_layout, grouped_experts=any(uses_grouped_experts(c) for c in self.chunks),
                             model_class=model_class_of(self.chunks[0]))
        self.padded_vocab = self._padded_vocab()
        self.topo = _Topology.current(bool(arch.num_experts))
        local = self._local_tensors()
        self.buckets = self._plan(local)
        self.max_bucket_bytes = max((b.nbytes for b in self.buckets if b.staged), default=0)
        self.scratch_bytes = max((self._scratch_need(b, s) for b in self.buckets for s in b.slots), default=0)
        self._device = next(iter(self.chunks[0].parameters())).device
        self._keep_buffers = self._device.type == "cpu"
        self._staging = self._scratch = None
        self._param_storages: set[int] = set()
        self._alive: dict[int, int] = {}  # storage pointer -> bytes of bridge memory alive now
        self._reset_counters()

    # ------------------------------------------------------------------ public API

    def iter_hf_tensors(self, retained: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """Every HF tensor of the full model, in plan order (layer by layer within a bucket group).

        ``retained=False``: a tensor is valid until the next item is requested. ``True``: tensors
        stay valid for as long as the consumer references them (see the module docstring).
        """
        return self._stream(decode=True, retained=retained)

    def sync(self, engine: object | None) -> SyncStats:
        """Push the current weights into ``engine.update_weights``; ``None``: this rank hosts no
        engine but still takes part in the collectives (nothing is un-fused or delivered).
        An engine with ``retains_pushed_tensors = True`` gets tensors that outlive the next item."""
        start = time.perf_counter()
        if engine is None:
            for _ in self._stream(decode=False):
                pass
        else:
            update = getattr(engine, "update_weights", None)
            if update is None:
                raise TypeError(f"{type(engine).__name__} has no update_weights(stream); it is not a rollout engine")
            stream = self._stream(decode=True, retained=bool(getattr(engine, "retains_pushed_tensors", False)))
            update(stream)
            leftover = sum(1 for _ in stream)  # keep the other ranks' collectives matched
            if leftover:
                raise RuntimeError(f"{type(engine).__name__}.update_weights stopped {leftover} tensors before the end")
        seconds = time.perf_counter() - start
        c = self._counters
        return SyncStats(
            seconds=seconds, bytes=c["bytes"], gb_per_s=c["bytes"] / max(seconds, 1e-12) / 1e9,
            num_tensors=c["tensors"], num_buckets=c["buckets"], max_bucket_bytes=self.max_bucket_bytes,
            peak_extra_bytes=c["peak"],
        )

    # ------------------------------------------------------------------ set-up

    def _padded_vocab(self) -> int:
        vocab = getattr(self.chunks[0], "vocab_size", None)
        if vocab is None:
            raise TypeError(f"{type(self.chunks[0]).__name__} has no vocab_size; WeightBridge expects GPTModel or "
                            "HybridModel chunks")
        return int(vocab)

    def _local_tensors(self) -> dict[tuple[str, int | None, int | None], torch.Tensor]:
        """(map template, layer, global expert) -> this rank's parameter."""
        arch, topo = self.arch, self.topo
        offset = topo.ep_rank * (arch.num_experts // topo.ep_size) if arch.num_experts else 0
        local: dict[tuple[str, int | None, int | None], torch.Tensor] = {}
        for chunk in self.chunks:
            for name, param in named_parameters_global(chunk, expert_offset=offset):
                if name == "output_layer.weight" and arch.tie_word_embeddings:
                    continue  # the last stage's copy of the tied embedding; the first stage's is exported
                tmap, layer, expert = self.names.lookup(name)
                local[(tmap.mcore, layer, expert)] = param  # detached at use: DDP may re-point .data
        return local

    def _owners(self, local: dict) -> dict[tuple[str, int | None], tuple[int, str]]:
        """(map template, layer) -> (owner pipeline stage, dtype name)."""
        mine = sorted({(key[0], key[1], str(t.dtype).removeprefix("torch.")) for key, t in local.items()},
                      key=lambda k: (k[0], -1 if k[1] is None else k[1]))
        if self.topo.pp_size == 1:
            stages = [mine]
        else:
            stages = [None] * self.topo.pp_size
            dist.all_gather_object(stages, mine, group=self.topo.pp_group)
        owners: dict[tuple[str, int | None], tuple[int, str]] = {}
        for stage, keys in enumerate(stages):
            for template, layer, dtype in keys:
                if (template, layer) in owners and owners[(template, layer)][0] != stage:
                    raise RuntimeError(f"{template} (layer {layer}) is held by pipeline stages "
                                       f"{owners[(template, layer)][0]} and {stage}")
                owners[(template, layer)] = (stage, dtype)
        return owners

    def _plan(self, local: dict) -> list[_Bucket]:
        arch, topo = self.arch, self.topo
        owners = self._owners(local)
        n_local = arch.num_experts // topo.ep_size if arch.num_experts else 0
        groups: dict[tuple[int, str, torch.dtype], list[_Slot]] = {}
        missing: list[str] = []
        for tmap, layer, expert in self.names.iter_all():
            owner = owners.get((tmap.mcore, layer))
            if owner is None:
                missing.append(tmap.format(layer, expert)[0])
                continue
            stage, dtype_name = owner
            kind, parts = self._kind(tmap)
            if kind == EXPERT_GATHER:
                if expert >= n_local:
                    continue  # arrives with local slot expert % n_local from its EP rank
                source_key = (tmap.mcore, layer, topo.ep_rank * n_local + expert)
            else:
                source_key = (tmap.mcore, layer, expert)
            full = mcore_full_shape(tmap, arch, self.padded_vocab)
            shape = _shard_shape(full, tmap.tp_dim, parts, tmap.format(layer, expert)[0])
            source = local.get(source_key) if stage == topo.pp_rank else None
            if stage == topo.pp_rank:
                if source is None:
                    raise RuntimeError(f"pipeline stage {stage} lacks {source_key} that its peers expect")
                if tuple(source.shape) != shape:
                    raise ValueError(
                        f"{tmap.format(layer, expert)[0]} has shape {tuple(source.shape)} on this rank, the "
                        f"architecture implies {shape}; the model was built from a different config.json"
                    )
            transport = self.dtype or getattr(torch, dtype_name)
            groups.setdefault((stage, kind, transport), []).append(_Slot(tmap, layer, expert, shape, source))
        if missing:
            raise RuntimeError(
                f"{len(missing)} parameters of the {arch.hf_architecture} are on no pipeline stage (first: "
                f"{missing[0]}); the model chunks were built with a different architecture than {arch.model_type}"
            )
        buckets: list[_Bucket] = []
        for (stage, kind, dtype), slots in groups.items():
            size = self._group_size(kind)
            bucket = _Bucket(stage, kind, dtype, size)
            for slot in slots:
                if bucket.slots and (bucket.member_numel + slot.numel) * size * dtype.itemsize > self.bucket_bytes:
                    buckets.append(bucket)
                    bucket = _Bucket(stage, kind, dtype, size)
                slot.offset = bucket.member_numel
                bucket.slots.append(slot)
                bucket.member_numel += slot.numel
            buckets.append(bucket)
        for bucket in buckets:  # a cast alone needs no staging: the engine's copy casts
            bucket.staged = topo.pp_size > 1 or bucket.group_size > 1 or any(s.source is None for s in bucket.slots)
        return buckets

    def _kind(self, tmap: TensorMap) -> tuple[str, int]:
        """(kind, how many ranks the tensor is split over) for this model's layout."""
        topo = self.topo
        if tmap.per_expert:
            if topo.ep_size * topo.etp_size == 1:
                return WHOLE, 1
            return EXPERT_GATHER, topo.etp_size if tmap.tp_dim is not None else 1
        if tmap.tp_dim is None or topo.tp_size == 1:
            return WHOLE, 1
        return TP_GATHER, topo.tp_size

    def _shards_per_hf(self, bucket: _Bucket, slot: _Slot) -> int:
        """How many shards one HF tensor of ``slot`` is written from."""
        if bucket.kind == WHOLE or slot.tmap.tp_dim is None:
            return 1
        return self._split_of(slot.tmap)

    def _scratch_need(self, bucket: _Bucket, slot: _Slot) -> int:
        """Bytes of the HF tensors written for ``slot`` (un-fuse buffer): merged from several
        shards, or q/k/v un-interleaved; in the dtype they are yielded in."""
        if not writes_hf_tensors(slot.tmap, self._shards_per_hf(bucket, slot)):
            return 0
        copies = self.topo.ep_size if bucket.kind == EXPERT_GATHER else 1
        dtype = bucket.dtype if bucket.staged else slot.source.dtype
        return _carved_bytes(expected_hf_shapes(slot.tmap, self.arch) * copies, dtype)

    def _group_size(self, kind: str) -> int:
        if kind == TP_GATHER:
            return self.topo.tp_size
        if kind == EXPERT_GATHER:
            return len(self.topo.expert_members)
        return 1

    # ------------------------------------------------------------------ the stream

    def release_buffers(self) -> None:
        """Free the staging / un-fuse buffers (on CPU they are kept between syncs: fresh pages
        cost a page fault each, which would halve the throughput)."""
        self._staging = self._scratch = None

    def _reset_counters(self) -> None:
        self._counters = {"bytes": 0, "tensors": 0, "buckets": 0, "peak": 0}

    def _buffer(self, attr: str, nbytes: int) -> torch.Tensor | None:
        if not nbytes:
            return None
        buf = getattr(self, attr, None)
        if buf is None:
            buf = torch.empty(nbytes, dtype=torch.uint8, device=self._device)
            setattr(self, attr, buf)
        return buf

    def _track(self, tensor: torch.Tensor) -> None:
        """Count ``tensor``'s memory as the bridge's until every view of it is gone."""
        storage = tensor.untyped_storage()  # shared by every view, dtype views included
        key = storage.data_ptr()
        if key in self._alive or key in self._param_storages:
            return
        self._alive[key] = storage.nbytes()
        weakref.finalize(storage, self._alive.pop, key, None)
        self._counters["peak"] = max(self._counters["peak"], sum(self._alive.values()))

    def _stream(self, decode: bool, retained: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        self._reset_counters()
        self._param_storages = {_storage_key(s.source) for b in self.buckets for s in b.slots if s.source is not None}
        fresh = decode and retained  # never reuse memory a yielded tensor may still view
        staging = None if fresh else self._buffer("_staging", self.max_bucket_bytes)
        scratch = None if fresh or not decode else self._buffer("_scratch", self.scratch_bytes)
        for buf in (staging, scratch):
            if buf is not None:
                self._track(buf)
        self._counters["peak"] = sum(self._alive.values())
        try:
            for bucket in self.buckets:
                if not bucket.staged:
                    if decode:
                        yield from self._emit(bucket, [[slot.source.detach()] for slot in bucket.slots], scratch, fresh)
                    continue
                if fresh:
                    staging = torch.empty(bucket.nbytes, dtype=torch.uint8, device=self._device)
                    self._track(staging)
                flat = staging[: bucket.nbytes].view(bucket.dtype)
                self._transfer(bucket, flat)
                self._counters["buckets"] += 1
                if decode:
                    segments = [flat.narrow(0, m * bucket.member_numel, bucket.member_numel)
                                for m in range(bucket.group_size)]
                    views = [[seg.narrow(0, s.offset, s.numel).view(s.shape) for seg in segments] for s in bucket.slots]
                    del segments
                    yield from self._emit(bucket, views, scratch, fresh)
                    del views
                del flat
                if fresh:
                    staging = None  # the engine's references alone keep it alive now
        finally:
            del staging, scratch
            if not self._keep_buffers:
                self.release_buffers()

    def _transfer(self, bucket: _Bucket, flat: torch.Tensor) -> None:
        """Pack (owner stage), gather over TP / experts (owner stage), broadcast over PP."""
        topo = self.topo
        if bucket.stage == topo.pp_rank:
            member = {TP_GATHER: topo.tp_rank, EXPERT_GATHER: topo.expert_index}.get(bucket.kind, 0)
            mine = flat.narrow(0, member * bucket.member_numel, bucket.member_numel)
            for slot in bucket.slots:
                mine.narrow(0, slot.offset, slot.numel).view(slot.shape).copy_(slot.source.detach())
            if bucket.group_size > 1:
                group = topo.tp_group if bucket.kind == TP_GATHER else topo.expert_group
                _all_gather_in_place(flat, mine, bucket.member_numel, group)
        if topo.pp_size > 1:
            dist.broadcast(flat, group=topo.pp_group, group_src=bucket.stage)

    def _emit(self, bucket: _Bucket, views: list[list[torch.Tensor]], scratch: torch.Tensor | None,
              fresh: bool) -> Iterator[tuple[str, torch.Tensor]]:
        """Un-fuse each slot of a transferred bucket into HF tensors and yield them. Only with
        ``fresh`` memory can a yielded tensor own memory the bridge has not counted already."""
        for slot, shards in zip(bucket.slots, views):
            items = self._hf_tensors(bucket, slot, shards, scratch)
            for name, tensor in items:
                if fresh:
                    self._track(tensor)  # a no-op for views of parameters or of tracked buckets
                self._counters["bytes"] += tensor.numel() * (self.dtype or tensor.dtype).itemsize
                self._counters["tensors"] += 1
                yield name, tensor
            del items, shards

    def _hf_tensors(self, bucket: _Bucket, slot: _Slot, shards: list[torch.Tensor],
                    scratch: torch.Tensor | None) -> list[tuple[str, torch.Tensor]]:
        """[(HF name, tensor)] of one slot; written tensors are carved from ``scratch`` (fresh
        memory when it is None)."""
        arch, tmap = self.arch, slot.tmap
        dtype = shards[0].dtype
        if bucket.kind != EXPERT_GATHER:
            shards = shards if tmap.tp_dim is not None else shards[:1]  # replicated: all members sent the same
            out = _carve(scratch, expected_hf_shapes(tmap, arch), dtype) if writes_hf_tensors(tmap, len(shards)) else None
            return list(zip(tmap.format(slot.layer, slot.expert)[1], hf_from_tp_shards(tmap, shards, arch, out)))
        # One slot carries local expert j of every EP rank: experts ep * n_local + j.
        n_local = arch.num_experts // self.topo.ep_size
        shapes = expected_hf_shapes(tmap, arch)
        per_expert = self.topo.etp_size if tmap.tp_dim is not None else 1
        outs = _carve(scratch, shapes * self.topo.ep_size, dtype) if writes_hf_tensors(tmap, per_expert) else None
        items: list[tuple[str, torch.Tensor]] = []
        for ep in range(self.topo.ep_size):
            ranked = sorted((etp, i) for i, (etp, e) in enumerate(self.topo.expert_members) if e == ep)
            expert_shards = [shards[i] for _, i in ranked][:per_expert]
            out = outs[ep * len(shapes): (ep + 1) * len(shapes)] if outs is not None else None
            full = hf_from_tp_shards(tmap, expert_shards, arch, out)
            items += list(zip(tmap.format(slot.layer, ep * n_local + slot.expert)[1], full))
        return items

    def _split_of(self, tmap: TensorMap) -> int:
        return self.topo.etp_size if tmap.per_expert else self.topo.tp_size
