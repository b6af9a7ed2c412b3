"""Next-token reasoning problems: a context, the prompt built from it and the ground-truth tokens.

Owns :class:`Problem` and :class:`ProblemStream`, the iterator the trainer and the evaluator pull
problems from.

Where documents come from, in order of preference:

1. ``data.prepared`` (or a ``data.paths`` entry holding a ``manifest.json``): documents already
   tokenised and scored by ``tools/prepare_data.py``; shuffled per epoch (shard order and rows);
   a ``data.mixture`` next to it must be the one it was prepared from;
2. raw JSONL / Parquet / ``datasets`` (``data.paths`` / ``data.hf_dataset``), or the document
   sequence of ``data.mixture`` (:mod:`megatron_rpt.data.mixture`), tokenised here and, when a
   proxy model is given (``proxy=`` or ``data.proxy_model``), scored on the fly; read in order.

A mixture's documents carry their corpus; the stream counts the problems it hands out per corpus
(:meth:`ProblemStream.mixture_metrics`, resumed exactly) so the trainer can log the mixture it
actually consumed.

Which positions: positions ``t >= data.min_context_tokens`` whose token starts a UTF-8 character
(a context must be text; a prediction can never be half a character). The train split keeps, when
scored, those whose entropy is above ``data.entropy_threshold`` and draws up to
``data.max_positions_per_doc`` of them with a generator seeded by (``data.seed``, epoch, doc id) --
the CPU default with no proxy draws uniformly -- re-drawn every epoch. The validation split keeps
every position, unfiltered (evaluation picks and buckets them, :mod:`megatron_rpt.eval.runner`).

The context is the document up to ``t``, cut from the left on a token (and character) boundary so
that the whole rendered prompt fits ``data.max_prompt_tokens``. The held-out split is the
``data.val_documents`` documents with the smallest ``sha256(seed:doc_id)``; the train split never
sees them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_rpt.config import ConfigError, DataConfig
from megatron_rpt.data.corpus import CorpusStream, heldout_doc_ids, open_sources
from megatron_rpt.data.entropy_filter import (
    ProxyScorer,
    difficulty_label,
    difficulty_splits,
)
from megatron_rpt.data.mixture import (
    Mixture,
    MixtureStream,
    check_same_mixture,
    mixture_metrics,
)
from megatron_rpt.data.shards import (
    PreparedCorpus,
    ScoredDoc,
    is_prepared_dir,
    load_manifest,
)
from megatron_rpt.data.templates import render_prompt
from megatron_rpt.data.tokenizer import default_prefix_ids, encode_document, token_byte_table, vocab_hash

__all__ = ["Problem", "ProblemStream", "build_problem", "candidate_positions"]

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")
STATE_VERSION = 1


@dataclass
class Problem:
    """One next-token reasoning problem (position ``position`` of document ``doc_id``)."""

    doc_id: str
    position: int  # index of the first target token in the document's token ids
    context_text: str  # document text before ``position`` (left-truncated to fit the prompt)
    prompt_text: str  # what the policy reads (template + chat template)
    prompt_ids: list[int]
    target_ids: list[int]  # the next ``data.target_tokens`` tokens (default: the rest of the document)
    target_token_bytes: list[bytes]  # their exact bytes: what the reward compares against
    entropy: float | None = None  # proxy top-k entropy (nats) at ``position``; None when unscored
    difficulty: str | None = None  # hardest split the position belongs to ("easy" < "medium" < "hard")
    splits: tuple[str, ...] = field(default_factory=tuple)  # every split it belongs to (nested)
    # The document's own token ids of the context (ids[start:position]): the exact plain-LM context
    # (re-tokenising context_text can differ at the left cut).
    context_ids: list[int] = field(default_factory=list)
    corpus: str = ""  # the data.mixture corpus of the document ("" outside a mixture)

    @property
    def target_text(self) -> str:
        return b"".join(self.target_token_bytes).decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (bytes as hex strings)."""
        d = dataclasses.asdict(self)
        d["target_token_bytes"] = [b.hex() for b in self.target_token_bytes]
        d["splits"] = list(self.splits)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Problem":
        d = dict(d)
        d["target_token_bytes"] = [bytes.fromhex(h) for h in d["target_token_bytes"]]
        d["splits"] = tuple(d.get("splits", ()))
        return cls(**d)


def _starts_char(b: bytes) -> bool:
    """True when ``b`` begins a UTF-8 character (its first byte is not a continuation byte)."""
    return bool(b) and (b[0] & 0xC0) != 0x80


