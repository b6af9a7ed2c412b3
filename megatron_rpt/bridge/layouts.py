"""The pure tensor maths of the fused Megatron layouts: fusing, un-fusing, slicing and merging.

Owns, for each :class:`~megatron_rpt.bridge.name_maps.Layout` (no names, no collectives; the
converter, the HF loader and the weight bridge all use these):
  * ``QKV``: Megatron's ``linear_qkv`` interleaves per query group: for each of the
    ``num_query_groups`` groups, ``heads_per_group`` query heads, then one key head, then one value
    head (``head_dim`` rows each). Tensor parallelism splits whole groups, so a TP shard is a
    contiguous slice of the full tensor and looks like the full layout of ``1/TP`` of the groups.
  * ``GATE_UP``: ``linear_fc1`` of a SwiGLU MLP. The full tensor is ``[gate; up]`` but TP rank r
    holds ``[gate_r; up_r]`` (its slice of each), so sharding is per half.
  * ``VOCAB``: embedding / output rows zero-padded to the padded vocabulary
    (``make_vocab_size_divisible_by * TP``); TP splits the *padded* rows, so the last ranks hold
    padding, and the padding is dropped on export.
  * ``COPY``: the HF tensor itself, split along ``tp_dim`` (or replicated).
Shapes come from the architecture alone (:func:`expected_hf_shapes`, :func:`mcore_full_shape`),
so a rank can size what it receives without metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from megatron_rpt.bridge.name_maps import Dim, Layout, TensorMap
from megatron_rpt.model.hf_config import ArchConfig


def dim_size(dim: Dim, arch: ArchConfig) -> int:
    """The length of a symbolic dimension for ``arch``."""
    sizes = {
        Dim.HIDDEN: arch.hidden_size, Dim.Q: arch.num_attention_heads * arch.head_dim,
        Dim.KV: arch.num_key_value_heads * arch.head_dim, Dim.HEAD: arch.head_dim,
        Dim.FFN: arch.intermediate_size, Dim.EXPERT_FFN: arch.moe_intermediate_size,
        Dim.EXPERTS: arch.num_experts, Dim.VOCAB: arch.vocab_size,
    }
    return int(sizes[dim])


def expected_hf_shapes(tmap: TensorMap, arch: ArchConfig) -> list[tuple[int, ...]]:
    """Shapes of the HF tensors of ``tmap`` (``tmap.hf`` order) for ``arch``."""
    return [tuple(dim_size(d, arch) for d in shape) for shape in tmap.shapes]


def mcore_full_shape(tmap: TensorMap, arch: ArchConfig, padded_vocab: int) -> tuple[int, ...]:
    """Shape of the full (unsharded) Megatron tensor of ``tmap``."""
    hf = expected_hf_shapes(tmap, arch)
    if tmap.layout in (Layout.QKV, Layout.GATE_UP):
        return (sum(s[0] for s in hf), *hf[0][1:])
    if tmap.layout is Layout.VOCAB:
        return (padded_vocab, *hf[0][1:])
    return hf[0]


def shard_shape(full: tuple[int, ...], dim: int | None, parts: int, what: str) -> tuple[int, ...]:
    """One of ``parts`` equal shards of a tensor of shape ``full`` split along ``dim``."""
    if dim is None or parts == 1:
        return full
    if full[dim] % parts:
        raise ValueError(f"{what}: dimension {dim} of size {full[dim]} does not split over {parts} ranks")
    return tuple(s // parts if i == dim else s for i, s in enumerate(full))


def tp_local_arch(arch: ArchConfig, tp_size: int) -> ArchConfig:
    """The architecture one TP shard of ``linear_qkv`` looks like (whole query groups)."""
    if arch.num_key_value_heads % tp_size:
        raise ValueError(f"TP={tp_size} does not divide num_key_value_heads={arch.num_key_value_heads}")
    return replace(arch, num_attention_heads=arch.num_attention_heads // tp_size,
                   num_key_value_heads=arch.num_key_value_heads // tp_size)


# --------------------------------------------------------------------------- full tensors


def qkv_to_mcore(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: ArchConfig) -> torch.Tensor:
    """Fuse HF q/k/v (weights [out, in] or biases [out]) into Megatron's per-group layout."""
    groups, hd = arch.num_key_value_heads, arch.head_dim
    per_group = arch.num_attention_heads // groups
    tail = q.shape[1:]
    fused = torch.cat(
        [q.reshape(groups, per_group * hd, *tail), k.reshape(groups, hd, *tail), v.reshape(groups, hd, *tail)], dim=1
    )
    return fused.reshape(groups * (per_group + 2) * hd, *tail)


