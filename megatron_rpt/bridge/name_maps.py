"""The one Hugging Face <-> Megatron-Core parameter map, shared by the converter and the bridge.

Owns, per architecture family (Llama, Qwen2, Qwen3, Qwen3-MoE):
  * which HF tensors make up each Megatron parameter (names with ``{layer}`` / ``{expert}``);
  * the fused layouts, converted between *full* (unsharded) tensors:
      - ``qkv``: Megatron's ``linear_qkv`` interleaves per query group:
        for each of the ``num_query_groups`` groups, ``heads_per_group`` query heads,
        then one key head, then one value head (``head_dim`` rows each). Tensor parallelism
        splits whole groups, so a TP shard is a contiguous slice of the full tensor.
      - ``gate_up``: ``linear_fc1`` of a SwiGLU MLP. The full tensor is ``[gate; up]`` but a
        TP rank holds ``[gate_r; up_r]`` (its slice of each), so sharding is per half.
      - ``vocab``: embedding / output rows padded with zeros to the padded vocabulary
        (``make_vocab_size_divisible_by * TP``); the padding is removed on export.
  * which dimension tensor parallelism splits (0: column-parallel, 1: row-parallel, None).
The Transformer-Engine spec fuses the pre-attention / pre-MLP RMSNorm weights into
``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``; ``te_layout=True`` maps those.
MoE experts come in two layouts: ``SequentialMLP`` (local spec) keeps one module per expert,
``mlp.experts.local_experts.{e}.linear_fc1.weight``; ``TEGroupedMLP`` (TE spec with
``moe_grouped_gemm``, the fast path) keeps one TE ``GroupedLinear`` per projection whose
parameters are ``weight0..weight{n-1}``, ``mlp.experts.linear_fc1.weight{e}``
(``grouped_experts=True``). Both hold the same per-expert tensors in the same layout.
Both Megatron model classes are mapped (``model_class``, default: the one this megatron-core
builds): ``GPTModel`` keeps HF layer ``i`` in ``decoder.layers.{i}``; ``HybridModel`` splits it
into ``decoder.layers.{2i}`` (input norm + attention) and ``decoder.layers.{2i+1}`` (pre-MLP norm
+ MLP / MoE) and names the final norm ``decoder.final_norm``. Suffixes and layouts are the same.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Sequence

import torch

from megatron_rpt.model.hf_config import ArchConfig
from megatron_rpt.model.mcore_compat import ModelClass, model_class_of, policy_model_class

LAYER = "{layer}"
EXPERT = "{expert}"


@dataclass(frozen=True)
class TensorMap:
    mcore: str  # Megatron name; ``{layer}`` = global layer index, ``{expert}`` = global expert index
    hf: tuple[str, ...]  # HF names, same placeholders
    layout: str  # copy | qkv | gate_up | vocab
    tp_dim: int | None  # dimension split across tensor-parallel ranks (None: replicated)
    # Megatron layer index = HF layer * layer_stride + layer_slot (GPTModel: 1, 0; HybridModel: 2, 0 for
    # the attention half, 2, 1 for the MLP half of a decoder layer).
    layer_stride: int = 1
    layer_slot: int = 0

    @property
    def per_layer(self) -> bool:
        return LAYER in self.mcore

    @property
    def per_expert(self) -> bool:
        return EXPERT in self.mcore

    def format(self, layer: int | None = None, expert: int | None = None) -> tuple[str, tuple[str, ...]]:
        def fill(s: str, layer_index: int | None) -> str:
            if layer_index is not None:
                s = s.replace(LAYER, str(layer_index))
            if expert is not None:
                s = s.replace(EXPERT, str(expert))
            return s

        mcore_layer = None if layer is None else layer * self.layer_stride + self.layer_slot
        return fill(self.mcore, mcore_layer), tuple(fill(h, layer) for h in self.hf)

    def hf_layer(self, mcore_layer: int) -> int | None:
        """The HF layer of Megatron layer ``mcore_layer``, or None when this map is not on it."""
        if mcore_layer % self.layer_stride != self.layer_slot:
            return None
        return mcore_layer // self.layer_stride


def param_maps(arch: ArchConfig, te_layout: bool = False, *, grouped_experts: bool = False,
               model_class: ModelClass | None = None) -> list[TensorMap]:
    """All tensor maps of ``arch`` (global ones first, then per layer) for ``model_class``."""
    L = "decoder.layers.{layer}."
    H = "model.layers.{layer}."
    maps = [TensorMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab", 0)]
    if te_layout:
        maps.append(TensorMap(L + "self_attention.linear_qkv.layer_norm_weight", (H + "input_layernorm.weight",), "copy", None))
    else:
        maps.append(TensorMap(L + "input_layernorm.weight", (H + "input_layernorm.weight",), "copy", None))
    qkv = tuple(H + f"self_attn.{p}_proj.weight" for p in "qkv")
    maps.append(TensorMap(L + "self_attention.linear_qkv.weight", qkv, "qkv", 0))
    if arch.qkv_bias:
        maps.append(TensorMap(L + "self_attention.linear_qkv.bias", tuple(h.replace("weight", "bias") for h in qkv), "qkv", 0))
    if arch.qk_norm:
        maps.append(TensorMap(L + "self_attention.q_layernorm.weight", (H + "self_attn.q_norm.weight",), "copy", None))
        maps.append(TensorMap(L + "self_attention.k_layernorm.weight", (H + "self_attn.k_norm.weight",), "copy", None))
    maps.append(TensorMap(L + "self_attention.linear_proj.weight", (H + "self_attn.o_proj.weight",), "copy", 1))
    if arch.num_experts:
        maps.append(TensorMap(L + "pre_mlp_layernorm.weight", (H + "post_attention_layernorm.weight",), "copy", None))
        maps.append(TensorMap(L + "mlp.router.weight", (H + "mlp.gate.weight",), "copy", None))
        HE = H + "mlp.experts.{expert}."
        if grouped_experts:  # TEGroupedMLP: GroupedLinear parameters weight0..weight{n-1}
            fc1, fc2 = L + "mlp.experts.linear_fc1.weight{expert}", L + "mlp.experts.linear_fc2.weight{expert}"
        else:  # SequentialMLP
            fc1 = L + "mlp.experts.local_experts.{expert}.linear_fc1.weight"
            fc2 = L + "mlp.experts.local_experts.{expert}.linear_fc2.weight"
        maps.append(TensorMap(fc1, (HE + "gate_proj.weight", HE + "up_proj.weight"), "gate_up", 0))
        maps.append(TensorMap(fc2, (HE + "down_proj.weight",), "copy", 1))
    else:
        norm = L + ("mlp.linear_fc1.layer_norm_weight" if te_layout else "pre_mlp_layernorm.weight")
        maps.append(TensorMap(norm, (H + "post_attention_layernorm.weight",), "copy", None))
        maps.append(TensorMap(L + "mlp.linear_fc1.weight", (H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"), "gate_up", 0))
        maps.append(TensorMap(L + "mlp.linear_fc2.weight", (H + "mlp.down_proj.weight",), "copy", 1))
    maps.append(TensorMap("decoder.final_layernorm.weight", ("model.norm.weight",), "copy", None))
    if not arch.tie_word_embeddings:
        maps.append(TensorMap("output_layer.weight", ("lm_head.weight",), "vocab", 0))
    if (model_class or policy_model_class()) is ModelClass.HYBRID:
        return [_hybrid_map(m) for m in maps]
    return maps


_GPT_LAYER = "decoder.layers.{layer}."
_HYBRID_ATTENTION_PARTS = ("input_layernorm.", "self_attention.")


def _hybrid_map(tmap: TensorMap) -> TensorMap:
    """The HybridModel name of a GPTModel map: the decoder layer's attention half on hybrid layer
    2i, its MLP half on 2i+1; ``decoder.final_layernorm`` is ``decoder.final_norm`` there."""
    if tmap.mcore == "decoder.final_layernorm.weight":
        return replace(tmap, mcore="decoder.final_norm.weight")
    if not tmap.per_layer:
        return tmap
    part = tmap.mcore[len(_GPT_LAYER):]
    return replace(tmap, layer_stride=2, layer_slot=0 if part.startswith(_HYBRID_ATTENTION_PARTS) else 1)


def _pattern(template: str) -> re.Pattern[str]:
    escaped = re.escape(template).replace(re.escape(LAYER), r"(?P<layer>\d+)").replace(re.escape(EXPERT), r"(?P<expert>\d+)")
    return re.compile(f"^{escaped}$")


class NameMap:
    """Index over :func:`param_maps` for name lookups in both directions."""

    def __init__(self, arch: ArchConfig, te_layout: bool = False, *, grouped_experts: bool = False,
                 model_class: ModelClass | None = None):
        self.arch = arch
        self.model_class = model_class or policy_model_class()
        self.maps = param_maps(arch, te_layout, grouped_experts=grouped_experts, model_class=self.model_class)
        self._mcore = [(_pattern(m.mcore), m) for m in self.maps]

    @classmethod
    def for_model(cls, arch: ArchConfig, model: torch.nn.Module) -> NameMap:
        """The map of a live (or meta-built) model chunk: its class and layer spec."""
        return cls(arch, uses_te_layout(model), grouped_experts=uses_grouped_experts(model),
                   model_class=model_class_of(model))

    def lookup(self, mcore_name: str) -> tuple[TensorMap, int | None, int | None]:
        """(map, layer, expert) for a *global* Megatron parameter name."""
        if mcore_name == "output_layer.weight" and self.arch.tie_word_embeddings:
            # Tied embeddings with pipeline parallelism: the last stage holds its own copy of the
            # word embeddings as ``output_layer.weight`` (kept equal by Megatron's embedding group).
            mcore_name = "embedding.word_embeddings.weight"
        for pattern, tmap in self._mcore:
            match = pattern.match(mcore_name)
            if match:
                groups = match.groupdict()
                layer = tmap.hf_layer(int(groups["layer"])) if "layer" in groups else None
                if "layer" in groups and layer is None:
                    continue
                expert = int(groups["expert"]) if "expert" in groups else None
                return tmap, layer, expert
        raise KeyError(
            f"Megatron parameter {mcore_name!r} has no Hugging Face mapping for {self.arch.hf_architecture} "
            f"as a {self.model_class.value}; the model was built with a different architecture, layer spec "
            "or model class than the name map"
        )

    def iter_all(self) -> Iterator[tuple[TensorMap, int | None, int | None]]:
        """Every (map, layer, expert) of the full model, in HF export order."""
        arch = self.arch
        globals_first = [m for m in self.maps if not m.per_layer and m.mcore.startswith("embedding")]
        globals_last = [m for m in self.maps if not m.per_layer and not m.mcore.startswith("embedding")]
        for tmap in globals_first:
            yield tmap, None, None
        for layer in range(arch.num_layers):
            for tmap in self.maps:
                if not tmap.per_layer:
                    continue
                if tmap.per_expert:
                    for expert in range(arch.num_experts):
                        yield tmap, layer, expert
                else:
                    yield tmap, layer, None
        for tmap in globals_last:
            yield tmap, None, None

    def hf_names(self) -> list[str]:
        return [name for tmap, layer, expert in self.iter_all() for name in tmap.format(layer, expert)[1]]


# --------------------------------------------------------------------------- full layouts


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
    q, k, v = qkv_grouped_views(fused, arch)
    return tuple(t.reshape(-1, *fused.shape[1:]).contiguous() for t in (q, k, v))  # type: ignore[return-value]


def to_mcore(tmap: TensorMap, hf: Sequence[torch.Tensor], arch: ArchConfig, padded_vocab: int) -> torch.Tensor:
    """Full Megatron tensor from the HF tensors named by ``tmap.hf`` (in that order)."""
    if tmap.layout == "qkv":
        return qkv_to_mcore(*hf, arch)
    if tmap.layout == "gate_up":
        return torch.cat(list(hf), dim=0)
    (tensor,) = hf
    if tmap.layout == "vocab":
        if tensor.shape[0] > padded_vocab:
            raise ValueError(f"{tmap.hf[0]} has {tensor.shape[0]} rows, more than the padded vocabulary {padded_vocab}")
        if tensor.shape[0] < padded_vocab:
            pad = tensor.new_zeros(padded_vocab - tensor.shape[0], *tensor.shape[1:])
            tensor = torch.cat([tensor, pad], dim=0)
    return tensor


def from_mcore(tmap: TensorMap, full: torch.Tensor, arch: ArchConfig) -> list[torch.Tensor]:
    """HF tensors (in ``tmap.hf`` order) from a full Megatron tensor."""
    if tmap.layout == "qkv":
        return list(qkv_from_mcore(full, arch))
    if tmap.layout == "gate_up":
        return [t.contiguous() for t in torch.chunk(full, 2, dim=0)]
    if tmap.layout == "vocab":
        return [full[: arch.vocab_size].contiguous()]
    return [full]


def expected_hf_shapes(tmap: TensorMap, arch: ArchConfig) -> list[tuple[int, ...]]:
    """Shapes the HF checkpoint must have for ``tmap`` (used to reject mismatched checkpoints)."""
    h, hd = arch.hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * hd, arch.num_key_value_heads * hd
    name = tmap.mcore
    if tmap.layout == "qkv":
        return [(q, h), (kv, h), (kv, h)] if name.endswith("weight") else [(q,), (kv,), (kv,)]
    if tmap.layout == "vocab":
        return [(arch.vocab_size, h)]
    if tmap.layout == "gate_up":
        ffn = arch.moe_intermediate_size if tmap.per_expert else arch.intermediate_size
        return [(ffn, h), (ffn, h)]
    if name.endswith("linear_proj.weight"):
        return [(h, q)]
    if name.endswith(("linear_fc2.weight", "linear_fc2.weight" + EXPERT)):
        ffn = arch.moe_intermediate_size if tmap.per_expert else arch.intermediate_size
        return [(h, ffn)]
    if name.endswith("router.weight"):
        return [(arch.num_experts, h)]
    if "q_layernorm" in name or "k_layernorm" in name:
        return [(hd,)]
    return [(h,)]


# --------------------------------------------------------------------------- tensor parallelism


def tp_shard(tmap: TensorMap, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This TP rank's slice of a full Megatron tensor."""
    if tmap.tp_dim is None or size == 1:
        return full
    if tmap.layout == "gate_up":
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([torch.chunk(gate, size, dim=0)[rank], torch.chunk(up, size, dim=0)[rank]], dim=0)
    return torch.chunk(full, size, dim=tmap.tp_dim)[rank].contiguous()


