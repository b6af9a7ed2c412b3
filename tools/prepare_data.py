#!/usr/bin/env python
"""Score a corpus, or a weighted mixture of corpora, with a proxy LM and write prepared RPT data.

    # one corpus, one process
    python tools/prepare_data.py --input ../shared/data/omni_math_rule.jsonl \\
        --tokenizer ../shared/tokenizers/r1_distill_qwen --proxy /models/DeepSeek-R1-Distill-Qwen-1.5B \\
        --out data/omni_prepared

    # the data.mixture of a training config, 8 workers on one node (one GPU each)
    torchrun --nproc-per-node 8 tools/prepare_data.py --config configs/math_mixture.yaml \\
        --proxy /models/DeepSeek-R1-Distill-Qwen-1.5B --out /scratch/$USER/data/math_mix

    # a SLURM array, one worker per task: examples/prepare_data.sh

Writes Parquet shards (a document per row: token ids and the proxy's top-k entropy at every
position) and, when every shard is done, manifest.json (easy / medium / hard counts, the mixture
drawn). Point ``data.prepared`` at ``--out`` to train on it. Worker w of N scores shards
w, w+N, ...; the result is the same for every N. Killed at any moment, the same command resumes
(done shards are skipped; a run whose inputs, proxy or settings changed is refused).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from megatron_rpt.config import ConfigError, DataConfig, load_config
from megatron_rpt.data.entropy_filter import ProxyScorer
from megatron_rpt.data.mixture import Mixture, single_corpus
from megatron_rpt.data.run_state import resolve_worker
from megatron_rpt.data.scoring import ScoringSettings, prepare
from megatron_rpt.data.tokenizer import load_tokenizer
from megatron_rpt.errors import UserError  # noqa: E402
from megatron_rpt.processes import die_with_parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="JSONL / Parquet files or directories of them (one corpus)")
    src.add_argument("--config", help="training config: its data.mixture (or data.paths) is what is scored")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (--config)")
    ap.add_argument("--tokenizer", help="tokenizer directory (default: the config's model.tokenizer)")
    ap.add_argument("--proxy", help="Hugging Face causal LM directory scoring positions (default: data.proxy_model)")
    ap.add_argument("--out", required=True, help="output directory: new, or an unfinished run of this command")
    ap.add_argument("--text-fields", nargs="+", default=["problem", "solution"], help="row fields joined (--input)")
    ap.add_argument("--text-separator", default="\n\n", help="string between text fields (--input)")
    ap.add_argument("--dedup", action="store_true", help="drop exact duplicate documents (--input; a config's "
                    "mixture uses data.dedup)")
    ap.add_argument("--min-chars", type=int, default=0, help="drop shorter documents (--input)")
    ap.add_argument("--max-chars", type=int, default=None, help="drop longer documents (--input)")
    ap.add_argument("--max-docs", type=int, default=None, help="stop after this many documents of the sequence")
    ap.add_argument("--shard-size", type=int, default=1024, help="documents per Parquet shard (the unit of resume)")
    ap.add_argument("--docs-per-batch", type=int, default=32, help="documents handed to the proxy at once")
    ap.add_argument("--top-k", type=int, default=None, help="entropy over the renormalised top-k (default 16)")
    ap.add_argument("--threshold", type=float, default=None, help="entropy above which a position is kept (counted)")
    ap.add_argument("--difficulty-thresholds", type=float, nargs="+", default=None,
                    help="increasing entropy thresholds of the easy/medium/hard splits (default 0.5 1.0 1.5)")
    ap.add_argument("--batch-tokens", type=int, default=16384, help="tokens per proxy forward pass")
    ap.add_argument("--max-seq-len", type=int, default=4096, help="longest packed row; longer documents use windows")
    ap.add_argument("--device", default=None, help="torch device (default: cuda:LOCAL_RANK when available, else cpu)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="proxy dtype (default: bfloat16 on GPU, float32 on CPU)")
    ap.add_argument("--worker-id", type=int, default=None, help="this worker (default: torchrun RANK or the SLURM "
                    "array task; else 0)")
    ap.add_argument("--num-workers", type=int, default=None, help="how many workers (default: WORLD_SIZE or the "
                    "SLURM array size; else 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads of this worker")
    ap.add_argument("--check", action="store_true", help="check the arguments, config and inputs, then exit "
                    "(the SLURM script's preflight)")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return ap.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Reject bad paths and values before anything is loaded or written."""
    errors = []
    for p in args.input or []:
        if not Path(p).exists():
            errors.append(f"--input {p}: does not exist")
    if args.config and not Path(args.config).is_file():
        errors.append(f"--config {args.config}: no such file")
    for name in ("max_docs", "shard_size", "docs_per_batch", "top_k", "batch_tokens", "max_seq_len", "threads",
                 "max_chars", "num_workers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            errors.append(f"--{name.replace('_', '-')}={value}: must be >= 1")
    if args.min_chars < 0:
        errors.append(f"--min-chars={args.min_chars}: must be >= 0")
    if args.difficulty_thresholds and sorted(args.difficulty_thresholds) != args.difficulty_thresholds:
        errors.append("--difficulty-thresholds must be increasing, e.g. 0.5 1.0 1.5")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "run.json").is_file())):
        errors.append(f"--out {args.out}: exists and is not an empty directory or an unfinished prepare_data run; "
                      "pick a new path or delete it")
    if errors:
        raise SystemExit("prepare_data: " + "\n  ".join(["invalid arguments:"] + errors))


