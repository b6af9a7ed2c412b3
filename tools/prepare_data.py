#!/usr/bin/env python
"""Score a corpus with a proxy LM and write prepared RPT data (Parquet shards + manifest.json).

    python tools/prepare_data.py --input ../shared/data/omni_math_rule.jsonl \\
        --tokenizer ../shared/tokenizers/r1_distill_qwen --proxy /models/DeepSeek-R1-Distill-Qwen-1.5B \\
        --out data/omni_prepared

Each shard row is a document: token ids and the proxy's top-k entropy at every position. Point
``data.prepared`` at ``--out`` to train on it; the manifest records how many positions fall in the
easy / medium / hard splits (entropy > 0.5 / 1.0 / 1.5 by default).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, help="JSONL / Parquet files or directories of them")
    ap.add_argument("--tokenizer", required=True, help="tokenizer directory (tokenizer.json)")
    ap.add_argument("--proxy", required=True, help="Hugging Face causal LM directory used to score positions")
    ap.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    ap.add_argument("--text-fields", nargs="+", default=["problem", "solution"], help="row fields joined into the text")
    ap.add_argument("--text-separator", default="\n\n", help="string between text fields (default: blank line)")
    ap.add_argument("--max-docs", type=int, default=None, help="stop after this many documents")
    ap.add_argument("--shard-size", type=int, default=1024, help="documents per Parquet shard")
    ap.add_argument("--top-k", type=int, default=16, help="entropy over the renormalised top-k next tokens")
    ap.add_argument("--threshold", type=float, default=0.5, help="entropy above which a position is kept (counted)")
    ap.add_argument("--difficulty-thresholds", type=float, nargs="+", default=[0.5, 1.0, 1.5],
                    help="increasing entropy thresholds of the easy/medium/hard splits")
    ap.add_argument("--batch-tokens", type=int, default=16384, help="tokens per proxy forward pass")
    ap.add_argument("--max-seq-len", type=int, default=4096, help="longest packed row; longer documents use windows")
    ap.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="proxy dtype (default: bfloat16 on GPU, float32 on CPU)")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return ap.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Reject bad paths and values before anything is loaded or written."""
    errors = []
    for p in args.input:
        if not Path(p).exists():
            errors.append(f"--input {p}: does not exist")
    if not Path(args.tokenizer).is_dir():
        errors.append(f"--tokenizer {args.tokenizer}: not a directory (give the folder holding tokenizer.json)")
    if not (Path(args.proxy) / "config.json").is_file():
        errors.append(f"--proxy {args.proxy}: not a Hugging Face model directory (no config.json)")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        errors.append(f"--out {args.out}: exists and is not an empty directory; pick a new path or delete it")
    for name in ("max_docs", "shard_size", "top_k", "batch_tokens", "max_seq_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            errors.append(f"--{name.replace('_', '-')}={value}: must be >= 1")
    if sorted(args.difficulty_thresholds) != args.difficulty_thresholds:
        errors.append("--difficulty-thresholds must be increasing, e.g. 0.5 1.0 1.5")
    if errors:
        raise SystemExit("prepare_data: " + "\n  ".join(["invalid arguments:"] + errors))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    check_args(args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from megatron_rpt.data.entropy_filter import ProxyScorer
    from megatron_rpt.data.shards import prepare
    from megatron_rpt.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    proxy = ProxyScorer(args.proxy, top_k=args.top_k, device=args.device, dtype=args.dtype,
                        batch_tokens=args.batch_tokens, max_seq_len=args.max_seq_len)
    manifest = prepare(args.input, tokenizer, args.tokenizer, proxy, args.out, text_fields=args.text_fields,
                       text_separator=args.text_separator, max_docs=args.max_docs, shard_size=args.shard_size,
                       threshold=args.threshold, difficulty_thresholds=args.difficulty_thresholds,
                       progress=not args.no_progress)
    print(json.dumps({k: manifest[k] for k in ("num_docs", "num_tokens", "counts", "unwinnable", "bad_rows")},
                     indent=2))
    print(f"wrote {len(manifest['shards'])} shard(s) and manifest.json to {args.out}")
    return manifest


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        raise SystemExit(f"prepare_data: {exc}") from None
