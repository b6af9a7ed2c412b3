"""The rollout phase of one RPT step: problems -> samples -> rewards -> GRPO groups.

Owns: generating ``rollout.samples_per_prompt`` responses per problem on the ranks that
host an engine and sharing them with the rest of the model-parallel group, scoring them
with the RPT reward, dynamic sampling (drop all-0 / all-1 groups, refill from the stream),
and the per-step rollout metrics (reward, accuracy by difficulty, response length).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch.distributed as dist

from megatron_rpt.config import Config
from megatron_rpt.data.entropy_filter import split_names
from megatron_rpt.reward import compute_reward, rollout_reward_kind
from megatron_rpt.rl import filter_groups
from megatron_rpt.rollout import SamplingParams


@dataclass
class RolloutGroup:
    """One problem and its samples."""

    problem: Any
    token_ids: list[list[int]]
    texts: list[str]
    rewards: list[float]
    engine_logprobs: list[list[float]]
    finish_reasons: list[str] = field(default_factory=list)


def _model_parallel_src_and_group() -> tuple[int, Any]:
    from megatron.core import parallel_state

    group = parallel_state.get_model_parallel_group()
    return dist.get_global_rank(group, 0), group


def hosts_engine(cfg: Config) -> bool:
    """Built-in engine: the first rank of each model-parallel group generates; vLLM: every rank."""
    if cfg.rollout.engine == "vllm":
        return True
    from megatron.core import parallel_state

    return dist.get_rank(parallel_state.get_model_parallel_group()) == 0


def sampling_params(cfg: Config, seed: int) -> SamplingParams:
    r = cfg.rollout
    return SamplingParams(
        n=r.samples_per_prompt, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_response_tokens,
        stop=list(r.stop), seed=seed,
    )


def generate_groups(cfg: Config, engine: Any, problems: list[Any], seed: int) -> list[RolloutGroup]:
    """Generate and score; every rank of the model-parallel group returns the same groups."""
    groups: list[RolloutGroup] | None = None
    if engine is not None:
        outputs = engine.generate([p.prompt_ids for p in problems], sampling_params(cfg, seed))
        groups = []
        for problem, samples in zip(problems, outputs):
            texts = [s.text for s in samples]
            groups.append(RolloutGroup(
                problem=problem,
                token_ids=[list(s.token_ids) for s in samples],
                texts=texts,
                rewards=[score(cfg, t, problem) for t in texts],
                engine_logprobs=[list(s.logprobs) for s in samples],
                finish_reasons=[s.finish_reason for s in samples],
            ))
    if cfg.rollout.engine != "vllm":
        src, group = _model_parallel_src_and_group()
        if dist.get_world_size(group) > 1:
            box = [groups]
            dist.broadcast_object_list(box, src=src, group=group)
            groups = box[0]
    assert groups is not None
    return groups


def score(cfg: Config, text: str, problem: Any) -> float:
    """The RPT reward of one response for ``problem`` (a policy reward starts as the correctness)."""
    rl = cfg.rl
    return compute_reward(rollout_reward_kind(rl.reward), text, problem.target_token_bytes,
                          require_think=rl.require_think, answer_format=rl.answer_format, escapes=rl.box_escapes)


def collect_step_groups(cfg: Config, engine: Any, stream: Iterator[Any], num_prompts: int, seed: int,
                        dynamic: bool) -> tuple[list[RolloutGroup], dict[str, float]]:
    """``num_prompts`` groups for this data-parallel rank, refilled when dynamic sampling drops some."""
    kept: list[RolloutGroup] = []
    generated: list[RolloutGroup] = []
    rounds = 0
    dropped = 0
    while True:
        need = num_prompts - len(kept)
        problems = [next(stream) for _ in range(need)]
        batch = generate_groups(cfg, engine, problems, seed + 7919 * rounds)
        generated.extend(batch)
        if dynamic:
            survivors, n_dropped = filter_groups(batch, key=lambda g: g.rewards)
            dropped += n_dropped
            kept.extend(survivors)
        else:
            kept.extend(batch)
        rounds += 1
        if len(kept) >= num_prompts or not dynamic or rounds > cfg.rl.max_refill_rounds:
            break
    if dynamic and not kept:
        kept = generated[:num_prompts]  # nothing informative: train on zero-advantage groups (no-op update)
    kept = kept[:num_prompts]
    metrics = rollout_metrics(cfg, generated)
    metrics.update({"dynamic/dropped_groups": float(dropped), "dynamic/rounds": float(rounds),
                    "dynamic/kept_groups": float(len(kept))})
    return kept, metrics


def rollout_metrics(cfg: Config, groups: list[RolloutGroup]) -> dict[str, float]:
    rewards = [r for g in groups for r in g.rewards]
    lengths = [len(t) for g in groups for t in g.token_ids]
    truncated = [fr == "length" for g in groups for fr in g.finish_reasons]
    out = {
        "reward/mean": sum(rewards) / max(len(rewards), 1),
        "response_length/mean": sum(lengths) / max(len(lengths), 1),
        "response_length/max": float(max(lengths, default=0)),
        "response_length/truncated_fraction": sum(truncated) / max(len(truncated), 1),
        "rollout/samples": float(len(rewards)),
        "rollout/generated_tokens": float(sum(lengths)),
    }
    for name in split_names(cfg.data.difficulty_thresholds):
        # Problem.splits holds every (nested) difficulty split its position's entropy falls in.
        scored = [r for g in groups if name in g.problem.splits for r in g.rewards]
        out[f"accuracy/{name}"] = sum(scored) / len(scored) if scored else float("nan")
        out[f"accuracy/{name}_samples"] = float(len(scored))
    return out


def save_rollouts(log_dir: str | Path, step: int, dp_rank: int, groups: list[RolloutGroup]) -> None:
    out_dir = Path(log_dir) / "rollouts"
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"step_{step:06d}_dp{dp_rank:03d}.jsonl"
    tmp = final.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for g in groups:
            p = g.problem
            for text, reward in zip(g.texts, g.rewards):
                f.write(json.dumps({
                    "step": step, "doc_id": getattr(p, "doc_id", None), "position": getattr(p, "position", None),
                    "entropy": None if p.entropy is None else float(p.entropy), "target": b"".join(p.target_token_bytes).decode("utf-8", "replace"),
                    "response": text, "reward": reward,
                }) + "\n")
    tmp.replace(final)

