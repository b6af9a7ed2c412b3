"""group_advantages against hand-computed float64 values."""

import math

import pytest
import torch

from megatron_rpt.rl import group_advantages

EPS = 1e-6


def test_grpo_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    # row 0: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3)
    s0 = math.sqrt(1 / 3)
    # row 1: mean 0.75, unbiased var (3 * 0.0625 + 0.5625) / 3 = 0.25 -> std 0.5
    expected = torch.tensor(
        [[0.5 / (s0 + EPS), -0.5 / (s0 + EPS), -0.5 / (s0 + EPS), 0.5 / (s0 + EPS)],
         [0.25 / (0.5 + EPS), 0.25 / (0.5 + EPS), 0.25 / (0.5 + EPS), -0.75 / (0.5 + EPS)]],
        dtype=torch.float64,
    )
    adv = group_advantages(rewards, normalize_std=True, eps=EPS)
    assert adv.dtype == torch.float64
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-12)
    assert adv[0, 0].item() == pytest.approx(0.8660254, abs=2e-6)  # sqrt(3)/2, minus the eps effect


def test_dr_grpo_no_std():
    rewards = torch.tensor([[1, 0, 0, 1], [1, 1, 1, 0]])  # integer rewards -> float32 result
    adv = group_advantages(rewards, normalize_std=False)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.25, 0.25, 0.25, -0.75]]))


def test_flat_with_group_ids_and_uneven_groups():
    rewards = torch.tensor([1.0, 0.0, 2.0, 5.0, 3.0, 7.0], dtype=torch.float64)
    groups = torch.tensor([9, 4, 9, 4, 9, 11])  # group 9: [1, 2, 3]; group 4: [0, 5]; group 11: [7]
    adv = group_advantages(rewards, normalize_std=True, eps=EPS, group_ids=groups)
    # group 9: mean 2, std 1; group 4: mean 2.5, std sqrt(12.5); singleton: no baseline -> 0
    s4 = math.sqrt(12.5)
    expected = torch.tensor(
        [-1 / (1 + EPS), -2.5 / (s4 + EPS), 0.0, 2.5 / (s4 + EPS), 1 / (1 + EPS), 0.0], dtype=torch.float64
    )
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-12)
    # the flat form agrees with the [num_prompts, n] form on equal-sized groups
    r2 = torch.rand(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    flat = group_advantages(r2.flatten(), group_ids=torch.arange(3).repeat_interleave(5))
    torch.testing.assert_close(flat.view(3, 5), group_advantages(r2), rtol=0, atol=1e-12)


def test_constant_group_gets_zero_advantage():
    adv = group_advantages(torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.3, 0.3, 0.3]]))
    assert adv.abs().max() < 1e-9


def test_bad_inputs():
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="flat"):
        group_advantages(torch.zeros(2, 2), group_ids=torch.zeros(4))
    with pytest.raises(ValueError, match="eps"):
        group_advantages(torch.zeros(2, 2), eps=0.0)
