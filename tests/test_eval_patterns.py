"""Reasoning-pattern counting (RPT section 4.5) on hand-written responses."""

import json

import pytest

from megatron_rpt.eval.patterns import PATTERN_KEYWORDS, PatternCounter, analyze, main, relative_change

R1 = ("<think>Wait, let me break this down. The next word is probably 'the', or something like 'a'. "
      "Alternatively, think differently: looking back at the thought process, the initial answer holds. "
      "Finally, to summarize: logically it is 'the'.</think> \\boxed{ the}")
R2 = "<think>The options are 7, 8, 9 etc. Either 8 or otherwise 9; exploring both.</think> \\boxed{8}"
R3 = "<think>Consequently the conclusion: we conclude 16. Wait. WAIT, waiting is not a keyword.</think> \\boxed{16}"


def test_keywords_are_the_papers_table_9():
    assert PATTERN_KEYWORDS == {
        "transition": ("alternatively", "think differently"),
        "reflection": ("wait", "initial answer", "original answer", "looking back", "thought process"),
        "breakdown": ("break down", "break this down"),
        "hypothesis": ("probably", "something like"),
        "divergent_thinking": ("etc.", "or something", "either", "sometimes it refers", "otherwise", "exploring",
                               "options"),
        "deduction": ("summarize", "conclusion", "conclude", "finally", "logically", "consequently"),
    }


def test_counts_by_hand():
    c = PatternCounter()
    # wait, looking back, thought process, initial answer | break this down | probably, something like |
    # or something | alternatively, think differently | finally, summarize, logically
    assert c.count(R1) == {"transition": 2, "reflection": 4, "breakdown": 1, "hypothesis": 2,
                           "divergent_thinking": 1, "deduction": 3}
    # options, etc., either, otherwise, exploring
    assert c.count(R2) == {"transition": 0, "reflection": 0, "breakdown": 0, "hypothesis": 0,
                           "divergent_thinking": 5, "deduction": 0}
    # consequently, conclusion, conclude | "Wait" and "WAIT" but not "waiting"
    assert c.count(R3) == {"transition": 0, "reflection": 2, "breakdown": 0, "hypothesis": 0,
                           "divergent_thinking": 0, "deduction": 3}


def test_whole_words_only():
    c = PatternCounter({"hyp": ["maybe"], "ded": ["thus"]})
    assert c.count("Maybelline thusly, MAYBE thus.") == {"hyp": 1, "ded": 1}


def test_fractions_and_relative_change():
    early = analyze([R2, R2, R3, "no pattern here"])
    late = analyze([R1, R3, R1, R2])
    assert early.num_responses == 4
    assert early.fraction["reflection"] == pytest.approx(1 / 4)  # R3
    assert late.fraction["reflection"] == pytest.approx(3 / 4)  # R1, R3, R1
    assert early.mean_count["deduction"] == pytest.approx((0 + 0 + 3 + 0) / 4)
    change = relative_change(early, late)
    assert change["reflection"] == pytest.approx(2.0)  # 25% -> 75%
    assert change["divergent_thinking"] == pytest.approx((3 / 4 - 2 / 4) / (2 / 4))
    assert change["hypothesis"] == float("inf")  # absent early, present late


def test_thinking_only_ignores_the_answer():
    c = PatternCounter({"ded": ["therefore"]})
    text = "<think>x</think> therefore \\boxed{1}"
    assert analyze([text], c).fraction["ded"] == 1.0
    assert analyze([text], c, thinking_only=True).fraction["ded"] == 0.0


def test_cli_early_vs_late(tmp_path, capsys):
    rollouts = tmp_path / "run" / "rollouts"
    rollouts.mkdir(parents=True)
    rows = {1: [R2, R2], 2: [R2, R1], 3: [R1, R3], 4: [R1, R3]}
    for step, texts in rows.items():
        with open(rollouts / f"step_{step:06d}_dp000.jsonl", "w") as f:
            for t in texts:
                f.write(json.dumps({"step": step, "response": t, "reward": 0.0}) + "\n")
    assert main(["--rollouts", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    table = capsys.readouterr().out
    assert "Hypothesis" in table and "early (steps 1-1)" in table and "late (steps 4-4)" in table
    data = json.loads((tmp_path / "out" / "patterns.json").read_text())
    early, late = data["sets"]["early (steps 1-1)"], data["sets"]["late (steps 4-4)"]
    assert early["fraction"]["hypothesis"] == 0.0 and late["fraction"]["hypothesis"] == 0.5  # R1 of R1, R3
    assert data["relative_change_fraction"]["hypothesis"] == "inf"
    assert (tmp_path / "out" / "patterns.md").is_file()


def test_cli_bad_path(tmp_path, capsys):
    assert main(["--rollouts", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
