"""Layer-spec and precision choices for the policy model.

Owns: choosing the Transformer-Engine spec (TE importable and a GPU present) or the
Megatron-Core local spec, and mapping ``model.fp8`` / ``model.fp8_recipe`` onto
Megatron's FP8 settings, with clear errors when TE or a Hopper-class GPU is missing.
The HybridModel stack spec (megatron-core >= 0.19) is the same decoder layer split in two:
an attention layer and an MLP / MoE layer, built from the very submodules of the GPT layer
spec, so both model classes hold the same modules, parameter suffixes and checkpoint keys.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import warnings
from typing import Any

import torch
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    MoETransformerLayer,
    TransformerLayer,
    TransformerLayerSubmodules,
)

from megatron_rpt.config import ConfigError, ModelConfig
from megatron_rpt.model.hf_config import ArchConfig


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


# Apex's fused softmax extensions, which megatron-core's FusedScaleMaskSoftmax imports when
# masked_softmax_fusion is on (they are not part of the megatron-core wheel).
FUSED_SOFTMAX_EXTENSIONS = ("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda",
                            "scaled_softmax_cuda")


def fused_softmax_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in FUSED_SOFTMAX_EXTENSIONS)


def resolve_transformer_impl(model_cfg: ModelConfig) -> str:
    """'transformer_engine' or 'local' for this machine and config."""
    impl = model_cfg.transformer_impl
    has_te = transformer_engine_available() and torch.cuda.is_available()
    if impl == "auto":
        return "transformer_engine" if has_te else "local"
    if impl == "transformer_engine" and not has_te:
        raise ConfigError(
            "model.transformer_impl=transformer_engine but Transformer Engine is "
            f"{'not installed' if not transformer_engine_available() else 'unusable without a GPU'}; "
            "pip install -e '.[gpu]' on a CUDA machine, or set model.transformer_impl=local"
        )
    return impl


def layer_spec(arch: ArchConfig, impl: str) -> Any:
    """The ModuleSpec of one transformer layer for ``arch`` under ``impl``."""
    num_experts = arch.num_experts or None
    if impl == "transformer_engine":
        return get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=bool(num_experts), qk_layernorm=arch.qk_norm
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
        spec = get_gpt_layer_local_spec(
            num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=arch.qk_norm, normalization="RMSNorm"
        )
    # Packed sequences (THD) under the local spec: attention inside each sequence only.
    spec.submodules.self_attention.submodules.core_attention = packed_local_attention()
    if num_experts:
        # The local spec saves pre_mlp_layernorm.* as mlp.linear_fc1.layer_norm_* in dist checkpoints,
        # where TE's dense spec fuses that norm into linear_fc1; TE's MoE spec keeps a separate
        # pre_mlp_layernorm (gpt_layer_specs.py: pre_mlp_layernorm=backend.layer_norm() if num_experts).
        # Keep the MoE name so a checkpoint written with the local spec loads under TE and back.
        keys = dict(spec.submodules.sharded_state_dict_keys_map)
        keys.pop("pre_mlp_layernorm.", None)
        spec.submodules.sharded_state_dict_keys_map = keys
    return spec


def hybrid_stack_spec(arch: ArchConfig, impl: str) -> Any:
    """The HybridModel decoder spec for ``arch``: "*" = attention layer, "-" = MLP, "E" = MoE.

    megatron-core's own ``hybrid_stack_spec`` is Transformer-Engine only (TE norms, TE linears,
    grouped-GEMM experts), so it is rebuilt here from the GPT layer spec of ``impl``: the
    attention half keeps the input norm, attention and its bias-dropout-add, the MLP half the
    pre-MLP norm, the MLP (or MoE) and its bias-dropout-add. Each half keeps the GPT spec's
    checkpoint-key renames for its own norm (local norms are stored under TE's fused names).
    """
    from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules  # lazy: mcore >= 0.19 only

    gpt = layer_spec(arch, impl).submodules
    keys_map = gpt.sharded_state_dict_keys_map or {}
    attention = ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=gpt.input_layernorm, self_attention=gpt.self_attention, self_attn_bda=gpt.self_attn_bda,
        sharded_state_dict_keys_map={k: v for k, v in keys_map.items() if k.startswith("input_layernorm")}))
    mlp_keys_map = {k: v for k, v in keys_map.items() if k.startswith(("pre_mlp_layernorm", "mlp."))}
    mlp = ModuleSpec(module=MoETransformerLayer if arch.num_experts else MLPLayer,
                     submodules=TransformerLayerSubmodules(pre_mlp_layernorm=gpt.pre_mlp_layernorm, mlp=gpt.mlp,
                                                           mlp_bda=gpt.mlp_bda,
                                                           sharded_state_dict_keys_map=mlp_keys_map))
    layers = HybridStackSubmodules(attention_layer=attention, **{"moe_layer" if arch.num_experts else "mlp_layer": mlp})
    if impl == "transformer_engine":
        return ModuleSpec(module=HybridStack, submodules=layers)
    return ModuleSpec(module=_local_norm_hybrid_stack(), params={"final_norm": gpt.pre_mlp_layernorm},
                      submodules=layers)


@functools.cache
def packed_local_attention() -> type:
    """Megatron-Core's local ``DotProductAttention`` that also takes packed (THD) sequences.

    The local class asserts ``packed_seq_params is None`` (packing is Transformer Engine's job
    on GPU). Here a packed call arrives as ``[t, heads, dim]`` (``SelfAttention`` squeezes the
    batch dimension for THD and has already applied RoPE per sequence from ``cu_seqlens``). The
    attention is the block-diagonal causal mask of the row evaluated block by block: each sequence
    runs through the local kernel under its own causal mask, so no token attends to another sequence and the cost is
    ``sum(L_i^2)``, not ``T^2``. No parameters: checkpoints are unchanged.
    """
    class PackedDotProductAttention(DotProductAttention):
        def forward(self, query: Any, key: Any, value: Any, attention_mask: Any, attn_mask_type: Any = None,
                    attention_bias: Any = None, packed_seq_params: Any = None) -> Any:
            if packed_seq_params is None:
                return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                       attention_bias=attention_bias)
            if packed_seq_params.qkv_format != "thd":
                raise ValueError(f"packed sequences must be qkv_format='thd', got {packed_seq_params.qkv_format!r}")
            cu = packed_seq_params.cu_seqlens_q_padded
            cu = (packed_seq_params.cu_seqlens_q if cu is None else cu).tolist()
            if cu[-1] != query.shape[0]:
                raise ValueError(f"cu_seqlens covers {cu[-1]} tokens but the packed row has {query.shape[0]}")
            blocks = [super(PackedDotProductAttention, self).forward(
                query[a:b].unsqueeze(1), key[a:b].unsqueeze(1), value[a:b].unsqueeze(1), None,
                attn_mask_type=attn_mask_type, attention_bias=attention_bias)
                for a, b in itertools.pairwise(cu) if b > a]
            return torch.cat(blocks, dim=0)

    return PackedDotProductAttention


@functools.cache
def _local_norm_hybrid_stack() -> type:
    """HybridStack with a Megatron-Core local final norm (0.19 hard-codes ``TENorm`` there, which
    raises without Transformer Engine). Defined on first use: the base class exists from 0.19."""
    from megatron.core.models.hybrid.hybrid_block import HybridStack  # lazy: megatron-core >= 0.19 only

    class LocalNormHybridStack(HybridStack):
        def __init__(self, config: Any, submodules: Any, *args: Any, final_norm: Any, post_layer_norm: bool = True,
                     **kwargs: Any) -> None:
            super().__init__(config, submodules, *args, post_layer_norm=False, **kwargs)
            self.post_layer_norm = post_layer_norm
            if self.post_process and post_layer_norm:
                self.final_norm = final_norm(config=config, hidden_size=config.hidden_size,
                                             eps=config.layernorm_epsilon)

    return LocalNormHybridStack


def fp8_settings(model_cfg: ModelConfig, impl: str) -> dict[str, Any]:
    """TransformerConfig kwargs for FP8 (empty when model.fp8 is null)."""
    if not model_cfg.fp8:
        return {}
    if impl != "transformer_engine":
        raise ConfigError(
            f"model.fp8={model_cfg.fp8!r} needs Transformer Engine on a GPU; install it with "
            "pip install -e '.[gpu]' or set model.fp8=null"
        )
    problem = fp8_hardware_problem(model_cfg, torch.cuda.get_device_capability(), torch.version.cuda)
    if problem:
        raise ConfigError(problem)
    return {"fp8": model_cfg.fp8, "fp8_recipe": model_cfg.fp8_recipe}


def fp8_hardware_problem(model_cfg: ModelConfig, capability: tuple[int, int], cuda_version: str | None) -> str | None:
    """Why this GPU cannot run ``model.fp8`` with ``model.fp8_recipe`` (None: it can).

    Transformer Engine's own gates (``transformer_engine/pytorch/quantization.py``,
    ``_compute_*_support``): FP8 needs sm_89+; block scaling sm_90+ and CUDA >= 12.9 (Ada's
    sm_89 has no block-scaled GEMM); MXFP8 sm_100 up to, not including, sm_120. Checked here
    so the run fails at start-up with the fix, not at the first forward inside TE.
    """
    major, minor = capability
    fp8, recipe = model_cfg.fp8, model_cfg.fp8_recipe
    if capability < (8, 9):
        return (f"model.fp8={fp8!r} needs an FP8-capable GPU (Hopper sm_90 or Ada sm_89); "
                f"this one is sm_{major}{minor}. Set model.fp8=null")
    if recipe == "blockwise" and capability < (9, 0):
        return (f"model.fp8_recipe=blockwise needs Hopper (sm_90) or newer; this GPU is sm_{major}{minor}. "
                "Use model.fp8_recipe=delayed or tensorwise")
    if recipe == "blockwise" and cuda_version and tuple(int(x) for x in cuda_version.split(".")[:2]) < (12, 9):
        return (f"model.fp8_recipe=blockwise needs CUDA >= 12.9; this torch is built with CUDA {cuda_version}. "
                "Use model.fp8_recipe=delayed or tensorwise")
    if recipe == "mxfp8" and not (10, 0) <= capability < (12, 0):
        return (f"model.fp8_recipe=mxfp8 needs Blackwell (sm_100 to sm_11x); this GPU is sm_{major}{minor}. "
                "Use delayed or tensorwise on Hopper")
    return None
