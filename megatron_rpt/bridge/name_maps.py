"""The one Hugging Face <-> Megatron-Core parameter NAME map, shared by the converter, the loader and the bridge.

Owns, per architecture family (Llama, Qwen2, Qwen3, Qwen3-MoE) and per Megatron model class:
  * which HF tensors make up each Megatron parameter (names with ``{layer}`` / ``{expert}``);
  * the :class:`Layout` of each Megatron parameter (how its HF tensors are fused: the tensor
    maths lives in :mod:`megatron_rpt.bridge.layouts`), the symbolic shape of each HF tensor
    (:class:`Dim`) and the dimension tensor parallelism splits (0: column-parallel, 1:
    row-parallel, None: replicated);
  * the tied-embedding rule: with ``tie_word_embeddings`` there is no ``lm_head``; the last
    pipeline stage's ``output_layer.weight`` is its copy of the word embeddings
    (:meth:`NameMap.is_tied_copy`), exported once, from the first stage;
  * global parameter names of a live model chunk (layer index within a pipeline stage or virtual
    chunk -> global layer, local expert -> global expert).
The Transformer-Engine spec fuses the pre-attention / pre-MLP RMSNorm weights into
``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``; ``te_layout=True`` maps those.
MoE experts come in two layouts: ``SequentialMLP`` (local spec) keeps one module per expert,
``mlp.experts.local_experts.{e}.linear_fc1.weight``; ``TEGroupedMLP`` (TE spec with
``moe_grouped_gemm``) keeps one TE ``GroupedLinear`` per projection whose parameters are
``weight0..weight{n-1}``, ``mlp.experts.linear_fc1.weight{e}`` (``grouped_experts=True``). Both hold
the same per-expert tensors in the same layout. ``GPTModel`` keeps HF layer ``i`` in
``decoder.layers.{i}``; ``HybridModel`` (megatron-core 0.19) splits it into ``decoder.layers.{2i}``
(input norm + attention) and ``decoder.layers.{2i+1}`` (pre-MLP norm + MLP / MoE) and names the
final norm ``decoder.final_norm``. Suffixes and layouts are the same.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from megatron_rpt.model.hf_config import ArchConfig
from megatron_rpt.model.mcore_compat import (
    ModelClass,
    model_class_of,
    policy_model_class,
)

LAYER = "{layer}"
EXPERT = "{expert}"
TIED_OUTPUT = "output_layer.weight"
EMBEDDING = "embedding.word_embeddings.weight"


class Layout(enum.Enum):
    """How the HF tensors of one Megatron parameter are fused (see :mod:`megatron_rpt.bridge.layouts`)."""

    COPY = "copy"  # one HF tensor, the same values
    QKV = "qkv"  # q, k, v interleaved per query group
    GATE_UP = "gate_up"  # [gate; up] of a SwiGLU MLP, sharded per half
    VOCAB = "vocab"  # embedding / output rows, zero-padded to the padded vocabulary


class Dim(enum.Enum):
    """A symbolic HF tensor dimension, resolved against an :class:`ArchConfig`."""

    HIDDEN = "hidden"
    Q = "q"  # num_attention_heads * head_dim
    KV = "kv"  # num_key_value_heads * head_dim
    HEAD = "head_dim"
    FFN = "ffn"  # dense MLP width
    EXPERT_FFN = "expert_ffn"  # one expert's MLP width
    EXPERTS = "experts"
    VOCAB = "vocab"  # the real (unpadded) vocabulary


@dataclass(frozen=True)
class TensorMap:
    mcore: str  # Megatron name; ``{layer}`` = global layer index, ``{expert}`` = global expert index
    hf: tuple[str, ...]  # HF names, same placeholders
    layout: Layout
    tp_dim: int | None  # dimension split across tensor-parallel ranks (None: replicated)
    shapes: tuple[tuple[Dim, ...], ...]  # symbolic shape of each HF tensor, in ``hf`` order
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
        """(Megatron name, HF names) of HF layer ``layer`` / global expert ``expert``."""
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


def _copy(mcore: str, hf: str, shape: tuple[Dim, ...], tp_dim: int | None = None) -> TensorMap:
    return TensorMap(mcore, (hf,), Layout.COPY, tp_dim, (shape,))


def _attention_maps(arch: ArchConfig, te_layout: bool) -> list[TensorMap]:
    L, H = "decoder.layers.{layer}.", "model.layers.{layer}."
    H_ = (Dim.HIDDEN,)
    norm = L + ("self_attention.linear_qkv.layer_norm_weight" if te_layout else "input_layernorm.weight")
    maps = [_copy(norm, H + "input_layernorm.weight", H_)]
    qkv = tuple(H + f"self_attn.{p}_proj.weight" for p in "qkv")
    maps.append(TensorMap(L + "self_attention.linear_qkv.weight", qkv, Layout.QKV, 0,
                          ((Dim.Q, Dim.HIDDEN), (Dim.KV, Dim.HIDDEN), (Dim.KV, Dim.HIDDEN))))
    if arch.qkv_bias:
        maps.append(TensorMap(L + "self_attention.linear_qkv.bias", tuple(h.replace("weight", "bias") for h in qkv),
                              Layout.QKV, 0, ((Dim.Q,), (Dim.KV,), (Dim.KV,))))
    if arch.qk_norm:
        maps.append(_copy(L + "self_attention.q_layernorm.weight", H + "self_attn.q_norm.weight", (Dim.HEAD,)))
        maps.append(_copy(L + "self_attention.k_layernorm.weight", H + "self_attn.k_norm.weight", (Dim.HEAD,)))
    maps.append(_copy(L + "self_attention.linear_proj.weight", H + "self_attn.o_proj.weight", (Dim.HIDDEN, Dim.Q), 1))
    return maps


def _mlp_maps(arch: ArchConfig, te_layout: bool, grouped_experts: bool) -> list[TensorMap]:
    L, H = "decoder.layers.{layer}.", "model.layers.{layer}."
    post_norm = H + "post_attention_layernorm.weight"
    if arch.num_experts:
        HE = H + "mlp.experts.{expert}."
        if grouped_experts:  # TEGroupedMLP: GroupedLinear parameters weight0..weight{n-1}
            fc1, fc2 = L + "mlp.experts.linear_fc1.weight{expert}", L + "mlp.experts.linear_fc2.weight{expert}"
        else:  # SequentialMLP
            fc1 = L + "mlp.experts.local_experts.{expert}.linear_fc1.weight"
            fc2 = L + "mlp.experts.local_experts.{expert}.linear_fc2.weight"
        ffn = Dim.EXPERT_FFN
        return [
            _copy(L + "pre_mlp_layernorm.weight", post_norm, (Dim.HIDDEN,)),
            _copy(L + "mlp.router.weight", H + "mlp.gate.weight", (Dim.EXPERTS, Dim.HIDDEN)),
            TensorMap(fc1, (HE + "gate_proj.weight", HE + "up_proj.weight"), Layout.GATE_UP, 0,
                      ((ffn, Dim.HIDDEN), (ffn, Dim.HIDDEN))),
            _copy(fc2, HE + "down_proj.weight", (Dim.HIDDEN, ffn), 1),
        ]
    norm = L + ("mlp.linear_fc1.layer_norm_weight" if te_layout else "pre_mlp_layernorm.weight")
    return [
        _copy(norm, post_norm, (Dim.HIDDEN,)),
        TensorMap(L + "mlp.linear_fc1.weight", (H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"), Layout.GATE_UP,
                  0, ((Dim.FFN, Dim.HIDDEN), (Dim.FFN, Dim.HIDDEN))),
        _copy(L + "mlp.linear_fc2.weight", H + "mlp.down_proj.weight", (Dim.HIDDEN, Dim.FFN), 1),
    ]


def param_maps(arch: ArchConfig, te_layout: bool = False, *, grouped_experts: bool = False,
               model_class: ModelClass | None = None) -> list[TensorMap]:
    """All tensor maps of ``arch`` (global ones first, then per layer) for ``model_class``."""
    vocab = ((Dim.VOCAB, Dim.HIDDEN),)
    maps = [TensorMap(EMBEDDING, ("model.embed_tokens.weight",), Layout.VOCAB, 0, vocab)]
    maps += _attention_maps(arch, te_layout) + _mlp_maps(arch, te_layout, grouped_experts)
    maps.append(_copy("decoder.final_layernorm.weight", "model.norm.weight", (Dim.HIDDEN,)))
    if not arch.tie_word_embeddings:
        maps.append(TensorMap(TIED_OUTPUT, ("lm_head.weight",), Layout.VOCAB, 0, vocab))
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
    escaped = re.escape(template).replace(re.escape(LAYER), r"(?P<layer>\d+)")
    escaped = escaped.replace(re.escape(EXPERT), r"(?P<expert>\d+)")
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

    def is_tied_copy(self, mcore_name: str) -> bool:
        """True for the last pipeline stage's copy of tied word embeddings (kept equal to the first
        stage's by Megatron's embedding group): it loads from, and is exported as, the embedding."""
        return self.arch.tie_word_embeddings and mcore_name == TIED_OUTPUT

    def lookup(self, mcore_name: str) -> tuple[TensorMap, int | None, int | None]:
        """(map, HF layer, global expert) for a *global* Megatron parameter name."""
        if self.is_tied_copy(mcore_name):
            mcore_name = EMBEDDING
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
        globals_first = [m for m in self.maps if m.mcore == EMBEDDING]
        globals_last = [m for m in self.maps if not m.per_layer and m not in globals_first]
        for tmap in globals_first:
            yield tmap, None, None
        for layer in range(self.arch.num_layers):
            for tmap in self.maps:
                if not tmap.per_layer:
                    continue
                if tmap.per_expert:
                    for expert in range(self.arch.num_experts):
                        yield tmap, layer, expert
                else:
                    yield tmap, layer, None
        for tmap in globals_last:
            yield tmap, None, None

    def hf_names(self) -> list[str]:
        return [name for tmap, layer, expert in self.iter_all() for name in tmap.format(layer, expert)[1]]


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
