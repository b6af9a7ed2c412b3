"""Evaluation orchestration: the validation positions, their difficulty, both modes, the report.

Owns: :class:`ValidationSet` (the held-out positions, their plain-LM contexts, difficulty
entropies and whether each can be won at all), :func:`select_positions` (the caps
``eval.positions_per_doc`` / ``eval.max_positions``, both off by default), the choice of the
difficulty scorer, :func:`evaluate_positions` (standard and/or reasoning mode on one engine),
:func:`run_evaluation` (one model -> :class:`EvalReport`) and :func:`evaluate_during_training`
(the trainer's hook: sharded over data-parallel ranks, gathered, flat ``val/...`` metrics).

Which positions (the paper's validation set, section 4.1): every position of the
``data.val_documents`` held-out documents (200), as :class:`~megatron_rpt.data.ProblemStream`'s
held-out split gives them -- never filtered by the training proxy's entropy, so the buckets hold
what the scorer says and nothing the proxy chose. A cap, when set, is a seeded draw per document
and/or over all documents (never "the first N", which would be the first few documents), and the
report states it.

Difficulty scorer, first match wins:
  1. ``eval.scorer_model`` (an HF dir; the paper's is R1-Distill-Qwen-14B) when it differs from
     ``data.proxy_model``: each held-out document is scored once (top-``data.entropy_top_k``
     entropy, the data pipeline's formula) and each position takes the entropy at it;
  2. the entropy the data pipeline attached to each position (``data.proxy_model`` or the proxy
     of prepared data);
  3. none configured: the evaluated model itself, from the logits of the standard-mode pass.
     During training the entropies are taken from the model at the first evaluation and then
     kept, so later evaluations use the same buckets.

The plain-LM context (standard mode, a scorer) starts with the tokens the tokenizer puts before
any text by default (R1-Distill's BOS; :func:`~megatron_rpt.data.tokenizer.default_prefix_ids`):
documents are tokenised without them, a language model reads text with them.
"""

from __future__ import annotations

import logging
import math
import random
import time
import typing
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_rpt.config import Config, EvalMode
from megatron_rpt.data import ProblemStream
from megatron_rpt.data.entropy_filter import ProxyScorer
from megatron_rpt.data.tokenizer import default_prefix_ids
from megatron_rpt.eval.next_token import (
    DecoderLogits,
    argmax_and_entropy,
    context_token_ids,
    greedy_next_tokens,
    standard_accuracy,
    standard_correct,
)
from megatron_rpt.eval.reasoning import generate_and_score, reasoning_accuracy, reasoning_params
from megatron_rpt.eval.report import (
    BucketAccumulator,
    EvalReport,
    ReportRow,
    bucket_names,
    flat_metrics,
    in_bucket,
    write_report,
)
from megatron_rpt.reward import writable_prefix_tokens
from megatron_rpt.rollout.handover import engine_awake
from megatron_rpt.rollout.torch_decoder import Decoder

log = logging.getLogger(__name__)

MODES = typing.get_args(EvalMode)

__all__ = [
    "MODES",
    "ValidationSet",
    "select_positions",
    "load_validation_set",
    "unwinnable_counts",
    "PositionResults",
    "evaluate_positions",
    "build_report",
    "run_evaluation",
    "evaluate_during_training",
]


# ----------------------------------------------------------------------------- validation positions


@dataclass
class ValidationSet:
    problems: list[Any]
    contexts: list[list[int]]  # x_<t as a language model reads it (default prefix + context, no template)
    entropies: list[float | None] | None  # None: not scored yet (the evaluated model scores them)
    scorer: str  # how the entropies were (or will be) obtained, for the report
    writable: list[int | None] = field(default_factory=list)  # writable_prefix_tokens of each position
    selection: dict[str, Any] = field(default_factory=dict)  # documents, positions and caps, for the report

    def __len__(self) -> int:
        return len(self.problems)

    def shard(self, rank: int, size: int) -> ValidationSet:
        pick = lambda xs: None if xs is None else xs[rank::size]  # noqa: E731
        return ValidationSet(self.problems[rank::size], self.contexts[rank::size], pick(self.entropies), self.scorer,
                             self.writable[rank::size], self.selection)