def candidate_positions(token_bytes: list[bytes], entropy: np.ndarray | None, min_context_tokens: int,
                        threshold: float) -> list[int]:
    """Positions eligible as problems (see the module docstring)."""
    first = max(1, min_context_tokens)
    out = []
    for t in range(first, len(token_bytes)):
        if not _starts_char(token_bytes[t]):
            continue
        if entropy is not None and not (entropy[t] > threshold):  # NaN is never above
            continue
        out.append(t)
    return out


def build_problem(tokenizer: Any, doc_id: str, ids: list[int], token_bytes: list[bytes], position: int,
                  *, entropy: float | None, thresholds: list[float], template: str, use_chat_template: bool,
                  max_prompt_tokens: int, target_tokens: int | None, context_budget: int) -> Problem | None:
    """The problem at ``position``; None when the context cannot be made to fit or is not text."""
    t = position
    start = max(0, t - context_budget)
    for _ in range(16):
        while start < t and not _starts_char(token_bytes[start]):
            start += 1
        try:
            context = b"".join(token_bytes[start:t]).decode("utf-8")
        except UnicodeDecodeError:
            logger.debug("%s@%d: context is not valid UTF-8; position skipped", doc_id, t)
            return None
        prompt = render_prompt(context, tokenizer, template, use_chat_template)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if template == "raw" and not use_chat_template:  # the bare context, as the LM reads text (BOS)
            prompt_ids = default_prefix_ids(tokenizer) + prompt_ids
        excess = len(prompt_ids) - max_prompt_tokens
        if excess <= 0:
            break
        if start >= t:
            return None
        start = min(t, start + excess)  # re-tokenisation inside the template can shift a few tokens
    else:
        return None
    if not context:
        return None
    tgt = slice(t, None if target_tokens is None else t + target_tokens)  # None: the whole continuation
    ent = None if entropy is None or not math.isfinite(entropy) else float(entropy)
    return Problem(doc_id=doc_id, position=t, context_text=context, prompt_text=prompt, prompt_ids=list(prompt_ids),
                   target_ids=list(ids[tgt]), target_token_bytes=list(token_bytes[tgt]), entropy=ent,
                   difficulty=difficulty_label(ent, thresholds), splits=difficulty_splits(ent, thresholds),
                   context_ids=list(ids[start:t]))


