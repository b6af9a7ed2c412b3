"""Difficulty buckets, the Table-1 layout and merging reports (megatron_rpt.eval.report)."""

import json
import math

import pytest

from megatron_rpt.eval.report import (
    BucketAccumulator,
    EvalReport,
    ReportRow,
    flat_metrics,
    format_table,
    load_report,
    main,
    to_markdown,
    write_report,
)


def test_buckets_are_nested_and_skip_unscored():
    acc = BucketAccumulator([0.5, 1.0, 1.5])
    for entropy, score in [(0.2, 1.0), (0.7, 1.0), (1.2, 0.0), (1.6, 1.0), (None, 1.0), (float("nan"), 1.0)]:
        acc.add(entropy, score)
    res = acc.result()
    assert (res["easy"].count, res["medium"].count, res["hard"].count) == (3, 2, 1)
    assert res["easy"].accuracy == pytest.approx(2 / 3)
    assert res["medium"].accuracy == pytest.approx(1 / 2)
    assert res["hard"].accuracy == 1.0
    empty = BucketAccumulator([0.5, 1.0, 1.5]).result()
    assert empty["hard"].count == 0 and math.isnan(empty["hard"].accuracy)


def _report(model: str, acc: float, n: int) -> EvalReport:
    rows = [ReportRow(model, "standard", "accuracy", BucketAccumulator([0.5, 1.0, 1.5]).result()),
            ReportRow(model, "reasoning", "random@1", {}), ReportRow(model, "reasoning", "pass@8", {})]
    for row in rows:
        acc_ = BucketAccumulator([0.5, 1.0, 1.5])
        for _ in range(n):
            acc_.add(2.0, acc)
        row.buckets = acc_.result()
    return EvalReport([0.5, 1.0, 1.5], rows, {"model": model})


def test_table_json_roundtrip_and_flat_metrics(tmp_path):
    report = _report("RPT-14B", 0.25, 4)
    table = format_table(report)
    assert "Easy (n=4)" in table and "RPT-14B / reasoning pass@8" in table and "25.00" in table
    assert "| RPT-14B / standard | 25.00 | 25.00 | 25.00 |" in to_markdown(report)
    json_path, md_path = write_report(report, tmp_path)
    back = load_report(json_path)
    assert back.to_dict() == report.to_dict()
    assert flat_metrics(back) == {
        **{f"val/{k}_{b}": 0.25 for k in ("standard_acc", "reasoning_random1", "reasoning_passk")
           for b in ("easy", "medium", "hard")},
        **{f"val/count_{b}": 4.0 for b in ("easy", "medium", "hard")},
    }
    assert not list(tmp_path.glob(".*tmp*"))  # temp files renamed away


def test_merge_cli(tmp_path, capsys):
    write_report(_report("base", 0.1, 3), tmp_path / "a")
    write_report(_report("rpt", 0.3, 5), tmp_path / "b")
    assert main([str(tmp_path / "a" / "eval.json"), str(tmp_path / "b" / "eval.json"), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "10.00 (n=3)" in out and "30.00 (n=5)" in out  # counts differ per model: shown per cell
    assert json.loads((tmp_path / "table.json").read_text())["rows"][3]["model"] == "rpt"
    (tmp_path / "bad.json").write_text("{}")
    assert main([str(tmp_path / "bad.json")]) == 2
    assert "not an evaluation report" in capsys.readouterr().err
