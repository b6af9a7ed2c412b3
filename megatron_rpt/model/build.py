"""Build the Megatron-Core policy (``GPTModel``) from a Hugging Face architecture.

Owns: the ArchConfig -> ``TransformerConfig`` mapping (RMSNorm, SwiGLU, RoPE theta and
Llama 3 scaling, QKV bias, QK-norm, MoE routing), vocabulary padding, and building the
model chunks of this rank (pipeline stage, virtual-pipeline chunks).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from megatron_rpt.config import ModelConfig, ParallelConfig
from megatron_rpt.model.hf_config import ArchConfig
from megatron_rpt.model.specs import fp8_settings, fused_softmax_available, layer_spec, resolve_transformer_impl

# The dtype names configs use (model.params_dtype, rollout.dtype, --dtype) -> torch dtypes.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Megatron-LM's rule: pad to a multiple of ``divisible_by * tensor_parallel``."""
    multiple = divisible_by * tensor_parallel
    return int(math.ceil(vocab_size / multiple) * multiple)


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


def transformer_config(
    arch: ArchConfig, model_cfg: ModelConfig, parallel_cfg: ParallelConfig, config_overrides: dict[str, Any] | None = None
) -> Any:
    """``config_overrides`` replace TransformerConfig fields, e.g. ``perform_initialization=False``
    when the weights are loaded from a checkpoint right after building."""
    from megatron.core.transformer import TransformerConfig

    impl = resolve_transformer_impl(model_cfg)
    dtype = DTYPES[model_cfg.params_dtype]
    on_gpu = torch.cuda.is_available()
    kwargs: dict[str, Any] = dict(
        num_layers=arch.num_layers,
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
        sequence_parallel=parallel_cfg.sequence_parallel,
        use_cpu_initialization=not on_gpu,
        **fusion_settings(on_gpu, impl),
        # Keep softmax/attention numerics in fp32 so CPU parity with transformers is tight.
        attention_softmax_in_fp32=True,
        deallocate_pipeline_outputs=on_gpu,
    )
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
) -> Any:
    """One GPTModel chunk for this rank (stage flags default to this rank's pipeline position)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    config = transformer_config(arch, model_cfg, parallel_cfg, config_overrides)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    vocab = padded_vocab_size(arch.vocab_size, model_cfg.make_vocab_size_divisible_by, parallel_cfg.tensor_parallel)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(arch, resolve_transformer_impl(model_cfg)),
        vocab_size=vocab,
        max_sequence_length=model_cfg.max_position_embeddings or arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta),
        rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 8.0,
        vp_stage=vp_stage,
    )
    return model


def build_model_chunks(
    arch: ArchConfig, model_cfg: ModelConfig, parallel_cfg: ParallelConfig, config_overrides: dict[str, Any] | None = None
) -> list[Any]:
    """All model chunks of this rank: one, or ``virtual_pipeline`` of them with interleaving."""
    vp = parallel_cfg.virtual_pipeline
    if not vp:
        return [build_model(arch, model_cfg, parallel_cfg, config_overrides=config_overrides)]
    return [
        build_model(arch, model_cfg, parallel_cfg, vp_stage=i, config_overrides=config_overrides) for i in range(vp)
    ]
