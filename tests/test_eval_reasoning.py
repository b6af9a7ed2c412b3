"""Next-token reasoning accuracy (Random@1 / Pass@k by difficulty) on hand-made generations."""

import json
from pathlib import Path

import pytest

from megatron_rpt.config import from_dict
from megatron_rpt.data.problems import Problem
from megatron_rpt.eval.reasoning import EVAL_SEED_OFFSET, score_response
from megatron_rpt.eval.runner import ValidationSet, evaluate_during_training, run_evaluation
from megatron_rpt.rollout.base import Generation

TARGET = [b" the", b" cat", b" sat"]
OK1 = "<think>The article comes next.</think> \\boxed{ the}"
OK2 = "<think>Two tokens.</think> \\boxed{ the cat}"
MID = "<think>Half a token.</think> \\boxed{ th}"  # not on a token boundary
NOTHINK = "\\boxed{ the}"  # never finished thinking
WRONG = "<think>A noun.</think> \\boxed{ dog}"


class ScriptedEngine:
    """Returns fixed responses per prompt (the first token id of the prompt selects the script)."""

    def __init__(self, scripts: dict[int, list[str]]):
        self.scripts = scripts
        self.calls = []

    def wake_up(self) -> None:  # the RolloutEngine protocol: nothing to release here
        pass

    def sleep(self) -> None:
        pass

    def generate(self, prompts, params):
        self.calls.append(([p[0] for p in prompts], params))
        out = []
        for i, p in enumerate(prompts):
            texts = self.scripts[p[0]]
            assert len(texts) == params.n
            out.append([Generation(i, j, [7] * (j + 1), t, [0.0] * (j + 1), "stop") for j, t in enumerate(texts)])
        return out


def _problem(key: int, entropy: float | None) -> Problem:
    return Problem(doc_id=f"doc{key}", position=10, context_text="The", prompt_text="p", prompt_ids=[key, 1, 2],
                   target_ids=[11, 12, 13], target_token_bytes=list(TARGET), entropy=entropy)


def test_score_response_rules():
    assert [score_response(t, TARGET) for t in (OK1, OK2, MID, NOTHINK, WRONG)] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert score_response(NOTHINK, TARGET, require_think=False) == 1.0
    assert score_response(" the cat", TARGET, answer_format="raw") == 1.0
    assert score_response(" the ca", TARGET, answer_format="raw") == 0.0


@pytest.fixture
def scripted(tmp_path):
    cfg = from_dict({"eval": {"pass_k": 4, "temperature": 0.6, "max_response_tokens": 77},
                     "rollout": {"seed": 5}, "logging": {"dir": str(tmp_path / "run")}})
    # key: (entropy, responses). Entropies put positions into easy (>0.5) / medium (>1.0) / hard (>1.5).
    table = {
        100: (0.7, [OK1, WRONG, WRONG, WRONG]),      # easy:            1/4, pass
        101: (1.2, [OK2, OK1, MID, NOTHINK]),        # easy+medium:     2/4, pass
        102: (1.8, [WRONG, MID, NOTHINK, WRONG]),    # easy+medium+hard: 0,  fail
        103: (2.0, [OK1, OK1, OK1, OK2]),            # easy+medium+hard: 1,  pass
        104: (0.3, [OK1, OK1, OK1, OK1]),            # below every bucket: must not be generated
        105: (None, [OK1, OK1, OK1, OK1]),           # unscored: must not be generated
    }
    problems = [_problem(k, e) for k, (e, _) in table.items()]
    engine = ScriptedEngine({k: r for k, (_, r) in table.items()})
    val = ValidationSet(problems, [[5, 6]] * len(problems), [e for e, _ in table.values()], "hand")
    return cfg, engine, val


def test_random1_and_pass_k_by_difficulty(scripted):
    cfg, engine, val = scripted
    report, _, res = run_evaluation(cfg, engine, None, "hand", modes=("reasoning",), val=val, progress=False)
    rows = {r.metric: r.buckets for r in report.rows}
    assert set(rows) == {"random@1", "pass@4"}
    r1, pk = rows["random@1"], rows["pass@4"]
    assert (r1["easy"].count, r1["medium"].count, r1["hard"].count) == (4, 3, 2)
    assert r1["easy"].accuracy == pytest.approx((1 / 4 + 2 / 4 + 0 + 1) / 4)
    assert r1["medium"].accuracy == pytest.approx((2 / 4 + 0 + 1) / 3)
    assert r1["hard"].accuracy == pytest.approx((0 + 1) / 2)
    assert pk["easy"].accuracy == pytest.approx(3 / 4)
    assert pk["medium"].accuracy == pytest.approx(2 / 3)
    assert pk["hard"].accuracy == pytest.approx(1 / 2)
    # Sampling settings come from eval.*, with a fixed evaluation seed stream.
    (keys, params), = engine.calls
    assert keys == [100, 101, 102, 103]
    assert (params.n, params.temperature, params.max_tokens, params.seed) == (4, 0.6, 77, 5 + EVAL_SEED_OFFSET)
    assert res.generated_tokens == 4 * (1 + 2 + 3 + 4)
    assert report.meta["positions"] == 6 and report.meta["positions_in_buckets"] == 4


def test_evaluate_during_training_flat_metrics(scripted):
    cfg, engine, val = scripted
    metrics = evaluate_during_training((cfg, engine, None), step=10, modes=("reasoning",), validation_set=val)
    assert metrics["val/reasoning_random1_easy"] == pytest.approx((1 / 4 + 2 / 4 + 0 + 1) / 4)
    assert metrics["val/reasoning_passk_hard"] == pytest.approx(1 / 2)
    assert metrics["val/count_medium"] == 3
    assert metrics["val/positions"] == 6
    assert "val/standard_acc_easy" not in metrics
    saved = json.loads((Path(cfg.logging.dir) / "eval" / "step_000010.json").read_text())
    assert saved["meta"]["step"] == 10


def test_unwinnable_positions_are_reported(tmp_path):
    """Positions whose ground truth no boxed answer can spell are counted per bucket and printed."""
    from megatron_rpt.eval.report import format_table

    targets = {200: (0.7, [b"}", b" x"]),           # never: the box would close at once
               201: (1.2, [b" \\", b"frac"]),     # not by its first token (it would escape the brace)
               202: (1.8, [b" the"]),             # fine
               203: (0.2, [b"}"])}                # below every bucket: not counted
    problems = [Problem(doc_id=f"doc{k}", position=3, context_text="c", prompt_text="p", prompt_ids=[k],
                        target_ids=[1] * len(t), target_token_bytes=t, entropy=e) for k, (e, t) in targets.items()]
    engine = ScriptedEngine({k: [WRONG] for k in targets})
    for escapes, not_first in ((True, 2), (False, 1)):
        cfg = from_dict({"eval": {"pass_k": 1}, "rl": {"box_escapes": escapes}, "logging": {"dir": str(tmp_path)}})
        val = ValidationSet(problems, [[5]] * 4, [e for e, _ in targets.values()], "hand")
        report, _, _ = run_evaluation(cfg, engine, None, "hand", modes=("reasoning",), val=val, progress=False)
        buckets = report.meta["unwinnable"]["buckets"]
        assert buckets["easy"] == {"positions": 3, "never": 1, "not_first_token": not_first}
        assert buckets["hard"] == {"positions": 1, "never": 0, "not_first_token": 0}
        assert f"easy 1 never, {not_first} not by the first token alone (of 3)" in format_table(report)
