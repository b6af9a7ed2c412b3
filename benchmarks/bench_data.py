#!/usr/bin/env python
"""Throughput of the RPT data side: problem construction, proxy entropy scoring, reward checks.

    python benchmarks/bench_data.py [--out benchmarks/results/bench_data.json] [--seconds 8]

* problems/s -- ``ProblemStream`` without a proxy: read JSONL, tokenise, pick positions, render and
  tokenise the chat prompt (OmniMATH + the R1-Distill tokenizer from ../shared).
* tokens/s -- ``ProxyScorer`` top-16 entropy with a tiny random Qwen2 (hidden 32, 1 layer, the real
  151,665-token vocabulary) on CPU; the vocabulary projection dominates, as it does for a real proxy.
* checks/s -- ``compute_reward("prefix", ...)`` on ~2,000-character responses.

Prints a table and writes JSON. Runs in well under two minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from megatron_rpt.config import DataConfig
from megatron_rpt.data import ProblemStream, load_tokenizer
from megatron_rpt.data.entropy_filter import ProxyScorer
from megatron_rpt.data.tiny_proxy import make_tiny_proxy
from megatron_rpt.data.tokenizer import encode_document, token_bytes
from megatron_rpt.reward import compute_reward

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("RPT_SHARED_DIR", REPO.parent / "shared"))


def timed(fn, seconds: float, min_iters: int = 1) -> tuple[int, float]:
    """Call ``fn`` (returns units done) until ``seconds`` pass; (units, elapsed)."""
    units, iters, t0 = 0, 0, time.perf_counter()
    while iters < min_iters or time.perf_counter() - t0 < seconds:
        units += fn()
        iters += 1
    return units, time.perf_counter() - t0


def bench_problems(tok, omni: Path, seconds: float) -> dict:
    t0 = time.perf_counter()
    stream = ProblemStream(DataConfig(paths=[str(omni)]), tok)
    init_s = time.perf_counter() - t0
    n, dt = timed(lambda: sum(1 for _ in range(50) if next(stream) is not None), seconds)
    return {"problems": n, "seconds": dt, "problems_per_s": n / dt, "stream_init_s": init_s}


def bench_entropy(tok, omni: Path, seconds: float) -> dict:
    rows = [json.loads(line) for line in open(omni)][:64]
    docs = [encode_document(tok, r["problem"] + "\n\n" + r["solution"]) for r in rows]
    with tempfile.TemporaryDirectory() as d:
        proxy = ProxyScorer(make_tiny_proxy(d, vocab_size=len(tok)), device="cpu", batch_tokens=4096,
                            max_seq_len=2048)
        i = 0

        def step() -> int:
            nonlocal i
            batch = docs[i % len(docs):i % len(docs) + 4]
            i += 4
            proxy.score(batch)
            return sum(len(x) for x in batch)

        n, dt = timed(step, seconds)
    return {"tokens": n, "seconds": dt, "tokens_per_s": n / dt, "vocab": len(tok), "threads": torch.get_num_threads()}


def bench_reward(tok, seconds: float) -> dict:
    target = token_bytes(tok, encode_document(tok, " the paragraph is long and 你好 \\frac{1}{2}"))
    thinking = "Let me think about which token comes next. " * 45
    responses = [f"<think>{thinking}</think>\n\nThe next token is \\boxed{{{p}}}"
                 for p in (" the", " the paragraph", " a", "\\text{ the}", " the para")]
    assert [compute_reward("prefix", r, target) for r in responses] == [1.0, 1.0, 0.0, 0.0, 0.0]
    n, dt = timed(lambda: sum(compute_reward("prefix", r, target) >= 0 for r in responses * 200), seconds)
    return {"checks": n, "seconds": dt, "checks_per_s": n / dt, "response_chars": len(responses[0])}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/bench_data.json"))
    ap.add_argument("--seconds", type=float, default=8.0, help="time budget of each measurement")
    args = ap.parse_args(argv)

    omni = SHARED / "data/omni_math_rule.jsonl"
    tok_dir = SHARED / "tokenizers/r1_distill_qwen"
    if not omni.is_file() or not tok_dir.is_dir():
        raise SystemExit(f"bench_data needs {omni} and {tok_dir} (the read-only ../shared directory); "
                         "set RPT_SHARED_DIR to where it lives")

    tok = load_tokenizer(tok_dir)
    results = {
        "problems": bench_problems(tok, omni, args.seconds),
        "entropy_filter": bench_entropy(tok, omni, args.seconds),
        "reward": bench_reward(tok, args.seconds / 2),
        # A busy machine (other jobs) slows every rate: the 1-minute load average says how busy it was.
        "machine": {"cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
                    "python": platform.python_version(), "platform": platform.platform()},
    }
    lines = [
        f"{'measurement':<40}{'rate':>16}  unit",
        f"{'tokenise + construct problems':<40}{results['problems']['problems_per_s']:>16,.1f}  problems/s",
        f"{'proxy top-16 entropy (tiny Qwen2, CPU)':<40}{results['entropy_filter']['tokens_per_s']:>16,.1f}  tokens/s",
        f"{'prefix reward checks':<40}{results['reward']['checks_per_s']:>16,.1f}  checks/s",
    ]
    print("\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