def tp_slice_ranges(
    tmap: TensorMap, arch: ArchConfig, padded_vocab: int, rank: int, size: int
) -> list[tuple[int, int, int] | None]:
    """Per HF tensor of ``tmap``: the ``(dim, start, stop)`` range a TP rank needs (None: all of it).

    Lets a rank read only its slice of each HF tensor (``safetensors`` ``get_slice``); feed the
    slices to :func:`to_mcore_shard`. Whole query groups, whole gate/up halves and padded-vocab
    rows are split, exactly as :func:`tp_shard` splits the full Megatron tensor.
    """
    shapes = expected_hf_shapes(tmap, arch)
    if tmap.layout == "vocab":
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
    """This TP rank's shard of the Megatron tensor, from the HF slices of :func:`tp_slice_ranges`.

    Equals ``tp_shard(tmap, to_mcore(tmap, full_hf, ...), rank, size)`` without materialising
    the full tensors.
    """
    if tmap.layout == "qkv":
        if arch.num_key_value_heads % size:
            raise ValueError(f"TP={size} does not divide num_key_value_heads={arch.num_key_value_heads}")
        local = replace(arch, num_attention_heads=arch.num_attention_heads // size,
                        num_key_value_heads=arch.num_key_value_heads // size)
        return qkv_to_mcore(*hf_slices, local)
    if tmap.layout == "gate_up":
        return torch.cat(list(hf_slices), dim=0)
    (tensor,) = hf_slices
    if tmap.layout == "vocab":
        rows = padded_vocab // size
        if tensor.shape[0] < rows:  # this rank's share of the padding rows
            tensor = torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])], dim=0)
    return tensor.contiguous()


