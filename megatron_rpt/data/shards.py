"""Prepared data: scored documents in Parquet shards plus a ``manifest.json``.

Owns the on-disk format written by ``tools/prepare_data.py`` (through
:mod:`megatron_rpt.data.scoring`) and read back by :class:`PreparedCorpus`. A shard row is one
*document*: its id, the mixture corpus it came from (v2; "" outside a mixture), its token ids and
the proxy's top-k entropy at every position (NaN at position 0). Problems are cut from it at load
time, so the prompt template, context length, entropy threshold and positions per document can
change without re-scoring; only the tokenizer is fixed (checked through ``vocab_hash``).

Every shard is written to a temporary name and renamed; the manifest is written last, so a
directory without ``manifest.json`` is an unfinished run and is refused.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megatron_rpt.atomic import write_json_atomic
from megatron_rpt.config import ConfigError

__all__ = ["FORMAT", "VERSION", "ScoredDoc", "write_shard", "load_manifest", "PreparedCorpus", "write_json_atomic",
           "is_prepared_dir", "MANIFEST"]

FORMAT = "megatron-rpt-prepared"
VERSION = 2  # 2: a corpus column, mixture and per-shard sha256 in the manifest; 1 is still read
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"


@dataclass
class ScoredDoc:
    doc_id: str
    token_ids: list[int]
    entropy: np.ndarray | None  # float32 per position, NaN at 0; None = not scored
    corpus: str = ""  # the data.mixture corpus ("" outside a mixture)


def write_shard(path: Path, docs: Sequence[ScoredDoc]) -> None:
    """One Parquet shard, through a temporary sibling and one rename (removed when writing fails)."""
    import pyarrow as pa  # lazy: optional dependency (pyarrow), Parquet only
    import pyarrow.parquet as pq  # lazy: optional dependency (pyarrow), Parquet only

    table = pa.table({
        "doc_id": pa.array([d.doc_id for d in docs], pa.string()),
        "corpus": pa.array([d.corpus for d in docs], pa.string()),
        "token_ids": pa.array([d.token_ids for d in docs], pa.list_(pa.int32())),
        "entropy": pa.array([d.entropy.astype(np.float32) for d in docs], pa.list_(pa.float32())),
    })
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    if manifest.get("format") != FORMAT or manifest.get("version") not in READABLE_VERSIONS:
        raise ConfigError(f"{m} is not a {FORMAT} v{VERSION} manifest (got {manifest.get('format')} "
                         f"v{manifest.get('version')}); re-run tools/prepare_data.py")
    for s in manifest["shards"]:
        if not (d / s["file"]).is_file():
            raise ConfigError(f"shard {s['file']} listed in {m} is missing; re-run tools/prepare_data.py")
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
        import pyarrow.parquet as pq  # lazy: optional dependency (pyarrow), Parquet only

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
        import pyarrow.parquet as pq  # lazy: optional dependency (pyarrow), Parquet only

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
                corpus = table.column("corpus")[r].as_py() if "corpus" in table.column_names else ""
                yield ScoredDoc(doc_id, ids, ent, corpus)
            self._cursor = {"order_pos": k + 1, "row_pos": 0}
