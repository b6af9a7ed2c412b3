"""Transformer-Engine parameter names in the one name map (issue 11, item 3), checked on CPU.

Transformer Engine does not import here, and megatron-core defines its grouped-linear TE
classes only when it does (``TEColumnParallelGroupedLinear = None`` otherwise, so the TE spec
falls back to the legacy ``GroupedMLP``): the TE spec of a grouped-GEMM MoE layer cannot be
built on this machine. Its parameter names are pinned from the sources:

* ``megatron/core/models/gpt/gpt_layer_specs.py`` (megatron-core 0.16.1 and 0.19.2),
  ``get_gpt_layer_with_transformer_engine_spec``: ``linear_qkv`` is
  ``TELayerNormColumnParallelLinear`` (the input norm fused in), ``q_layernorm`` /
  ``k_layernorm`` and ``pre_mlp_layernorm`` are ``TENorm`` (the latter only with experts:
  ``pre_mlp_layernorm=backend.layer_norm() if num_experts else IdentityOp``);
  ``linear_proj`` is ``TERowParallelLinear``; a dense MLP's ``linear_fc1`` is
  ``TELayerNormColumnParallelLinear`` (the pre-MLP norm fused in).
* ``megatron/core/extensions/transformer_engine_spec_provider.py``,
  ``TESpecProvider.grouped_mlp_modules``: grouped GEMM -> ``TEGroupedMLP`` with
  ``TEColumnParallelGroupedLinear`` / ``TERowParallelGroupedLinear``.
* ``megatron/core/transformer/moe/experts.py``, ``TEGroupedMLP.__init__``: ``linear_fc1`` /
  ``linear_fc2`` built with ``num_local_experts`` GEMMs; ``moe/router.py``: ``router.weight``.
* TransformerEngine ``transformer_engine/pytorch/module/grouped_linear.py``, ``GroupedLinear``:
  ``register_parameter(f"weight{i}")`` for each GEMM (``bias{i}`` only with bias);
  ``module/layernorm_linear.py``: ``layer_norm_weight`` and ``weight`` (no ``layer_norm_bias``
  for RMSNorm); ``module/rmsnorm.py``: ``weight``.

The live parts: the name map must resolve exactly those names (expert e <-> ``weight{e}``,
shifted by the expert-parallel offset), convert a real transformers Qwen3-MoE state dict both
ways through them, and a MoE model built here with the local spec must write its pre-MLP norm
under the key the TE MoE spec reads (``pre_mlp_layernorm.weight``).
"""

from __future__ import annotations

import re

import pytest
import torch

from megatron_rpt.bridge.layouts import from_mcore, to_mcore
from megatron_rpt.bridge.name_maps import Layout, NameMap, global_param_name
from megatron_rpt.config import ModelConfig, ParallelConfig
from megatron_rpt.model.hf_config import arch_from_dict
from megatron_rpt.model.mcore_compat import ModelClass

EXPERTS = 4
MOE = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 32,
       "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
       "intermediate_size": 48, "moe_intermediate_size": 16, "num_experts": EXPERTS, "num_experts_per_tok": 2,
       "norm_topk_prob": True, "vocab_size": 64, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
       "tie_word_embeddings": False, "max_position_embeddings": 64, "decoder_sparse_step": 1, "mlp_only_layers": []}
DENSE = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48, "vocab_size": 64,
         "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": False, "max_position_embeddings": 64}

# One TE-spec layer's parameters (pinned from the sources above), relative to decoder.layers.{i}.
TE_MOE_GROUPED_LAYER = {
    "self_attention.linear_qkv.layer_norm_weight", "self_attention.linear_qkv.weight",
    "self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight", "self_attention.linear_proj.weight",
    "pre_mlp_layernorm.weight", "mlp.router.weight",
    *(f"mlp.experts.linear_fc{n}.weight{e}" for n in (1, 2) for e in range(EXPERTS)),
}
TE_DENSE_LAYER = {
    "self_attention.linear_qkv.layer_norm_weight", "self_attention.linear_qkv.weight",
    "self_attention.linear_qkv.bias", "self_attention.linear_proj.weight",
    "mlp.linear_fc1.layer_norm_weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight",
}
GLOBALS = {"embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"}


def _mcore_names(names: NameMap) -> set[str]:
    return {tmap.format(layer, expert)[0] for tmap, layer, expert in names.iter_all()}


def _expected(arch, layer: set[str], model_class: ModelClass) -> set[str]:
    """GPTModel: decoder layer i holds every name. HybridModel (megatron-core >= 0.19, built from
    the same layer spec split in two): the norm + attention names on layer 2i, the rest on 2i+1,
    and the final norm is ``decoder.final_norm``."""
    if model_class is ModelClass.GPT:
        return GLOBALS | {f"decoder.layers.{i}.{name}" for i in range(arch.num_layers) for name in layer}
    globals_ = {g.replace("final_layernorm", "final_norm") for g in GLOBALS}
    return globals_ | {f"decoder.layers.{2 * i + (0 if name.startswith('self_attention.') else 1)}.{name}"
                       for i in range(arch.num_layers) for name in layer}


