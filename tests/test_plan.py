"""The memory planner against hand-computed numbers, the paper's activation formulas,
transformers' own parameter counts, and the recipes it must place on their GPU counts."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_rpt.config import load_config, validate
from megatron_rpt.memory_plan import (
    GiB,
    Hardware,
    LayerShape,
    Layout,
    StageParams,
    Workload,
    estimate_memory,
    estimate_step_time,
    layer_activation_bytes,
    min_gpus_that_fit,
    plan,
    plan_config,
    refusal,
    stage_params,
)
from megatron_rpt.memory_plan.search import balanced_uneven_split, layout_problems
from megatron_rpt.model.hf_config import arch_from_dict, load_hf_config

REPO = Path(__file__).resolve().parent.parent
RECIPES = ["configs/rpt_14b.yaml", "configs/rpt_32b.yaml", "configs/rpt_72b.yaml", "configs/rpt_moe_30b_a3b.yaml",
           "configs/rpt_qwen3_235b_a22b.yaml"]
HF_CONFIGS = ["r1_distill_qwen_14b", "r1_distill_qwen_32b", "qwen2_5_72b", "qwen3_30b_a3b"]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name configs/hf/*.json relative to the repository


# ----------------------------------------------------------------------------- activations


def test_activations_match_korthikanti_table_2():
    """Korthikanti et al. 2022, Table 2, for a GPT-3 175B layer (s=2048, b=1, h=12288, a=96, t=8)."""
    s, b, h, a, t = 2048, 1, 12288, 96, 8
    gpt = LayerShape.gpt(hidden=h, heads=a)
    sbh = s * b * h
    assert layer_activation_bytes(gpt, s, b) == sbh * (34 + 5 * a * s / h)
    assert layer_activation_bytes(gpt, s, b, tp=t) == sbh * (10 + 24 / t + 5 * a * s / (h * t))
    assert layer_activation_bytes(gpt, s, b, tp=t, sequence_parallel=True) == sbh / t * (34 + 5 * a * s / h)
    assert layer_activation_bytes(gpt, s, b, tp=t, recompute="selective") == sbh * (10 + 24 / t)
    assert layer_activation_bytes(gpt, s, b, tp=t, sequence_parallel=True, recompute="selective") == sbh * 34 / t
    assert layer_activation_bytes(gpt, s, b, recompute="full") == 2 * sbh
    assert layer_activation_bytes(gpt, s, b, tp=t, sequence_parallel=True, recompute="full") == 2 * sbh / t
    # Flash attention never stores the s x s matrix: same as the paper's selective recompute.
    assert layer_activation_bytes(gpt, s, b, tp=t, flash_attention=True) == sbh * (10 + 24 / t)


def test_activations_r1_distill_14b_layer_by_hand():
    """GQA + SwiGLU, no dropout, TP=4 + SP, flash attention; every stored tensor listed by hand."""
    h, q, kv, f = 5120, 40 * 128, 8 * 128, 13824
    replicated = 2 * h + 2 * h + 2 * h + 2 * h  # attn norm in, QKV in, MLP norm in, fc1 in (bf16)
    sharded = 2 * q + 2 * kv + 2 * kv + 2 * q  # Q, K, V for the core; context = out-proj input
    sharded += 2 * (2 * f) + 2 * f + 2 * f  # fc1 out (gate|up), silu(gate), silu*up = fc2 in
    assert (replicated, sharded) == (40960, 135168)
    s, tp = 4096 + 8192, 4
    expected = s * (replicated + sharded) / tp  # = 541,065,216 bytes
    arch = load_hf_config("configs/hf/r1_distill_qwen_14b.json")
    got = layer_activation_bytes(LayerShape.from_arch(arch), s, 1, tp=tp, sequence_parallel=True,
                                 flash_attention=True)
    assert got == expected == 541_065_216


# ----------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("name", HF_CONFIGS)
def test_parameter_split_adds_up_to_transformers_count(name):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(f"configs/hf/{name}.json"))
    reference = sum(p.numel() for p in model.parameters())
    arch = load_hf_config(f"configs/hf/{name}.json")
    one = stage_params(arch, Layout(), arch.vocab_size, 0)
    assert one.total == reference
    pp4 = Layout(pp=4)
    assert sum(stage_params(arch, pp4, arch.vocab_size, st).total for st in range(4)) == reference


def _tiny_moe():
    return arch_from_dict({
        "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_experts": 8,
        "num_experts_per_tok": 2, "moe_intermediate_size": 32, "intermediate_size": 128, "vocab_size": 256,
    })


def test_moe_experts_split_by_ep_and_tp_optimizer_by_expert_dp():
    arch = _tiny_moe()
    lay = Layout(tp=2, ep=4, dp=4)
    p = stage_params(arch, lay, 256, 0)
    # experts: layers x experts/EP x (gate, up, down) x h x f / TP
    assert p.expert == 2 * (8 // 4) * 3 * 64 * 32 // 2 == 12288
    q, kv = 4 * 16, 2 * 16
    attn = 64 * (q + 2 * kv) + q * 64  # no qkv bias in Qwen3
    per_layer = attn // 2 + 2 * 64 + 2 * 16 + 64 * 8  # norms, q/k norms, router replicated
    assert p.dense == 2 * per_layer + 2 * (256 * 64 // 2) + 64  # + embedding, output layer, final norm
    work = Workload(prompt_len=16, response_len=16, micro_batch=1, sequences_per_step=16, rollout_engine="builtin",
                    rollout_batch=1)
    mem = estimate_memory(arch, work, lay, Hardware(gpus=8, overhead_gib=0))
    # fp32 master + m + v: dense state over DP*CP = 4 ranks, experts over DP*CP/EP = 1 rank
    assert mem.optimizer == 12 * (p.dense / 4 + p.expert / 1)


def test_uneven_stages_expert_tp1_and_optimizer_offload_by_hand():
    """The layouts peers run MoE at: PP3 split 1 + 3 + 1, EP4 with expert TP 1 under TP2, 3/4 of the optimizer
    state offloaded to the CPU; the worst stage is the middle one, which a first/last-only check would miss."""
    arch = arch_from_dict({
        "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64, "num_hidden_layers": 5,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_experts": 8,
        "num_experts_per_tok": 2, "moe_intermediate_size": 32, "intermediate_size": 128, "vocab_size": 256,
    })
    assert balanced_uneven_split(5, 3) == (1, 1)
    assert balanced_uneven_split(94, 8) == (11, 11)  # Qwen3-235B over PP8: 11 + 6 x 12 + 11, as NeMo-RL runs it
    assert balanced_uneven_split(94, 4) == (23, 23)  # 23 + 24 + 24 + 23
    assert balanced_uneven_split(28, 4) is None and balanced_uneven_split(7, 2) is None
    lay = Layout(tp=2, pp=3, ep=4, dp=4, etp=1, first_stage_layers=1, last_stage_layers=1)
    assert lay.stage_layers(5) == [1, 3, 1] and lay.gpus == 24
    q, kv = 4 * 16, 2 * 16
    dense_layer = (64 * (q + 2 * kv) + q * 64) // 2 + 2 * 64 + 2 * 16 + 64 * 8  # attention / TP, norms, router
    expert_layer = (8 // 4) * 3 * 64 * 32  # two whole experts per rank: EP4, expert TP 1 (not / TP)
    embedding = 256 * 64 // 2
    assert (dense_layer, expert_layer) == (6816, 12288)
    assert stage_params(arch, lay, 256, 0) == StageParams(dense=dense_layer + embedding, expert=expert_layer)
    assert stage_params(arch, lay, 256, 1) == StageParams(dense=3 * dense_layer, expert=3 * expert_layer)
    assert stage_params(arch, lay, 256, 2) == StageParams(dense=dense_layer + embedding + 64, expert=expert_layer)
    work = Workload(prompt_len=16, response_len=16, micro_batch=1, sequences_per_step=16, rollout_engine="builtin",
                    rollout_batch=1, optimizer_offload_fraction=0.75)
    mem = estimate_memory(arch, work, lay, Hardware(gpus=24, overhead_gib=0))
    assert mem.stage == 1 and mem.params_per_gpu == 3 * (dense_layer + expert_layer)
    # dense state over DP*CP = 4 ranks; experts over the expert data-parallel size TP*CP*DP/(EP*ETP) = 8/4 = 2;
    # a quarter of it stays on the GPU
    assert mem.optimizer == 12 * (3 * dense_layer / 4 + 3 * expert_layer / 2) * 0.25


# ----------------------------------------------------------------------------- a 1B model by hand


def _llama_1b():
    return arch_from_dict({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 2048, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 32001,
        "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
    })


@pytest.mark.parametrize("distributed_optimizer", [True, False])
def test_1b_model_tp2_dp4_by_hand(distributed_optimizer):
    arch = _llama_1b()
    assert 1.0e9 < arch.num_parameters() < 1.2e9
    # --- parameters on one GPU at TP=2, PP=1
    attn = 2048 * (2048 + 2 * 512) + 2048 * 2048  # QKV + out-proj = 10,485,760
    mlp = 3 * 2048 * 8192  # gate, up, down = 50,331,648
    per_layer = (attn + mlp) // 2 + 2 * 2048  # TP-split matrices + two replicated RMSNorms
    vocab = 32256  # 32001 padded to a multiple of 128 * TP
    params = 16 * per_layer + 2 * (vocab * 2048 // 2) + 2048  # + embedding, output layer, final norm
    assert params == 552_667_136
    weights, grads = 2 * params, 4 * params  # bf16 weights, fp32 gradient buffer
    optimizer = 12 * params / (4 if distributed_optimizer else 1)  # fp32 master + m + v, sharded over DP=4
    # --- activations: one 2048-token micro-batch (1024 prompt + 1024 response), SP, flash attention
    tokens = 2048
    per_token_layer = (8 * 2048 + (4 * 2048 + 4 * 512 + 8 * 8192)) / 2  # (replicated + sharded) / TP
    activations = 16 * tokens * per_token_layer  # 1,509,949,440
    activations += tokens * 4 * 2048 / 2  # final-norm and output-layer inputs (SP)
    activations += tokens * vocab / 2 * 4  # logits: bf16 logits + their bf16 gradient
    activations += 1024 * vocab / 2 * 18  # float32 temporaries of one 1024-token log-prob chunk
    # --- rollout: vLLM claims 25% of 80 GiB, plus one 512 MiB weight-sync bucket; 2 GiB overhead
    rollout, bucket, overhead = 0.25 * 80 * 2**30, 512 * 2**20, 2 * 2**30
    train_phase = weights + grads + optimizer + overhead + activations
    rollout_phase = weights + grads + optimizer + overhead + rollout + bucket

    work = Workload(prompt_len=1024, response_len=1024, micro_batch=1, sequences_per_step=64,
                    rollout_engine="vllm", rollout_tp=1, gpu_memory_utilization=0.25, bucket_mb=512)
    hw = Hardware(gpus=8, gpu_mem_gib=80, overhead_gib=2)
    lay = Layout(tp=2, dp=4, sequence_parallel=True, distributed_optimizer=distributed_optimizer)
    mem = estimate_memory(arch, work, lay, hw)
    assert mem.params_per_gpu == params
    assert (mem.weights, mem.grads) == (weights, grads)
    assert mem.optimizer == pytest.approx(optimizer, rel=1e-12)
    assert mem.activations == pytest.approx(activations, rel=1e-12)
    assert (mem.rollout, mem.bucket, mem.overhead) == (rollout, bucket, overhead)
    assert mem.train_phase == pytest.approx(train_phase, rel=1e-12)
    assert mem.rollout_phase == pytest.approx(rollout_phase, rel=1e-12)
    assert mem.peak == pytest.approx(max(train_phase, rollout_phase), rel=1e-12)
    # distributed: 1.03 + 2.06 + 1.54 + 2 + 20.5 GiB (rollout phase); plain Adam: +4.63 GiB optimizer
    assert mem.peak / GiB == pytest.approx(27.13 if distributed_optimizer else 31.76, abs=0.01)
    # unchunked log-probs (rl.logprob_chunk_tokens=0): 22 bytes per logit element (bench_logprobs.py)
    full = estimate_memory(arch, dataclasses.replace(work, logprob_chunk_tokens=0), lay, hw)
    unchunked = activations - (tokens * 4 + 1024 * 18) * vocab / 2 + tokens * vocab / 2 * 22
    assert full.activations == pytest.approx(unchunked, rel=1e-12)


def test_pipeline_first_stage_holds_pp_microbatches():
    """1F1B: stage 0 keeps PP micro-batches of its L/PP layers = all L layers of one micro-batch."""
    arch = _llama_1b()
    work = Workload(prompt_len=1024, response_len=1024, micro_batch=1, sequences_per_step=64,
                    rollout_engine="builtin", rollout_batch=1)
    hw = Hardware(gpus=8, overhead_gib=0)
    per_layer = layer_activation_bytes(LayerShape.from_arch(arch), 2048, 1, tp=1, flash_attention=True)
    pp4 = estimate_memory(arch, work, Layout(pp=4, dp=2), hw)
    assert pp4.stage == 0
    assert pp4.activations == pytest.approx(16 * per_layer)  # 4 layers x 4 micro-batches in flight
    interleaved = estimate_memory(arch, work, Layout(pp=4, dp=2, vp=2), hw)
    assert interleaved.activations == pytest.approx(16 * per_layer * (1 + 3 / 8))


def test_vllm_kv_cache_by_hand():
    """14B recipe, 32 GPUs, rollout TP 2: KV bytes per token and the concurrent sequences that fit."""
    cfg = load_config("configs/rpt_14b.yaml", validate_paths=False)
    arch = load_hf_config(cfg.model.hf_config)
    work = Workload.from_config(cfg)
    mem = estimate_memory(arch, work, Layout.from_config(cfg, 32), Hardware(gpus=32, gpu_mem_gib=80))
    per_token = 48 * 2 * (8 // 2) * 128 * 2  # layers x (K,V) x kv heads per rank x head dim x bf16
    assert mem.kv_bytes_per_token == per_token == 98_304
    seqs_per_engine = 256 * 8 // (32 // 2)
    assert mem.kv_needed == seqs_per_engine * (4096 + 8192) * per_token
    vllm = 0.6 * 80 * 2**30  # rollout.gpu_memory_utilization=0.6, as peers run vLLM
    kv_room = vllm - 14_770_033_664 * 2 / 2 - 2**30  # minus rollout weights (bf16 / TP 2) and ~1 GiB
    assert mem.concurrent_sequences == int(kv_room // (12288 * per_token)) == 29


# ----------------------------------------------------------------------------- step time


def test_step_time_bubble_and_tp_across_nodes():
    arch = _llama_1b()
    work = Workload(prompt_len=1024, response_len=1024, micro_batch=2, sequences_per_step=256,
                    rollout_engine="builtin")
    hw = Hardware(gpus=16)
    t = estimate_step_time(arch, work, Layout(pp=4, dp=4), hw)
    assert t.bubble == pytest.approx(3 / (256 / (4 * 2)))  # (PP-1) / micro-batches
    inside = estimate_step_time(arch, work, Layout(tp=8, dp=2, sequence_parallel=True), hw)
    across = estimate_step_time(arch, work, Layout(tp=8, dp=2, sequence_parallel=True),
                                dataclasses.replace(hw, gpus_per_node=4))
    assert inside.comm_s > 0
    assert across.comm_s == pytest.approx(inside.comm_s * hw.intra_node_gbps / hw.inter_node_gbps)
    assert across.total_s > inside.total_s


def test_cpu_optimizer_step_of_the_14b_recipe_by_hand(capsys):
    """optim.cpu_offload=true on the paper's recipe (R1-Distill-Qwen-14B, TP2 PP4 DP2 on 16 GPUs, offload_fraction
    1.0): the host's AdamW over the worst stage's optimizer shard and the grad/param copies, by hand."""
    h, ffn, vocab, tp, dp = 5120, 13824, 152064, 2, 2  # vocab = 594 x 128 x TP: no padding
    q, kv = 40 * 128, 8 * 128  # query heads x head_dim, KV heads x head_dim
    attention = (h * (q + 2 * kv) + q * h + (q + 2 * kv)) // tp  # QKV with bias, out-proj; over TP
    layer = attention + 2 * h + 3 * h * ffn // tp  # + two RMSNorms + the SwiGLU MLP over TP
    assert (attention, layer) == (31_460_864, 137_639_424)
    last_stage = 48 // 4 * layer + h + vocab * h // tp  # 12 layers, final norm, output layer (the worst stage)
    shard = last_stage // dp  # the distributed optimizer's shard over DP2
    assert shard == 1_020_481_024
    host_adam_s = shard * 28 / 50e9  # fp32 AdamW: read param, grad, m, v, write param, m, v; 50 GB/s per GPU
    copy_s = shard * (4 + 4) / 50e9  # fp32 grad to the host, fp32 param back, over 50 GB/s PCIe
    assert (round(host_adam_s, 4), round(copy_s, 4)) == (0.5715, 0.1633)

    cfg = load_config("configs/rpt_14b.yaml", ["optim.cpu_offload=true"], validate_paths=False)
    arch, hw = load_hf_config(cfg.model.hf_config), Hardware(gpus=16)
    work, layout = Workload.from_config(cfg), Layout.from_config(cfg, 16)
    t = estimate_step_time(arch, work, layout, hw)
    c = t.cpu_optimizer
    assert (c.params, c.optimizer_steps) == (shard, 1)
    assert (c.host_adam_s, c.copy_s) == (pytest.approx(host_adam_s), pytest.approx(copy_s))
    resident = estimate_step_time(arch, dataclasses.replace(work, optimizer_offload_fraction=0.0), layout, hw)
    assert resident.cpu_optimizer.total_s == 0.0 and resident.cpu_optimizer.params == 0.0
    assert t.total_s - resident.total_s == pytest.approx(host_adam_s + copy_s)
    assert t.train_s - resident.train_s == pytest.approx(host_adam_s + copy_s)
    # every optimizer step pays it: 2 mini-batches x 2 updates; half the state offloaded halves it
    four = estimate_step_time(arch, dataclasses.replace(work, mini_batches=2, updates_per_batch=2), layout, hw)
    assert four.cpu_optimizer.total_s == pytest.approx(4 * (host_adam_s + copy_s))
    half = estimate_step_time(arch, dataclasses.replace(work, optimizer_offload_fraction=0.5), layout, hw)
    assert half.cpu_optimizer.total_s == pytest.approx((host_adam_s + copy_s) / 2)

    assert _cli().main(["--config", "configs/rpt_14b.yaml", "--set", "optim.cpu_offload=true", "--top", "1"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps the line at 160 columns
    assert ("CPU optimizer step (optim.offload_fraction=1): 0.73 s per RL step (in train s) = 1 optimizer step(s) "
            "x 1.020B offloaded params/GPU") in out
    assert "= 0.57 s + 0.16 s" in out


# ----------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("path", RECIPES)
def test_recipe_layout_fits_its_gpu_count(path):
    cfg = load_config(path, validate_paths=False)  # validates TP/PP/EP against the HF shape
    gpus = cfg.parallel.world_size
    assert gpus % 8 == 0
    result = plan_config(cfg, Hardware(gpus=gpus, gpu_mem_gib=80, gpus_per_node=8))
    assert result.plan.ok and result.configured is not None and not result.configured_problems
    assert result.configured.fits, result.configured.to_dict()
    assert result.configured_rank is not None
    assert result.configured.memory.peak < 80 * GiB
    # every layout the planner proposes is one the config validation accepts
    for cand in result.plan.fitting[:10]:
        lay = cand.layout
        trial = dataclasses.replace(cfg, parallel=dataclasses.replace(
            cfg.parallel, tensor_parallel=lay.tp, pipeline_parallel=lay.pp, context_parallel=lay.cp,
            expert_parallel=lay.ep, sequence_parallel=lay.sequence_parallel, world_size=gpus,
            expert_tensor_parallel=lay.etp, first_stage_layers=lay.first_stage_layers,
            last_stage_layers=lay.last_stage_layers, virtual_pipeline=lay.vp))
        validate(trial)


def test_planner_keeps_the_prompts_divisible_by_the_engines():
    """24 GPUs hold the 32B recipe in memory (PP6 as 10 + 4 x 11 + 10), but 24 / rollout TP 8 = 3 engines cannot
    share 256 prompts evenly, which the config loader refuses; so the planner does too."""
    cfg = load_config("configs/rpt_32b.yaml", validate_paths=False)
    arch = load_hf_config(cfg.model.hf_config)
    work = Workload.from_config(cfg)
    lay = Layout(tp=4, pp=6, dp=1, sequence_parallel=True, first_stage_layers=10, last_stage_layers=10)
    assert estimate_memory(arch, work, lay, Hardware(gpus=24)).peak < 80 * GiB
    assert layout_problems(arch, work, lay) == ["rl.prompts_per_step=256 is not divisible by the 3 rollout engines "
                                                "(24 GPUs / rollout TP 8)"]
    assert min_gpus_that_fit(arch, work, Hardware(gpus=8)) == 32


def test_paper_recipe_hyperparameters():
    cfg = load_config("configs/rpt_14b.yaml", validate_paths=False)
    assert (cfg.rl.prompts_per_step, cfg.rollout.samples_per_prompt, cfg.rollout.temperature) == (256, 8, 0.8)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.beta1, cfg.optim.beta2) == (1e-6, 0.01, 0.9, 0.999)
    assert (cfg.rl.clip_low, cfg.rl.clip_high, cfg.rl.kl_coef, cfg.rl.entropy_coef) == (0.2, 0.2, 0.0, 0.0)
    assert (cfg.data.max_prompt_tokens, cfg.rollout.max_response_tokens) == (4096, 8192)
    assert (cfg.rl.dynamic_sampling_from_step, cfg.train.steps, cfg.model.params_dtype) == (500, 1000, "bfloat16")
    assert cfg.rollout.engine == "vllm"
    for path in RECIPES[1:]:  # the scaled recipes keep the paper's RL settings
        other = load_config(path, validate_paths=False)
        # sequence packing is how a batch is laid out, not an RL setting (off where CP is on)
        same_rl = dataclasses.replace(other.rl, sequence_packing=cfg.rl.sequence_packing)
        # so is where the optimizer state lives (optim.cpu_offload)
        same_optim = dataclasses.replace(other.optim, cpu_offload=cfg.optim.cpu_offload)
        assert (same_rl, same_optim, other.train) == (cfg.rl, cfg.optim, cfg.train)


def test_recipe_paths_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("RPT_CKPT", "/ckpt/r1-14b")
    monkeypatch.setenv("RPT_TOKENIZER", "/models/r1-14b")
    cfg = load_config("configs/rpt_14b.yaml", validate_paths=False)
    assert (cfg.model.load, cfg.model.tokenizer) == ("/ckpt/r1-14b", "/models/r1-14b")


# ----------------------------------------------------------------------------- refusal and CLI


def test_refusal_names_smallest_requirement_and_gpu_count():
    cfg = load_config("configs/rpt_72b.yaml", validate_paths=False)
    arch = load_hf_config(cfg.model.hf_config)
    work = Workload.from_config(cfg)
    hw = Hardware(gpus=8, gpu_mem_gib=80)
    result = plan(arch, work, hw)
    assert not result.ok and result.considered > 0
    smallest = result.smallest
    text = refusal(arch, result)
    assert f"Smallest requirement: {smallest.memory.peak / GiB:.1f} GiB per GPU" in text
    need = min_gpus_that_fit(arch, work, hw)
    assert f"use at least {need} GPUs" in text
    assert plan(arch, work, dataclasses.replace(hw, gpus=need)).ok
    assert not plan(arch, work, dataclasses.replace(hw, gpus=need - 8)).ok


def _cli():
    spec = importlib.util.spec_from_file_location("plan_cli", REPO / "tools" / "plan.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("path,gpus", [("configs/rpt_14b.yaml", 32), ("configs/rpt_72b.yaml", 32),
                                       ("configs/rpt_moe_30b_a3b.yaml", 8)])
def test_cli_json_for_recipes(path, gpus, capsys):
    assert _cli().main(["--config", path, "--gpus", str(gpus), "--gpu-mem", "80", "--top", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and 1 <= len(out["layouts"]) <= 5 and out["configured"]["fits"]
    steps = [lay["time_s"]["step"] for lay in out["layouts"]]
    offload = load_config(path, validate_paths=False).optim.cpu_offload  # 72B and 30B-A3B offload, 14B does not
    assert (out["configured"]["time_s"]["cpu_optimizer"] > 0) == offload
    assert steps == sorted(steps)
    assert all(lay["memory_gib"]["peak"] <= 80 for lay in out["layouts"])


def test_cli_refuses_with_exit_code_2(capsys):
    assert _cli().main(["--config", "configs/rpt_32b.yaml", "--gpus", "8", "--gpu-mem", "40"]) == 2
    err = capsys.readouterr().err
    assert "no layout of 8 GPUs fits in 40 GiB" in err and "Smallest requirement" in err


def test_cli_table_subprocess():
    """The real command line, as documented: python tools/plan.py --config ... --gpus 32 --gpu-mem 80."""
    proc = subprocess.run([sys.executable, "tools/plan.py", "--config", "configs/rpt_32b.yaml", "--gpus", "32",
                           "--gpu-mem", "80", "--top", "10"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "TP4 PP8 CP1 DP1" in proc.stdout and "configured layout" in proc.stdout and "fits" in proc.stdout
