"""One rollout engine per prompt stream (rollout/layout.py): engines of consecutive ranks must lie
inside one Megatron data-parallel replica, checked against hand-derived rank orders; the config
loader, the planner and the recipes apply the same rule."""

from __future__ import annotations

import inspect

import pytest
from megatron.core import parallel_state

from megatron_rpt.config import ConfigError, ParallelConfig, load_config
from megatron_rpt.rollout.layout import data_parallel_ranks, engine_count, engine_layout_problem, replica_ranks

MOE = "configs/rpt_moe_30b_a3b.yaml"


def test_data_parallel_rank_of_every_rank_by_hand():
    # Megatron orders tp fastest, then cp, (ep,) dp, and pp slowest:
    # rank = tp + TP * (cp + CP * (dp + DP * pp)).
    tp2_pp2 = ParallelConfig(tensor_parallel=2, pipeline_parallel=2)
    assert data_parallel_ranks(tp2_pp2, 8) == [0, 0, 1, 1, 0, 0, 1, 1]
    tp2_cp2 = ParallelConfig(tensor_parallel=2, context_parallel=2)
    assert data_parallel_ranks(tp2_cp2, 8) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert data_parallel_ranks(ParallelConfig(pipeline_parallel=2), 4) == [0, 1, 0, 1]


def test_replica_ranks_are_megatron_rank_generators():
    """The megatron-free arithmetic equals megatron-core's own RankGenerator in the default order of
    initialize_model_parallel (what init_distributed calls), on this megatron-core version."""
    order = inspect.signature(parallel_state.initialize_model_parallel).parameters["order"].default
    for world, tp, cp, pp in [(1, 1, 1, 1), (8, 2, 1, 2), (8, 2, 2, 1), (8, 1, 1, 2), (16, 2, 2, 2), (24, 3, 1, 2),
                              (12, 1, 3, 1), (8, 8, 1, 1), (8, 1, 1, 8)]:
        generator = parallel_state.RankGenerator(tp=tp, ep=1, dp=world // (tp * cp * pp), pp=pp, cp=cp, order=order)
        assert replica_ranks(world, tp, cp, pp) == generator.get_ranks("tp-cp-pp"), (world, tp, cp, pp)


def test_engine_spanning_two_replicas_is_refused_with_a_working_value():
    tp2_pp2 = ParallelConfig(tensor_parallel=2, pipeline_parallel=2)
    # rollout TP4: ranks [0, 1, 2, 3] hold data-parallel ranks 0 and 1 (see above).
    problem = engine_layout_problem(tp2_pp2, 8, 4)
    assert problem is not None
    assert "rollout.tensor_parallel=4 puts global ranks [0, 1, 2, 3]" in problem
    assert "data-parallel ranks [0, 1]" in problem
    assert "set rollout.tensor_parallel=2" in problem
    assert engine_layout_problem(tp2_pp2, 8, 2) is None  # an engine = one TP group
    assert engine_layout_problem(ParallelConfig(tensor_parallel=2, context_parallel=2), 8, 4) is None  # TP x CP
    assert engine_layout_problem(ParallelConfig(pipeline_parallel=4), 4, 4) is None  # one replica: every rank
    assert engine_layout_problem(ParallelConfig(pipeline_parallel=2), 4, 2) is not None  # [0, 1]: DP ranks 0, 1
    assert engine_count(8, 2) == 4
    with pytest.raises(ConfigError, match=r"rollout\.tensor_parallel=3 must divide the world size 8"):
        engine_count(8, 3)


def test_config_load_refuses_the_old_moe_layout_and_accepts_the_recipe():
    # An old recipe (training TP2 PP2 EP4, rollout TP4 on 16 ranks): vLLM group [0..3] spans DP 0 and 1.
    with pytest.raises(ConfigError, match=r"rollout\.tensor_parallel=4 puts global ranks \[0, 1, 2, 3\] in one vLLM "
                                          r"engine, but Megatron gives them data-parallel ranks \[0, 1\].*set "
                                          r"rollout\.tensor_parallel=2"):
        load_config(MOE, ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2", "parallel.expert_parallel=4",
                          "parallel.world_size=16"], validate_paths=False)
    cfg = load_config(MOE, validate_paths=False)  # TP2 PP4 on 8 ranks: one replica holds every engine
    assert (cfg.parallel.tensor_parallel, cfg.rollout.tensor_parallel, cfg.parallel.world_size) == (2, 4, 8)
    # Prompts split over engines, not data-parallel ranks: 8 ranks / rollout TP4 = 2 engines.
    with pytest.raises(ConfigError, match=r"rl\.prompts_per_step=257 is not divisible by the 2 rollout engines"):
        load_config(MOE, ["rl.prompts_per_step=257"], validate_paths=False)


def test_builtin_engine_is_one_per_rank():
    with pytest.raises(ConfigError, match=r"rollout\.tensor_parallel=2 but the builtin engine runs one engine per "
                                          r"rank: set rollout\.tensor_parallel=1, or rollout\.engine=vllm"):
        load_config(None, ["model.hf_checkpoint=auto:tiny-qwen2", "rollout.engine=builtin",
                           "rollout.tensor_parallel=2"], validate_paths=False)


def test_planner_counts_engines_and_refuses_a_spanning_engine():
    from megatron_rpt.memory_plan import Hardware, Layout, Workload, estimate_memory, layout_problems
    from megatron_rpt.model.hf_config import load_hf_config

    cfg = load_config(MOE, validate_paths=False)
    arch = load_hf_config(cfg.model.hf_config)
    work = Workload.from_config(cfg)
    assert layout_problems(arch, work, Layout.from_config(cfg, 8)) == []
    spanning = Layout(tp=2, pp=2, ep=4, dp=4, sequence_parallel=True)
    assert any("puts global ranks [0, 1, 2, 3] in one vLLM engine" in p for p in layout_problems(arch, work, spanning))
    # 2 engines share 256 prompts x 8 samples: 1024 sequences of KV each.
    mem = estimate_memory(arch, work, Layout.from_config(cfg, 8), Hardware(gpus=8, gpu_mem_gib=80))
    assert mem.kv_needed == 256 * 8 // 2 * work.seq_len * mem.kv_bytes_per_token


def test_planner_builtin_engine_holds_the_whole_model_on_every_rank():
    from megatron_rpt.memory_plan import Hardware, Layout, Workload, estimate_memory
    from megatron_rpt.model.hf_config import arch_from_dict

    arch = arch_from_dict({"architectures": ["LlamaForCausalLM"], "hidden_size": 256, "num_hidden_layers": 4,
                           "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 512,
                           "vocab_size": 1000, "tie_word_embeddings": False})
    work = Workload(prompt_len=32, response_len=32, micro_batch=1, sequences_per_step=16, rollout_engine="builtin",
                    rollout_dtype="bfloat16", rollout_batch=4)
    mem = estimate_memory(arch, work, Layout(tp=2, pp=2), Hardware(gpus=4, overhead_gib=0))
    # Unsharded: every layer's K and V of 2 KV heads x head dim 32 in bf16, for 4 sequences of 64 tokens.
    kv = 4 * 64 * 4 * 2 * 2 * 32 * 2
    assert mem.rollout == arch.num_parameters() * 2 + kv
