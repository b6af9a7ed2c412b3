"""Appendix A's dense rewards in training: P(y[0] | x<t) of each wrong prediction, from the policy.

Owns: :func:`first_token_ids` (the first token of each prediction), :func:`first_token_probabilities`
(the Megatron policy's probability of that token after the plain context, temperature 1, shared by
every pipeline stage) and :func:`apply_policy_rewards`, which the trainer calls after the rollout
phase when ``rl.reward`` is ``dense`` or ``conditional_dense``: the rollout phase has scored each
sample's correctness (the prefix-match reward), and the group rules of
:func:`megatron_rpt.reward.group_rewards` turn it into the dense reward.

Why the policy and not the rollout engine: the reward is the probability under the model being
trained (the paper's P(y[0] | x<t; theta)), and the Megatron policy is that model on every rank at
any parallel layout, while an engine may sample in another dtype or hold no logits (vLLM). The
first token is the prediction tokenised on its own (no special tokens): the verifier has the
prediction as text, and that is the token the model would write first to spell it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.distributed as dist

from megatron_rpt.config import Config
from megatron_rpt.reward import POLICY_REWARDS, group_rewards, prediction_of
from megatron_rpt.rl import build_micro_batches
from megatron_rpt.topology import Topology

__all__ = ["first_token_ids", "first_token_probabilities", "apply_policy_rewards"]


def first_token_ids(tokenizer: Any, predictions: Sequence[str | None]) -> list[int | None]:
    """The id of each prediction's first token (None for no prediction or an empty one)."""
    out: list[int | None] = []
    for text in predictions:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        out.append(int(ids[0]) if ids else None)
    return out


def _share_from_last_stage(values: list[float] | None, topo: Topology) -> list[float]:
    """The last pipeline stage's values on every stage (the other stages computed nothing)."""
    if topo.pp_size == 1:
        assert values is not None
        return values
    box = [values]
    dist.broadcast_object_list(box, group=topo.pp_group, group_src=topo.pp_size - 1)
    return box[0]


def first_token_probabilities(policy: Any, contexts: Sequence[Sequence[int]], token_ids: Sequence[int],
                              micro_batch_size: int) -> list[float]:
    """P(token_ids[i] | contexts[i]) under the policy at temperature 1, on every rank of the
    model-parallel group (collective: every rank of it calls this with the same arguments; the last
    stage shares the result over the pipeline group of ``policy.topo``)."""
    if len(contexts) != len(token_ids):
        raise ValueError(f"{len(contexts)} contexts but {len(token_ids)} tokens")
    if not contexts:
        return []
    samples = [(list(c), [int(t)]) for c, t in zip(contexts, token_ids)]
    micro = build_micro_batches(samples, [0.0] * len(samples), micro_batch_size=micro_batch_size)
    logprobs = policy.compute_logprobs(micro, temperature=1.0)
    values = None
    if logprobs is not None:
        values = []
        for mb, lp in zip(micro, logprobs):
            for row in range(mb["loss_mask"].shape[0]):
                mask = mb["loss_mask"][row].bool()
                if mask.any():  # padding rows fill the last micro-batch
                    values.append(float(lp[row][mask][0].double().exp()))
        values = values[:len(samples)]
    return _share_from_last_stage(values, policy.topo)


def apply_policy_rewards(cfg: Config, groups: Sequence[Any], policy: Any, tokenizer: Any) -> dict[str, float]:
    """Replace each group's correctness by its ``rl.reward`` (dense / conditional dense) in place.

    Every rank of a model-parallel group holds the same groups and calls this together.
    """
    rl = cfg.rl
    if rl.reward not in POLICY_REWARDS:
        raise ValueError(f"apply_policy_rewards is for rl.reward in {list(POLICY_REWARDS)}, got {rl.reward!r}")
    needed: list[tuple[int, int]] = []  # (group, sample) of every wrong prediction that has a first token
    contexts, tokens = [], []
    per_group_ids = []
    for gi, g in enumerate(groups):
        predictions = [prediction_of(t, rl.answer_format, rl.require_think, rl.box_escapes) for t in g.texts]
        ids = first_token_ids(tokenizer, predictions)
        per_group_ids.append(ids)
        if rl.reward == "conditional_dense" and not any(r == 1.0 for r in g.rewards):
            continue  # stays all-zero: no probability needed
        for si, (correct, tok) in enumerate(zip(g.rewards, ids)):
            if correct != 1.0 and tok is not None:
                needed.append((gi, si))
                contexts.append(g.problem.context_ids)
                tokens.append(tok)
    probs = first_token_probabilities(policy, contexts, tokens, rl.micro_batch_size)
    found = {key: p for key, p in zip(needed, probs)}
    dense = []
    for gi, g in enumerate(groups):
        g.rewards = group_rewards(rl.reward, g.rewards,
                                  [found.get((gi, si)) for si in range(len(g.rewards))])
        dense.extend(g.rewards)
    return {"reward/policy_mean": sum(dense) / max(len(dense), 1),
            "reward/first_token_probs": float(len(probs))}
