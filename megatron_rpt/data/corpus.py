"""Streaming text documents out of JSONL / Parquet files and Hugging Face datasets.

Owns: finding the sources (:func:`open_sources`), turning a row into document text
(``data.text_fields`` joined by ``data.text_separator``), counting and skipping bad rows,
deterministic sharding by (data-parallel rank, dataloader worker), the held-out document split
(:func:`heldout_doc_ids`) and resumable iteration (:class:`CorpusStream`).

Every row has a stable id ``"<source name>:<row index>"`` (row = line number for JSONL, counting
blank and bad lines too) that does not depend on sharding or on where the data lives. Sharding is a
stride over the global row index (over all sources in order), decided before a row is parsed, so
each rank parses only its own rows.

Resuming is exact and cheap: the cursor is (source index, row, byte offset) for JSONL (a seek),
(source, row) for Parquet (row-group arithmetic) and local ``datasets``, and the library's own
``IterableDataset.state_dict()`` for ``streaming=True`` datasets.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_rpt.config import ConfigError

__all__ = [
    "Document",
    "CorpusStream",
    "BadRows",
    "open_sources",
    "heldout_doc_ids",
    "doc_hash",
    "row_text",
]

logger = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str
    corpus: str = ""  # the data.mixture corpus it was drawn from ("" outside a mixture)


# ----------------------------------------------------------------------------- bad rows


class BadRows:
    """Counts skipped rows by reason; warns about the first one and then at most every 30 s."""

    def __init__(self, interval_s: float = 30.0):
        self.counts: Counter[str] = Counter()
        self._interval_s = interval_s
        self._last_warn = -float("inf")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, reason: str, doc_id: str) -> None:
        self.counts[reason] += 1
        now = time.monotonic()
        if now - self._last_warn >= self._interval_s:
            self._last_warn = now
            logger.warning("skipping bad row %s (%s); %d bad rows so far: %s", doc_id, reason, self.total,
                           dict(self.counts))

    def state_dict(self) -> dict[str, int]:
        return dict(self.counts)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.counts = Counter({str(k): int(v) for k, v in state.items()})


def row_text(row: Any, text_fields: Sequence[str], separator: str) -> tuple[str | None, str | None]:
    """(text, None) for a usable row, (None, reason) for a bad one."""
    if not isinstance(row, dict):
        return None, "not_an_object"
    parts = []
    for field in text_fields:
        value = row.get(field)
        if value is None:
            return None, f"missing_field:{field}"
        if not isinstance(value, str):
            return None, f"not_a_string:{field}"
        parts.append(value)
    if not any(p.strip() for p in parts):  # the separator alone is not text
        return None, "empty_text"
    text = separator.join(parts)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from "\ud800"-style JSON escapes
        return None, "non_utf8"
    return text, None


# ----------------------------------------------------------------------------- sources
# A source yields (row index, raw row, cursor after the row); ``parse`` turns a raw row into a
# Python object (or raises ValueError naming the reason).


class _Source:
    name: str

    def num_rows(self) -> int | None:
        raise NotImplementedError

    def rows(self, cursor: dict[str, Any]) -> Iterator[tuple[int, Any, dict[str, Any]]]:
        raise NotImplementedError

    def parse(self, raw: Any) -> Any:
        return raw

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "rows": self.num_rows()}


class _JsonlSource(_Source):
    def __init__(self, path: Path, name: str):
        self.path, self.name = path, name
        self._num_rows: int | None = None

    def num_rows(self) -> int:
        if self._num_rows is None:
            count, last = 0, b"\n"
            with open(self.path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    count += chunk.count(b"\n")
                    last = chunk[-1:]
            self._num_rows = count + (0 if last == b"\n" else 1)
        return self._num_rows

    def rows(self, cursor):
        row, offset = int(cursor.get("row", 0)), int(cursor.get("offset", 0))
        with open(self.path, "rb") as f:
            f.seek(offset)
            while True:
                line = f.readline()
                if not line:
                    return
                offset += len(line)
                yield row, line, {"row": row + 1, "offset": offset}
                row += 1

    def parse(self, raw: bytes) -> Any:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("non_utf8") from None
        if not line.strip():
            return _BLANK
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            raise ValueError("not_json") from None

    def describe(self):
        return {"name": self.name, "path": str(self.path), "rows": self.num_rows(), "bytes": self.path.stat().st_size}


class _ParquetSource(_Source):
    def __init__(self, path: Path, name: str):
        import pyarrow.parquet as pq  # lazy: optional dependency (pyarrow), Parquet only

        self.path, self.name = path, name
        try:
            self._file = pq.ParquetFile(path)
        except Exception as exc:
            raise ConfigError(f"{path} is not a readable Parquet file ({exc}); fix or remove it from data.paths"
                              ) from None
        self.columns: list[str] | None = None  # None = all; CorpusStream narrows it to the text fields

    def use_columns(self, columns: Sequence[str]) -> None:
        names = set(self._file.schema_arrow.names)
        self.columns = [c for c in columns if c in names]
        missing = [c for c in columns if c not in names]
        if missing:
            logger.warning("%s has no column(s) %s (data.text_fields); its rows will be skipped as bad rows",
                           self.path, missing)

    def num_rows(self) -> int:
        return self._file.metadata.num_rows

    def rows(self, cursor):
        start = int(cursor.get("row", 0))
        meta = self._file.metadata
        first_row = 0
        for rg in range(meta.num_row_groups):
            rg_rows = meta.row_group(rg).num_rows
            if first_row + rg_rows <= start:
                first_row += rg_rows
                continue
            table = self._file.read_row_group(rg, columns=self.columns)
            # With none of the text columns present every row is bad; keep the row count right.
            records = table.to_pylist() if self.columns != [] else [{}] * rg_rows
            for i, raw in enumerate(records):
                row = first_row + i
                if row < start:
                    continue
                yield row, raw, {"row": row + 1}
            first_row += rg_rows

    def describe(self):
        return {"name": self.name, "path": str(self.path), "rows": self.num_rows(), "bytes": self.path.stat().st_size}


class _HFSource(_Source):
    """A ``datasets.Dataset`` (random access) or ``IterableDataset`` (streaming)."""

    def __init__(self, dataset: Any, name: str):
        self.dataset, self.name = dataset, name
        self.streaming = not hasattr(dataset, "__len__")
        # load_state_dict() makes every later iteration start from the loaded point, so a fresh
        # pass must explicitly load the state of "nothing read yet".
        self._initial_state = dataset.state_dict() if self.streaming and hasattr(dataset, "state_dict") else None

    def num_rows(self) -> int | None:
        if not self.streaming:
            return len(self.dataset)
        return None

    def rows(self, cursor):
        row = int(cursor.get("row", 0))
        if not self.streaming:
            n = len(self.dataset)
            for batch_start in range(row, n, 256):
                batch = self.dataset[batch_start:min(batch_start + 256, n)]
                keys = list(batch)
                for i in range(len(batch[keys[0]]) if keys else 0):
                    r = batch_start + i
                    yield r, {k: batch[k][i] for k in keys}, {"row": r + 1}
            return
        ds = self.dataset
        if cursor.get("hf_state") is not None:
            ds.load_state_dict(cursor["hf_state"])
        else:
            if self._initial_state is not None:
                ds.load_state_dict(self._initial_state)
            if row:
                ds = ds.skip(row)  # no saved library state (e.g. a cursor written by hand): re-read
        for raw in ds:
            # The library state is taken lazily (CorpusStream.state_dict) because copying it per row
            # is wasteful; "_hf" tells the stream which dataset to ask.
            yield row, raw, {"row": row + 1, "_hf": ds}
            row += 1

    def describe(self):
        return {"name": self.name, "rows": self.num_rows(), "streaming": self.streaming}


class _Blank:
    pass


_BLANK = _Blank()


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (path / "dataset_info.json").is_file() and (
        (path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def _load_saved_dataset(path: Path, split: str) -> Any:
    import datasets  # lazy: optional dependency (datasets), HF datasets only

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ConfigError(f"dataset {path} has splits {list(ds)}, not data.hf_split={split!r}")
        ds = ds[split]
    return ds


def open_sources(paths: Sequence[str | os.PathLike] = (), hf_dataset: str | None = None,
                 hf_split: str = "train", hf_streaming: bool = True) -> list[_Source]:
    """Resolve ``data.paths`` (files, directories) or ``data.hf_dataset`` into ordered sources."""
    sources: list[_Source] = []
    for i, raw in enumerate(paths):
        p = Path(raw)
        if not p.exists():
            raise ConfigError(f"data.paths[{i}]={str(raw)!r} does not exist; fix the path")
        if _is_saved_dataset(p):
            sources.append(_HFSource(_load_saved_dataset(p, hf_split), f"{p.name}/{hf_split}"))
        elif p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES)
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))  # skip hidden
            if not files:
                raise ConfigError(f"data.paths[{i}]={str(raw)!r} is a directory without .jsonl/.json/.parquet "
                                  "files (nor a datasets.save_to_disk directory)")
            for f in files:
                sources.append(_file_source(f, f"{p.name}/{f.relative_to(p).as_posix()}"))
        else:
            sources.append(_file_source(p, p.name))
    if not paths and hf_dataset:
        p = Path(hf_dataset)
        if _is_saved_dataset(p):
            sources.append(_HFSource(_load_saved_dataset(p, hf_split), f"{p.name}/{hf_split}"))
        else:
            import datasets  # lazy: optional dependency (datasets), HF datasets only

            try:
                ds = datasets.load_dataset(hf_dataset, split=hf_split, streaming=hf_streaming)
            except Exception as exc:
                raise ConfigError(f"could not load data.hf_dataset={hf_dataset!r} split {hf_split!r}: {exc}") from exc
            sources.append(_HFSource(ds, f"{p.name or hf_dataset}/{hf_split}"))
    if not sources:
        raise ConfigError("no data: set data.paths (JSONL/Parquet files or directories), data.hf_dataset "
                          "or data.prepared")
    names = Counter(s.name for s in sources)
    dup = [n for n, c in names.items() if c > 1]
    if dup:
        raise ConfigError(f"two inputs share the name {dup[0]!r}, so their document ids would collide; "
                          "put them in differently named directories")
    return sources


def _file_source(path: Path, name: str) -> _Source:
    if path.name.endswith(PARQUET_SUFFIXES):
        return _ParquetSource(path, name)
    if path.name.endswith(JSONL_SUFFIXES):
        return _JsonlSource(path, name)
    raise ConfigError(f"{path}: unsupported file type; use .jsonl/.json (one JSON object per line) or .parquet")


# ----------------------------------------------------------------------------- held-out split


def doc_hash(doc_id: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()[:8], "big")


def heldout_doc_ids(sources: Sequence[_Source] | Sequence[str], n: int, seed: int) -> frozenset[str]:
    """The ``n`` documents held out for validation: smallest ``sha256(seed:doc_id)``.

    ``sources`` are corpus sources (all their row ids are candidates, bad rows included, so a bad
    row drawn here just leaves the validation set one short) or a list of document ids. When a
    streaming source has no known length the first ``n`` rows in stream order are held out instead
    (a hash rank needs the whole id list).
    """
    if n <= 0:
        return frozenset()
    if sources and isinstance(sources[0], str):
        ids: Iterator[str] = iter(sources)  # type: ignore[arg-type]
    else:
        srcs: Sequence[_Source] = sources  # type: ignore[assignment]
        if any(s.num_rows() is None for s in srcs):
            logger.warning("a streaming source has no known length: holding out its first %d rows as "
                           "the validation split instead of a hash-ranked sample", n)
            first = itertools.chain.from_iterable(
                (f"{s.name}:{r}" for r in range(s.num_rows() or n)) for s in srcs)
            return frozenset(itertools.islice(first, n))
        ids = itertools.chain.from_iterable((f"{s.name}:{r}" for r in range(s.num_rows())) for s in srcs)
    return frozenset(heapq.nsmallest(n, ids, key=lambda d: doc_hash(d, seed)))


# ----------------------------------------------------------------------------- the stream


class CorpusStream:
    """One pass over the documents of shard ``shard`` of ``num_shards``, resumable.

    ``keep(doc_id)`` filters rows before they are parsed (the train/validation split). Iterating
    yields :class:`Document`; :meth:`state_dict` is the cursor of the next row to read.
    """

    def __init__(self, sources: Sequence[_Source], text_fields: Sequence[str], separator: str = "\n\n",
                 shard: int = 0, num_shards: int = 1, keep: Callable[[str], bool] | None = None):
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard {shard} is not in [0, {num_shards})")
        if not text_fields:
            raise ConfigError("data.text_fields is empty; name the row field(s) holding the text, e.g. [text]")
        self.sources = list(sources)
        self.text_fields = list(text_fields)
        for src in self.sources:
            if isinstance(src, _ParquetSource):
                src.use_columns(self.text_fields)
        self.separator = separator
        self.shard, self.num_shards = shard, num_shards
        self.keep = keep
        self.bad_rows = BadRows()
        self._cursor: dict[str, Any] = {"source": 0, "row": 0, "offset": 0, "global": 0}
        self._live_hf: Any = None

    # -- resume
    def state_dict(self) -> dict[str, Any]:
        cursor = {k: v for k, v in self._cursor.items() if k != "_hf"}
        hf = self._cursor.get("_hf")
        if hf is not None:
            cursor["hf_state"] = hf.state_dict()
        return {"cursor": cursor, "sources": [s.name for s in self.sources], "bad_rows": self.bad_rows.state_dict(),
                "shard": self.shard, "num_shards": self.num_shards}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = [s.name for s in self.sources]
        if state.get("sources") != names:
            raise ValueError(f"the corpus changed since this state was saved (sources {state.get('sources')} "
                             f"!= {names}); restore the same data.paths or start the data stream afresh")
        if (state.get("shard"), state.get("num_shards")) != (self.shard, self.num_shards):
            raise ValueError(f"state is for shard {state.get('shard')}/{state.get('num_shards')}, this stream is "
                             f"{self.shard}/{self.num_shards}: resume with the same data-parallel size and workers")
        self._cursor = dict(state["cursor"])
        self.bad_rows.load_state_dict(state.get("bad_rows", {}))

    # -- iteration
    def __iter__(self) -> Iterator[Document]:
        while self._cursor["source"] < len(self.sources):
            src = self.sources[self._cursor["source"]]
            start = {k: v for k, v in self._cursor.items() if k in ("row", "offset", "hf_state")}
            base_global = self._cursor["global"] - int(start.get("row", 0))
            for row, raw, after in src.rows(start):
                g = base_global + row
                doc_id = f"{src.name}:{row}"
                self._cursor = {"source": self._cursor["source"], **after, "global": g + 1}
                if g % self.num_shards != self.shard or (self.keep is not None and not self.keep(doc_id)):
                    continue
                try:
                    parsed = src.parse(raw)
                except ValueError as exc:
                    self.bad_rows.add(str(exc), doc_id)
                    continue
                if parsed is _BLANK:
                    continue
                text, reason = row_text(parsed, self.text_fields, self.separator)
                if text is None:
                    self.bad_rows.add(reason or "bad_row", doc_id)
                    continue
                yield Document(doc_id, text)
            total = src.num_rows()
            end_global = base_global + (total if total is not None else self._cursor.get("row", 0))
            self._cursor = {"source": self._cursor["source"] + 1, "row": 0, "offset": 0,
                            "global": max(end_global, self._cursor["global"])}