def resolve_inputs(args: argparse.Namespace):
    """(corpora, dedup, tokenizer dir, proxy dir, top_k, threshold, thresholds) from the flags and the config."""
    data, tokenizer = DataConfig(), args.tokenizer
    if args.config:
        cfg = load_config(args.config, args.set, validate_paths=False)
        data, tokenizer = cfg.data, args.tokenizer or cfg.model.tokenizer
        if data.mixture:
            corpora, dedup = data.mixture, data.dedup
        elif data.paths:
            corpora, dedup = [single_corpus(data.paths, data.text_fields, data.text_separator)], False
        else:
            raise ConfigError(f"--config {args.config} has neither data.mixture nor data.paths: nothing to score")
    else:
        corpora = [single_corpus(args.input, args.text_fields, args.text_separator, args.min_chars, args.max_chars)]
        dedup = args.dedup
    proxy = args.proxy or data.proxy_model
    if not tokenizer or not Path(tokenizer).is_dir():
        raise ConfigError(f"--tokenizer {tokenizer!r}: not a directory (give the folder holding tokenizer.json, or "
                          "set model.tokenizer in the config)")
    if not proxy or not (Path(proxy) / "config.json").is_file():
        raise ConfigError(f"--proxy {proxy!r}: not a Hugging Face model directory (no config.json); give one, or "
                          "set data.proxy_model in the config")
    thresholds = args.difficulty_thresholds or data.difficulty_thresholds
    threshold = data.entropy_threshold if args.threshold is None else args.threshold
    return corpora, dedup, tokenizer, proxy, args.top_k or data.entropy_top_k, threshold, thresholds


def _interrupt(signum, _frame) -> None:
    """SIGTERM / SIGUSR1 (SLURM's time limit) unwind like Ctrl-C: the shard in flight is dropped, the rest kept."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    check_args(args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    corpora, dedup, tok_dir, proxy_dir, top_k, threshold, thresholds = resolve_inputs(args)
    worker, workers, how = resolve_worker(args.worker_id, args.num_workers)
    if how == "torchrun":  # torchrun starts workers in sessions of their own: kill -9 of it would orphan them
        die_with_parent(os.getppid())
    settings = ScoringSettings(args.shard_size, args.docs_per_batch, threshold, tuple(thresholds))
    settings.check()
    mixture = Mixture(corpora, dedup, args.max_docs)
    mixture.check_usable()
    tokenizer = load_tokenizer(tok_dir)
    if args.check:
        print(f"[preflight] prepare_data: ok (worker {worker} of {workers} from {how}; {len(corpora)} corpus/corpora; "
              f"out {args.out})")
        return None
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device is None and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    proxy = ProxyScorer(proxy_dir, top_k=top_k, device=device or "cpu", dtype=args.dtype,
                        batch_tokens=args.batch_tokens, max_seq_len=args.max_seq_len)
    logging.getLogger("prepare_data").info("worker %d of %d (%s), %d thread(s), device %s", worker, workers, how,
                                           torch.get_num_threads(), proxy.device)
    manifest = prepare(mixture, tokenizer, tok_dir, proxy, args.out, settings, worker=worker, num_workers=workers,
                       progress=not args.no_progress)
    if manifest is None:
        print(f"worker {worker} of {workers}: its shards are done; the last worker to finish writes "
              f"{args.out}/manifest.json")
        return None
    summary = {k: manifest[k] for k in ("num_docs", "num_tokens", "counts", "unwinnable", "bad_rows")}
    if manifest.get("mixture"):
        summary["mixture"] = {c["name"]: {"docs": c["docs"], "share": round(c["share"], 4), "tokens": c["tokens"]}
                              for c in manifest["mixture"]["corpora"]}
    print(json.dumps(summary, indent=2))
    print(f"wrote {len(manifest['shards'])} shard(s) and manifest.json to {args.out}")
    return manifest


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGUSR1, _interrupt)
    try:
        main()
    except UserError as exc:
        print(f"prepare_data: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        print(f"prepare_data: interrupted ({exc or 'Ctrl-C'}); the finished shards are kept: rerun the same "
              "command to resume", file=sys.stderr)
        sys.exit(130)
