"""Worker-side helpers of the real-vLLM tests (run inside ``spawn``ed ranks).

Owns: the tiny checkpoint shapes vLLM's CPU backend accepts (:func:`tiny_checkpoint`), a
Megatron policy loaded from a checkpoint (:func:`megatron_policy`), vLLM engines as the
trainer builds them (:func:`vllm_engine`), and the comparison the tests assert on
(:func:`logprob_gap`): the engine's per-token log-probabilities of its own samples against
Megatron's recomputation of the same tokens (``MegatronPolicy.compute_logprobs``, the GRPO
old-policy path) at the sampling temperature.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from helpers_models import make_tiny_hf_checkpoint

# vLLM's CPU attention takes head sizes 32, 64, 80, ... (not helpers_models' default 16). The
# vocabulary is the shared Qwen2.5 tokenizer's: vLLM detokenises what it samples.
VLLM_DIMS: dict[str, Any] = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                 intermediate_size=256, vocab_size=151936, max_position_embeddings=512)
MAX_MODEL_LEN = 256
SAMPLES = 2  # per prompt
MAX_TOKENS = 8


def tiny_checkpoint(family: str, out: Path, seed: int = 0, **overrides: Any) -> Path:
    """A random ``family`` checkpoint with :data:`VLLM_DIMS` (+ ``overrides``) and the Qwen tokenizer."""
    if not (out / "config.json").is_file():
        make_tiny_hf_checkpoint(family, out, seed=seed, **{**VLLM_DIMS, **overrides})
    if not (out / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{out} has no tokenizer.json: the vLLM tests need ../shared/tokenizers/qwen2_5")
    return out


def small_config(tp: int = 1, pp: int = 1, ep: int = 1, lr: float = 1e-2) -> Any:
    from megatron_rpt.config import Config

    cfg = Config()
    cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.parallel.expert_parallel = tp, pp, ep
    cfg.rl.micro_batch_size = 4
    cfg.optim.lr = lr
    cfg.rollout.dtype = "float32"
    return cfg


def megatron_policy(cfg: Any, model_dir: Path, optimizer: bool = False) -> Any:
    """The Megatron policy (as the trainer builds it) with ``model_dir``'s weights.
    ``init_distributed`` must have been called with ``cfg.parallel``'s sizes."""
    from megatron_rpt.model.build import build_model_chunks
    from megatron_rpt.model.hf_config import load_hf_config
    from megatron_rpt.trainer.optimizer import build_optimizer, wrap_ddp
    from megatron_rpt.trainer.policy import MegatronPolicy
    from megatron_rpt.weights.load import load_hf_into_model

    arch = load_hf_config(model_dir)
    chunks = build_model_chunks(arch, cfg.model, cfg.parallel)
    load_hf_into_model(chunks, model_dir, arch)
    opt = sched = None
    if optimizer:
        chunks = wrap_ddp(chunks, cfg)
        opt, sched = build_optimizer(chunks, cfg)
    return MegatronPolicy(cfg, arch, chunks, opt, sched)


def vllm_engine(model_dir: Path, tensor_parallel: int = 1) -> Any:
    """A vLLM engine without weights (``load_format="dummy"``): they can only come from the bridge."""
    from megatron_rpt.model.hf_config import load_hf_config
    from megatron_rpt.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(model_dir, load_hf_config(model_dir), tensor_parallel=tensor_parallel, dtype="float32",
                      enforce_eager=True, seed=0, max_model_len=MAX_MODEL_LEN, max_num_seqs=8, load_format="dummy")


def prompts(n: int, length: int, seed: int, vocab: int = 150000) -> list[list[int]]:
    """Random prompts of ordinary tokens (below the tokenizer's special ids)."""
    rng = random.Random(seed)
    return [[rng.randrange(200, min(vocab, 150000)) for _ in range(length)] for _ in range(n)]


def _micro_batches(prompt_ids: list[list[int]], generations: list[list[Any]]) -> tuple[list[dict], list[list[float]]]:
    from megatron_rpt.rl import build_micro_batches

    samples = [(p, g.token_ids) for p, row in zip(prompt_ids, generations) for g in row]
    micro = build_micro_batches(samples, [1.0] * len(samples), micro_batch_size=4, pad_token_id=0)
    return micro, [g.logprobs for row in generations for g in row]


def logprob_gap(policy: Any, prompt_ids: list[list[int]], generations: list[list[Any]],
                temperature: float) -> dict[str, float] | None:
    """max / mean |engine - Megatron| log-prob over the sampled tokens, and the trainer's metric
    (``engine_vs_policy_logprob_diff``); None on ranks that are not the last pipeline stage."""
    from megatron_rpt.trainer.mini_batches import engine_vs_policy_logprob_diff

    micro, engine = _micro_batches(prompt_ids, generations)
    policy.temperature = temperature
    megatron = policy.compute_logprobs(micro)
    if megatron is None:
        return None
    gaps, sample = [], 0
    for mb, lp in zip(micro, megatron):
        mb["old_logprobs"] = lp
        for row in range(mb["loss_mask"].shape[0]):
            mask = mb["loss_mask"][row].bool()
            if mask.any():
                gaps.append((lp[row][mask].double() - torch.tensor(engine[sample], dtype=torch.float64)).abs())
                sample += 1
    gap = torch.cat(gaps)
    return {"max": float(gap.max()), "mean": float(gap.mean()), "metric": engine_vs_policy_logprob_diff(micro, engine),
            "tokens": int(gap.numel())}


def grpo_step(policy: Any, prompt_ids: list[list[int]], generations: list[list[Any]]) -> dict[str, float]:
    """One real GRPO optimizer step on the engine's samples (alternating +-1 advantages)."""
    from megatron_rpt.rl import build_micro_batches

    samples = [(p, g.token_ids) for p, row in zip(prompt_ids, generations) for g in row]
    advantages = [1.0 if i % 2 else -1.0 for i in range(len(samples))]
    micro = build_micro_batches(samples, advantages, micro_batch_size=4, pad_token_id=0)
    old = policy.compute_logprobs(micro)
    for mb, lp in zip(micro, old or [torch.zeros_like(mb["loss_mask"], dtype=torch.float32) for mb in micro]):
        mb["old_logprobs"] = lp
    tokens = sum(len(g.token_ids) for row in generations for g in row)
    return policy.train_step(micro, tokens, len(samples))
