"""Corpus mixtures: several corpora sampled by weight into one deterministic document sequence.

Owns :class:`Mixture` (the sequence), :class:`MixtureStream` (one reader's share of it, resumable:
the trainer's on-the-fly path), :func:`single_corpus` (``tools/prepare_data.py --input`` as a
mixture of one), :func:`mixture_spec` / :func:`check_same_mixture` (what makes two mixtures the
same) and :func:`mixture_metrics` (what the trainer logs about the mixture it consumed).

The sequence. Weights are shares of *documents*: RPT draws at most ``data.max_positions_per_doc``
problems from a document, so the document share is the share of problems the policy trains on.
Position ``n`` goes to the corpus furthest below its share (largest ``share_c * (n + 1) - taken_c``,
ties to the first listed: Megatron's BlendedDataset rule), which keeps every corpus within one
document of its share at every prefix. Inside a corpus documents come in file order. A document is
dropped before it is counted when its text is shorter than ``min_chars`` or longer than
``max_chars``, or (``data.dedup``) when the same text (sha256) was already taken from any corpus.
The sequence stops when the corpus whose turn it is has no document left (first exhausted: the
shares stay exact) or at ``max_docs``.

Nothing here is random and nothing depends on how many readers share the sequence, so the
prepare workers, the trainer's ranks and a resumed run see the same documents at the same
positions. The price: every reader reads (not tokenises, not scores) the whole sequence.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_rpt.config import ConfigError, CorpusConfig, DataConfig
from megatron_rpt.data.corpus import BadRows, CorpusStream, Document, open_sources
from megatron_rpt.data.run_state import differences

__all__ = ["Mixture", "MixtureStream", "CorpusStats", "single_corpus", "mixture_spec", "check_same_mixture",
           "mixture_metrics", "content_hash"]

ORDER = "by document weight; stops when the corpus whose turn it is runs out (first exhausted) or at max_docs"


def content_hash(text: str) -> bytes:
    """The dedup key of a document: the first 128 bits of sha256 of its UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).digest()[:16]


def single_corpus(paths: Sequence[str | Path], text_fields: Sequence[str], separator: str = "\n\n",
                  min_chars: int = 0, max_chars: int | None = None) -> CorpusConfig:
    """One unnamed corpus: its document ids keep the plain ``file:row`` form of a non-mixture run."""
    return CorpusConfig(name="", paths=[str(p) for p in paths], weight=1.0, text_fields=list(text_fields),
                        text_separator=separator, min_chars=min_chars, max_chars=max_chars)


@dataclass
class CorpusStats:
    """What one pass over the sequence did with one corpus."""

    docs: int = 0  # taken into the sequence
    read: int = 0  # usable rows read (text built)
    duplicates: int = 0
    too_short: int = 0
    too_long: int = 0
    exhausted: bool = False
    bad_rows: BadRows = field(default_factory=BadRows)


class Mixture:
    """The document sequence of ``corpora`` (see the module docstring); iterate for ``(position, Document)``."""

    def __init__(self, corpora: Sequence[CorpusConfig], dedup: bool = True, max_docs: int | None = None):
        if not corpora:
            raise ConfigError("data.mixture is empty; list at least one corpus")
        if max_docs is not None and max_docs < 1:
            raise ConfigError(f"--max-docs={max_docs} must be >= 1")
        self.corpora = list(corpora)
        self.dedup, self.max_docs = dedup, max_docs
        total = sum(c.weight for c in self.corpora)
        self.shares = [c.weight / total for c in self.corpora]
        self.sources = [self._open(c) for c in self.corpora]
        self.stats = [CorpusStats() for _ in self.corpora]
        self._doc_ids: list[str] | None = None

    @classmethod
    def from_config(cls, data: DataConfig, max_docs: int | None = None) -> "Mixture":
        return cls(data.mixture, data.dedup, max_docs)

    @staticmethod
    def _open(c: CorpusConfig) -> list[Any]:
        try:
            return open_sources(c.paths)
        except ConfigError as exc:
            if not c.name:
                raise
            raise ConfigError(f"data.mixture corpus {c.name!r}: {exc}") from None

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.corpora]

    @property
    def named(self) -> bool:
        """A real mixture (named corpora) rather than the plain ``--input`` corpus."""
        return any(c.name for c in self.corpora)

    def _documents(self, i: int) -> Iterator[Document]:
        """Corpus ``i`` after its length filters (dedup belongs to the sequence: it spans corpora)."""
        c, st = self.corpora[i], self.stats[i]
        stream = CorpusStream(self.sources[i], c.text_fields, c.text_separator)
        st.bad_rows = stream.bad_rows
        for doc in stream:
            st.read += 1
            if len(doc.text) < c.min_chars:
                st.too_short += 1
                continue
            if c.max_chars is not None and len(doc.text) > c.max_chars:
                st.too_long += 1
                continue
            yield Document(f"{c.name}/{doc.doc_id}" if c.name else doc.doc_id, doc.text, c.name)

    def check_usable(self) -> None:
        """Every corpus has at least one usable document (else its turn would end the sequence at once)."""
        for i, c in enumerate(self.corpora):
            if next(self._documents(i), None) is None:
                st = self.stats[i]
                what = f"corpus {c.name!r} ({', '.join(c.paths)})" if c.name else f"{c.paths}"
                raise ConfigError(
                    f"no usable documents in {what}: {st.read} rows with text, {st.too_short} shorter than "
                    f"min_chars={c.min_chars}, {st.too_long} longer than max_chars={c.max_chars}, bad rows "
                    f"{st.bad_rows.state_dict()}; check its text fields {c.text_fields} against the rows")
        self.stats = [CorpusStats() for _ in self.corpora]

    def __iter__(self) -> Iterator[tuple[int, Document]]:
        self.stats = [CorpusStats() for _ in self.corpora]
        streams = [self._documents(i) for i in range(len(self.corpora))]
        seen: set[bytes] = set()
        taken = [0] * len(self.corpora)
        n = 0
        while self.max_docs is None or n < self.max_docs:
            i = max(range(len(taken)), key=lambda c: (self.shares[c] * (n + 1) - taken[c], -c))
            doc = self._take(i, streams[i], seen)
            if doc is None:
                self.stats[i].exhausted = True
                return
            taken[i] += 1
            self.stats[i].docs += 1
            yield n, doc
            n += 1

    def _take(self, i: int, docs: Iterator[Document], seen: set[bytes]) -> Document | None:
        for doc in docs:
            if self.dedup:
                key = content_hash(doc.text)
                if key in seen:
                    self.stats[i].duplicates += 1
                    continue
                seen.add(key)
            return doc
        return None

    def doc_ids(self) -> list[str]:
        """Every document id of the sequence, in order (one pass, cached: the held-out split needs them)."""
        if self._doc_ids is None:
            self._doc_ids = [doc.doc_id for _, doc in self]
        return self._doc_ids

    def describe(self) -> dict[str, Any]:
        """The mixture actually drawn by the last complete pass: per corpus, taken, dropped and why."""
        total = sum(s.docs for s in self.stats)
        corpora = []
        for c, share, st, srcs in zip(self.corpora, self.shares, self.stats, self.sources):
            corpora.append({
                "name": c.name, "weight": c.weight, "target_share": share, "docs": st.docs,
                "share": st.docs / total if total else 0.0, "rows_read": st.read, "duplicates": st.duplicates,
                "too_short": st.too_short, "too_long": st.too_long, "bad_rows": st.bad_rows.state_dict(),
                "exhausted": st.exhausted, "text_fields": list(c.text_fields), "text_separator": c.text_separator,
                "min_chars": c.min_chars, "max_chars": c.max_chars, "sources": [s.describe() for s in srcs],
            })
        return {"order": ORDER, "dedup": self.dedup, "max_docs": self.max_docs, "num_docs": total, "corpora": corpora}