def tp_merge(tmap: TensorMap, shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`tp_shard` over all ranks' shards (rank order)."""
    if tmap.tp_dim is None or len(shards) == 1:
        return shards[0]
    if tmap.layout == "gate_up":
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(list(shards), dim=tmap.tp_dim)


# --------------------------------------------------------------------------- live Megatron models

_LOCAL_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")
_GROUPED_EXPERT = re.compile(r"(\.experts\.linear_fc[12]\.weight)(\d+)$")


def global_param_name(model: torch.nn.Module, local_name: str, expert_offset: int = 0) -> str:
    """Rewrite a chunk-local parameter name (layer index within this pipeline stage / virtual
    chunk, expert index within this expert-parallel rank) to the global name of the full model."""
    match = _LOCAL_LAYER.match(local_name)
    if match:
        layer = model.decoder.layers[int(match.group(1))].layer_number - 1  # layer_number is 1-based, global
        local_name = f"decoder.layers.{layer}." + local_name[match.end():]
    if expert_offset:
        local_name = _LOCAL_EXPERT.sub(lambda m: f".local_experts.{int(m.group(1)) + expert_offset}.", local_name)
        local_name = _GROUPED_EXPERT.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + expert_offset}", local_name)
    return local_name


def uses_te_layout(model: torch.nn.Module) -> bool:
    """True when the model was built with the Transformer-Engine spec (norms fused into linears)."""
    return any(name.endswith("layer_norm_weight") for name, _ in unwrap(model).named_parameters())


