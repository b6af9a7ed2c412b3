"""Policy model build: layer-spec choice, FP8 errors, vocabulary padding, parameter shapes."""

import importlib
import re

import pytest
import torch

from megatron_rpt.config import ConfigError, ModelConfig, ParallelConfig
from megatron_rpt.model.build import fusion_settings, padded_vocab_size
from megatron_rpt.model.hf_config import arch_from_dict
from megatron_rpt.model.specs import (
    FUSED_SOFTMAX_EXTENSIONS,
    fp8_hardware_problem,
    fp8_settings,
    fused_softmax_available,
    resolve_transformer_impl,
    transformer_engine_available,
)

QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 96, "num_hidden_layers": 2, "num_attention_heads": 6,
         "num_key_value_heads": 2, "intermediate_size": 160, "vocab_size": 1000, "rope_theta": 1e6}


def test_padded_vocab_follows_megatron_lm():
    assert padded_vocab_size(1000, 128, 1) == 1024
    assert padded_vocab_size(1000, 128, 2) == 1024
    assert padded_vocab_size(1025, 128, 2) == 1280
    assert padded_vocab_size(151665, 128, 8) == 152576


@pytest.mark.skipif(transformer_engine_available(), reason="checks the machine without Transformer Engine")
def test_without_transformer_engine():
    assert resolve_transformer_impl(ModelConfig()) == "local"
    with pytest.raises(ConfigError, match=r"model\.transformer_impl=transformer_engine .*pip install -e '\.\[gpu\]'"):
        resolve_transformer_impl(ModelConfig(transformer_impl="transformer_engine"))
    with pytest.raises(ConfigError, match=r"model\.fp8='hybrid' needs Transformer Engine on a GPU"):
        fp8_settings(ModelConfig(fp8="hybrid"), "local")
    assert fp8_settings(ModelConfig(), "local") == {}


def _shapes(tp: int):
    from megatron_rpt.distributed import init_distributed
    from megatron_rpt.model.build import build_model

    init_distributed(tensor_parallel=tp)
    model = build_model(arch_from_dict(QWEN2), ModelConfig(), ParallelConfig(tensor_parallel=tp))
    return {name: tuple(p.shape) for name, p in model.named_parameters()}, type(model.decoder.layers[0].mlp).__name__


def test_parameter_shapes_at_tp2():
    from megatron_rpt.distributed import spawn

    shapes, _ = spawn(_shapes, 2, 2)[0]
    # 6 query heads + 2 KV groups x (k, v), head_dim 16, split over 2 ranks: (6 + 4) * 16 / 2 = 80 rows.
    assert shapes["decoder.layers.0.self_attention.linear_qkv.weight"] == (80, 96)
    assert shapes["decoder.layers.0.self_attention.linear_qkv.bias"] == (80,)
    assert shapes["decoder.layers.0.self_attention.linear_proj.weight"] == (96, 48)
    assert shapes["decoder.layers.0.mlp.linear_fc1.weight"] == (160, 96)  # [gate_r; up_r], 80 rows each
    assert shapes["decoder.layers.0.mlp.linear_fc2.weight"] == (96, 80)
    assert shapes["embedding.word_embeddings.weight"] == (512, 96)  # 1024 padded / 2
    assert shapes["output_layer.weight"] == (512, 96)  # untied


@pytest.mark.skipif(fused_softmax_available(), reason="checks a machine without Apex's fused softmax kernels")
def test_gpu_fusion_flags_keep_the_local_softmax_off_apex_kernels():
    """Issue 11 item 2: bf16 scores with 32 keys through megatron-core's own softmax module,
    configured with the flags a GPU run of the local spec gets, must not import Apex's kernels."""
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.utils import attention_mask_func

    with pytest.raises(ModuleNotFoundError):  # the kernel really is absent here
        importlib.import_module(FUSED_SOFTMAX_EXTENSIONS[0])
    flags = fusion_settings(on_gpu=True, impl="local")
    softmax = FusedScaleMaskSoftmax(
        input_in_fp16=False, input_in_bf16=True, attn_mask_type=AttnMaskType.causal,
        scaled_masked_softmax_fusion=flags["masked_softmax_fusion"], mask_func=attention_mask_func,
        softmax_in_fp32=True, scale=None,
    )
    scores = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0)).bfloat16()
    mask = torch.triu(torch.ones(32, 32, dtype=torch.bool), diagonal=1)[None, None]  # True: masked
    probs = softmax(scores, mask)
    reference = torch.softmax(scores.double().masked_fill(mask, float("-inf")), dim=-1)
    assert probs.dtype == torch.bfloat16
    assert (probs.double() - reference).abs().max() < 1e-2
    # Transformer Engine's attention does not go through this module; there the flag stays on.
    assert fusion_settings(on_gpu=True, impl="transformer_engine")["masked_softmax_fusion"]
    assert not any(fusion_settings(on_gpu=False, impl="local").values())


@pytest.mark.parametrize("recipe,capability,cuda,problem", [
    ("blockwise", (8, 9), "12.9", r"blockwise needs Hopper \(sm_90\) or newer; this GPU is sm_89"),  # Ada
    ("blockwise", (9, 0), "12.8", r"blockwise needs CUDA >= 12.9; this torch is built with CUDA 12.8"),
    ("blockwise", (9, 0), "13.0", None),  # H100 / H200
    ("blockwise", (10, 0), "12.9", None),
    ("delayed", (8, 9), "12.1", None),
    ("tensorwise", (8, 0), "12.9", r"needs an FP8-capable GPU .* this one is sm_80"),  # A100
    ("mxfp8", (9, 0), "12.9", r"mxfp8 needs Blackwell .* this GPU is sm_90"),
    ("mxfp8", (10, 0), "12.9", None),
])
def test_fp8_recipes_follow_transformer_engines_hardware_gates(recipe, capability, cuda, problem):
    """Issue 11 item 6: TE's block-scaled GEMM needs sm_90+ (its _compute_fp8_block_scaling_support)."""
    found = fp8_hardware_problem(ModelConfig(fp8="hybrid", fp8_recipe=recipe), capability, cuda)
    if problem is None:
        assert found is None
    else:
        assert found is not None and re.search(problem, found), found