def select_positions(candidates: Sequence[tuple[str, Sequence[int]]], per_doc: int | None, total: int | None,
                     seed: int) -> list[tuple[int, int]]:
    """``(document index, position)`` pairs to evaluate, in document order.

    ``candidates`` are (doc id, its positions). ``per_doc``: at most that many per document, drawn
    with a generator seeded by (seed, doc id); ``total``: then at most that many in all, drawn
    uniformly over every document. None: no cap (every position, the paper's set).
    """
    chosen: list[tuple[int, int]] = []
    for index, (doc_id, positions) in enumerate(candidates):
        positions = list(positions)
        if per_doc is not None and len(positions) > per_doc:
            positions = sorted(random.Random(f"{seed}:eval:{doc_id}").sample(positions, per_doc))
        chosen.extend((index, t) for t in positions)
    if total is not None and len(chosen) > total:
        chosen = sorted(random.Random(f"{seed}:eval:all").sample(chosen, total))
    return chosen


def scorer_choice(cfg: Config) -> str | None:
    """The HF dir that re-scores difficulty, or None (use the problems' own entropy / the model itself)."""
    scorer = cfg.eval.scorer_model
    if scorer and scorer != cfg.data.proxy_model:
        return scorer
    return None


def _open_scorer(model_dir: str, top_k: int) -> Any:
    if not Path(model_dir, "config.json").is_file():
        raise FileNotFoundError(f"eval.scorer_model={model_dir!r} is not a Hugging Face model directory "
                                "(no config.json); fix the path or set it to null")
    return ProxyScorer(model_dir, top_k=top_k)


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(float(x)) else None


def _document_entropies(model_dir: str, docs: Sequence[Any], problems: Sequence[Any], prefix: list[int],
                        top_k: int) -> list[float | None]:
    """Each held-out document scored once (with the default prefix); each position takes its entropy."""
    scorer = _open_scorer(model_dir, top_k)
    wanted = {p.doc_id for p in problems}
    docs = [d for d in docs if d.doc_id in wanted]
    scores = scorer.score([prefix + list(d.token_ids) for d in docs])
    by_doc = {d.doc_id: s[len(prefix):] for d, s in zip(docs, scores)}
    del scorer  # a 14B scorer must not stay in memory for the rest of the run
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return [_finite(by_doc[p.doc_id][p.position]) for p in problems]


def _context_entropies(model_dir: str, contexts: Sequence[Sequence[int]], problems: Sequence[Any],
                       top_k: int) -> list[float | None]:
    """Problems given without their documents: each context scored on its own."""
    scorer = _open_scorer(model_dir, top_k)
    scores = scorer.score([list(c) + [int(p.target_ids[0])] for c, p in zip(contexts, problems)])
    return [_finite(s[-1]) for s in scores]


def _heldout_problems(cfg: Config, tokenizer: Any) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """(problems, held-out documents, selection summary) of the validation split."""
    stream = ProblemStream(cfg.data, tokenizer, dp_rank=0, dp_size=1, split="val")
    docs = list(stream.documents())
    candidates = [(d.doc_id, stream.positions(d)) for d in docs]
    chosen = select_positions(candidates, cfg.eval.positions_per_doc, cfg.eval.max_positions, cfg.data.seed)
    problems = [p for i, t in chosen if (p := stream.problem_at(docs[i], t)) is not None]
    selection = {
        "documents": len(docs),
        "documents_evaluated": len({p.doc_id for p in problems}),
        "candidate_positions": sum(len(c) for _, c in candidates),
        "positions": len(problems),
        "positions_skipped": len(chosen) - len(problems),  # contexts that cannot fit data.max_prompt_tokens
        "positions_per_doc_cap": cfg.eval.positions_per_doc,
        "max_positions_cap": cfg.eval.max_positions,
    }
    return problems, docs, selection


