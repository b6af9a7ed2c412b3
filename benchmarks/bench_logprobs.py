"""Peak memory of the log-prob / entropy pass: chunked (the trainer's default) vs the full path.

The full path is what the trainer ran before ``rl.logprob_chunk_tokens``: a float32 copy of the
logits, then ``vocab_parallel_logprobs_and_entropy`` (its own scaled copy and softmax
temporaries). The chunked path (``chunked_logprobs_and_entropy``) keeps the logits as the model
returned them and only ``chunk x V`` float32 temporaries. Each variant runs in a fresh process
(one Megatron-free torch process, TP=1) that first allocates the bf16 logits; the number
reported is the process's peak RSS above its RSS with the logits allocated, for

* ``logprob pass``: forward only under ``no_grad`` (the old-/ref-logprob pass);
* ``train``: forward + backward with the entropy bonus's gradient (the update's loss pass).

CPU RSS is what this machine can measure; on a GPU the same ratio is what
``torch.cuda.max_memory_allocated`` would show (the allocations are the same tensors).
Writes JSON (atomically) to ``benchmarks/results/bench_logprobs.json``.

    python benchmarks/bench_logprobs.py [--tokens 4096] [--vocab 32768] [--chunk 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from megatron_rpt.rl import chunked_logprobs_and_entropy, vocab_parallel_logprobs_and_entropy

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VARIANTS = ("full", "chunked")
PASSES = ("logprob pass", "train")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _measure(variant: str, backward: bool, tokens: int, vocab: int, chunk: int) -> dict:
    """Peak RSS growth of one pass in this (fresh) process, in bytes."""
    torch.manual_seed(0)
    logits = torch.randn(tokens, vocab, dtype=torch.bfloat16).requires_grad_(backward)
    labels = torch.randint(0, vocab, (tokens,))
    weights = torch.randn(tokens)

    def run(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> None:
        with torch.set_grad_enabled(backward):
            if variant == "full":
                lp, ent = vocab_parallel_logprobs_and_entropy(x.float(), y, temperature=0.7, entropy_grad=backward)
            else:
                lp, ent = chunked_logprobs_and_entropy(x, y, temperature=0.7, chunk_tokens=chunk,
                                                       entropy_grad=backward)
            if backward:
                ((lp - 0.01 * ent) * w).sum().backward()

    # Warm-up on 8 tokens: the kernels' libraries and thread pools (~300 MB of RSS on this machine,
    # whatever the size) load before the baseline, so the peak is what the pass itself allocates.
    run(logits.detach()[:8].clone().requires_grad_(backward), labels[:8], weights[:8])
    base = _rss_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    run(logits, labels, weights)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if peak_before > base + logits.numel():  # an earlier transient would hide this pass's peak
        raise RuntimeError(f"peak RSS before the pass ({peak_before}) is above the baseline ({base}); "
                           "raise --tokens so the logits dominate")
    return {"peak_extra_bytes": peak - base, "logits_bytes": logits.numel() * logits.element_size(),
            "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/bench_logprobs.json"))
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "PASS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:  # the child: one measurement, printed as JSON
        variant, which = args.one
        print(json.dumps(_measure(variant, which == "train", args.tokens, args.vocab, args.chunk)))
        return 0

    results: dict = {}
    for which in PASSES:
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--tokens", str(args.tokens), "--vocab", str(args.vocab),
                   "--chunk", str(args.chunk), "--one", variant, which]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ,
                                 "PYTHONPATH": str(REPO)}).stdout
            results[f"{which}/{variant}"] = json.loads(out.strip().splitlines()[-1])
    logits_gib = results["train/full"]["logits_bytes"] / 2**30
    print(f"\nlog-prob + entropy pass: {args.tokens} tokens x vocab {args.vocab}, bf16 logits "
          f"({logits_gib:.2f} GiB), chunk {args.chunk}")
    print(f"  {'pass':<13} {'full GiB':>9} {'chunked GiB':>12} {'chunked/full':>13} {'full B/elt':>11} "
          f"{'chunked B/elt':>14}")
    elements = args.tokens * args.vocab
    summary = {}
    for which in PASSES:
        full, chunked = (results[f"{which}/{v}"]["peak_extra_bytes"] for v in VARIANTS)
        summary[which] = {"full_gib": full / 2**30, "chunked_gib": chunked / 2**30, "ratio": chunked / full,
                          "full_bytes_per_logit": full / elements, "chunked_bytes_per_logit": chunked / elements}
        s = summary[which]
        print(f"  {which:<13} {s['full_gib']:>9.3f} {s['chunked_gib']:>12.3f} {s['ratio']:>13.3f} "
              f"{s['full_bytes_per_logit']:>11.2f} {s['chunked_bytes_per_logit']:>14.2f}")

    record = {"tokens": args.tokens, "vocab": args.vocab, "chunk": args.chunk, "runs": results,
              "summary": summary, "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}}
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(out_path)
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