def _fingerprint(cfg: DataConfig) -> str:
    keys = ("text_fields", "text_separator", "entropy_threshold", "max_positions_per_doc", "min_context_tokens",
            "max_prompt_tokens", "target_tokens", "template", "use_chat_template", "val_documents", "seed")
    blob = json.dumps({k: getattr(cfg, k) for k in keys}, sort_keys=True)
    if cfg.mixture:  # appended only when set, so the fingerprint of a plain data.paths run is unchanged
        blob += json.dumps([dataclasses.asdict(c) for c in cfg.mixture] + [cfg.dedup], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class ProblemStream(torch.utils.data.IterableDataset):
    """Problems of one data-parallel rank (and dataloader worker), with exact resume.

    ``ProblemStream(cfg.data, tokenizer, dp_rank, dp_size, split="train"|"val", proxy=None)``.
    ``proxy``: a :class:`ProxyScorer`, a model directory, or None to use ``data.proxy_model`` (and
    no scoring when that is null too, or when the data is prepared). The train split loops over
    epochs forever; the val split is one pass. ``state_dict()`` taken after ``n`` problems and
    loaded into a fresh stream makes it yield problem ``n+1`` next (same config, same ranks).

    Iterating in-process is the supported path (exact resume). Inside a ``torch`` DataLoader worker
    the stream shards itself over the workers, but the DataLoader then owns the progress.
    """

    def __init__(self, cfg: DataConfig, tokenizer: Any, dp_rank: int = 0, dp_size: int = 1, split: str = "train",
                 proxy: ProxyScorer | str | os.PathLike | None = None, *, worker_id: int = 0, num_workers: int = 1):
        super().__init__()
        if split not in SPLITS:
            raise ValueError(f"split={split!r} must be one of {SPLITS}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is not in [0, dp_size={dp_size})")
        if not 0 <= worker_id < num_workers:
            raise ValueError(f"worker_id={worker_id} is not in [0, num_workers={num_workers})")
        self.cfg, self.tokenizer, self.split = cfg, tokenizer, split
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self._set_worker(worker_id, num_workers)
        self._table = token_byte_table(tokenizer)

        self.prepared_dir = self._prepared_dir(cfg)
        self.manifest: dict[str, Any] | None = None
        self._sources = None
        self._mixture: Mixture | None = None
        if self.prepared_dir is not None:
            self.manifest = load_manifest(self.prepared_dir)
            self._check_tokenizer()
            if cfg.mixture:
                check_same_mixture(cfg, self.manifest, str(self.prepared_dir))
            all_ids: Any = PreparedCorpus(self.prepared_dir, manifest=self.manifest).doc_ids()
            self.proxy = None
            if proxy is not None:
                logger.warning("data.prepared is set: documents are already scored, the proxy is not used")
        else:
            if cfg.mixture:
                self._mixture = Mixture.from_config(cfg)
                self._mixture.check_usable()
                all_ids = self._mixture.doc_ids()
            else:
                self._sources = open_sources(cfg.paths, cfg.hf_dataset, cfg.hf_split, cfg.hf_streaming)
                all_ids = self._sources
            if proxy is None and cfg.proxy_model:
                proxy = cfg.proxy_model
            if isinstance(proxy, (str, os.PathLike)):
                proxy = ProxyScorer(proxy, top_k=cfg.entropy_top_k)
            self.proxy = proxy
        self.heldout = heldout_doc_ids(all_ids, cfg.val_documents, cfg.seed)
        sizes = [len(all_ids)] if self._sources is None else [s.num_rows() for s in all_ids]
        total = None if None in sizes else sum(sizes)
        if total == 0:
            raise ConfigError(f"the corpus is empty: {self._describe_sources()} hold no rows; point data.paths "
                              "(or data.prepared / data.hf_dataset) at the documents")
        if split == "train" and total is not None and cfg.val_documents >= total:
            raise ConfigError(f"data.val_documents={cfg.val_documents} holds out every document of the corpus "
                              f"({total} rows), leaving nothing to train on; lower it below {total} (the paper "
                              "holds out 200)")
        self.scored = self.proxy is not None or self.prepared_dir is not None
        self._context_budget = self._compute_context_budget()
        self._fingerprint = _fingerprint(cfg)
        self.corpus_names = self._corpus_names()
        self._corpus_problems: Counter[str] = Counter()  # problems handed out per corpus, over all epochs
        self._reset(epoch=0)

    # -- setup helpers
    def _describe_sources(self) -> str:
        if self.prepared_dir is not None:
            return f"data.prepared={str(self.prepared_dir)!r}"
        if self._mixture is not None:
            return f"data.mixture={self._mixture.names}"
        return f"data.paths={self.cfg.paths}" if self.cfg.paths else f"data.hf_dataset={self.cfg.hf_dataset!r}"

    @staticmethod
    def _prepared_dir(cfg: DataConfig) -> Path | None:
        if cfg.prepared:
            return Path(cfg.prepared)
        prepared = [p for p in cfg.paths if is_prepared_dir(p)]
        if prepared and len(prepared) != len(cfg.paths):
            raise ConfigError("data.paths mixes a prepared directory (manifest.json) with raw files; "
                              "use data.prepared for the prepared one and drop the rest")
        if len(prepared) > 1:
            raise ConfigError("data.paths lists several prepared directories; merge them with one prepare_data run")
        return Path(prepared[0]) if prepared else None

    def _corpus_names(self) -> list[str]:
        """The corpora of a mixture (configured or prepared); [] for plain data."""
        if self._mixture is not None:
            return self._mixture.names
        drawn = (self.manifest or {}).get("mixture") or {}
        return [c["name"] for c in drawn.get("corpora", [])]

    def _check_tokenizer(self) -> None:
        prepared_with = self.manifest["tokenizer"]  # type: ignore[index]
        if vocab_hash(self.tokenizer) != prepared_with["vocab_hash"]:
            raise ConfigError(f"the tokenizer does not match the one {self.prepared_dir} was prepared with "
                              f"({prepared_with['path']}); point model.tokenizer at it or re-run "
                              "tools/prepare_data.py with --tokenizer <model.tokenizer>")

    def _compute_context_budget(self) -> int:
        empty = render_prompt("", self.tokenizer, self.cfg.template, self.cfg.use_chat_template)
        overhead = len(self.tokenizer(empty, add_special_tokens=False)["input_ids"])
        budget = self.cfg.max_prompt_tokens - overhead - 4  # margin: merges across the template boundary
        if budget < 16:
            raise ConfigError(f"data.max_prompt_tokens={self.cfg.max_prompt_tokens} leaves {budget} tokens of "
                              f"context after the {overhead}-token template {self.cfg.template} (16 needed); "
                              "raise it (e.g. 4096)")
        return budget

    def _set_worker(self, worker_id: int, num_workers: int) -> None:
        self.worker_id, self.num_workers = worker_id, num_workers
        self.shard = self.dp_rank * num_workers + worker_id
        self.num_shards = self.dp_size * num_workers

    def _keep(self, doc_id: str) -> bool:
        return (doc_id in self.heldout) == (self.split == "val")

    def _reset(self, epoch: int) -> None:
        self.epoch = epoch
        if self.prepared_dir is not None:
            self._docs_src: Any = PreparedCorpus(self.prepared_dir, self.shard, self.num_shards, self._keep,
                                                 seed=self.cfg.seed, epoch=epoch, shuffle=self.split == "train",
                                                 manifest=self.manifest)
        elif self._mixture is not None:
            self._docs_src = MixtureStream(self._mixture, self.shard, self.num_shards, self._keep)
        else:
            self._docs_src = CorpusStream(self._sources or [], self.cfg.text_fields, self.cfg.text_separator,
                                          self.shard, self.num_shards, self._keep)
        self._doc_iter: Iterator[Any] | None = None
        self._doc_state: dict[str, Any] | None = None  # source cursor just before the current document
        self._pending: deque[Problem] = deque()
        self._consumed = 0  # problems of the current document already handed out
        self._epoch_problems = 0
        self._docs_read = 0  # documents of this epoch (for the message when none gives a problem)
        self._skip = 0

    # -- documents -> problems
    def _next_doc(self) -> ScoredDoc | None:
        if self._doc_iter is None:
            self._doc_iter = iter(self._docs_src)
        state = self._docs_src.state_dict()
        try:
            item = next(self._doc_iter)
        except StopIteration:
            return None
        self._doc_state = state
        self._docs_read += 1
        if isinstance(item, ScoredDoc):
            return item
        ids = encode_document(self.tokenizer, item.text)
        entropy = self.proxy.score([ids])[0] if self.proxy is not None else None
        return ScoredDoc(item.doc_id, ids, entropy, item.corpus)

    def positions(self, doc: ScoredDoc) -> list[int]:
        """The candidate positions of ``doc``. The train split keeps those whose proxy entropy is above
        ``data.entropy_threshold``; the held-out split keeps every one: evaluation buckets positions by
        its own scorer, so the training proxy must not pick which ones it sees (no selection bias)."""
        cfg = self.cfg
        tb = [self._table[i] for i in doc.token_ids]
        entropy = doc.entropy if self.split == "train" else None
        return candidate_positions(tb, entropy, cfg.min_context_tokens, cfg.entropy_threshold)

    def problem_at(self, doc: ScoredDoc, t: int) -> Problem | None:
        """The problem at position ``t`` of ``doc`` (None when its context cannot be made to fit)."""
        cfg = self.cfg
        problem = build_problem(self.tokenizer, doc.doc_id, doc.token_ids, [self._table[i] for i in doc.token_ids], t,
                                entropy=None if doc.entropy is None else float(doc.entropy[t]),
                                thresholds=list(cfg.difficulty_thresholds), template=cfg.template,
                                use_chat_template=cfg.use_chat_template, max_prompt_tokens=cfg.max_prompt_tokens,
                                target_tokens=cfg.target_tokens, context_budget=self._context_budget)
        if problem is not None:
            problem.corpus = doc.corpus  # the mixture's corpus, counted by mixture_metrics
        return problem

    def next_document(self) -> ScoredDoc:
        """The next whole document of this stream, epochs rolling over on the train split (the
        next-token-prediction baseline trains on every token of the documents RPT draws positions
        from). ``state_dict`` then resumes right after it."""
        while True:
            doc = self._next_doc()
            if doc is not None:
                self._epoch_problems += 1
                return doc
            if self.split == "val":
                raise StopIteration
            if self._epoch_problems == 0:
                raise ConfigError(self._no_problems_message())
            self._reset(self.epoch + 1)

    def documents(self) -> Iterator[ScoredDoc]:
        """One pass over this stream's documents from the start (the held-out ones for split="val")."""
        self._reset(epoch=0)
        while (doc := self._next_doc()) is not None:
            yield doc

    def problems_for(self, doc: ScoredDoc, epoch: int | None = None) -> list[Problem]:
        """Every problem this stream makes from ``doc`` (deterministic in seed, epoch and doc id): the
        train split draws ``data.max_positions_per_doc`` of its positions, the held-out split takes all."""
        epoch = self.epoch if epoch is None else epoch
        chosen = self.positions(doc)
        if self.split == "train":
            rng = random.Random(f"{self.cfg.seed}:{epoch}:{doc.doc_id}")
            chosen = sorted(rng.sample(chosen, min(self.cfg.max_positions_per_doc, len(chosen))))
        return [p for t in chosen if (p := self.problem_at(doc, t)) is not None]

    def __iter__(self) -> "ProblemStream":
        info = torch.utils.data.get_worker_info()
        if info is not None and self.num_workers == 1 and info.num_workers > 1:
            self._set_worker(info.id, info.num_workers)
            self._reset(self.epoch)
        return self

    def __next__(self) -> Problem:
        while not self._pending:
            doc = self._next_doc()
            if doc is None:
                if self.split == "val":
                    raise StopIteration
                if self._epoch_problems == 0:
                    raise ConfigError(self._no_problems_message())
                self._reset(self.epoch + 1)
                continue
            problems = self.problems_for(doc)
            self._consumed = min(self._skip, len(problems))
            self._skip = 0
            self._pending = deque(problems[self._consumed:])
        self._consumed += 1
        self._epoch_problems += 1
        problem = self._pending.popleft()
        self._corpus_problems[problem.corpus] += 1
        return problem

    def mixture_metrics(self) -> dict[str, float]:
        """``mixture/<corpus>/share`` and ``/problems`` of the problems handed out so far ({} without a mixture)."""
        return mixture_metrics(self._corpus_problems, self.corpus_names) if self.corpus_names else {}

    def _no_problems_message(self) -> str:
        bad = self.bad_rows
        if bad and self._docs_read == 0:
            return (f"every row this reader saw in {self._describe_sources()} is bad ({sum(bad.values())} rows: "
                    f"{bad}); check data.text_fields={self.cfg.text_fields} against the rows' fields")
        return (f"epoch {self.epoch} gave rank {self.dp_rank} (worker {self.worker_id}) no problems from "
                f"{self._docs_read} documents: the corpus has too few usable documents for {self.num_shards} "
                f"readers, or no position passes data.entropy_threshold={self.cfg.entropy_threshold} / "
                f"data.min_context_tokens={self.cfg.min_context_tokens} (documents too short?)")

    # -- resume
    def state_dict(self) -> dict[str, Any]:
        """Where the stream is: the cursor of the current document and how many of its problems were used."""
        if self._doc_state is None or not self._pending:
            # Nothing half-used: resume right after the last document read.
            doc_state, consumed = self._docs_src.state_dict(), 0
        else:
            doc_state, consumed = self._doc_state, self._consumed
        return {"version": STATE_VERSION, "split": self.split, "epoch": self.epoch, "doc_state": doc_state,
                "consumed": consumed, "epoch_problems": self._epoch_problems, "shard": self.shard,
                "num_shards": self.num_shards, "fingerprint": self._fingerprint,
                "corpus_problems": dict(self._corpus_problems)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data stream state version {state.get('version')} is not {STATE_VERSION}")
        if state["split"] != self.split:
            raise ValueError(f"state is for the {state['split']!r} split, this stream is {self.split!r}")
        if (state["shard"], state["num_shards"]) != (self.shard, self.num_shards):
            raise ValueError(f"state is for reader {state['shard']} of {state['num_shards']}, this stream is "
                             f"{self.shard} of {self.num_shards}: resume with the same data-parallel size and workers")
        if state["fingerprint"] != self._fingerprint:
            logger.warning("data.* settings changed since the data state was saved; resuming at the same document, "
                           "but the problems will not be the ones the old settings would have produced")
        self._reset(int(state["epoch"]))
        self._docs_src.load_state_dict(state["doc_state"])
        self._skip = int(state["consumed"])
        self._epoch_problems = int(state.get("epoch_problems", 0))
        self._corpus_problems = Counter({str(k): int(v) for k, v in state.get("corpus_problems", {}).items()})

    @property
    def bad_rows(self) -> dict[str, int]:
        """Rows skipped so far in this epoch, by reason (raw corpora only)."""
        src = self._docs_src
        return src.bad_rows.state_dict() if isinstance(src, (CorpusStream, MixtureStream)) else {}
