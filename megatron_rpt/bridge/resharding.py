"""Stream the live Megatron policy into a rollout engine, in Hugging Face names and layout.

Owns :class:`WeightBridge`, the streaming: from this rank's Megatron shards (tensor / pipeline /
virtual pipeline / expert parallel) to the stream of HF-named tensors an engine's
``update_weights`` takes, on every rank. Names come from :mod:`~megatron_rpt.bridge.name_maps`,
the un-fusing maths from :mod:`~megatron_rpt.bridge.layouts`, the bucket plan from
:mod:`~megatron_rpt.bridge.buckets`, the parallel layout from :class:`~megatron_rpt.topology.Topology`.

Per bucket (every rank runs the same collectives): the owner stage packs its shards into one
flat staging buffer, casting to the engine dtype in the same copy; one in-place all-gather (gloo:
one broadcast per member, ~10x faster there) gathers TP / expert shards; with PP > 1 one
broadcast hands the bucket to the other stages; every rank then un-fuses it into HF tensors,
writing each HF tensor once. Without any collective (TP=PP=EP=1) tensors are views of the
parameters in their own dtype (the engine's copy casts); only q/k/v are copied to un-interleave.
Every rank receives the *full* HF tensors (a TP engine narrows them itself).

Memory: one staging buffer (the largest bucket) and one un-fuse buffer (the largest HF tensor
group written from shards), reported as ``SyncStats.peak_extra_bytes``; kept between syncs on
CPU (fresh pages cost a page fault each), dropped after each sync on an accelerator.

Lifetime: by default a yielded tensor is valid only until the next item is requested (the
buffers behind it are reused); the engine copies it first (the built-in engine does). An engine
that keeps references to pushed tensors and reads them later declares
``retains_pushed_tensors = True`` (vLLM's in-place reload holds every tensor of a layer until the
layer is complete). For it the bridge never reuses memory a yielded tensor may view: every
bucket gets a fresh staging buffer and every un-fused tensor fresh memory, freed by reference
counting once the engine drops them; ``peak_extra_bytes`` counts each such buffer while alive.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from megatron_rpt.bridge.buckets import (
    Bucket,
    Slot,
    Transfer,
    local_tensors,
    owners_from_stages,
    plan_buckets,
    stage_holdings,
    tp_split,
)
from megatron_rpt.bridge.layouts import (
    expected_hf_shapes,
    hf_from_tp_shards,
    writes_hf_tensors,
)
from megatron_rpt.bridge.name_maps import (
    NameMap,
    unwrap,
    uses_grouped_experts,
    uses_te_layout,
)
from megatron_rpt.model.hf_config import ArchConfig
from megatron_rpt.model.mcore_compat import model_class_of
from megatron_rpt.topology import Topology


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


def _expert_members(topo: Topology) -> list[tuple[int, int]]:
    """(expert-TP rank, EP rank) of each member of the expert group, in group order. The rank
    order inside Megatron's combined group is Megatron's business: ask once (collective)."""
    if topo.expert_world == 1:
        return [(0, 0)]
    members: list[tuple[int, int] | None] = [None] * dist.get_world_size(topo.expert_group)
    dist.all_gather_object(members, (topo.etp_rank, topo.ep_rank), group=topo.expert_group)
    return [tuple(m) for m in members]  # type: ignore[misc]


_ALIGN = 64  # bytes; keeps every carved tensor aligned for vectorised copies


def _carved_bytes(shapes: Sequence[tuple[int, ...]], dtype: torch.dtype) -> int:
    return sum(-(-torch.Size(shape).numel() * dtype.itemsize // _ALIGN) * _ALIGN for shape in shapes)


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

    def __init__(self, model_chunks: Sequence[nn.Module], arch: ArchConfig, bucket_mb: float,
                 dtype: torch.dtype | None = None, te_layout: bool | None = None,
                 topology: Topology | None = None):
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
        self.topo = topology or Topology.current()
        self.expert_members, self.expert_index = [(0, 0)], 0
        if arch.num_experts:
            self.expert_members = _expert_members(self.topo)
            self.expert_index = self.expert_members.index((self.topo.etp_rank, self.topo.ep_rank))
        local = local_tensors(self.chunks, self.names, self.topo)
        self.buckets = plan_buckets(self.names, self.padded_vocab, self.topo, self._owners(local), local,
                                    self.bucket_bytes, dtype)
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

    def release_buffers(self) -> None:
        """Free the staging / un-fuse buffers (on CPU they are kept between syncs: fresh pages
        cost a page fault each, which would halve the throughput)."""
        self._staging = self._scratch = None

    # ------------------------------------------------------------------ set-up

    def _padded_vocab(self) -> int:
        vocab = getattr(self.chunks[0], "vocab_size", None)
        if vocab is None:
            raise TypeError(f"{type(self.chunks[0]).__name__} has no vocab_size; WeightBridge expects GPTModel or "
                            "HybridModel chunks")
        return int(vocab)

    def _owners(self, local: dict) -> dict[tuple[str, int | None], tuple[int, str]]:
        """Owner stage of every tensor: each stage says what it holds (collective over PP)."""
        mine = stage_holdings(local)
        if self.topo.pp_size == 1:
            return owners_from_stages([mine])
        stages: list = [None] * self.topo.pp_size
        dist.all_gather_object(stages, mine, group=self.topo.pp_group)
        return owners_from_stages(stages)

    def _scratch_need(self, bucket: Bucket, slot: Slot) -> int:
        """Bytes of the HF tensors written for ``slot`` (un-fuse buffer): merged from several
        shards, or q/k/v un-interleaved; in the dtype they are yielded in."""
        shards = 1 if bucket.kind is Transfer.WHOLE or slot.tmap.tp_dim is None else tp_split(slot.tmap, self.topo)
        if not writes_hf_tensors(slot.tmap, shards):
            return 0
        copies = self.topo.ep_size if bucket.kind is Transfer.EXPERT_GATHER else 1
        dtype = bucket.dtype if bucket.staged else slot.source.dtype
        return _carved_bytes(expected_hf_shapes(slot.tmap, self.arch) * copies, dtype)

    # ------------------------------------------------------------------ the stream

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
        self._param_storages = {s.source.untyped_storage().data_ptr()
                                for b in self.buckets for s in b.slots if s.source is not None}
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

    def _transfer(self, bucket: Bucket, flat: torch.Tensor) -> None:
        """Pack (owner stage), gather over TP / experts (owner stage), broadcast over PP."""
        topo = self.topo
        if bucket.stage == topo.pp_rank:
            member = {Transfer.TP_GATHER: topo.tp_rank, Transfer.EXPERT_GATHER: self.expert_index}.get(bucket.kind, 0)
            mine = flat.narrow(0, member * bucket.member_numel, bucket.member_numel)
            for slot in bucket.slots:
                mine.narrow(0, slot.offset, slot.numel).view(slot.shape).copy_(slot.source.detach())
            if bucket.group_size > 1:
                group = topo.tp_group if bucket.kind is Transfer.TP_GATHER else topo.expert_group
                _all_gather_in_place(flat, mine, bucket.member_numel, group)
        if topo.pp_size > 1:
            dist.broadcast(flat, group=topo.pp_group, group_src=bucket.stage)

    def _emit(self, bucket: Bucket, views: list[list[torch.Tensor]], scratch: torch.Tensor | None,
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

    def _hf_tensors(self, bucket: Bucket, slot: Slot, shards: list[torch.Tensor],
                    scratch: torch.Tensor | None) -> list[tuple[str, torch.Tensor]]:
        """[(HF name, tensor)] of one slot; written tensors are carved from ``scratch`` (fresh
        memory when it is None)."""
        arch, tmap = self.arch, slot.tmap
        dtype = shards[0].dtype
        if bucket.kind is not Transfer.EXPERT_GATHER:
            shards = shards if tmap.tp_dim is not None else shards[:1]  # replicated: all members sent the same
            writes = writes_hf_tensors(tmap, len(shards))
            out = _carve(scratch, expected_hf_shapes(tmap, arch), dtype) if writes else None
            return list(zip(tmap.format(slot.layer, slot.expert)[1], hf_from_tp_shards(tmap, shards, arch, out)))
        # One slot carries local expert j of every EP rank: experts ep * n_local + j.
        n_local = arch.num_experts // self.topo.ep_size
        shapes = expected_hf_shapes(tmap, arch)
        per_expert = self.topo.etp_size if tmap.tp_dim is not None else 1
        outs = _carve(scratch, shapes * self.topo.ep_size, dtype) if writes_hf_tensors(tmap, per_expert) else None
        items: list[tuple[str, torch.Tensor]] = []
        for ep in range(self.topo.ep_size):
            ranked = sorted((etp, i) for i, (etp, e) in enumerate(self.expert_members) if e == ep)
            expert_shards = [shards[i] for _, i in ranked][:per_expert]
            out = outs[ep * len(shapes): (ep + 1) * len(shapes)] if outs is not None else None
            full = hf_from_tp_shards(tmap, expert_shards, arch, out)
            items += list(zip(tmap.format(slot.layer, ep * n_local + slot.expert)[1], full))
        return items
