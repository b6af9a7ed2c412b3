"""Appendix A's dense rewards in training: P(y[0] | x<t) from the Megatron policy (real megatron-core, PP=2).

The probabilities the trainer hands to the dense rewards are checked against transformers' own
softmax of the same Hugging Face model in float64, on both pipeline stages (the last stage computes
them and shares them); the group rules are checked by hand in tests/test_reward.py. A short toy run
with rl.reward=conditional_dense trains (it crashed on the first wrong prediction before).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers_toy import metrics, train

from megatron_rpt.toy import prepare_toy

pytestmark = pytest.mark.slow

CONTEXTS = ["abcdab", "ponm", "hgfedcbahg"]
# Raw answer format: the response is the prediction. Group 0 has a right sample, group 1 does not.
TARGETS = ["cd", "lk", "fe"]
TEXTS = [["c", "e", "a"], ["a", "b"], ["fe", ""]]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return prepare_toy(tmp_path_factory.mktemp("toy") / "toy")


def _groups(tokenizer):
    groups = []
    for ctx, tgt, texts in zip(CONTEXTS, TARGETS, TEXTS):
        ids = tokenizer(ctx, add_special_tokens=False)["input_ids"]
        problem = SimpleNamespace(context_ids=ids, target_token_bytes=[c.encode() for c in tgt])
        correct = [1.0 if t and tgt.startswith(t) else 0.0 for t in texts]
        groups.append(SimpleNamespace(problem=problem, texts=list(texts), rewards=correct))
    return groups


def _worker(toy_dir: str) -> dict:
    import copy

    from megatron_rpt.config import Config
    from megatron_rpt.data.tokenizer import load_tokenizer
    from megatron_rpt.distributed import init_distributed
    from megatron_rpt.model.build import build_model_chunks
    from megatron_rpt.model.hf_config import load_hf_config
    from megatron_rpt.trainer.dense_reward import apply_policy_rewards, first_token_probabilities
    from megatron_rpt.trainer.policy import MegatronPolicy
    from megatron_rpt.weights.load import load_hf_into_model

    init_distributed(1, 2)  # two pipeline stages: only the last one computes the logits
    cfg = Config()
    cfg.model.make_vocab_size_divisible_by = 8
    cfg.parallel.pipeline_parallel = 2
    cfg.rollout.temperature = 0.5  # the dense reward must not use the sampling temperature
    cfg.rl.answer_format, cfg.rl.require_think, cfg.rl.micro_batch_size = "raw", False, 2
    model_dir = Path(toy_dir) / "model"
    arch = load_hf_config(model_dir)
    chunks = build_model_chunks(arch, cfg.model, cfg.parallel, config_overrides={"perform_initialization": False})
    load_hf_into_model(chunks, model_dir, arch)
    policy = MegatronPolicy(cfg, arch, chunks, optimizer=None, scheduler=None)
    tokenizer = load_tokenizer(model_dir)
    contexts = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in CONTEXTS]
    letters = [tokenizer(ch, add_special_tokens=False)["input_ids"][0] for ch in "abcdefghijklmnop"]
    probs = first_token_probabilities(policy, [c for c in contexts for _ in letters],
                                      [t for _ in contexts for t in letters], micro_batch_size=5)
    out = {"probs": probs}
    for kind in ("dense", "conditional_dense"):
        cfg.rl.reward = kind
        groups = _groups(tokenizer)
        out[kind] = apply_policy_rewards(copy.deepcopy(cfg), groups, policy, tokenizer)
        out[kind + "_rewards"] = [g.rewards for g in groups]
    return out


def test_first_token_probabilities_match_transformers(toy):
    import transformers

    from megatron_rpt.data.tokenizer import load_tokenizer
    from megatron_rpt.distributed import spawn

    results = spawn(_worker, 2, str(toy))
    tokenizer = load_tokenizer(toy / "model")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(toy / "model"), dtype=torch.float32).eval()
    letters = [tokenizer(ch, add_special_tokens=False)["input_ids"][0] for ch in "abcdefghijklmnop"]
    reference = {}
    with torch.no_grad():
        for ctx in CONTEXTS:
            ids = tokenizer(ctx, add_special_tokens=False)["input_ids"]
            p = torch.softmax(model(torch.tensor([ids])).logits[0, -1].double(), dim=-1)  # temperature 1
            reference[ctx] = {ch: float(p[t]) for ch, t in zip("abcdefghijklmnop", letters)}
    expected = [reference[c][ch] for c in CONTEXTS for ch in "abcdefghijklmnop"]
    for r in results:  # both pipeline stages hold the last stage's numbers
        assert r["probs"] == pytest.approx(expected, abs=2e-6)
        # dense: 1 where right, else P(first token); conditional: group 1 has no right sample -> zeros.
        ref = reference
        flat = lambda groups: [x for g in groups for x in g]  # noqa: E731
        assert flat(r["dense_rewards"]) == pytest.approx(
            [1.0, ref["abcdab"]["e"], ref["abcdab"]["a"], ref["ponm"]["a"], ref["ponm"]["b"], 1.0, 0.0], abs=2e-6)
        assert flat(r["conditional_dense_rewards"]) == pytest.approx(
            [1.0, ref["abcdab"]["e"], ref["abcdab"]["a"], 0.0, 0.0, 1.0, 0.0], abs=2e-6)
        assert r["dense"]["reward/first_token_probs"] == 4.0
        assert r["conditional_dense"]["reward/first_token_probs"] == 2.0


def test_conditional_dense_trains_on_the_toy(toy, tmp_path):
    run = tmp_path / "run"
    train(toy, run, None, "train.steps=2", "rl.reward=conditional_dense", resume="none")
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    # A random policy is wrong most of the time: the wrong samples of groups with a right one get P > 0.
    assert all(r["reward/first_token_probs"] > 0 for r in rows)
    assert all(r["reward/policy_mean"] >= r["reward/mean"] for r in rows)