def uses_grouped_experts(model: torch.nn.Module) -> bool:
    """True when the MoE experts are TE ``GroupedLinear``s (``TEGroupedMLP``, grouped GEMM)."""
    return any(_GROUPED_EXPERT.search(name) for name, _ in unwrap(model).named_parameters())


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def named_parameters_global(model: torch.nn.Module, expert_offset: int = 0) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """``named_parameters`` of one model chunk with global layer / expert indices."""
    inner = unwrap(model)
    for name, param in inner.named_parameters():
        yield global_param_name(inner, name, expert_offset), param


def hf_state_dict_from_full(full: dict[str, torch.Tensor], arch: ArchConfig, te_layout: bool = False,
                            cast: Callable[[torch.Tensor], torch.Tensor] | None = None,
                            grouped_experts: bool = False, model_class: ModelClass | None = None
                            ) -> dict[str, torch.Tensor]:
    """HF state dict from a dict of full (TP-merged, global-named) Megatron tensors."""
    names = NameMap(arch, te_layout, grouped_experts=grouped_experts, model_class=model_class)
    out: dict[str, torch.Tensor] = {}
    for mcore_name, tensor in full.items():
        tmap, layer, expert = names.lookup(mcore_name)
        hf_names = tmap.format(layer, expert)[1]
        for hf_name, t in zip(hf_names, from_mcore(tmap, tensor, arch)):
            out[hf_name] = cast(t) if cast else t
    return out