def load_validation_set(cfg: Config, tokenizer: Any, problems: Sequence[Any] | None = None) -> ValidationSet:
    """The held-out positions (every position of the held-out documents unless capped, or ``problems``
    when given), their contexts, whether each can be won, and their difficulty scorer."""
    docs = None
    if problems is None:
        problems, docs, selection = _heldout_problems(cfg, tokenizer)
    else:
        problems = list(problems)
        selection = {"positions": len(problems), "given": "problems passed by the caller"}
    if not problems:
        raise ValueError("the validation split has no positions: raise data.val_documents or check data.paths")
    prefix = default_prefix_ids(tokenizer)
    contexts = [prefix + context_token_ids(p, tokenizer) for p in problems]
    writable = [writable_prefix_tokens(p.target_token_bytes, cfg.rl.answer_format, cfg.rl.box_escapes)
                for p in problems]
    scorer = scorer_choice(cfg)
    if scorer is not None:
        top_k = cfg.data.entropy_top_k
        entropies = (_document_entropies(scorer, docs, problems, prefix, top_k) if docs is not None
                     else _context_entropies(scorer, contexts, problems, top_k))
        return ValidationSet(problems, contexts, entropies, f"eval.scorer_model={scorer}", writable, selection)
    carried = [getattr(p, "entropy", None) for p in problems]
    if any(e is not None for e in carried):
        source = cfg.data.proxy_model or cfg.data.prepared or "data pipeline"
        return ValidationSet(problems, contexts, [None if e is None else float(e) for e in carried],
                             f"data pipeline proxy ({source})", writable, selection)
    return ValidationSet(problems, contexts, None,
                         "the evaluated model itself (no eval.scorer_model or data.proxy_model configured)",
                         writable, selection)


def unwinnable_counts(cfg: Config, val: ValidationSet) -> dict[str, dict[str, int]]:
    """Per bucket: positions, those no prediction can win (``never``) and those the first token alone
    cannot win (``not_first_token``), for the configured answer format and brace rule."""
    writable = val.writable or [writable_prefix_tokens(p.target_token_bytes, cfg.rl.answer_format, cfg.rl.box_escapes)
                                for p in val.problems]
    out = {}
    thresholds = cfg.data.difficulty_thresholds
    for name, th in zip(bucket_names(thresholds), thresholds):
        members = [w for w, e in zip(writable, val.entropies or []) if in_bucket(e, th)]
        out[name] = {"positions": len(members), "never": sum(w is None for w in members),
                     "not_first_token": sum(w != 1 for w in members)}
    return out


# ----------------------------------------------------------------------------- running one model


@dataclass
class PositionResults:
    standard: list[float] | None = None  # 1/0 per position
    standard_pred: list[int] | None = None
    rewards: list[list[float] | None] | None = None  # per position (None: below every bucket, skipped)
    responses: list[list[str] | None] | None = None
    generated_tokens: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


def engine_decoder(engine: Any) -> torch.nn.Module | None:
    """The engine's plain-torch decoder when it has one (the built-in engine), else None."""
    model = getattr(engine, "model", None)
    return model if isinstance(model, Decoder) else None


def evaluate_positions(cfg: Config, engine: Any, val: ValidationSet, modes: Sequence[str],
                       progress: bool = False, batch_tokens: int = 8192) -> PositionResults:
    """Run ``modes`` on ``val``; fills ``val.entropies`` when the model is its own scorer."""
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"modes {list(modes)} must be a non-empty subset of {list(MODES)}")
    out = PositionResults()
    decoder = engine_decoder(engine)
    if "standard" in modes or val.entropies is None:
        start = time.perf_counter()
        if decoder is not None:
            pred, entropies = argmax_and_entropy(DecoderLogits(decoder, batch_tokens), val.contexts,
                                                 top_k=cfg.data.entropy_top_k)
            if val.entropies is None:
                val.entropies = list(entropies)
        else:
            if val.entropies is None:
                raise ValueError(
                    f"{type(engine).__name__} exposes no logits, so the evaluated model cannot score difficulty "
                    "itself: set eval.scorer_model (or data.proxy_model) to a small Hugging Face model")
            pred = greedy_next_tokens(engine, val.contexts)
        if "standard" in modes:  # else the pass only scored difficulty
            out.standard_pred = pred
            out.standard = standard_correct(pred, val.problems)
        out.seconds["standard"] = time.perf_counter() - start
    if "reasoning" in modes:
        start = time.perf_counter()
        lowest = min(cfg.data.difficulty_thresholds, default=-math.inf)
        # Positions below every bucket count nowhere: do not spend k generations on them.
        chosen = [i for i, e in enumerate(val.entropies) if e is not None and e > lowest]
        rewards, texts, generated = generate_and_score(
            engine, [val.problems[i] for i in chosen], reasoning_params(cfg), cfg.rl.answer_format,
            cfg.rl.require_think, progress=progress, escapes=cfg.rl.box_escapes)
        out.rewards = [None] * len(val)
        out.responses = [None] * len(val)
        for i, r, t in zip(chosen, rewards, texts):
            out.rewards[i], out.responses[i] = r, t
        out.generated_tokens = generated
        out.seconds["reasoning"] = time.perf_counter() - start
    return out


