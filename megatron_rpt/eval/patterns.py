"""Reasoning-pattern analysis of next-token-reasoning responses (RPT paper, section 4.5).

Owns: the six keyword groups of the paper's analysis (its appendix E, table 9: transition,
reflection, breakdown, hypothesis, divergent thinking, deduction), counting them in responses,
the fraction of responses that use each pattern, the relative change between two sets of
responses (early vs late training steps, or two models), and ``python -m megatron_rpt.eval.patterns``.

Matching: a response uses a pattern when at least one of its keywords occurs as whole words,
case-insensitively (``etc.`` ends in a dot, so only its start must be a word boundary). Pass
``--keywords FILE`` (JSON ``{group: [phrases]}``) to use other lists.

The paper compares the next-token-reasoning responses of a model with its *problem-solving*
responses on OmniMATH; ``python -m megatron_rpt.eval.solve`` writes the latter, then

    python -m megatron_rpt.eval.patterns --rollouts runs/rpt_14b/rollouts --compare runs/solve/responses.jsonl

Input: the trainer's rollout files ``<logging.dir>/rollouts/step_XXXXXX_dpYYY.jsonl`` (rows with
``step`` and ``response``), ``eval.solve``'s ``responses.jsonl``, or ``evaluate --save-responses``'s
``positions.jsonl`` (rows with a ``responses`` list); other fields are ignored.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_rpt.atomic import write_text_atomic

__all__ = [
    "PATTERN_KEYWORDS",
    "PatternCounter",
    "PatternStats",
    "analyze",
    "relative_change",
    "load_rollouts",
    "split_by_step",
    "main",
]

# The paper's appendix E, table 9, verbatim.
PATTERN_KEYWORDS: dict[str, tuple[str, ...]] = {
    "transition": ("alternatively", "think differently"),
    "reflection": ("wait", "initial answer", "original answer", "looking back", "thought process"),
    "breakdown": ("break down", "break this down"),
    "hypothesis": ("probably", "something like"),
    "divergent_thinking": ("etc.", "or something", "either", "sometimes it refers", "otherwise", "exploring",
                           "options"),
    "deduction": ("summarize", "conclusion", "conclude", "finally", "logically", "consequently"),
}

DISPLAY_NAMES = {
    "transition": "Transition",
    "reflection": "Reflection",
    "breakdown": "Breakdown",
    "hypothesis": "Hypothesis",
    "divergent_thinking": "Divergent thinking",
    "deduction": "Deduction",
}


def _phrase_regex(phrase: str) -> str:
    """Whole-word match of ``phrase``; inner whitespace matches any run of whitespace."""
    body = r"\s+".join(re.escape(word) for word in phrase.strip().split())
    start = r"(?<!\w)" if re.match(r"\w", phrase.strip()) else ""
    end = r"(?!\w)" if re.search(r"\w$", phrase.strip()) else ""
    return start + body + end


class PatternCounter:
    """Counts keyword occurrences per pattern group in a text."""

    def __init__(self, keywords: dict[str, Sequence[str]] | None = None):
        keywords = PATTERN_KEYWORDS if keywords is None else keywords
        if not keywords:
            raise ValueError("no pattern groups given")
        self.keywords = {group: tuple(words) for group, words in keywords.items()}
        self._regex = {}
        for group, words in self.keywords.items():
            if not words or any(not isinstance(w, str) or not w.strip() for w in words):
                raise ValueError(f"pattern group {group!r} needs a non-empty list of non-empty phrases")
            # Longest first so "double-check" is one hit, not "double" + "check".
            alternatives = sorted(words, key=len, reverse=True)
            self._regex[group] = re.compile("|".join(_phrase_regex(w) for w in alternatives), re.IGNORECASE)

    @property
    def groups(self) -> list[str]:
        return list(self.keywords)

    def count(self, text: str) -> dict[str, int]:
        """Occurrences of each group's keywords in ``text`` (non-overlapping)."""
        return {group: len(regex.findall(text or "")) for group, regex in self._regex.items()}


