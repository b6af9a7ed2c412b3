"""The rollout phase of one RPT step: each engine's prompts -> samples -> rewards -> its replica's groups.

Owns: generating ``rollout.samples_per_prompt`` responses per problem on every rollout engine (each
engine its own prompts and seed: :mod:`megatron_rpt.rollout.layout`), scoring them with the RPT
reward, dynamic sampling per engine, gathering the engines' groups into the batch of their
data-parallel replica (every rank of the replica gets the same groups, in engine order), saving
each engine's rollouts, and the per-step rollout metrics.

Dynamic sampling (DAPO, from step ``rl.dynamic_sampling_from_step``): a group whose rewards are
all equal carries no gradient and is dropped; the engine keeps sampling until its share of
``rl.prompts_per_step`` is full of informative groups. Every refill round asks for the missing
count divided by the keep rate observed so far in this step (floored at 0.1:
:func:`~megatron_rpt.rl.refill_prompt_count`), and at most ``rl.max_refill_rounds`` refill rounds
run; a share still short then trains on what it kept, and ``dynamic/fill_fraction`` (logged every
step) says how full the batch was.
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
from megatron_rpt.rl import filter_groups, refill_prompt_count
from megatron_rpt.rollout import SamplingParams
from megatron_rpt.rollout.layout import RolloutLayout


@dataclass
class RolloutGroup:
    """One problem and its samples."""

    problem: Any
    token_ids: list[list[int]]
    texts: list[str]
    rewards: list[float]
    engine_logprobs: list[list[float]]
    finish_reasons: list[str] = field(default_factory=list)


@dataclass
class EngineRollout:
    """What one engine produced in one step: its share of the batch and everything it generated."""

    kept: list[RolloutGroup]  # the engine's share of the training batch, in generation order
    generated: list[RolloutGroup]  # every group generated this step (kept, dropped, beyond the share)
    target: int  # the engine's share: rl.prompts_per_step / engines
    rounds: int  # generation rounds (1 + refill rounds)
    informative: int  # kept groups that carry a learning signal (all of them without dynamic sampling)
    dropped: int  # generated groups dynamic sampling dropped (all rewards equal)

    def metrics(self, cfg: Config) -> dict[str, float]:
        out = rollout_metrics(cfg, self.generated)
        out.update({
            "dynamic/rounds": float(self.rounds),
            "dynamic/kept_groups": float(len(self.kept)),
            "dynamic/dropped_groups": float(self.dropped),
            "dynamic/fill_fraction": self.informative / self.target,
            "rollout/prompts": float(len(self.generated)),
        })
        return out


def sampling_params(cfg: Config, seed: int) -> SamplingParams:
    r = cfg.rollout
    return SamplingParams(
        n=r.samples_per_prompt, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_response_tokens,
        stop=list(r.stop), seed=seed,
    )


def generate_groups(cfg: Config, engine: Any, problems: list[Any], seed: int) -> list[RolloutGroup]:
    """Generate and score on this rank's engine (every rank of a vLLM engine returns the same groups)."""
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
    return groups


def score(cfg: Config, text: str, problem: Any) -> float:
    """The RPT reward of one response for ``problem`` (a policy reward starts as the correctness)."""
    rl = cfg.rl
    return compute_reward(rollout_reward_kind(rl.reward), text, problem.target_token_bytes,
                          require_think=rl.require_think, answer_format=rl.answer_format, escapes=rl.box_escapes)


def sample_engine_share(cfg: Config, engine: Any, stream: Iterator[Any], target: int, seed: int,
                        dynamic: bool) -> EngineRollout:
    """``target`` groups from this engine's stream; with ``dynamic``, informative ones, refilled
    (see the module docstring). Round ``r`` samples with seed ``seed + 7919 * r``."""
    generated: list[RolloutGroup] = []
    informative: list[RolloutGroup] = []
    rounds, ask = 0, target
    while True:
        batch = generate_groups(cfg, engine, [next(stream) for _ in range(ask)], seed + 7919 * rounds)
        rounds += 1
        generated.extend(batch)
        if not dynamic:
            return EngineRollout(batch, generated, target, rounds, informative=len(batch), dropped=0)
        informative.extend(filter_groups(batch, key=lambda g: g.rewards)[0])
        if len(informative) >= target or rounds > cfg.rl.max_refill_rounds:
            break
        ask = refill_prompt_count(len(informative), target, keep_rate=len(informative) / len(generated))
    kept = informative[:target]
    # Nothing informative: train on zero-advantage groups (no policy gradient) rather than on nothing.
    return EngineRollout(kept or generated[:target], generated, target, rounds, informative=len(kept),
                         dropped=len(generated) - len(informative))


def gather_replica_batch(layout: RolloutLayout, kept: list[RolloutGroup]) -> list[RolloutGroup]:
    """Collective over the replica: the groups of every engine in this rank's data-parallel replica,
    in engine order (each engine's first rank sends them), on every rank of the replica."""
    if layout.replica_group is None:
        return kept
    parts: list[Any] = [None] * dist.get_world_size(layout.replica_group)
    dist.all_gather_object(parts, (layout.engine, kept if layout.leader else None), group=layout.replica_group)
    by_engine = {engine: groups for engine, groups in parts if groups is not None}
    return [g for engine in layout.replica_engines for g in by_engine[engine]]


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


def rollout_file(log_dir: str | Path, step: int, engine: int) -> Path:
    """Where engine ``engine`` saves the rollouts of (1-based) step ``step``."""
    return Path(log_dir) / "rollouts" / f"step_{step:06d}_engine{engine:04d}.jsonl"


def save_rollouts(log_dir: str | Path, step: int, engine: int, rollout: EngineRollout) -> None:
    """Every group the engine generated this step, one row per sample (``kept``: in the batch)."""
    final = rollout_file(log_dir, step, engine)
    final.parent.mkdir(parents=True, exist_ok=True)
    kept = {id(g) for g in rollout.kept}
    tmp = final.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for g in rollout.generated:
            p = g.problem
            target = b"".join(p.target_token_bytes).decode("utf-8", "replace")
            for text, reward in zip(g.texts, g.rewards):
                f.write(json.dumps({
                    "step": step, "engine": engine, "doc_id": getattr(p, "doc_id", None),
                    "position": getattr(p, "position", None),
                    "entropy": None if p.entropy is None else float(p.entropy),
                    "target": target, "response": text, "reward": reward, "kept": id(g) in kept,
                }) + "\n")
    tmp.replace(final)