def accumulators(cfg: Config, val: ValidationSet, res: PositionResults) -> dict[tuple[str, str], BucketAccumulator]:
    th = cfg.data.difficulty_thresholds
    accs: dict[tuple[str, str], BucketAccumulator] = {}
    assert val.entropies is not None
    docs = [getattr(p, "doc_id", None) for p in val.problems]  # positions of one document are clustered
    if res.standard is not None:
        accs[("standard", "accuracy")] = standard_accuracy(res.standard, val.entropies, th, docs)
    if res.rewards is not None:
        kept = [(r, e, d) for r, e, d in zip(res.rewards, val.entropies, docs) if r is not None]
        random1, pass_k = reasoning_accuracy([r for r, _, _ in kept], [e for _, e, _ in kept], th,
                                             [d for _, _, d in kept])
        accs[("reasoning", "random@1")] = random1
        accs[("reasoning", "pass@k")] = pass_k
    return accs


def _unwinnable_meta(cfg: Config, buckets: dict[str, dict[str, int]]) -> dict[str, Any]:
    rl = cfg.rl
    rule = "raw continuation" if rl.answer_format == "raw" else (
        "\\boxed{} with backslash escapes" if rl.box_escapes else "\\boxed{}, every brace counts")
    return {"rule": rule, "target_tokens": cfg.data.target_tokens, "buckets": buckets}


def build_report(cfg: Config, model_name: str, accs: dict[tuple[str, str], BucketAccumulator],
                 meta: dict[str, Any]) -> EvalReport:
    report = EvalReport(list(cfg.data.difficulty_thresholds), meta=meta)
    for (mode, metric), acc in accs.items():
        shown = f"pass@{cfg.eval.pass_k}" if metric == "pass@k" else metric
        report.rows.append(ReportRow(model_name, mode, shown, acc.result()))
    return report


def run_evaluation(cfg: Config, engine: Any, tokenizer: Any, model_name: str, modes: Sequence[str] = MODES,
                   val: ValidationSet | None = None, progress: bool = True,
                   extra_meta: dict[str, Any] | None = None) -> tuple[EvalReport, ValidationSet, PositionResults]:
    """Evaluate one model (already in ``engine``) on the validation split; returns the report,
    the positions and the per-position results."""
    val = val or load_validation_set(cfg, tokenizer)
    start = time.perf_counter()
    res = evaluate_positions(cfg, engine, val, modes, progress=progress)
    lowest = min(cfg.data.difficulty_thresholds, default=-math.inf)
    meta = {
        "model": model_name,
        **val.selection,
        "positions": len(val),
        "positions_in_buckets": sum(1 for e in val.entropies or [] if e is not None and e > lowest),
        "difficulty_scorer": val.scorer,
        "entropy_top_k": cfg.data.entropy_top_k,
        "unwinnable": _unwinnable_meta(cfg, unwinnable_counts(cfg, val)),
        "modes": ", ".join(modes),
        "seconds": round(time.perf_counter() - start, 2),
        **(extra_meta or {}),
    }
    if "reasoning" in modes:
        meta.update({"pass_k": cfg.eval.pass_k, "temperature": cfg.eval.temperature,
                     "max_response_tokens": cfg.eval.max_response_tokens or cfg.rollout.max_response_tokens,
                     "template": cfg.data.template, "answer_format": cfg.rl.answer_format,
                     "generated_tokens": res.generated_tokens})
    return build_report(cfg, model_name, accumulators(cfg, val, res), meta), val, res


# ----------------------------------------------------------------------------- during training

# Validation sets cached per config object (id + weak reference, configs are not hashable).
_CACHE: dict[int, tuple[weakref.ref, ValidationSet]] = {}


def _cached_validation_set(cfg: Config, tokenizer: Any) -> ValidationSet:
    entry = _CACHE.get(id(cfg))
    if entry is not None and entry[0]() is cfg:
        return entry[1]
    val = load_validation_set(cfg, tokenizer)
    _CACHE[id(cfg)] = (weakref.ref(cfg), val)
    return val


