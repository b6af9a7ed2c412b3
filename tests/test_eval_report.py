"""Difficulty buckets, the Table-1 layout and merging reports (megatron_rpt.eval.report)."""

import json
import math

import pytest

from megatron_rpt.eval.report import (
    BucketAccumulator,
    EvalReport,
    ReportRow,
    clustered_interval,
    flat_metrics,
    format_table,
    load_report,
    main,
    to_markdown,
    wilson_interval,
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


def test_entropy_exactly_on_a_threshold_is_not_above_it():
    # The paper's buckets hold positions whose entropy EXCEEDS the threshold: 0.5 is not easy,
    # 1.0 is easy but not medium, 1.5 is medium but not hard (floats that are exact in binary).
    acc = BucketAccumulator([0.5, 1.0, 1.5])
    for entropy in (0.5, 1.0, 1.5):
        acc.add(entropy, 1.0)
    res = acc.result()
    assert (res["easy"].count, res["medium"].count, res["hard"].count) == (2, 1, 0)
    acc.add(math.nextafter(1.5, 2.0), 1.0)  # the smallest entropy above the hard threshold
    assert acc.result()["hard"].count == 1


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
    # Four positions of four documents scoring 0.25 each: Wilson's interval for 1 of 4, [4.6 %, 69.9 %].
    assert "| RPT-14B / standard | 25.00 [4.6, 69.9] | 25.00 [4.6, 69.9] | 25.00 [4.6, 69.9] |" in to_markdown(report)
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
    # Counts differ per model: shown per cell, after the accuracy and its interval.
    assert "10.00 [0.7, 64.2] (n=3)" in out and "30.00 [7.3, 70.1] (n=5)" in out
    assert json.loads((tmp_path / "table.json").read_text())["rows"][3]["model"] == "rpt"
    (tmp_path / "bad.json").write_text("{}")
    assert main([str(tmp_path / "bad.json")]) == 2
    assert "not an evaluation report" in capsys.readouterr().err


def test_wilson_interval_by_hand():
    # 7 of 20: centre (0.35 + z^2/40) / (1 + z^2/20), half-width z sqrt(0.35*0.65/20 + z^2/1600) / (1 + z^2/20).
    low, high = wilson_interval(7 / 20, 20)
    assert (low, high) == pytest.approx((0.18120, 0.56714), abs=5e-5)
    assert wilson_interval(0.0, 10) == pytest.approx((0.0, 0.27753), abs=5e-5)  # never [0, 0]


def test_interval_is_clustered_by_document():
    # One position per document: exactly Wilson's interval at n.
    independent = {f"d{i}": [1.0 if i < 7 else 0.0, 1] for i in range(20)}
    assert clustered_interval(independent) == pytest.approx((0.35, 20, *wilson_interval(0.35, 20)))
    # Two documents of four positions, one all right and one all wrong: p = 0.5 but only two
    # independent observations. SE^2 = ((4 - 2)^2 + (0 - 2)^2) / 8^2 = 0.125, n_eff = 0.25 / 0.125 = 2.
    p, n, low, high = clustered_interval({"a": [4.0, 4], "b": [0.0, 4]})
    assert (p, n) == (0.5, 8) and (low, high) == pytest.approx(wilson_interval(0.5, 2))
    assert (low, high) == pytest.approx((0.09453, 0.90547), abs=5e-5)
    assert high - low > wilson_interval(0.5, 8)[1] - wilson_interval(0.5, 8)[0]


def test_accumulator_counts_documents_and_merges_shards():
    acc, other = BucketAccumulator([0.5, 1.0, 1.5]), BucketAccumulator([0.5, 1.0, 1.5])
    for e, score, doc in [(0.7, 1.0, "a"), (1.2, 0.0, "a"), (0.9, 1.0, "b")]:
        acc.add(e, score, doc)
    other.add(0.8, 0.0, "a")  # another rank's position of the same document
    acc.merge(other)
    easy = acc.result()["easy"]
    assert (easy.count, easy.documents, easy.accuracy) == (4, 2, 0.5)
    # Per document: a = 1 of 3, b = 1 of 1; residuals 1 - 1.5 and 1 - 0.5; SE^2 = 0.5 / 16.
    assert (easy.ci_low, easy.ci_high) == pytest.approx(wilson_interval(0.5, min(4, 0.25 / (0.5 / 16))))
