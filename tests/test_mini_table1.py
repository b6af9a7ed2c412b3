"""``benchmarks/mini_table1.py`` (issue 13): its flag refusals and the NTP token budget, without running it.

The benchmark itself takes an hour on a CPU; its numbers are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("mini_table1", REPO / "benchmarks" / "mini_table1.py")
mini_table1 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mini_table1)


def test_ntp_steps_match_the_rpt_budget_to_the_nearest_step():
    # Two RPT steps of 16 samples logged 2016 + 1688 trained tokens; NTP steps are 8 windows x 128
    # = 1024 tokens, so 3704 / 1024 = 3.62 -> 4 steps (4096 tokens, 3 would be 3072).
    assert mini_table1.ntp_steps_for(2016 + 1688, 8, 128) == 4
    assert mini_table1.ntp_steps_for(3 * 1024 + 511, 8, 128) == 3
    assert mini_table1.ntp_steps_for(100, 8, 128) == 1  # a budget under one step still trains once


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps=0 must be >= 1"),
    (["--positions-per-doc", "-1"], "--positions-per-doc=-1 must be >= 1"),
    (["--lr", "0"], "--lr=0.0 must be > 0"),
])
def test_bad_flags_are_refused_with_the_value(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        mini_table1.parse_args(["--out", str(tmp_path / "new"), *flags])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_a_non_empty_out_directory_is_refused(tmp_path, capsys):
    (tmp_path / "old.json").write_text("{}")
    with pytest.raises(SystemExit) as exc:
        mini_table1.parse_args(["--out", str(tmp_path)])
    assert exc.value.code == 2 and "is not empty" in capsys.readouterr().err
    assert mini_table1.parse_args(["--out", str(tmp_path / "new")]).documents == 200  # the paper's count
