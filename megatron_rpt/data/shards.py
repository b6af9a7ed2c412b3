"""Prepared data: scored documents in Parquet shards plus a ``manifest.json``.

Owns the on-disk format written by ``tools/prepare_data.py`` (:func:`prepare`) and read back by
:class:`PreparedCorpus`. A shard row is one *document*: its token ids and the proxy's top-k
entropy at every position (NaN at position 0). Problems are cut from it at load time, so the
prompt template, context length, entropy threshold and positions per document can change without
re-scoring; only the tokenizer is fixed (checked through ``vocab_hash``).

Everything is written to a temporary name and renamed; the manifest is written last, so a
directory without ``manifest.json`` is an unfinished run and is refused.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megatron_rpt.atomic import atomic_output_dir, write_json_atomic
from megatron_rpt.config import ConfigError
from megatron_rpt.data.corpus import CorpusStream, open_sources
from megatron_rpt.data.entropy_filter import ProxyScorer, split_names
from megatron_rpt.data.tokenizer import encode_document, token_byte_table, tokenizer_hash, vocab_hash
from megatron_rpt.reward import writable_prefix_tokens

__all__ = ["FORMAT", "VERSION", "ScoredDoc", "prepare", "load_manifest", "PreparedCorpus", "write_json_atomic",
           "is_prepared_dir"]

FORMAT = "megatron-rpt-prepared"
VERSION = 1
MANIFEST = "manifest.json"


@dataclass
class ScoredDoc:
    doc_id: str
    token_ids: list[int]
    entropy: np.ndarray | None  # float32 per position, NaN at 0; None = not scored


def _write_shard(path: Path, docs: Sequence[ScoredDoc]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "doc_id": pa.array([d.doc_id for d in docs], pa.string()),
        "token_ids": pa.array([d.token_ids for d in docs], pa.list_(pa.int32())),
        "entropy": pa.array([d.entropy.astype(np.float32) for d in docs], pa.list_(pa.float32())),
    })
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def is_prepared_dir(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


def load_manifest(path: str | os.PathLike) -> dict[str, Any]:
    d = Path(path)
    if not d.is_dir():
        raise ConfigError(f"prepared data directory {str(path)!r} does not exist; run tools/prepare_data.py")
    m = d / MANIFEST
    if not m.is_file():
        raise ConfigError(f"{d} has no {MANIFEST}: tools/prepare_data.py did not finish there; re-run it")
    try:
        manifest = json.loads(m.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{m} is not valid JSON ({exc}); re-run tools/prepare_data.py") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ConfigError(f"{m} is not a {FORMAT} v{VERSION} manifest (got {manifest.get('format')} "
                         f"v{manifest.get('version')}); re-run tools/prepare_data.py")
    for s in manifest["shards"]:
        if not (d / s["file"]).is_file():
            raise ConfigError(f"shard {s['file']} listed in {m} is missing; re-run tools/prepare_data.py")
    return manifest


def _add_counts(counts: dict[str, int], entropy: np.ndarray, threshold: float, thresholds: Sequence[float]) -> None:
    vals = entropy[np.isfinite(entropy)]
    counts["scored"] = counts.get("scored", 0) + int(vals.size)
    counts["kept"] = counts.get("kept", 0) + int((vals > threshold).sum())
    for name, th in zip(split_names(thresholds), thresholds):
        counts[name] = counts.get(name, 0) + int((vals > th).sum())


# How a boxed answer is read (rl.box_escapes): both rules are counted so that the choice is informed.
_BOX_RULES = (("boxed_escapes", True), ("boxed_no_escapes", False))


def _add_unwinnable(acc: dict[str, Any], token_bytes: Sequence[bytes], entropy: np.ndarray,
                    thresholds: Sequence[float]) -> None:
    """Count the scored positions whose ground truth (the rest of the document) no boxed answer can
    win, and those its first token alone cannot, per split and brace rule (reward.writable_prefix_tokens)."""
    names = split_names(thresholds)
    for t in range(1, len(token_bytes)):
        if not np.isfinite(entropy[t]):
            continue
        where = ["all"] + [n for n, th in zip(names, thresholds) if entropy[t] > th]
        for rule, escapes in _BOX_RULES:
            writable = writable_prefix_tokens(itertools.islice(token_bytes, t, None), "boxed", escapes)
            for kind, hit in (("never", writable is None), ("not_first_token", writable != 1)):
                if hit:
                    for name in where:
                        acc[rule][kind][name] += 1


def _unwinnable_acc(thresholds: Sequence[float]) -> dict[str, Any]:
    zero = lambda: {n: 0 for n in ("all", *split_names(thresholds))}  # noqa: E731
    return {rule: {"never": zero(), "not_first_token": zero()} for rule, _ in _BOX_RULES}


def prepare(inputs: Sequence[str | os.PathLike], tokenizer: Any, tokenizer_dir: str | os.PathLike,
            proxy: ProxyScorer, out_dir: str | os.PathLike, text_fields: Sequence[str] = ("problem", "solution"),
            text_separator: str = "\n\n", max_docs: int | None = None, shard_size: int = 1024,
            threshold: float = 0.5, difficulty_thresholds: Sequence[float] = (0.5, 1.0, 1.5),
            docs_per_batch: int = 32, progress: bool = True) -> dict[str, Any]:
    """Tokenise and score ``inputs``; write Parquet shards and the manifest to ``out_dir``.

    Returns the manifest. ``out_dir`` must be absent or empty; it appears only when complete.
    """
    final = Path(out_dir)
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise FileExistsError(f"output directory {final} is not empty; choose a new --out or delete it")
    if shard_size < 1:
        raise ValueError(f"--shard-size={shard_size} must be >= 1")
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"--max-docs={max_docs} must be >= 1")
    sources = open_sources(list(inputs))
    # Built in a sibling directory renamed into place at the very end (atomic_output_dir).
    with atomic_output_dir(final) as out:
        return _prepare_into(out, sources, tokenizer, tokenizer_dir, proxy, text_fields, text_separator,
                             max_docs, shard_size, threshold, difficulty_thresholds, docs_per_batch, progress)


def _prepare_into(out: Path, sources: list[Any], tokenizer: Any, tokenizer_dir: str | os.PathLike,
                  proxy: ProxyScorer, text_fields: Sequence[str], text_separator: str, max_docs: int | None,
                  shard_size: int, threshold: float, difficulty_thresholds: Sequence[float], docs_per_batch: int,
                  progress: bool) -> dict[str, Any]:
    from tqdm import tqdm

    corpus = CorpusStream(sources, text_fields, text_separator)
    known = [s.num_rows() for s in sources]
    total = sum(known) if all(k is not None for k in known) else None  # type: ignore[misc]
    if max_docs is not None:
        total = min(total, max_docs) if total is not None else max_docs

    shards: list[dict[str, Any]] = []
    pending: list[ScoredDoc] = []
    counts: dict[str, int] = {"scored": 0, "kept": 0, **{n: 0 for n in split_names(difficulty_thresholds)}}
    unwinnable = _unwinnable_acc(difficulty_thresholds)
    table = token_byte_table(tokenizer)
    num_docs = num_tokens = 0

    def flush() -> None:
        if not pending:
            return
        name = f"shard-{len(shards):05d}.parquet"
        _write_shard(out / name, pending)
        shards.append({"file": name, "docs": len(pending), "tokens": int(sum(len(d.token_ids) for d in pending))})
        pending.clear()

    def score(batch: list[tuple[str, list[int]]]) -> None:
        for (doc_id, ids), ent in zip(batch, proxy.score([ids for _, ids in batch])):
            pending.append(ScoredDoc(doc_id, ids, ent))
            _add_counts(counts, ent, threshold, difficulty_thresholds)
            _add_unwinnable(unwinnable, [table[i] for i in ids], ent, difficulty_thresholds)
            if len(pending) >= shard_size:
                flush()

    batch: list[tuple[str, list[int]]] = []
    bar = tqdm(total=total, desc="scoring documents", unit="doc", disable=not progress)
    for doc in corpus:
        ids = encode_document(tokenizer, doc.text)
        batch.append((doc.doc_id, ids))
        num_docs += 1
        num_tokens += len(ids)
        if len(batch) >= docs_per_batch:
            score(batch)
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{proxy.tokens_scored / max(proxy.seconds, 1e-9):.0f}")
            batch = []
        if max_docs is not None and num_docs >= max_docs:
            break
    if batch:
        score(batch)
        bar.update(len(batch))
    bar.close()
    flush()
    if num_docs == 0:
        raise ValueError(f"no usable documents in {[s.name for s in sources]} (bad rows: "
                         f"{corpus.bad_rows.state_dict()}); check --text-fields")

    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "num_docs": num_docs,
        "num_tokens": num_tokens,
        "shards": shards,
        "counts": counts,
        "counts_note": "positions (tokens after the first of each document) with entropy above each threshold; "
                       "splits are nested (every hard position is also medium and easy)",
        "unwinnable": unwinnable,
        "unwinnable_note": "scored positions (as in counts) whose ground truth, the rest of the document, no "
                           "\\boxed{} answer can win (never) or the first token alone cannot (not_first_token), "
                           "with rl.box_escapes=true (boxed_escapes) and false; rl.answer_format=raw can win all",
        "threshold": threshold,
        "difficulty_thresholds": list(difficulty_thresholds),
        "top_k": proxy.top_k,
        "entropy_unit": "nats",
        "proxy": {"path": str(proxy.path), "config_hash": proxy.config_hash,
                  "dtype": str(proxy.dtype).replace("torch.", ""), "max_seq_len": proxy.max_seq_len},
        "tokenizer": {"path": str(tokenizer_dir), "hash": tokenizer_hash(tokenizer_dir),
                      "vocab_hash": vocab_hash(tokenizer)},
        "sources": [s.describe() for s in sources],
        "text_fields": list(text_fields),
        "text_separator": text_separator,
        "bad_rows": corpus.bad_rows.state_dict(),
        "max_docs": max_docs,
    }
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


class PreparedCorpus:
    """Scored documents of one shard of a prepared directory, in a seeded per-epoch order, resumable.

    The order (which parquet file first, which row first inside it) is a permutation seeded by
    ``(seed, epoch)`` when ``shuffle``; documents are then striped over ``num_shards`` readers.
    """

    def __init__(self, path: str | os.PathLike, shard: int = 0, num_shards: int = 1,
                 keep: Callable[[str], bool] | None = None, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                 manifest: dict[str, Any] | None = None):
        self.path = Path(path)
        self.manifest = manifest or load_manifest(path)
        self.shard, self.num_shards, self.keep = shard, num_shards, keep
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        files = self.manifest["shards"]
        self._order = list(range(len(files)))
        if shuffle:
            random.Random(f"{seed}:{epoch}:shards").shuffle(self._order)
        self._cursor = {"order_pos": 0, "row_pos": 0}

    def doc_ids(self) -> list[str]:
        """Every document id of the prepared set, in manifest order (for the held-out split)."""
        import pyarrow.parquet as pq

        ids: list[str] = []
        for s in self.manifest["shards"]:
            ids.extend(pq.read_table(self.path / s["file"], columns=["doc_id"]).column("doc_id").to_pylist())
        return ids

    def _rows(self, k: int) -> list[int]:
        n = self.manifest["shards"][self._order[k]]["docs"]
        rows = list(range(n))
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}:{self._order[k]}").shuffle(rows)
        return rows

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": dict(self._cursor), "epoch": self.epoch, "num_docs": self.manifest["num_docs"]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("num_docs") != self.manifest["num_docs"] or state.get("epoch") != self.epoch:
            raise ValueError("the prepared data changed since this state was saved (document count or epoch "
                             "differ); resume with the same data.prepared directory")
        self._cursor = dict(state["cursor"])

    def __iter__(self) -> Iterator[ScoredDoc]:
        import pyarrow.parquet as pq

        files = self.manifest["shards"]
        offsets = np.cumsum([0] + [files[i]["docs"] for i in self._order])
        while self._cursor["order_pos"] < len(self._order):
            k = self._cursor["order_pos"]
            rows = self._rows(k)
            table = None
            for j in range(self._cursor["row_pos"], len(rows)):
                self._cursor = {"order_pos": k, "row_pos": j + 1}
                if (int(offsets[k]) + j) % self.num_shards != self.shard:
                    continue
                if table is None:
                    table = pq.read_table(self.path / files[self._order[k]]["file"])
                    doc_ids = table.column("doc_id")
                r = rows[j]
                doc_id = doc_ids[r].as_py()
                if self.keep is not None and not self.keep(doc_id):
                    continue
                ids = table.column("token_ids")[r].as_py()
                ent = np.asarray(table.column("entropy")[r].values.to_numpy(zero_copy_only=False), dtype=np.float32)
                yield ScoredDoc(doc_id, ids, ent)
            self._cursor = {"order_pos": k + 1, "row_pos": 0}
