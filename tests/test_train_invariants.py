"""What the real trainer feeds the loss, read from the trainer itself (real megatron-core, CPU).

One training step of the toy run (1 rank): the rollout groups the trainer turns into mini-batches
(``Trainer._mini_batches``) and the micro-batches it hands to ``MegatronPolicy.train_step`` are
recorded by wrapping those two calls (nothing is replaced). The per-token advantages the loss saw
must be each prompt group's own normalised rewards, ``(r - mean_group) / (std_group + eps)`` with
the unbiased std, derived here in float64 from the recorded rewards: normalising across prompts (per
sample index), a wrong sign or advantages on padding would all differ. The comparison is over the
multiset of response-token advantages, so it holds however the trainer orders or packs samples.

The gradient-scale invariants (DP=2, TP=2, PP=2 against a float64 transformers step) live in
``test_bridge.py``, whose two-rank spawn already loads a checkpoint at each layout.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from megatron_rpt.distributed import spawn
from megatron_rpt.toy import prepare_toy

REPO = Path(__file__).resolve().parent.parent
EPS = 1e-6  # rl.group_advantages' default


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory) -> Path:
    return prepare_toy(tmp_path_factory.mktemp("toy") / "toy")


def _one_step(toy: str, run: str) -> dict:
    os.environ["RPT_TOY_DIR"] = toy
    from megatron_rpt.config import load_config
    from megatron_rpt.trainer.trainer import Trainer

    cfg = load_config(REPO / "configs/toy_learn.yaml",
                      [f"logging.dir={run}", "logging.progress_bar=false", "train.steps=1", "train.eval_interval=0"])
    trainer = Trainer(cfg, resume=None)
    seen: dict = {"groups": [], "micro": []}
    mini_batches, train_step = trainer._mini_batches, trainer.policy.train_step

    def recording_mini_batches(groups, *args, **kwargs):  # the groups whose rewards become advantages
        seen["groups"] += [list(g.rewards) for g in groups]
        return mini_batches(groups, *args, **kwargs)

    def recording_train_step(micro_batches, *args, **kwargs):
        seen["micro"] += [{k: mb[k].clone() for k in ("advantages", "loss_mask")} for mb in micro_batches]
        return train_step(micro_batches, *args, **kwargs)

    trainer._mini_batches, trainer.policy.train_step = recording_mini_batches, recording_train_step
    trainer.sync_weights()  # as Trainer.run does before the first step
    trainer.train_step()
    return {"groups": seen["groups"], "micro": seen["micro"], "normalize_std": cfg.rl.normalize_advantage_std}


@pytest.mark.slow
def test_loss_sees_each_prompt_groups_own_normalised_rewards(toy_dir, tmp_path):
    (result,) = spawn(_one_step, 1, str(toy_dir), str(tmp_path / "run"))
    groups, micro = result["groups"], result["micro"]
    assert result["normalize_std"] and len(groups) == 32 and all(len(g) == 8 for g in groups)
    rewards = [r for g in groups for r in g]
    # the toy's random policy: some groups all wrong, some mixed, so the normalisation matters
    assert any(len(set(g)) > 1 for g in groups) and any(len(set(g)) == 1 for g in groups)
    expected = []
    for g in groups:
        r = torch.tensor(g, dtype=torch.float64)
        expected += ((r - r.mean()) / (r.std() + EPS)).tolist()  # the toy's response is one token
    used = torch.cat([mb["advantages"][mb["loss_mask"] > 0] for mb in micro]).double()
    assert used.numel() == len(rewards)
    torch.testing.assert_close(used.sort().values, torch.tensor(sorted(expected), dtype=torch.float64),
                               atol=1e-6, rtol=1e-6)
    # padding and prompt positions carry no advantage
    assert all(torch.all(mb["advantages"][mb["loss_mask"] == 0] == 0) for mb in micro)
