"""Evaluation results: difficulty buckets, the paper's Table 1 layout, JSON and Markdown files.

Owns: the difficulty buckets (a position is *easy* / *medium* / *hard* when the scorer's entropy
at it exceeds ``data.difficulty_thresholds`` = 0.5 / 1.0 / 1.5; the buckets are nested, as in the
paper: every hard position is also medium and easy), :class:`BucketAccumulator` with its 95 %
confidence interval (:func:`clustered_interval`), :class:`EvalReport` (rows = model / mode /
metric, columns = buckets with counts and intervals), the plain-text and Markdown tables, the flat
``val/...`` metric dict for the trainer, and atomic writes.

The interval: positions of one document are not independent (an easy document has many easy
positions), so the standard error is clustered by document (CR0: the squared sum of each
document's residuals, over n^2) and turned into an effective sample size
n_eff = p(1 - p) / SE^2, at most n; the interval is Wilson's score interval at n_eff. With one
position per document it is exactly Wilson's interval at n. Scores in [0, 1] that are not 0/1
(Random@1, a mean over k samples) use the same formula; p(1 - p) bounds their variance, and n_eff
is capped at n, so the interval errs wide.

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
    "wilson_interval",
    "clustered_interval",
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
Z95 = 1.959963984540054  # the two-sided 95 % normal quantile


def wilson_interval(p: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval of a proportion ``p`` observed over ``n`` (possibly effective) trials."""
    if n <= 0:
        return float("nan"), float("nan")
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def clustered_interval(docs: dict[Any, list[float]]) -> tuple[float, int, float, float]:
    """(mean, n, low, high) of per-position scores summed per document: ``{doc: [sum, count]}``.

    See the module docstring: Wilson's interval at the document-clustered effective sample size.
    """
    n = int(sum(c for _, c in docs.values()))
    if n == 0:
        return float("nan"), 0, float("nan"), float("nan")
    p = sum(s for s, _ in docs.values()) / n
    var = sum((s - p * c) ** 2 for s, c in docs.values()) / (n * n)
    n_eff = float(n) if var <= 0 or p * (1 - p) <= 0 else min(float(n), p * (1 - p) / var)
    low, high = wilson_interval(p, n_eff)
    return p, n, low, high


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
    ci_low: float = float("nan")  # 95 % confidence interval (clustered by document)
    ci_high: float = float("nan")
    documents: int = 0  # documents the positions come from


class BucketAccumulator:
    """Per-document sums of a per-position score (0/1 or a mean over samples) per difficulty bucket."""

    def __init__(self, thresholds: Sequence[float]):
        if list(thresholds) != sorted(thresholds):
            raise ValueError(f"difficulty thresholds {list(thresholds)} must be increasing")
        self.thresholds = list(thresholds)
        self.names = bucket_names(self.thresholds)
        self.docs: list[dict[Any, list[float]]] = [{} for _ in self.thresholds]
        self._anonymous = 0

    def add(self, entropy: float | None, score: float, doc: Any = None) -> None:
        """One position; ``doc`` names its document (None: a document of its own)."""
        if doc is None:
            self._anonymous += 1
            doc = ("position", os.getpid(), id(self), self._anonymous)
        for i, t in enumerate(self.thresholds):
            if in_bucket(entropy, t):
                entry = self.docs[i].setdefault(doc, [0.0, 0])
                entry[0] += score
                entry[1] += 1

    @property
    def sums(self) -> list[float]:
        return [sum(s for s, _ in d.values()) for d in self.docs]

    @property
    def counts(self) -> list[int]:
        return [int(sum(c for _, c in d.values())) for d in self.docs]

    def merge(self, other: BucketAccumulator) -> None:
        """Add the positions another accumulator saw (another data-parallel rank's share)."""
        if other.thresholds != self.thresholds:
            raise ValueError(f"cannot merge buckets {other.thresholds} into {self.thresholds}")
        for mine, theirs in zip(self.docs, other.docs):
            for doc, (s, c) in theirs.items():
                entry = mine.setdefault(doc, [0.0, 0])
                entry[0] += s
                entry[1] += c

    def result(self) -> dict[str, BucketResult]:
        out = {}
        for name, docs in zip(self.names, self.docs):
            p, n, low, high = clustered_interval(docs)
            out[name] = BucketResult(p, n, low, high, len(docs))
        return out


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
                      "buckets": {k: {"accuracy": _finite_or_none(v.accuracy), "count": v.count,
                                      "ci95": [_finite_or_none(v.ci_low), _finite_or_none(v.ci_high)],
                                      "documents": v.documents}
                                  for k, v in r.buckets.items()}} for r in self.rows],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalReport:
        try:
            rows = [ReportRow(r["model"], r["mode"], r["metric"],
                              {k: _bucket_from_dict(v) for k, v in r["buckets"].items()}) for r in data["rows"]]
            return cls(list(data["thresholds"]), rows, dict(data.get("meta") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not an evaluation report (missing or bad field: {exc})") from None


def _finite_or_none(x: float) -> float | None:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def _float(x: Any) -> float:
    return float("nan") if x is None else float(x)


def _bucket_from_dict(v: dict[str, Any]) -> BucketResult:
    low, high = v.get("ci95") or (None, None)  # reports written before the intervals have none
    return BucketResult(_float(v["accuracy"]), int(v["count"]), _float(low), _float(high), int(v.get("documents", 0)))


def _cell(b: BucketResult | None) -> str:
    if b is None or b.count == 0 or not math.isfinite(b.accuracy):
        return "-"
    if not (math.isfinite(b.ci_low) and math.isfinite(b.ci_high)):
        return f"{100 * b.accuracy:.2f}"
    return f"{100 * b.accuracy:.2f} [{100 * b.ci_low:.1f}, {100 * b.ci_high:.1f}]"


def _unwinnable_lines(report: EvalReport) -> list[str]:
    """The positions no answer can win, per bucket (meta["unwinnable"], written by the evaluator)."""
    info = report.meta.get("unwinnable")
    if not isinstance(info, dict) or not info.get("buckets"):
        return []
    cells = [f"{name} {b['never']} never, {b['not_first_token']} not by the first token alone (of {b['positions']})"
             for name, b in info["buckets"].items()]
    return [f"Unwinnable positions ({info.get('rule', '')}): " + "; ".join(cells)]


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
    out = ["Next-token prediction accuracy (%) [95% CI] by difficulty: entropy > "
           + " / ".join(f"{t:g}" for t in report.thresholds), rule, line(header), rule]
    out += [line(r) for r in body]
    out.append(rule)
    out += _unwinnable_lines(report)
    return "\n".join(out)


def to_markdown(report: EvalReport) -> str:
    header, body = _grid(report)
    lines = ["# Next-token prediction accuracy", "",
             "Accuracy (%) on held-out positions by difficulty (scorer entropy > "
             + " / ".join(f"{t:g}" for t in report.thresholds) + "; buckets are nested), with the 95 % "
             "confidence interval clustered by document.", "",
             "| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    lines += ["", line] if (line := " ".join(_unwinnable_lines(report))) else []
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
        raise FileNotFoundError(f"{p} does not exist; pass eval.json files written by megatron_rpt.eval")
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
    parser.add_argument("reports", nargs="+", help="eval.json files written by python -m megatron_rpt.eval")
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
