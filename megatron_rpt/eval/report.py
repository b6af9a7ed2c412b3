"""Evaluation results: difficulty buckets, the paper's Table 1 layout, JSON and Markdown files.

Owns: the difficulty buckets (a position is *easy* / *medium* / *hard* when the scorer's entropy
at it exceeds ``data.difficulty_thresholds`` = 0.5 / 1.0 / 1.5; the buckets are nested, as in the
paper: every hard position is also medium and easy), :class:`BucketAccumulator`,
:class:`EvalReport` (rows = model / mode / metric, columns = buckets with counts), the plain-text
and Markdown tables, the flat ``val/...`` metric dict for the trainer, and atomic writes.

``python -m megatron_rpt.eval.report A.json B.json ...`` merges several reports into one table
(e.g. the base model and the RPT checkpoint, as in the paper's Table 1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_rpt.atomic import write_text_atomic

__all__ = [
    "bucket_names",
    "in_bucket",
    "BucketAccumulator",
    "BucketResult",
    "ReportRow",
    "EvalReport",
    "format_table",
    "to_markdown",
    "write_report",
    "load_report",
    "flat_metrics",
]

_PAPER_NAMES = ("easy", "medium", "hard")


def bucket_names(thresholds: Sequence[float]) -> list[str]:
    """easy / medium / hard for three thresholds (the paper), else ``entropy>T`` names."""
    if len(thresholds) == len(_PAPER_NAMES):
        return list(_PAPER_NAMES)
    return [f"entropy>{t:g}" for t in thresholds]


def in_bucket(entropy: float | None, threshold: float) -> bool:
    return entropy is not None and math.isfinite(entropy) and entropy > threshold


@dataclass
class BucketResult:
    accuracy: float  # nan when the bucket is empty
    count: int


class BucketAccumulator:
    """Sums of a per-position score (0/1 or a mean over samples) per difficulty bucket."""

    def __init__(self, thresholds: Sequence[float]):
        if list(thresholds) != sorted(thresholds):
            raise ValueError(f"difficulty thresholds {list(thresholds)} must be increasing")
        self.thresholds = list(thresholds)
        self.names = bucket_names(self.thresholds)
        self.sums = [0.0] * len(self.thresholds)
        self.counts = [0] * len(self.thresholds)
        self.all_sum, self.all_count = 0.0, 0

    def add(self, entropy: float | None, score: float) -> None:
        self.all_sum += score
        self.all_count += 1
        for i, t in enumerate(self.thresholds):
            if in_bucket(entropy, t):
                self.sums[i] += score
                self.counts[i] += 1

    def merge_counts(self, sums: Sequence[float], counts: Sequence[int]) -> None:
        """Add sums/counts gathered elsewhere (another data-parallel rank)."""
        for i in range(len(self.thresholds)):
            self.sums[i] += sums[i]
            self.counts[i] += int(counts[i])

    def result(self) -> dict[str, BucketResult]:
        return {name: BucketResult(s / c if c else float("nan"), c)
                for name, s, c in zip(self.names, self.sums, self.counts)}


@dataclass
class ReportRow:
    model: str
    mode: str  # "standard" | "reasoning"
    metric: str  # "accuracy" | "random@1" | "pass@<k>"
    buckets: dict[str, BucketResult]

    @property
    def label(self) -> str:
        return f"{self.model} / {self.mode}" + ("" if self.metric == "accuracy" else f" {self.metric}")


@dataclass
class EvalReport:
    thresholds: list[float]
    rows: list[ReportRow] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return bucket_names(self.thresholds)

    def to_dict(self) -> dict[str, Any]:
        return {
            "thresholds": self.thresholds,
            "buckets": self.names,
            "rows": [{"model": r.model, "mode": r.mode, "metric": r.metric,
                      "buckets": {k: {"accuracy": _finite_or_none(v.accuracy), "count": v.count}
                                  for k, v in r.buckets.items()}} for r in self.rows],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalReport:
        try:
            rows = [ReportRow(r["model"], r["mode"], r["metric"],
                              {k: BucketResult(float("nan") if v["accuracy"] is None else float(v["accuracy"]),
                                               int(v["count"])) for k, v in r["buckets"].items()})
                    for r in data["rows"]]
            return cls(list(data["thresholds"]), rows, dict(data.get("meta") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not an evaluation report (missing or bad field: {exc})") from None


def _finite_or_none(x: float) -> float | None:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def _cell(b: BucketResult | None) -> str:
    if b is None or b.count == 0 or not math.isfinite(b.accuracy):
        return "-"
    return f"{100 * b.accuracy:.2f}"


def _grid(report: EvalReport) -> tuple[list[str], list[list[str]]]:
    """Header and body cells. Counts go into the header when every row has the same count per
    bucket (one model), else into each cell (merged reports of different runs)."""
    per_bucket = {n: {r.buckets[n].count for r in report.rows if n in r.buckets} for n in report.names}
    uniform = all(len(c) <= 1 for c in per_bucket.values())
    header = ["Model / mode"]
    for name in report.names:
        header.append(f"{name.capitalize()} (n={next(iter(per_bucket[name]), 0)})" if uniform else name.capitalize())
    body = []
    for row in report.rows:
        cells = [row.label]
        for name in report.names:
            b = row.buckets.get(name)
            cells.append(_cell(b) if uniform or b is None else f"{_cell(b)} (n={b.count})")
        body.append(cells)
    return header, body


def format_table(report: EvalReport) -> str:
    """Fixed-width text table shaped like the paper's Table 1 (accuracy in %)."""
    header, body = _grid(report)
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    out = ["Next-token prediction accuracy (%) by difficulty: entropy > "
           + " / ".join(f"{t:g}" for t in report.thresholds), rule, line(header), rule]
    out += [line(r) for r in body]
    out.append(rule)
    return "\n".join(out)


