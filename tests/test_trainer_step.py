"""The parts of Trainer.train_step that are plain arithmetic: mini-batches and their global
normalisers, the metrics merged over every optimizer step of a step, and the one save decision per
step, each against a hand-derived case (the step itself runs in test_train_loop.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from megatron_rpt.config import load_config
from megatron_rpt.trainer.mini_batches import merge_update_metrics, split_mini_batches


def _cfg(*overrides: str):
    return load_config(None, ["model.hf_checkpoint=auto:tiny-qwen2", *overrides], validate_paths=False)


def test_metrics_are_merged_over_every_optimizer_step():
    steps = [
        {"loss": 1.0, "grad_norm": 2.0, "num_tokens": 10, "num_seqs": 2, "update_skipped": 0, "ratio_max": 1.1,
         "lr": 1e-3},
        {"loss": 3.0, "grad_norm": 6.0, "num_tokens": 30, "num_seqs": 4, "update_skipped": 1, "ratio_max": 1.5,
         "lr": 2e-3, "kl_to_ref": 0.5},
    ]
    merged = merge_update_metrics(steps)
    # Means (losses, norms, KL where reported), sums (counts, skipped), max (ratio), last (lr).
    assert merged == {"loss": 2.0, "grad_norm": 4.0, "num_tokens": 40.0, "num_seqs": 6.0, "update_skipped": 1.0,
                      "ratio_max": 1.5, "lr": 2e-3, "kl_to_ref": 0.5, "grad_norm_max": 6.0, "optimizer_steps": 2.0}
    assert merge_update_metrics([]) == {}


def test_mini_batches_split_consecutive_samples_with_their_own_normalisers():
    samples = [([1, 2], [3] * n) for n in (1, 2, 3, 4, 5)]  # response lengths 1..5
    rl = _cfg("rl.mini_batches_per_step=2", "rl.micro_batch_size=2").rl
    minis = split_mini_batches(samples, [0.5, -0.5, 1.0, -1.0, 0.0], [[-0.1] * n for n in (1, 2, 3, 4, 5)], rl)
    # round(i * 5 / 2) bounds: samples [0, 1] and [2, 3, 4] (one process: the global counts are local).
    assert [(m.global_tokens, m.global_seqs) for m in minis] == [(1 + 2, 2), (3 + 4 + 5, 3)]
    assert [len(m.micro_batches) for m in minis] == [1, 2]
    assert [len(lp) for lp in minis[1].engine_logprobs] == [3, 4, 5]
    with pytest.raises(ValueError, match=r"2 samples cannot fill rl\.mini_batches_per_step=3"):
        split_mini_batches(samples[:2], [0.0, 0.0], [[0.0], [0.0, 0.0]], _cfg("rl.mini_batches_per_step=3").rl)


@pytest.mark.parametrize("interval, on_exit, steps, step, stopping, due", [
    (5, True, 12, 5, False, True),    # interval
    (5, True, 12, 7, False, False),   # nothing due
    (5, True, 12, 12, False, True),   # the last step, off the interval
    (5, True, 10, 10, False, True),   # the last step on the interval: one save, not two
    (5, False, 12, 12, False, False),  # no save on exit
    (5, True, 12, 7, True, True),     # a stop signal
    (5, False, 12, 10, True, True),   # a stop signal on the interval still saves the interval's checkpoint
    (0, True, 12, 10, False, False),  # no interval
    (0, True, 12, 12, False, True),
])
def test_one_save_decision_per_step(interval, on_exit, steps, step, stopping, due):
    from megatron_rpt.trainer.trainer import Trainer

    cfg = _cfg("checkpoint.dir=/tmp/unused", f"checkpoint.save_interval={interval}",
               f"checkpoint.save_on_exit={str(on_exit).lower()}", f"train.steps={steps}")
    assert Trainer._save_due(SimpleNamespace(cfg=cfg, step=step), stopping) is due
    no_dir = _cfg("checkpoint.dir=null", f"train.steps={steps}")
    assert Trainer._save_due(SimpleNamespace(cfg=no_dir, step=step), stopping) is False
