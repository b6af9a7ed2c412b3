"""DAPO dynamic sampling: keep only prompt groups that carry a learning signal.

Owns: finding the groups whose ``n`` rewards are all equal (all 0 or all 1 with the
binary RPT reward) — their group-relative advantages are all zero, so they add no
gradient but dilute the batch — and the small decisions of the refill loop: whether
dynamic sampling is on at this step, whether more prompts are needed, and how many to
ask for. The trainer does the generating (up to ``rl.max_refill_rounds`` extra rounds,
from step ``rl.dynamic_sampling_from_step``; the RPT paper turns it on at step 500).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


@dataclass(frozen=True)
class GroupFilter:
    keep: Tensor  # bool [num_groups]: the group has at least two different rewards
    num_all_zero: int  # dropped: every reward 0
    num_all_one: int  # dropped: every reward 1
    num_other_constant: int  # dropped: every reward equal to some other value (dense rewards)

    @property
    def kept_indices(self) -> list[int]:
        return torch.nonzero(self.keep, as_tuple=False).flatten().tolist()

    @property
    def num_kept(self) -> int:
        return int(self.keep.sum())

    @property
    def num_dropped(self) -> int:
        return self.num_all_zero + self.num_all_one + self.num_other_constant


def classify_groups(rewards: Tensor, atol: float = 0.0) -> GroupFilter:
    """Which prompt groups of ``rewards [num_groups, n]`` to keep, with the drop reasons.

    A group is dropped when max - min of its rewards is <= ``atol`` (0: exactly equal).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_groups, samples_per_prompt], got shape {tuple(rewards.shape)}")
    r = rewards.detach().to(torch.float64)
    if r.shape[0] == 0:
        return GroupFilter(torch.zeros(0, dtype=torch.bool), 0, 0, 0)
    constant = (r.max(dim=1).values - r.min(dim=1).values) <= atol
    all_zero = constant & (r[:, 0] == 0)
    all_one = constant & (r[:, 0] == 1)
    return GroupFilter(
        keep=(~constant).cpu(),
        num_all_zero=int(all_zero.sum()),
        num_all_one=int(all_one.sum()),
        num_other_constant=int((constant & ~all_zero & ~all_one).sum()),
    )


def filter_groups(
    groups: Sequence[T], key: Callable[[T], Sequence[float]] | None = None, atol: float = 0.0
) -> tuple[list[T], int]:
    """(the groups whose rewards differ, how many were dropped), order kept.

    ``key`` maps a group to its rewards (default: the group is its list of rewards), e.g.
    ``filter_groups(rollout_groups, key=lambda g: g.rewards)``. Groups may differ in size.
    """
    kept = []
    for index, group in enumerate(groups):
        rewards = [float(x) for x in (key(group) if key is not None else group)]
        if not rewards:
            raise ValueError(f"group {index} has no rewards; every prompt needs at least one sample")
        if max(rewards) - min(rewards) > atol:
            kept.append(group)
    return kept, len(groups) - len(kept)


def dynamic_sampling_active(step: int, from_step: int | None) -> bool:
    """True from ``rl.dynamic_sampling_from_step`` on (never when it is None)."""
    return from_step is not None and step >= from_step


def needs_refill(kept_groups: int, target_groups: int) -> bool:
    """True while fewer informative groups than ``rl.prompts_per_step`` have been collected."""
    return kept_groups < target_groups


def refill_prompt_count(
    kept_groups: int, target_groups: int, keep_rate: float, max_prompts: int | None = None, min_keep_rate: float = 0.1
) -> int:
    """How many new prompts to roll out next to reach ``target_groups``.

    ``keep_rate`` is the fraction of groups kept so far; the estimate is the missing count
    divided by it, floored at ``min_keep_rate`` so that a round that kept nothing does not
    ask for an unbounded number. ``max_prompts`` caps it (e.g. ``rl.prompts_per_step``).
    """
    if not 0 < min_keep_rate <= 1:
        raise ValueError(f"min_keep_rate={min_keep_rate} must be in (0, 1]")
    missing = max(target_groups - kept_groups, 0)
    if missing == 0:
        return 0
    estimate = math.ceil(missing / min(max(keep_rate, min_keep_rate), 1.0))
    return min(estimate, max_prompts) if max_prompts is not None else estimate
