"""Scoring a corpus mixture into prepared shards: N workers, resumable, one merged manifest.

Owns :func:`prepare` (everything one worker does), :class:`ScoringSettings`, :func:`run_identity`
(what ``run.json`` pins) and :func:`merge` (the manifest). The on-disk state is
:mod:`megatron_rpt.data.run_state`'s; the document sequence is :mod:`megatron_rpt.data.mixture`'s.

Work split: position ``n`` of the sequence lies in shard ``n // shard_size``; worker ``w`` of ``N``
scores the shards ``k`` with ``k % N == w``, skipping those already done. Every worker reads the
whole sequence (cheap: no tokenising, no model) and tokenises and scores only its own documents.
A shard's bytes depend only on its documents, the proxy and the settings ``run.json`` pins: its
documents are scored in fixed groups of ``docs_per_batch``, whoever scores them. So the shards and
the manifest are the same for any N and any sequence of kills and reruns (on one device type and
dtype; on CPU, BLAS could in principle round differently at another thread count).

Whoever finishes its last shard and finds every shard done merges the progress records into
``manifest.json`` (two finishing at once write the same bytes); a killed merge is redone by the
rerun. The manifest has no timestamps or worker details, for the same reason.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from megatron_rpt.atomic import write_json_atomic
from megatron_rpt.config import ConfigError
from megatron_rpt.data.corpus import Document
from megatron_rpt.data.entropy_filter import ProxyScorer, split_names
from megatron_rpt.data.mixture import Mixture, mixture_spec
from megatron_rpt.data.run_state import (
    append_progress,
    claim_output,
    fingerprint,
    fingerprint_files,
    lock_worker,
    progress_path,
    read_progress,
)
from megatron_rpt.data.shards import (
    FORMAT,
    MANIFEST,
    VERSION,
    ScoredDoc,
    load_manifest,
    write_shard,
)
from megatron_rpt.data.tokenizer import encode_document, token_byte_table, tokenizer_hash, vocab_hash
from megatron_rpt.errors import UserError
from megatron_rpt.reward import writable_prefix_tokens
from megatron_rpt.trainer.ckpt_manifest import file_digest
from megatron_rpt.trainer.run_lock import pid_alive

__all__ = ["ScoringSettings", "prepare", "run_identity", "merge", "PROXY_WEIGHT_SUFFIXES"]

log = logging.getLogger(__name__)

PROXY_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
COUNTS_NOTE = ("positions (tokens after the first of each document) with entropy above each threshold; splits are "
               "nested (every hard position is also medium and easy)")


@dataclass(frozen=True)
class ScoringSettings:
    """The settings that change a shard's bytes or the manifest's counts (all pinned in run.json)."""

    shard_size: int = 1024
    docs_per_batch: int = 32
    threshold: float = 0.5
    difficulty_thresholds: tuple[float, ...] = (0.5, 1.0, 1.5)

    def check(self) -> None:
        if self.shard_size < 1 or self.docs_per_batch < 1:
            raise ConfigError(f"--shard-size={self.shard_size} and docs per batch={self.docs_per_batch} must be >= 1")
        if list(self.difficulty_thresholds) != sorted(self.difficulty_thresholds):
            raise ConfigError(f"--difficulty-thresholds {list(self.difficulty_thresholds)} must be increasing, "
                              "e.g. 0.5 1.0 1.5")


def run_identity(mixture: Mixture, proxy: ProxyScorer, tokenizer: Any, tokenizer_dir: str | os.PathLike,
                 settings: ScoringSettings) -> dict[str, Any]:
    """What makes two runs the same run: a rerun into the same ``--out`` must match it exactly."""
    proxy_files = sorted(f for f in proxy.path.iterdir()
                         if f.name == "config.json" or f.suffix in PROXY_WEIGHT_SUFFIXES)
    return {
        "mixture": {**mixture_spec(mixture.corpora, mixture.dedup), "max_docs": mixture.max_docs},
        "inputs": fingerprint_files([p for c in mixture.corpora for p in c.paths]),
        "proxy": {"files": {f.name: fingerprint(f) for f in proxy_files}, "dtype": str(proxy.dtype),
                  "device": proxy.device.type, "top_k": proxy.top_k, "max_seq_len": proxy.max_seq_len,
                  "rows_per_batch": proxy.rows_per_batch, "packing": proxy.packing},
        "tokenizer": {"hash": tokenizer_hash(tokenizer_dir), "vocab_hash": vocab_hash(tokenizer)},
        "scoring": dataclasses.asdict(settings),
    }


def _check_vocab(tokenizer: Any, proxy: ProxyScorer) -> None:
    if len(tokenizer) > proxy.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the proxy {proxy.path} only "
                          f"{proxy.vocab_size} (vocab_size): it does not use this tokenizer; give --proxy a model "
                          "with the tokenizer's vocabulary")


def prepare(mixture: Mixture, tokenizer: Any, tokenizer_dir: str | os.PathLike, proxy: ProxyScorer,
            out_dir: str | os.PathLike, settings: ScoringSettings = ScoringSettings(), worker: int = 0,
            num_workers: int = 1, progress: bool = True) -> dict[str, Any] | None:
    """Score worker ``worker``'s shards of ``mixture`` into ``out_dir``; merge when every shard is done.

    Returns the manifest when the run is complete (merged now, or found complete), else None
    (other workers still have shards to score). Bad inputs raise before anything is written.
    """
    settings.check()
    _check_vocab(tokenizer, proxy)
    mixture.check_usable()
    out = Path(out_dir).absolute()
    claim_output(out, run_identity(mixture, proxy, tokenizer, tokenizer_dir, settings))
    if (out / MANIFEST).is_file():
        log.info("%s is already complete (manifest.json); nothing to do", out)
        return load_manifest(out)
    lock = lock_worker(out, worker)
    try:
        total = _score_own_shards(out, mixture, tokenizer, proxy, settings, worker, num_workers, progress)
        return merge(out, mixture, proxy, tokenizer, tokenizer_dir, settings, total)
    finally:
        lock.release()


def _score_own_shards(out: Path, mixture: Mixture, tokenizer: Any, proxy: ProxyScorer, settings: ScoringSettings,
                      worker: int, num_workers: int, progress: bool) -> int:
    """Score this worker's unfinished shards; return the length of the sequence."""
    size = settings.shard_size
    done = read_progress(out)
    bar = tqdm(desc=f"worker {worker}/{num_workers} scoring", unit="doc", disable=not progress)
    pending: list[Document] = []
    total = 0
    for n, doc in mixture:
        total = n + 1
        k = n // size
        if k % num_workers != worker or k in done:
            continue
        pending.append(doc)
        if len(pending) == size:
            _score_shard(out, k, pending, tokenizer, proxy, settings, worker, num_workers)
            bar.update(len(pending))
            bar.set_postfix(tok_s=f"{proxy.tokens_scored / max(proxy.seconds, 1e-9):.0f}")
            pending = []
    if pending:
        _score_shard(out, (total - 1) // size, pending, tokenizer, proxy, settings, worker, num_workers)
        bar.update(len(pending))
    bar.close()
    return total


def _counts(entropies: Sequence[np.ndarray], settings: ScoringSettings) -> dict[str, int]:
    vals = np.concatenate([e[np.isfinite(e)] for e in entropies]) if entropies else np.zeros(0)
    counts = {"scored": int(vals.size), "kept": int((vals > settings.threshold).sum())}
    for name, th in zip(split_names(settings.difficulty_thresholds), settings.difficulty_thresholds):
        counts[name] = int((vals > th).sum())
    return counts


# How a boxed answer is read (rl.box_escapes): both rules are counted so that the choice is informed.
_BOX_RULES = (("boxed_escapes", True), ("boxed_no_escapes", False))
UNWINNABLE_NOTE = ("scored positions (as in counts) whose ground truth, the rest of the document, no \\boxed{} answer "
                   "can win (never) or the first token alone cannot (not_first_token), with rl.box_escapes=true "
                   "(boxed_escapes) and false; rl.answer_format=raw can win all")


def _unwinnable(token_ids: Sequence[list[int]], entropies: Sequence[np.ndarray], table: Sequence[bytes],
                settings: ScoringSettings) -> dict[str, Any]:
    """Count the scored positions whose ground truth (the rest of the document) no boxed answer can
    win, and those its first token alone cannot, per split and brace rule (reward.writable_prefix_tokens)."""
    names = split_names(settings.difficulty_thresholds)
    zero = lambda: {n: 0 for n in ("all", *names)}  # noqa: E731
    acc = {rule: {"never": zero(), "not_first_token": zero()} for rule, _ in _BOX_RULES}
    for ids, entropy in zip(token_ids, entropies):
        token_bytes = [table[i] for i in ids]
        for t in range(1, len(token_bytes)):
            if not np.isfinite(entropy[t]):
                continue
            where = ["all"] + [n for n, th in zip(names, settings.difficulty_thresholds) if entropy[t] > th]
            for rule, escapes in _BOX_RULES:
                writable = writable_prefix_tokens(itertools.islice(token_bytes, t, None), "boxed", escapes)
                for kind, hit in (("never", writable is None), ("not_first_token", writable != 1)):
                    if hit:
                        for name in where:
                            acc[rule][kind][name] += 1
    return acc


def _add_nested(total: dict[str, Any], part: dict[str, Any]) -> None:
    for key, v in part.items():
        if isinstance(v, dict):
            _add_nested(total.setdefault(key, {}), v)
        else:
            total[key] = total.get(key, 0) + v


def _score_shard(out: Path, k: int, docs: list[Document], tokenizer: Any, proxy: ProxyScorer,
                 settings: ScoringSettings, worker: int, num_workers: int) -> None:
    """Tokenise, score in fixed groups, write the shard (atomic), then record it: from then on it is done."""
    started, seconds, scored_tokens = time.time(), proxy.seconds, proxy.tokens_scored
    ids = [encode_document(tokenizer, d.text) for d in docs]
    entropies: list[np.ndarray] = []
    for i in range(0, len(ids), settings.docs_per_batch):
        entropies.extend(proxy.score(ids[i:i + settings.docs_per_batch]))
    name = f"shard-{k:05d}.parquet"
    _remove_dead_tmp(out, name)
    write_shard(out / name, [ScoredDoc(d.doc_id, x, e, d.corpus) for d, x, e in zip(docs, ids, entropies)])
    nbytes, sha = file_digest(out / name)
    corpora: dict[str, dict[str, int]] = {}
    for d, x in zip(docs, ids):
        c = corpora.setdefault(d.corpus, {"docs": 0, "tokens": 0})
        c["docs"] += 1
        c["tokens"] += len(x)
    record = {"shard": k, "file": name, "docs": len(docs), "tokens": sum(len(x) for x in ids), "bytes": nbytes,
              "sha256": sha, "counts": _counts(entropies, settings),
              "unwinnable": _unwinnable(ids, entropies, token_byte_table(tokenizer), settings), "corpora": corpora,
              "worker": worker,
              "num_workers": num_workers, "host": socket.gethostname(), "pid": os.getpid(), "started": started,
              "finished": time.time(), "scoring_seconds": proxy.seconds - seconds,
              "scored_tokens": proxy.tokens_scored - scored_tokens}
    append_progress(progress_path(out, worker), record)
    log.info("worker %d/%d: %s (%d docs, %d tokens) in %.1f s", worker, num_workers, name, len(docs),
             record["tokens"], record["finished"] - started)


def _remove_dead_tmp(out: Path, name: str) -> None:
    """Temporary files of ``name`` left by a killed writer on this host (a live one's are kept)."""
    for tmp in out.glob(f".{name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def merge(out: Path, mixture: Mixture, proxy: ProxyScorer, tokenizer: Any, tokenizer_dir: str | os.PathLike,
          settings: ScoringSettings, total_docs: int) -> dict[str, Any] | None:
    """Write ``manifest.json`` when every shard of the sequence is done (verified); else None."""
    n_shards = -(-total_docs // settings.shard_size)
    done = read_progress(out)
    missing = [k for k in range(n_shards) if k not in done]
    if missing:
        log.info("%d of %d shards done; the other workers are scoring the rest (e.g. shard %d); the last one "
                 "to finish writes manifest.json", n_shards - len(missing), n_shards, missing[0])
        return None
    shards = [_verified(out, done[k]) for k in range(n_shards)]
    if sum(s["docs"] for s in shards) != total_docs:
        raise UserError(f"the shards of {out} hold {sum(s['docs'] for s in shards)} documents but the sequence has "
                        f"{total_docs}; this output is inconsistent: choose a new --out")
    counts: dict[str, int] = {}
    unwinnable: dict[str, Any] = {}
    for k in range(n_shards):
        for key, v in done[k]["counts"].items():
            counts[key] = counts.get(key, 0) + v
        _add_nested(unwinnable, done[k]["unwinnable"])
    drawn = mixture.describe()
    for c in drawn["corpora"]:
        c["tokens"] = sum(s["corpora"].get(c["name"], {}).get("tokens", 0) for s in shards)
    num_tokens = sum(s["tokens"] for s in shards)
    for c in drawn["corpora"]:
        c["token_share"] = c["tokens"] / num_tokens if num_tokens else 0.0
    bad: dict[str, int] = {}
    for c in drawn["corpora"]:
        for reason, v in c["bad_rows"].items():
            bad[reason] = bad.get(reason, 0) + v
    single = not mixture.named
    manifest = {
        "format": FORMAT, "version": VERSION, "num_docs": total_docs, "num_tokens": num_tokens,
        "shard_size": settings.shard_size, "shards": shards, "counts": counts, "counts_note": COUNTS_NOTE,
        "unwinnable": unwinnable, "unwinnable_note": UNWINNABLE_NOTE,
        "threshold": settings.threshold, "difficulty_thresholds": list(settings.difficulty_thresholds),
        "top_k": proxy.top_k, "entropy_unit": "nats",
        "proxy": {"path": str(proxy.path), "config_hash": proxy.config_hash,
                  "dtype": str(proxy.dtype).replace("torch.", ""), "max_seq_len": proxy.max_seq_len},
        "tokenizer": {"path": str(tokenizer_dir), "hash": tokenizer_hash(tokenizer_dir),
                      "vocab_hash": vocab_hash(tokenizer)},
        "sources": [s for c in drawn["corpora"] for s in c["sources"]],
        "text_fields": list(mixture.corpora[0].text_fields) if single else None,
        "text_separator": mixture.corpora[0].text_separator if single else None,
        "bad_rows": bad, "max_docs": mixture.max_docs,
        "mixture": drawn if mixture.named else None,
        "mixture_spec": mixture_spec(mixture.corpora, mixture.dedup) if mixture.named else None,
    }
    manifest = json.loads(json.dumps(manifest))
    write_json_atomic(out / MANIFEST, manifest)
    for tmp in out.glob(".shard-*.tmp-*"):  # every shard is done: these belong to killed writers
        tmp.unlink(missing_ok=True)
    log.info("merged %d shards into %s", n_shards, out / MANIFEST)
    return manifest


def _verified(out: Path, rec: dict[str, Any]) -> dict[str, Any]:
    """The manifest entry of one shard, after checking its bytes against its progress record."""
    path = out / rec["file"]
    _, sha = file_digest(path)
    if sha != rec["sha256"]:
        path.unlink(missing_ok=True)
        raise UserError(f"shard {path} changed after it was written (sha256 {sha[:12]}... is not the recorded "
                        f"{rec['sha256'][:12]}...); it was removed: rerun the same command to score it again")
    return {k: rec[k] for k in ("file", "docs", "tokens", "bytes", "sha256", "corpora")}