def mixture_spec(corpora: Sequence[CorpusConfig], dedup: bool) -> dict[str, Any]:
    """What the user asked for (not what was drawn): two mixtures with equal specs are the same mixture."""
    return {"dedup": dedup, "corpora": [
        {"name": c.name, "weight": float(c.weight), "paths": [str(Path(p).resolve()) for p in c.paths],
         "text_fields": list(c.text_fields), "text_separator": c.text_separator, "min_chars": c.min_chars,
         "max_chars": c.max_chars} for c in corpora]}


def check_same_mixture(data: DataConfig, manifest: Mapping[str, Any], where: str) -> None:
    """``data.mixture`` next to ``data.prepared`` must be the mixture the directory was prepared from."""
    prepared = manifest.get("mixture_spec")
    wanted = mixture_spec(data.mixture, data.dedup)
    if prepared == wanted:
        return
    if prepared is None:
        diff = "it was prepared from plain --input files, not a mixture"
    else:
        diff = "; ".join(differences(prepared, wanted)[:3])
    raise ConfigError(f"data.mixture is not the mixture {where} was prepared from ({diff}); re-run "
                      "tools/prepare_data.py with this config, or drop data.mixture (data.prepared alone trains "
                      "on the mixture it holds)")


class MixtureStream:
    """Positions ``shard, shard + num_shards, ...`` of a :class:`Mixture`, as :class:`CorpusStream` yields.

    Resuming replays the sequence up to the saved position (reading and hashing, no tokenising):
    the dedup set is rebuilt instead of being stored in every checkpoint.
    """

    def __init__(self, mixture: Mixture, shard: int = 0, num_shards: int = 1,
                 keep: Callable[[str], bool] | None = None):
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard {shard} is not in [0, {num_shards})")
        self.mixture, self.shard, self.num_shards, self.keep = mixture, shard, num_shards, keep
        self._next = 0

    def state_dict(self) -> dict[str, Any]:
        return {"next_position": self._next, "corpora": self.mixture.names, "shard": self.shard,
                "num_shards": self.num_shards}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("corpora") != self.mixture.names:
            raise ConfigError(f"the data state is for the corpora {state.get('corpora')}, data.mixture has "
                              f"{self.mixture.names}; restore the same data.mixture or start the data stream afresh")
        if (state.get("shard"), state.get("num_shards")) != (self.shard, self.num_shards):
            raise ValueError(f"state is for shard {state.get('shard')}/{state.get('num_shards')}, this stream is "
                             f"{self.shard}/{self.num_shards}: resume with the same data-parallel size and workers")
        self._next = int(state["next_position"])

    @property
    def bad_rows(self) -> BadRows:
        total = BadRows()
        for st in self.mixture.stats:
            total.counts.update(st.bad_rows.counts)
        return total

    def __iter__(self) -> Iterator[Document]:
        for n, doc in self.mixture:
            if n < self._next:
                continue
            self._next = n + 1
            if n % self.num_shards != self.shard or (self.keep is not None and not self.keep(doc.doc_id)):
                continue
            yield doc


def mixture_metrics(problems: Mapping[str, int], names: Sequence[str]) -> dict[str, float]:
    """``mixture/<corpus>/share`` and ``.../problems``: the problems drawn so far from each corpus."""
    total = sum(problems.get(n, 0) for n in names)
    out: dict[str, float] = {}
    for name in names:
        count = problems.get(name, 0)
        out[f"mixture/{name}/problems"] = float(count)
        out[f"mixture/{name}/share"] = count / total if total else math.nan
    return out
