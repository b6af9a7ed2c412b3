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


# ----------------------------------------------------------------------------- one engine's share, refilled


class _ScriptedEngine:
    """A rollout engine whose answers are fixed by the prompt: prompt ``i`` gets one right and one
    wrong answer (an informative group) when ``informative(i)``, else two wrong ones (dropped).
    The refill arithmetic is the subject here; real engines are exercised in test_train_loop.py."""

    def __init__(self, informative):
        self.informative = informative
        self.asked: list[int] = []

    def generate(self, prompts, params):
        from megatron_rpt.rollout import Generation

        self.asked.append(len(prompts))
        texts = lambda i: ["x", "y"] if self.informative(i) else ["y", "y"]  # noqa: E731
        return [[Generation(p, k, [7], text, [-0.5], "stop") for k, text in enumerate(texts(ids[0]))]
                for p, ids in enumerate(prompts)]


def _share(informative, target, max_refill_rounds):
    from megatron_rpt.config import load_config
    from megatron_rpt.data.problems import Problem
    from megatron_rpt.trainer.rollout_phase import sample_engine_share

    cfg = load_config(None, ["model.hf_checkpoint=auto:tiny-qwen2", "rl.answer_format=raw",
                             "rollout.samples_per_prompt=2", f"rl.max_refill_rounds={max_refill_rounds}"],
                      validate_paths=False)
    stream = (Problem(doc_id=i, position=0, context_text="", prompt_text="", prompt_ids=[i], target_ids=[7],
                      target_token_bytes=[b"x"]) for i in range(1000))
    engine = _ScriptedEngine(informative)
    return sample_engine_share(cfg, engine, stream, target, seed=0, dynamic=True), engine


def test_engine_share_refills_by_the_observed_keep_rate():
    # Every other prompt is informative. Round 1 asks 4 -> prompts 0-3 keep {0, 2}: rate 2/4, 2
    # missing -> round 2 asks ceil(2 / 0.5) = 4 -> prompts 4-7 keep {4, 6}: full.
    share, engine = _share(lambda i: i % 2 == 0, target=4, max_refill_rounds=4)
    assert engine.asked == [4, 4]
    assert [g.problem.doc_id for g in share.kept] == [0, 2, 4, 6]
    assert (share.rounds, share.dropped, share.informative, len(share.generated)) == (2, 4, 4, 8)


def test_engine_share_stops_at_the_refill_cap_and_reports_the_fill_fraction():
    # One prompt in 8 is informative, one refill round allowed. Round 1: prompts 0-3 keep {0}: rate
    # 1/4, 3 missing -> round 2 asks ceil(3 / 0.25) = 12 -> prompts 4-15 keep {8}: 2 of 4, cap reached.
    share, engine = _share(lambda i: i % 8 == 0, target=4, max_refill_rounds=1)
    assert engine.asked == [4, 12]
    assert [g.problem.doc_id for g in share.kept] == [0, 8]
    assert (share.rounds, share.dropped, share.informative) == (2, 14, 2)
    from megatron_rpt.config import load_config

    metrics = share.metrics(load_config(None, ["model.hf_checkpoint=auto:tiny-qwen2", "rl.answer_format=raw"],
                                        validate_paths=False))
    assert metrics["dynamic/fill_fraction"] == 0.5
    assert (metrics["dynamic/rounds"], metrics["dynamic/kept_groups"], metrics["dynamic/dropped_groups"]) == (2, 2, 14)
    assert metrics["rollout/prompts"] == 16


def test_engine_share_with_nothing_informative_trains_on_zero_advantage_groups():
    share, engine = _share(lambda i: False, target=2, max_refill_rounds=1)
    assert engine.asked == [2, 20]  # keep rate 0 is floored at 0.1: ceil(2 / 0.1)
    assert [g.problem.doc_id for g in share.kept] == [0, 1]  # the first generated, all rewards equal
    assert share.informative == 0 and share.dropped == 22
