"""DAPO dynamic-sampling filter and refill decisions."""

import pytest
import torch

from megatron_rpt.rl import (
    classify_groups,
    dynamic_sampling_active,
    filter_groups,
    group_advantages,
    needs_refill,
    refill_prompt_count,
)


def test_filter_drops_zero_advantage_groups():
    rewards = torch.tensor(
        [[0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0], [0.5, 0.5, 0.5, 0.5], [1, 1, 0, 1], [0, 0, 0, 0]],
        dtype=torch.float32,
    )
    result = classify_groups(rewards)
    assert result.keep.tolist() == [False, False, True, False, True, False]
    assert result.kept_indices == [2, 4]
    assert (result.num_all_zero, result.num_all_one, result.num_other_constant) == (2, 1, 1)
    assert result.num_dropped == 4 and result.num_kept == 2
    # exactly the dropped groups are the ones with all-zero advantages
    adv = group_advantages(rewards)
    assert torch.equal(adv.abs().amax(dim=1) > 0, result.keep)


    # the list form used by the trainer keeps the same groups, in order
    groups = [{"id": i, "rewards": row.tolist()} for i, row in enumerate(rewards)]
    kept, dropped = filter_groups(groups, key=lambda g: g["rewards"])
    assert [g["id"] for g in kept] == [2, 4] and dropped == 4


def test_filter_tolerance_and_shapes():
    near = torch.tensor([[0.5, 0.5 + 1e-9], [0.2, 0.9]], dtype=torch.float64)
    assert classify_groups(near).kept_indices == [0, 1]
    assert classify_groups(near, atol=1e-6).kept_indices == [1]
    assert classify_groups(torch.zeros(0, 4)).num_kept == 0
    with pytest.raises(ValueError, match="num_groups"):
        classify_groups(torch.zeros(8))
    # groups of different sizes (plain reward lists, no key)
    assert filter_groups([[1.0], [0.0, 1.0, 1.0], [0.0, 0.0]]) == ([[0.0, 1.0, 1.0]], 2)
    assert filter_groups([[0.5, 0.5 + 1e-9]], atol=1e-6) == ([], 1)
    with pytest.raises(ValueError, match="group 1 has no rewards"):
        filter_groups([[1.0, 0.0], []])


def test_refill_decisions():
    assert not dynamic_sampling_active(10_000, None)
    assert not dynamic_sampling_active(499, 500)
    assert dynamic_sampling_active(500, 500)
    assert needs_refill(kept_groups=200, target_groups=256)
    assert not needs_refill(kept_groups=256, target_groups=256)
    assert not needs_refill(kept_groups=300, target_groups=256)
    # 56 missing at a 50% keep rate -> ask for 112 prompts
    assert refill_prompt_count(200, 256, keep_rate=0.5) == 112
    assert refill_prompt_count(200, 256, keep_rate=0.5, max_prompts=64) == 64
    assert refill_prompt_count(200, 256, keep_rate=1.0) == 56
    # nothing kept so far: floored at the minimum keep rate (10%) instead of dividing by 0
    assert refill_prompt_count(0, 8, keep_rate=0.0) == 80
    assert refill_prompt_count(256, 256, keep_rate=0.3) == 0
    with pytest.raises(ValueError, match="min_keep_rate"):
        refill_prompt_count(0, 8, keep_rate=0.0, min_keep_rate=0.0)