@dataclass
class PatternStats:
    """Pattern usage over a set of responses."""

    num_responses: int
    fraction: dict[str, float]  # share of responses with >= 1 keyword of the group
    mean_count: dict[str, float]  # keyword occurrences per response
    mean_words: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"num_responses": self.num_responses, "fraction": self.fraction, "mean_count": self.mean_count,
                "mean_words": self.mean_words, **self.extra}


def thinking_part(response: str) -> str:
    """The text before the last ``</think>`` (the whole response when there is none)."""
    cut = response.rfind("</think>")
    return response if cut < 0 else response[:cut]


def analyze(responses: Iterable[str], counter: PatternCounter | None = None,
            thinking_only: bool = False) -> PatternStats:
    counter = counter or PatternCounter()
    used = {g: 0 for g in counter.groups}
    counts = {g: 0 for g in counter.groups}
    words = 0
    n = 0
    for response in responses:
        text = thinking_part(response) if thinking_only else (response or "")
        n += 1
        words += len(text.split())
        for group, c in counter.count(text).items():
            counts[group] += c
            used[group] += c > 0
    return PatternStats(
        num_responses=n,
        fraction={g: used[g] / n if n else float("nan") for g in counter.groups},
        mean_count={g: counts[g] / n if n else float("nan") for g in counter.groups},
        mean_words=words / n if n else float("nan"),
    )


def relative_change(before: PatternStats, after: PatternStats, key: str = "fraction") -> dict[str, float]:
    """``(after - before) / before`` per group (``inf`` when a pattern appears from nothing)."""
    a, b = getattr(before, key), getattr(after, key)
    out = {}
    for group in a:
        if a[group] == 0:
            out[group] = 0.0 if b[group] == 0 else math.inf
        else:
            out[group] = (b[group] - a[group]) / a[group]
    return out


# ----------------------------------------------------------------------------- rollout files