def qkv_grouped_views(fused: torch.Tensor, arch: ArchConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of a fused ``linear_qkv`` as views ``[groups, rows_per_group, *tail]`` (no copy):
    an HF tensor reshaped the same way can take them with one strided ``copy_``."""
    groups, hd = arch.num_key_value_heads, arch.head_dim
    per_group = arch.num_attention_heads // groups
    grouped = fused.reshape(groups, (per_group + 2) * hd, *fused.shape[1:])
    q, k, v = torch.split(grouped, [per_group * hd, hd, hd], dim=1)
    return q, k, v


def qkv_from_mcore(fused: torch.Tensor, arch: ArchConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HF q, k, v (contiguous) of a fused ``linear_qkv`` of ``arch``."""
    q, k, v = qkv_grouped_views(fused, arch)
    return tuple(t.reshape(-1, *fused.shape[1:]).contiguous() for t in (q, k, v))  # type: ignore[return-value]


def to_mcore(tmap: TensorMap, hf: Sequence[torch.Tensor], arch: ArchConfig, padded_vocab: int) -> torch.Tensor:
    """Full Megatron tensor from the HF tensors named by ``tmap.hf`` (in that order)."""
    if tmap.layout is Layout.QKV:
        return qkv_to_mcore(*hf, arch)
    if tmap.layout is Layout.GATE_UP:
        return torch.cat(list(hf), dim=0)
    (tensor,) = hf
    if tmap.layout is Layout.VOCAB:
        if tensor.shape[0] > padded_vocab:
            raise ValueError(f"{tmap.hf[0]} has {tensor.shape[0]} rows, more than the padded vocabulary {padded_vocab}")
        if tensor.shape[0] < padded_vocab:
            pad = tensor.new_zeros(padded_vocab - tensor.shape[0], *tensor.shape[1:])
            tensor = torch.cat([tensor, pad], dim=0)
    return tensor


def from_mcore(tmap: TensorMap, full: torch.Tensor, arch: ArchConfig) -> list[torch.Tensor]:
    """HF tensors (in ``tmap.hf`` order) from a full Megatron tensor."""
    if tmap.layout is Layout.QKV:
        return list(qkv_from_mcore(full, arch))
    if tmap.layout is Layout.GATE_UP:
        return [t.contiguous() for t in torch.chunk(full, 2, dim=0)]
    if tmap.layout is Layout.VOCAB:
        return [full[: arch.vocab_size].contiguous()]
    return [full]


# --------------------------------------------------------------------------- HF -> one TP shard


def tp_slice_ranges(
    tmap: TensorMap, arch: ArchConfig, padded_vocab: int, rank: int, size: int
) -> list[tuple[int, int, int] | None]:
    """Per HF tensor of ``tmap``: the ``(dim, start, stop)`` range TP rank ``rank`` needs (None: all).

    Lets a rank read only its slice of each HF tensor (``safetensors`` ``get_slice``); feed the
    slices to :func:`to_mcore_shard`. Whole query groups, whole gate/up halves and padded-vocab
    rows are split, as Megatron splits the full tensor.
    """
    shapes = expected_hf_shapes(tmap, arch)
    if tmap.layout is Layout.VOCAB:
        rows = padded_vocab // size
        start = min(rank * rows, arch.vocab_size)
        return [(0, start, min(rank * rows + rows, arch.vocab_size))]
    if tmap.tp_dim is None or size == 1:
        return [None] * len(shapes)
    ranges: list[tuple[int, int, int] | None] = []
    for shape in shapes:
        n = shape[tmap.tp_dim]
        if n % size:
            raise ValueError(f"{tmap.mcore}: dimension {tmap.tp_dim} of size {n} does not split over TP={size}")
        ranges.append((tmap.tp_dim, rank * n // size, (rank + 1) * n // size))
    return ranges


def to_mcore_shard(
    tmap: TensorMap, hf_slices: Sequence[torch.Tensor], arch: ArchConfig, padded_vocab: int, rank: int, size: int
) -> torch.Tensor:
    """TP rank ``rank``'s shard of the Megatron tensor, from the HF slices of :func:`tp_slice_ranges`
    (never materialising the full tensors)."""
    if tmap.layout is Layout.QKV:
        return qkv_to_mcore(*hf_slices, tp_local_arch(arch, size))
    if tmap.layout is Layout.GATE_UP:
        return torch.cat(list(hf_slices), dim=0)
    (tensor,) = hf_slices
    if tmap.layout is Layout.VOCAB:
        rows = padded_vocab // size
        if tensor.shape[0] < rows:  # this rank's share of the padding rows
            tensor = torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])], dim=0)
    return tensor.contiguous()