def to_markdown(report: EvalReport) -> str:
    header, body = _grid(report)
    lines = ["# Next-token prediction accuracy", "",
             "Accuracy (%) on held-out positions by difficulty (scorer entropy > "
             + " / ".join(f"{t:g}" for t in report.thresholds) + "; buckets are nested).", "",
             "| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    if report.meta:
        lines += ["", "## Setup", ""]
        lines += [f"- **{k}**: {v}" for k, v in report.meta.items() if not isinstance(v, (dict, list))]
    return "\n".join(lines) + "\n"


def write_report(report: EvalReport, out_dir: str | os.PathLike, stem: str = "eval") -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` into ``out_dir`` (each via temp file + rename)."""
    out = Path(out_dir)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    write_text_atomic(json_path, json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    write_text_atomic(md_path, to_markdown(report))
    return json_path, md_path


def load_report(path: str | os.PathLike) -> EvalReport:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist; pass eval.json files written by megatron_rpt.evaluate")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p} is not valid JSON ({exc})") from None
    try:
        return EvalReport.from_dict(data)
    except ValueError as exc:
        raise ValueError(f"{p}: {exc}") from None


def _metric_key(mode: str, metric: str) -> str | None:
    if mode == "standard" and metric == "accuracy":
        return "standard_acc"
    if mode == "reasoning" and metric == "random@1":
        return "reasoning_random1"
    if mode == "reasoning" and metric.startswith("pass@"):
        return "reasoning_passk"
    return None


def flat_metrics(report: EvalReport, prefix: str = "val/") -> dict[str, float]:
    """``{"val/standard_acc_easy": ..., "val/reasoning_random1_hard": ..., "val/count_easy": ...}``."""
    out: dict[str, float] = {}
    for row in report.rows:
        key = _metric_key(row.mode, row.metric)
        if key is None:
            continue
        for name, b in row.buckets.items():
            out[f"{prefix}{key}_{name}"] = b.accuracy
            out[f"{prefix}count_{name}"] = float(b.count)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_rpt.eval.report",
                                     description="Merge evaluation reports (eval.json) into one Table-1 style table.")
    parser.add_argument("reports", nargs="+", help="eval.json files written by python -m megatron_rpt.evaluate")
    parser.add_argument("--out", help="directory for the merged table.json / table.md")
    args = parser.parse_args(argv)
    try:
        reports = [load_report(p) for p in args.reports]
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    thresholds = reports[0].thresholds
    for path, r in zip(args.reports, reports):
        if r.thresholds != thresholds:
            print(f"error: {path} uses thresholds {r.thresholds}, {args.reports[0]} uses {thresholds}; "
                  "reports with different difficulty buckets cannot share a table", file=sys.stderr)
            return 2
    merged = EvalReport(thresholds, [row for r in reports for row in r.rows],
                        {"sources": ", ".join(str(p) for p in args.reports)})
    print(format_table(merged))
    if args.out:
        paths = write_report(merged, args.out, stem="table")
        print(f"wrote {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