def load_rollouts(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of the rollout JSONL files under ``path`` (a run dir, its ``rollouts/`` dir, or one file)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist; pass --rollouts <logging.dir>/rollouts (or the run dir)")
    if p.is_dir() and (p / "rollouts").is_dir():
        p = p / "rollouts"
    files = [p] if p.is_file() else sorted(p.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no *.jsonl rollout files in {p}; runs save them with logging.save_rollouts=true")
    rows: list[dict[str, Any]] = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{f}:{line_no} is not valid JSON ({exc}); is the file truncated?") from None
                if isinstance(row, dict) and isinstance(row.get("responses"), list):  # evaluate's positions.jsonl
                    rows.extend({**row, "response": r} for r in row["responses"] if isinstance(r, str))
                    continue
                if not isinstance(row, dict) or not isinstance(row.get("response"), str):
                    raise ValueError(f"{f}:{line_no} has no 'response' string (nor a 'responses' list); "
                                     "not a rollout file")
                rows.append(row)
    return rows


def split_by_step(rows: Sequence[dict[str, Any]], early_max: int | None = None,
                  late_min: int | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(early rows, late rows). Default: the first and the last quarter of the logged steps."""
    steps = sorted({int(r["step"]) for r in rows if isinstance(r.get("step"), (int, float))})
    if not steps:
        raise ValueError("the rollout rows carry no 'step'; give two files/dirs with --compare instead")
    if early_max is None or late_min is None:
        q = max(1, len(steps) // 4)
        early_max = steps[q - 1] if early_max is None else early_max
        late_min = steps[-q] if late_min is None else late_min
    early = [r for r in rows if isinstance(r.get("step"), (int, float)) and r["step"] <= early_max]
    late = [r for r in rows if isinstance(r.get("step"), (int, float)) and r["step"] >= late_min]
    return early, late


# ----------------------------------------------------------------------------- report


def _fmt_change(x: float) -> str:
    if math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "new"
    return f"{100 * x:+.1f}%"


def format_table(sets: dict[str, PatternStats], change: dict[str, float] | None = None) -> str:
    """Markdown table: one row per pattern, one column per set (fraction of responses, mean count)."""
    groups = list(next(iter(sets.values())).fraction)
    header = ["Pattern"] + [f"{name} (n={s.num_responses})" for name, s in sets.items()]
    if change is not None:
        header.append("Relative change")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for g in groups:
        cells = [DISPLAY_NAMES.get(g, g)]
        cells += [f"{100 * s.fraction[g]:.1f}% ({s.mean_count[g]:.2f}/resp)" for s in sets.values()]
        if change is not None:
            cells.append(_fmt_change(change[g]))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("| Mean words | " + " | ".join(f"{s.mean_words:.1f}" for s in sets.values())
                 + (" | |" if change is not None else " |"))
    return "\n".join(lines)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _load_keywords(path: str) -> dict[str, list[str]]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--keywords {path}: cannot read a JSON object of keyword lists ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise ValueError(f"--keywords {path}: expected {{\"group\": [\"phrase\", ...], ...}}")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_rpt.eval.patterns",
        description="Reasoning-pattern usage in saved rollouts (RPT section 4.5): early vs late steps, or two sets.")
    parser.add_argument("--rollouts", required=True, help="run dir, its rollouts/ dir, or one rollout .jsonl")
    parser.add_argument("--compare", help="a second rollouts dir/file (e.g. another model): compares the two sets "
                                          "instead of early vs late steps")
    parser.add_argument("--early-max-step", type=int, help="early set = steps <= this (default: first quarter)")
    parser.add_argument("--late-min-step", type=int, help="late set = steps >= this (default: last quarter)")
    parser.add_argument("--thinking-only", action="store_true", help="count only the text before </think>")
    parser.add_argument("--keywords", help="JSON file {group: [phrases]} replacing the built-in lists")
    parser.add_argument("--out", help="directory for patterns.json and patterns.md (default: print only)")
    args = parser.parse_args(argv)
    try:
        counter = PatternCounter(_load_keywords(args.keywords) if args.keywords else None)
        rows = load_rollouts(args.rollouts)
        if args.compare:
            other = load_rollouts(args.compare)
            names = (Path(args.rollouts).name or "A", Path(args.compare).name or "B")
            if names[0] == names[1]:
                names = ("A", "B")
            first, second = rows, other
        else:
            first, second = split_by_step(rows, args.early_max_step, args.late_min_step)
            steps = lambda rs: sorted({int(r["step"]) for r in rs})  # noqa: E731
            s1, s2 = steps(first), steps(second)
            names = (f"early (steps {s1[0]}-{s1[-1]})" if s1 else "early",
                     f"late (steps {s2[0]}-{s2[-1]})" if s2 else "late")
        if not first or not second:
            raise ValueError("one of the two sets is empty; adjust --early-max-step / --late-min-step")
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stats = {names[0]: analyze((r["response"] for r in first), counter, args.thinking_only),
             names[1]: analyze((r["response"] for r in second), counter, args.thinking_only)}
    change = relative_change(stats[names[0]], stats[names[1]])
    table = format_table(stats, change)
    print(table)
    if args.out:
        out = Path(args.out)
        payload = {"sets": {k: v.to_dict() for k, v in stats.items()}, "relative_change_fraction": change,
                   "relative_change_mean_count": relative_change(stats[names[0]], stats[names[1]], "mean_count"),
                   "keywords": counter.keywords, "thinking_only": args.thinking_only}
        write_text_atomic(out / "patterns.json", json.dumps(_json_safe(payload), indent=2) + "\n")
        write_text_atomic(out / "patterns.md", "# Reasoning patterns\n\n" + table + "\n")
        print(f"wrote {out / 'patterns.json'} and {out / 'patterns.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