def _unpack(trainer_or_parts: Any) -> tuple[Config, Any, Any, int, int, bool, Any]:
    """(cfg, engine, tokenizer, shard index, shards, contributes, reduce group)."""
    if isinstance(trainer_or_parts, tuple):
        cfg, engine, tokenizer = trainer_or_parts
        return cfg, engine, tokenizer, 0, 1, engine is not None, None
    t = trainer_or_parts
    cfg, engine, tokenizer = t.cfg, t.engine, t.tokenizer
    # Every rollout engine evaluates its share (rollout/layout.py); its first rank reports it.
    layout = t.layout
    return cfg, engine, tokenizer, layout.engine, layout.engines, engine is not None and layout.leader, None


def _gather(local: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's evaluation share (ranks without an engine send an empty one)."""
    if not dist.is_initialized():
        return [local]
    gathered: list[dict[str, Any]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, local)
    return gathered


def _merge_unwinnable(parts: Sequence[dict[str, dict[str, int]]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for part in parts:
        for name, counts in part.items():
            mine = out.setdefault(name, {k: 0 for k in counts})
            for k, v in counts.items():
                mine[k] += v
    return out


def evaluate_during_training(trainer_or_parts: Any, step: int, modes: Sequence[str] | None = None,
                             validation_set: ValidationSet | None = None) -> dict[str, float]:
    """Validation metrics for the training loop: ``val/standard_acc_easy``, ``val/reasoning_random1_hard``,
    ``val/reasoning_passk_medium``, ``val/count_easy``, ... plus ``val/positions`` and ``val/time_s``.

    Pass the :class:`~megatron_rpt.trainer.trainer.Trainer` (collective: call it on every rank; each
    data-parallel rank evaluates its share of the held-out positions and the per-document sums are
    gathered) or ``(cfg, engine, tokenizer)`` (one process). Modes default to ``eval.modes``;
    ``validation_set`` replaces the held-out positions (default: built once per config and cached).
    Rank 0 also writes ``<logging.dir>/eval/step_XXXXXX.{json,md}``.
    """
    cfg, engine, tokenizer, dp_rank, dp_size, contributes, _ = _unpack(trainer_or_parts)
    modes = tuple(modes or getattr(cfg.eval, "modes", MODES))
    start = time.perf_counter()
    keys = [("standard", "accuracy")] if "standard" in modes else []
    if "reasoning" in modes:
        keys += [("reasoning", "random@1"), ("reasoning", "pass@k")]
    local: dict[str, Any] = {"accs": {}, "positions": 0, "generated": 0, "unwinnable": {}, "selection": {}}
    if engine is not None:  # every rank of a vLLM engine generates, its first one reports
        val = validation_set or _cached_validation_set(cfg, tokenizer)
        shard = val.shard(dp_rank, dp_size)
        with engine_awake(engine, cfg.rollout.sleep_between_phases):
            res = evaluate_positions(cfg, engine, shard, modes)
        if val.entropies is None or any(e is None for e in val.entropies[dp_rank::dp_size]):
            # Self-scored: keep this evaluation's buckets for the later ones (this rank's share).
            entropies = list(val.entropies or [None] * len(val))
            entropies[dp_rank::dp_size] = shard.entropies
            val.entropies = entropies
    if contributes:
        local = {"accs": accumulators(cfg, shard, res), "positions": len(shard), "generated": res.generated_tokens,
                 "unwinnable": unwinnable_counts(cfg, shard), "selection": val.selection}
    parts = _gather(local)
    report_accs: dict[tuple[str, str], BucketAccumulator] = {}
    for key in keys:
        acc = BucketAccumulator(cfg.data.difficulty_thresholds)
        for part in parts:
            if key in part["accs"]:
                acc.merge(part["accs"][key])
        report_accs[key] = acc
    positions = sum(p["positions"] for p in parts)
    generated = sum(p["generated"] for p in parts)
    selection = next((p["selection"] for p in parts if p["selection"]), {})
    meta = {"step": step, **selection, "positions": positions, "generated_tokens": generated,
            "unwinnable": _unwinnable_meta(cfg, _merge_unwinnable([p["unwinnable"] for p in parts])),
            "modes": ", ".join(modes)}
    report = build_report(cfg, f"step {step}", report_accs, meta)
    metrics = flat_metrics(report)
    metrics["val/positions"] = float(positions)
    metrics["val/generated_tokens"] = float(generated)
    metrics["val/time_s"] = time.perf_counter() - start
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            write_report(report, Path(cfg.logging.dir) / "eval", stem=f"step_{step:06d}")
        except OSError as exc:  # a full disk must not kill the training run
            log.warning("could not write the evaluation report for step %d: %s", step, exc)
    return metrics