# --------------------------------------------------------------------------- TP shards -> HF


def hf_slice_of_shard(tmap: TensorMap, shard: torch.Tensor, arch: ArchConfig, tp_size: int) -> list[torch.Tensor]:
    """HF tensors (``tmap.hf`` order) of one TP shard: rank r's shard gives chunk r of each HF
    tensor along ``tmap.tp_dim``. Not defined for the padded vocabulary (shard edges differ)."""
    if tmap.layout is Layout.VOCAB and tp_size > 1:
        raise ValueError("a vocabulary shard is not a slice of the HF tensor (Megatron pads the vocabulary)")
    if tmap.layout is Layout.QKV:
        return [t.reshape(-1, *shard.shape[1:]) for t in qkv_grouped_views(shard, tp_local_arch(arch, tp_size))]
    return from_mcore(tmap, shard, arch)  # gate_up: [gate_r; up_r] halves; copy: the shard itself


def writes_hf_tensors(tmap: TensorMap, num_shards: int) -> bool:
    """Whether the HF tensors of ``tmap`` must be written (merged from several shards, or q/k/v
    un-interleaved) rather than being views of one shard."""
    return tmap.tp_dim is not None and (num_shards > 1 or tmap.layout is Layout.QKV)


def hf_from_tp_shards(tmap: TensorMap, shards: Sequence[torch.Tensor], arch: ArchConfig,
                      out: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """HF tensors (``tmap.hf`` order) from all TP ranks' shards (rank order).

    Writes each HF tensor once into its final buffer (``out`` when given, shaped as
    :func:`expected_hf_shapes`; fresh memory otherwise) straight from the shards, never
    materialising the merged Megatron tensor. When nothing must be written (one shard that is
    not q/k/v, or a replicated tensor) the result is ``from_mcore`` of the shard: views.
    """
    n = len(shards)
    if not writes_hf_tensors(tmap, n):
        return from_mcore(tmap, shards[0], arch)
    ref = shards[0]
    outs = list(out) if out is not None else [
        torch.empty(shape, dtype=ref.dtype, device=ref.device) for shape in expected_hf_shapes(tmap, arch)
    ]
    if tmap.layout is Layout.VOCAB:
        rows = ref.shape[0]
        for r, shard in enumerate(shards):
            start = r * rows
            keep = max(0, min(rows, arch.vocab_size - start))
            if keep:
                outs[0].narrow(0, start, keep).copy_(shard.narrow(0, 0, keep))
        return outs
    if tmap.layout is Layout.QKV:  # strided copies straight out of each shard's per-group layout
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
