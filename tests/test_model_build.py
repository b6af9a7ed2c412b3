"""Policy model build: layer-spec choice, FP8 errors, vocabulary padding, parameter shapes."""

import importlib
import re

import pytest
import torch

from megatron_rpt.config import ConfigError, ModelConfig, ParallelConfig
from megatron_rpt.memory_plan import Layout, stage_params
from megatron_rpt.model.build import fusion_settings
from megatron_rpt.model.hf_config import arch_from_dict, padded_vocab_size
from megatron_rpt.model.mcore_compat import mcore_version
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


def test_the_transformer_config_raises_no_megatron_deprecation_warning():
    """megatron-core 0.19 warns that its own default cuda_graph_modules="full" is deprecated."""
    import warnings

    from megatron_rpt.model.build import transformer_config

    transformer_config(arch_from_dict(QWEN2), ModelConfig(), ParallelConfig())  # imports (torch.jit warns there)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        transformer_config(arch_from_dict(QWEN2), ModelConfig(), ParallelConfig())
    deprecations = [f"{w.filename}: {w.message}" for w in caught if "deprecat" in str(w.message).lower()]
    assert not deprecations, deprecations


def _build_checks(tp: int):
    import torch

    from megatron_rpt.distributed import init_distributed
    from megatron_rpt.model.build import build_model

    init_distributed(tensor_parallel=tp)
    model = build_model(arch_from_dict(QWEN2), ModelConfig(), ParallelConfig(tensor_parallel=tp))
    # What megatron-core 0.19's gradient sync and overlapped DDP call, on the CPU shim.
    side = torch.cuda.Stream(device=torch.cuda.current_device())
    side.wait_stream(torch.cuda.current_stream())
    event = torch.cuda.Event(enable_timing=False)
    event.record()
    torch.cuda.current_stream().wait_event(event)
    with torch.cuda.stream(side):
        streamed = torch.ones(3).sum().item()
    torch.cuda.current_stream().synchronize()
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    per_rank = {"tp2": sum(p.numel() for p in model.parameters())}
    init_distributed(pipeline_parallel=2)  # the same world re-initialised: one stage per rank
    stage = build_model(arch_from_dict(QWEN2), ModelConfig(), ParallelConfig(pipeline_parallel=2))
    per_rank["pp2"] = sum(p.numel() for p in stage.parameters())
    return shapes, type(model).__name__, streamed, per_rank


@pytest.fixture(scope="module")
def tp2_build():
    from megatron_rpt.distributed import spawn

    return spawn(_build_checks, 2, 2)[0]


def test_cuda_streams_and_events_run_on_the_cpu(tp2_build):
    assert tp2_build[2] == 3.0


def test_planner_counts_the_parameters_megatron_builds(tp2_build):
    """The planner's per-GPU parameter formula against the model this megatron-core builds (GPTModel or
    HybridModel: the planner does not depend on the class), on rank 0 of TP=2 and of PP=2."""
    arch = arch_from_dict(QWEN2)
    per_rank = tp2_build[3]
    assert per_rank["tp2"] == stage_params(arch, Layout(tp=2), padded_vocab_size(1000, 128, 2), 0).total
    assert per_rank["pp2"] == stage_params(arch, Layout(pp=2), padded_vocab_size(1000, 128, 1), 0).total


def test_parameter_shapes_at_tp2(tp2_build):
    shapes, model_class, _, _ = tp2_build
    # megatron-core 0.19 deprecates GPTModel for HybridModel, where decoder layer i is an attention layer (2i)
    # and an MLP layer (2i+1), and the final norm is decoder.final_norm.
    hybrid = mcore_version() >= (0, 19)
    assert model_class == ("HybridModel" if hybrid else "GPTModel")
    attn, mlp = ("decoder.layers.0.", "decoder.layers.1.") if hybrid else ("decoder.layers.0.", "decoder.layers.0.")
    final_norm = "decoder.final_norm.weight" if hybrid else "decoder.final_layernorm.weight"
    # 6 query heads + 2 KV groups x (k, v), head_dim 16, split over 2 ranks: (6 + 4) * 16 / 2 = 80 rows.
    assert shapes[attn + "self_attention.linear_qkv.weight"] == (80, 96)
    assert shapes[attn + "self_attention.linear_qkv.bias"] == (80,)
    assert shapes[attn + "self_attention.linear_proj.weight"] == (96, 48)
    assert shapes[attn + "input_layernorm.weight"] == (96,)
    assert shapes[mlp + "pre_mlp_layernorm.weight"] == (96,)
    assert shapes[mlp + "mlp.linear_fc1.weight"] == (160, 96)  # [gate_r; up_r], 80 rows each
    assert shapes[mlp + "mlp.linear_fc2.weight"] == (96, 80)
    assert shapes[final_norm] == (96,)
    assert shapes["embedding.word_embeddings.weight"] == (512, 96)  # 1024 padded / 2
    assert shapes["output_layer.weight"] == (512, 96)  # untied
    assert len(shapes) == 3 + 2 * 7  # embedding, final norm, output layer + 7 tensors per decoder layer


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
