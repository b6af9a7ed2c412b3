"""Build the Megatron-Core policy from a Hugging Face architecture.

Owns: the ArchConfig -> ``TransformerConfig`` mapping (RMSNorm, SwiGLU, RoPE theta and
Llama 3 scaling, QKV bias, QK-norm, MoE routing), vocabulary padding, and building the
model chunks of this rank (pipeline stage, virtual-pipeline chunks) as the class this
megatron-core maintains (:func:`~megatron_rpt.model.mcore_compat.policy_model_class`):
``HybridModel`` from 0.19, where decoder layer ``i`` is hybrid layers ``2i`` (attention, "*")
and ``2i+1`` (MLP "-" / MoE "E"), ``GPTModel`` before.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from megatron_rpt.config import ConfigError, ModelConfig, ParallelConfig
from megatron_rpt.model.dtypes import DTYPES
from megatron_rpt.model.hf_config import ArchConfig, padded_vocab_size
from megatron_rpt.model.mcore_compat import ModelClass, policy_model_class, transformer_config_kwargs
from megatron_rpt.model.specs import (
    fp8_settings,
    fused_softmax_available,
    hybrid_stack_spec,
    layer_spec,
    resolve_transformer_impl,
)


def fusion_settings(on_gpu: bool, impl: str) -> dict[str, bool]:
    """TransformerConfig fusion flags: only the fused kernels this machine can run.

    On CPU every fusion is off. ``masked_softmax_fusion`` under the local spec calls Apex's
    ``scaled_masked_softmax_cuda`` for fp16/bf16 scores with more than 16 keys, and that
    extension is not in the megatron-core wheel (``ModuleNotFoundError`` at the first long
    forward), so it is on only with Transformer Engine (whose attention does not use it) or
    when the kernels import. ``bias_dropout_fusion`` stays off: these models have no linear
    biases and no dropout, so the fused op is one residual add, and megatron-core wraps it in
    ``torch.compile`` on torch >= 2.2 (a compile per new sequence length, tens of seconds each).
    """
    return dict(
        bias_dropout_fusion=False,
        masked_softmax_fusion=on_gpu and (impl == "transformer_engine" or fused_softmax_available()),
        apply_rope_fusion=on_gpu and impl == "transformer_engine",
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )


def hybrid_layer_pattern(arch: ArchConfig, pipeline_parallel: int = 1, virtual_pipeline: int | None = None,
                         first_stage_layers: int | None = None, last_stage_layers: int | None = None) -> str:
    """HybridModel's layer pattern: "*-" ("*E" for MoE) per decoder layer, with a "|" between the
    ``pipeline_parallel * virtual_pipeline`` segments, split as GPTModel splits the layers (evenly, or
    with the uneven first / last stage counts; HybridModel reads an uneven split only from the pipes)."""
    segments = pipeline_parallel * (virtual_pipeline or 1)
    if first_stage_layers is None and last_stage_layers is None and arch.num_layers % segments:
        raise ConfigError(f"parallel.pipeline_parallel x virtual_pipeline = {segments} does not divide the "
                          f"{arch.num_layers} layers of {arch.hf_architecture}; choose a divisor of it")
    layout = ParallelConfig(pipeline_parallel=pipeline_parallel, virtual_pipeline=virtual_pipeline,
                            first_stage_layers=first_stage_layers, last_stage_layers=last_stage_layers)
    per_rank = layout.stage_layers(arch.num_layers)
    unit = "*E" if arch.num_experts else "*-"
    # Segment vp_stage * pipeline_parallel + pp_rank is chunk vp_stage of rank pp_rank (megatron-core's order).
    return "|".join(unit * (layers // (virtual_pipeline or 1)) for _ in range(virtual_pipeline or 1)
                    for layers in per_rank)


def transformer_config(
    arch: ArchConfig, model_cfg: ModelConfig, parallel_cfg: ParallelConfig,
    config_overrides: dict[str, Any] | None = None, model_class: ModelClass | None = None,
) -> Any:
    """``config_overrides`` replace TransformerConfig fields, e.g. ``perform_initialization=False``
    when the weights are loaded from a checkpoint right after building."""
    impl = resolve_transformer_impl(model_cfg)
    dtype = DTYPES[model_cfg.params_dtype]
    on_gpu = torch.cuda.is_available()
    # HybridModel counts its attention and MLP layers separately: two per decoder layer.
    model_class = model_class or policy_model_class()
    per_decoder_layer = 2 if model_class is ModelClass.HYBRID else 1
    kwargs: dict[str, Any] = dict(
        num_layers=arch.num_layers * per_decoder_layer,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_key_value_heads,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.intermediate_size or arch.moe_intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        init_method_std=model_cfg.init_std,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        tensor_model_parallel_size=parallel_cfg.tensor_parallel,
        pipeline_model_parallel_size=parallel_cfg.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel_cfg.virtual_pipeline,
        context_parallel_size=parallel_cfg.context_parallel,
        expert_model_parallel_size=parallel_cfg.expert_parallel,
        expert_tensor_parallel_size=parallel_cfg.expert_tensor_size,
        sequence_parallel=parallel_cfg.sequence_parallel,
        use_cpu_initialization=not on_gpu,
        **fusion_settings(on_gpu, impl),
        # Keep softmax/attention numerics in fp32 so CPU parity with transformers is tight.
        attention_softmax_in_fp32=True,
        deallocate_pipeline_outputs=on_gpu,
    )
    if model_class is ModelClass.GPT:  # HybridModel: the split is in its pattern
        kwargs.update(num_layers_in_first_pipeline_stage=parallel_cfg.first_stage_layers,
                      num_layers_in_last_pipeline_stage=parallel_cfg.last_stage_layers)
    if model_cfg.recompute == "full":
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif model_cfg.recompute == "selective":
        kwargs.update(recompute_granularity="selective")
    if arch.num_experts:
        kwargs.update(
            num_moe_experts=arch.num_experts,
            moe_router_topk=arch.num_experts_per_tok,
            moe_ffn_hidden_size=arch.moe_intermediate_size,
            moe_router_score_function="softmax",
            # Qwen3-MoE: softmax over all experts, top-k, renormalise when norm_topk_prob.
            # Megatron's top-k-then-softmax equals softmax-top-k-renormalise.
            moe_router_pre_softmax=not arch.norm_topk_prob,
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            # The all-to-all dispatcher creates CUDA streams; allgather is the CPU-safe choice.
            moe_token_dispatcher_type="alltoall" if parallel_cfg.expert_parallel > 1 and on_gpu else "allgather",
            moe_grouped_gemm=impl == "transformer_engine",
            moe_router_dtype="fp32",
        )
    kwargs.update(fp8_settings(model_cfg, impl))
    kwargs.update(transformer_config_kwargs(TransformerConfig))
    kwargs.update(config_overrides or {})
    return TransformerConfig(**kwargs)


def build_model(
    arch: ArchConfig,
    model_cfg: ModelConfig,
    parallel_cfg: ParallelConfig,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    vp_stage: int | None = None,
    config_overrides: dict[str, Any] | None = None,
    model_class: ModelClass | None = None,
) -> Any:
    """One model chunk for this rank (stage flags default to this rank's pipeline position), of
    ``model_class`` (default: the class this megatron-core maintains)."""
    model_class = model_class or policy_model_class()
    config = transformer_config(arch, model_cfg, parallel_cfg, config_overrides, model_class)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    vocab = padded_vocab_size(arch.vocab_size, model_cfg.make_vocab_size_divisible_by, parallel_cfg.tensor_parallel)
    common: dict[str, Any] = dict(
        config=config,
        vocab_size=vocab,
        max_sequence_length=model_cfg.max_position_embeddings or arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta),
        vp_stage=vp_stage,
    )
    impl = resolve_transformer_impl(model_cfg)
    if model_class is ModelClass.HYBRID:
        return _hybrid_model(arch, impl, parallel_cfg, common)
    return GPTModel(transformer_layer_spec=layer_spec(arch, impl), rope_scaling=arch.rope_scaling_factor is not None,
                    rope_scaling_factor=arch.rope_scaling_factor or 8.0, **common)


def _hybrid_model(arch: ArchConfig, impl: str, parallel_cfg: ParallelConfig, common: dict[str, Any]) -> Any:
    from megatron.core.models.hybrid.hybrid_model import HybridModel  # lazy: megatron-core >= 0.19 only

    pattern = hybrid_layer_pattern(arch, parallel_cfg.pipeline_parallel, parallel_cfg.virtual_pipeline,
                                   parallel_cfg.first_stage_layers, parallel_cfg.last_stage_layers)
    model = HybridModel(hybrid_stack_spec=hybrid_stack_spec(arch, impl), hybrid_layer_pattern=pattern, **common)
    if arch.rope_scaling_factor is not None:
        # HybridModel has no rope_scaling argument; Llama 3 scaling is GPTModel's RotaryEmbedding
        # with rope_scaling=True (the same class, no parameters or buffers: nothing else changes).
        config = common["config"]
        model.rotary_pos_emb = RotaryEmbedding(
            kv_channels=config.kv_channels, rotary_percent=1.0, rotary_base=common["rotary_base"],
            rope_scaling=True, rope_scaling_factor=arch.rope_scaling_factor,
            use_cpu_initialization=config.use_cpu_initialization, cp_group=model.pg_collection.cp)
    return model


def build_model_chunks(
    arch: ArchConfig, model_cfg: ModelConfig, parallel_cfg: ParallelConfig,
    config_overrides: dict[str, Any] | None = None, model_class: ModelClass | None = None,
) -> list[Any]:
    """All model chunks of this rank: one, or ``virtual_pipeline`` of them with interleaving."""
    vp = parallel_cfg.virtual_pipeline
    if not vp:
        return [build_model(arch, model_cfg, parallel_cfg, config_overrides=config_overrides, model_class=model_class)]
    return [
        build_model(arch, model_cfg, parallel_cfg, vp_stage=i, config_overrides=config_overrides,
                    model_class=model_class)
        for i in range(vp)
    ]
