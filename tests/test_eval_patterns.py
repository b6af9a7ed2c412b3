"""Reasoning-pattern counting (RPT section 4.5) on hand-written responses."""

import json

import pytest

from megatron_rpt.eval.patterns import PatternCounter, analyze, main, relative_change

R1 = ("<think>Wait, let me check the context. The numbers are listed step by step. Suppose the next one is 7; "
      "maybe it is 8. Alternatively, the pattern could be arithmetic, so the next token is 9. Therefore 9."
      "</think> \\boxed{ 9}")
R2 = "<think>The sequence doubles, thus the next value is 16. Hence it must be 16.</think> \\boxed{16}"
R3 = "<think>Possibilities: 'the', 'a', or 'an'. Perhaps 'the'. Wait, double-check: double-check done.</think> \\boxed{ the}"


def test_counts_by_hand():
    c = PatternCounter()
    # suppose / maybe / could be; "so the next" / therefore
    assert c.count(R1) == {"transition": 1, "reflection": 2, "breakdown": 1, "hypothesis": 3,
                           "divergent_thinking": 0, "deduction": 2}
    assert c.count(R2) == {"transition": 0, "reflection": 0, "breakdown": 0, "hypothesis": 0,
                           "divergent_thinking": 0, "deduction": 3}
    # "double-check" twice is two reflection hits, not "double" + "check"; "Possibilities" is divergent.
    assert c.count(R3) == {"transition": 0, "reflection": 3, "breakdown": 0, "hypothesis": 1,
                           "divergent_thinking": 1, "deduction": 0}


def test_whole_words_only():
    c = PatternCounter({"hyp": ["maybe"], "ded": ["thus"]})
    assert c.count("Maybelline thusly, MAYBE thus.") == {"hyp": 1, "ded": 1}


def test_fractions_and_relative_change():
    early = analyze([R2, R2, R1, "no pattern here"])
    late = analyze([R1, R3, R1, R2])
    assert early.num_responses == 4
    assert early.fraction["hypothesis"] == pytest.approx(1 / 4)
    assert late.fraction["hypothesis"] == pytest.approx(3 / 4)  # R2 has none
    assert early.mean_count["deduction"] == pytest.approx((3 + 3 + 2 + 0) / 4)
    change = relative_change(early, late)
    assert change["hypothesis"] == pytest.approx(2.0)  # 25% -> 75%
    assert change["deduction"] == pytest.approx((3 / 4 - 3 / 4) / (3 / 4))
    assert change["divergent_thinking"] == float("inf")  # absent early, present late


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
    assert early["fraction"]["hypothesis"] == 0.0 and late["fraction"]["hypothesis"] == 1.0
    assert data["relative_change_fraction"]["hypothesis"] == "inf"
    assert (tmp_path / "out" / "patterns.md").is_file()


def test_cli_bad_path(tmp_path, capsys):
    assert main(["--rollouts", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
