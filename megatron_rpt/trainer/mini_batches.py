"""A step's samples as the optimizer sees them: mini-batches of Megatron micro-batches.

Owns :class:`MiniBatch` (one optimizer step: micro-batches from
:func:`megatron_rpt.rl.build_micro_batches`, the global token and sequence counts its GRPO loss
is normalised by, and the engine's log-probabilities of its samples), :func:`split_mini_batches`,
:func:`engine_vs_policy_logprob_diff` (the weight-sync check logged every step) and
:func:`merge_update_metrics` (the metrics of all optimizer steps of one training step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from megatron_rpt.config import RLConfig
from megatron_rpt.distributed import all_reduce_numbers
from megatron_rpt.rl import PackingSpec, build_micro_batches, response_values

Sample = tuple[list[int], list[int]]  # (prompt ids, response ids)


@dataclass
class MiniBatch:
    """One optimizer step's share of this data-parallel rank."""

    micro_batches: list[dict[str, torch.Tensor]]
    global_tokens: int  # response tokens of the mini-batch over all data-parallel ranks
    global_seqs: int  # sequences of the mini-batch over all data-parallel ranks
    engine_logprobs: list[list[float]]  # the engine's logprob of every response token, per sample

    def attach(self, key: str, logprobs: list[torch.Tensor] | None) -> None:
        """Put per-token ``logprobs`` (one tensor per micro-batch) on the micro-batches under ``key``;
        None (a pipeline stage that computes none) puts zeros, which that stage never reads."""
        for i, mb in enumerate(self.micro_batches):
            mb[key] = logprobs[i] if logprobs is not None else torch.zeros_like(mb["loss_mask"], dtype=torch.float32)


def split_evenly(n: int, parts: int) -> list[range]:
    """``parts`` contiguous index ranges covering ``range(n)`` (sizes differ by at most one)."""
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def split_mini_batches(samples: Sequence[Sample], advantages: Sequence[float],
                       engine_logprobs: Sequence[list[float]], rl: RLConfig, dp_group: Any = None,
                       packing: PackingSpec | None = None) -> list[MiniBatch]:
    """``rl.mini_batches_per_step`` mini-batches of consecutive samples, each normalised over its
    tokens and sequences on all data-parallel ranks (one all-reduce for all of them); ``packing``:
    the policy's packed layout (:func:`megatron_rpt.trainer.policy.packing_spec`), None for padded rows."""
    parts = split_evenly(len(samples), rl.mini_batches_per_step)
    if any(len(part) == 0 for part in parts):
        raise ValueError(f"{len(samples)} samples cannot fill rl.mini_batches_per_step={rl.mini_batches_per_step} "
                         "mini-batches; lower rl.mini_batches_per_step")
    counts = []
    for part in parts:
        counts += [sum(len(samples[i][1]) for i in part), len(part)]
    totals = all_reduce_numbers(counts, group=dp_group)
    return [MiniBatch(build_micro_batches([samples[i] for i in part], [advantages[i] for i in part],
                                          micro_batch_size=rl.micro_batch_size, pad_token_id=0, packing=packing),
                      int(totals[2 * k]), int(totals[2 * k + 1]), [engine_logprobs[i] for i in part])
            for k, part in enumerate(parts)]


def engine_vs_policy_logprob_diff(micro_batches: list[dict[str, torch.Tensor]],
                                  engine_logprobs: list[list[float]]) -> float:
    """Mean |engine logprob - Megatron logprob| over response tokens, at every temperature.

    The engine samples with the weights the bridge pushed; Megatron scores the same tokens with
    the weights it trains. Both are ``log_softmax(logits / T)`` of the sampled token (see
    rollout/base.py), so anything but float noise here means the weight sync is broken. With
    ``rollout.top_p < 1`` vLLM reports the log-probability renormalised over the nucleus: the
    metric then also holds the mean ``-log(nucleus mass)`` of the sampled positions (the
    built-in engine reports the pre-top-p value at any top_p).
    """
    policy = response_values(micro_batches, [mb["old_logprobs"] for mb in micro_batches])
    diffs = [(p.double() - torch.tensor(e, dtype=torch.float64)).abs() for p, e in zip(policy, engine_logprobs)]
    return float(torch.cat(diffs).mean()) if diffs else float("nan")


_SUMMED = ("num_tokens", "num_seqs", "update_skipped")  # counts over every optimizer step
_MAXED = ("ratio_max",)
_LAST = ("lr",)  # the value after the step's last update


def merge_update_metrics(steps: Sequence[dict[str, float]]) -> dict[str, float]:
    """The metrics of one training step's optimizer steps (mini-batches x ``rl.updates_per_batch``).

    Counts and skipped updates are summed, ``ratio_max`` is maxed, ``lr`` is the last one, every
    other metric (losses, gradient norm, KL, clip fractions, entropy) is the mean over the optimizer
    steps that report it; ``grad_norm_max`` and ``optimizer_steps`` are added.
    """
    if not steps:
        return {}
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for step in steps for k in step):
        values = [float(step[key]) for step in steps if key in step]
        if key in _SUMMED:
            out[key] = sum(values)
        elif key in _MAXED:
            out[key] = max(values)
        elif key in _LAST:
            out[key] = values[-1]
        else:
            out[key] = sum(values) / len(values)
    if "grad_norm" in out:
        out["grad_norm_max"] = max(float(step["grad_norm"]) for step in steps if "grad_norm" in step)
    out["optimizer_steps"] = float(len(steps))
    return out