@pytest.mark.parametrize("model_class", list(ModelClass))
@pytest.mark.parametrize("config,layer", [(MOE, TE_MOE_GROUPED_LAYER), (DENSE, TE_DENSE_LAYER)], ids=["moe", "dense"])
def test_name_map_covers_exactly_the_te_spec_parameters(config, layer, model_class):
    arch = arch_from_dict(config)
    names = NameMap(arch, te_layout=True, grouped_experts=bool(arch.num_experts), model_class=model_class)
    expected = _expected(arch, layer, model_class)
    assert _mcore_names(names) == expected
    for name in expected:
        names.lookup(name)  # every TE parameter resolves


def test_grouped_expert_index_is_the_gemm_index_plus_the_expert_parallel_offset():
    arch = arch_from_dict(MOE)
    names = NameMap(arch, te_layout=True, grouped_experts=True, model_class=ModelClass.GPT)
    tmap, layer, expert = names.lookup("decoder.layers.1.mlp.experts.linear_fc1.weight3")
    assert (layer, expert) == (1, 3)
    assert tmap.format(layer, expert)[1] == ("model.layers.1.mlp.experts.3.gate_proj.weight",
                                             "model.layers.1.mlp.experts.3.up_proj.weight")
    assert tmap.layout is Layout.GATE_UP and tmap.tp_dim == 0
    tmap, _, expert = names.lookup("decoder.layers.0.mlp.experts.linear_fc2.weight2")
    assert expert == 2 and tmap.tp_dim == 1
    # EP rank 1 of 2 holds experts 2 and 3 as its GEMMs 0 and 1.
    model = torch.nn.Module()
    assert global_param_name(model, "mlp.experts.linear_fc2.weight1", 2) == "mlp.experts.linear_fc2.weight3"
    assert global_param_name(model, "mlp.experts.local_experts.1.linear_fc2.weight", 2) == \
        "mlp.experts.local_experts.3.linear_fc2.weight"


def test_grouped_names_convert_a_transformers_qwen3_moe_both_ways(tmp_path):
    from safetensors.torch import load_file

    from megatron_rpt.model.hf_config import load_hf_config
    from tests.helpers_models import make_tiny_hf_checkpoint

    out = make_tiny_hf_checkpoint("qwen3_moe", tmp_path / "moe", tokenizer=False)
    hf = load_file(out / "model.safetensors")  # per-expert names, as released checkpoints store them
    arch = load_hf_config(out)
    names = NameMap(arch, te_layout=True, grouped_experts=True, model_class=ModelClass.GPT)
    full = {}
    for tmap, layer, expert in names.iter_all():
        mcore, hf_names = tmap.format(layer, expert)
        full[mcore] = to_mcore(tmap, [hf[n] for n in hf_names], arch, padded_vocab=arch.vocab_size)
    # Megatron's fused gate/up of expert 3 in layer 1 is [gate; up] of transformers' expert 3.
    gate_up = full["decoder.layers.1.mlp.experts.linear_fc1.weight3"]
    assert torch.equal(gate_up, torch.cat([hf["model.layers.1.mlp.experts.3.gate_proj.weight"],
                                           hf["model.layers.1.mlp.experts.3.up_proj.weight"]]))
    back = {}
    for mcore, tensor in full.items():  # every TE name resolves back to the HF tensors it came from
        tmap, layer, expert = names.lookup(mcore)
        back.update(zip(tmap.format(layer, expert)[1], from_mcore(tmap, tensor, arch)))
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[k], hf[k]) for k in hf)
    tmap, _, _ = names.lookup("decoder.layers.0.mlp.experts.linear_fc2.weight0")
    assert [t.shape for t in from_mcore(tmap, full["decoder.layers.0.mlp.experts.linear_fc2.weight0"], arch)] == \
        [hf["model.layers.0.mlp.experts.0.down_proj.weight"].shape]


def _checkpoint_keys(config: dict) -> set[str]:
    from megatron_rpt.distributed import init_distributed
    from megatron_rpt.model.build import build_model

    init_distributed()
    model = build_model(arch_from_dict(config), ModelConfig(), ParallelConfig())
    # The keys written to the dist checkpoint (each sharded entry's .key, after the spec's key map).
    # GPTModel stacks its layers along a sharded axis (keys carry no layer index); HybridModel's
    # layers differ in kind and keep their index: drop it, only the suffixes matter here.
    return {re.sub(r"^decoder\.layers\.\d+\.", "decoder.layers.", entry.key)
            for entry in model.sharded_state_dict().values() if not entry.key.endswith("_extra_state")}


def test_local_moe_checkpoint_names_the_pre_mlp_norm_as_the_te_moe_spec_does():
    from megatron_rpt.distributed import spawn

    moe, dense = spawn(_checkpoint_keys, 1, MOE)[0], spawn(_checkpoint_keys, 1, DENSE)[0]
    # TE's MoE spec keeps a separate TENorm; a local-spec checkpoint must use the same key.
    assert "decoder.layers.pre_mlp_layernorm.weight" in moe
    assert "decoder.layers.mlp.linear_fc1.layer_norm_weight" not in moe
    # Dense: TE fuses the norm into linear_fc1, and Megatron's local spec saves it there too.
    assert "decoder.layers.mlp.linear_fc1.layer_norm_weight" in dense
    assert "decoder.layers.pre_mlp_layernorm.weight" not in dense
    # Both specs fuse the input norm into linear_qkv.
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in moe
