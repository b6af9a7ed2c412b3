"""Evaluation orchestration: the validation positions, their difficulty, both modes, the report.

Owns: :class:`ValidationSet` (held-out positions from ``ProblemStream(split="val")``, capped at
``eval.max_positions``, with the plain contexts and the difficulty entropies), the choice of the
difficulty scorer, :func:`evaluate_positions` (standard and/or reasoning mode on one engine),
:func:`run_evaluation` (one model -> :class:`EvalReport`) and :func:`evaluate_during_training`
(the trainer's hook: sharded over data-parallel ranks, reduced, flat ``val/...`` metrics).

Difficulty scorer, first match wins:
  1. ``eval.scorer_model`` (an HF dir) when it differs from ``data.proxy_model``: every position
     is re-scored with it (top-``data.entropy_top_k`` entropy, the data pipeline's formula);
  2. the entropy the data pipeline attached to each problem (``data.proxy_model`` or the proxy
     of prepared data) -- the paper's setting;
  3. none configured: the evaluated model itself, from the logits of the standard-mode pass.
     During training the entropies are taken from the model at the first evaluation and then
     kept, so later evaluations use the same buckets.
"""

from __future__ import annotations

import logging
import math
import time
import typing
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_rpt.config import Config, EvalMode
from megatron_rpt.distributed import all_reduce_numbers
from megatron_rpt.eval.next_token import (
    DecoderLogits,
    argmax_and_entropy,
    context_token_ids,
    greedy_next_tokens,
    standard_accuracy,
    standard_correct,
)
from megatron_rpt.eval.reasoning import generate_and_score, reasoning_accuracy, reasoning_params
from megatron_rpt.eval.report import BucketAccumulator, EvalReport, ReportRow, flat_metrics
from megatron_rpt.rollout.handover import engine_awake

log = logging.getLogger(__name__)

MODES = typing.get_args(EvalMode)

__all__ = [
    "MODES",
    "ValidationSet",
    "load_validation_set",
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
    contexts: list[list[int]]  # x_<t of each problem (no template)
    entropies: list[float | None] | None  # None: not scored yet (the evaluated model scores them)
    scorer: str  # how the entropies were (or will be) obtained, for the report

    def __len__(self) -> int:
        return len(self.problems)

    def shard(self, rank: int, size: int) -> ValidationSet:
        pick = lambda xs: None if xs is None else xs[rank::size]  # noqa: E731
        return ValidationSet(self.problems[rank::size], self.contexts[rank::size], pick(self.entropies), self.scorer)


def _problem_key(problem: Any) -> tuple[Any, Any, tuple[int, ...]]:
    return (getattr(problem, "doc_id", None), getattr(problem, "position", None), tuple(problem.target_ids[:1]))


def take_problems(stream: Any, limit: int) -> list[Any]:
    """Up to ``limit`` distinct problems; stops at the end of a finite stream or when it wraps around."""
    problems: list[Any] = []
    seen: set[tuple[Any, Any, tuple[int, ...]]] = set()
    iterator = iter(stream)
    while len(problems) < limit:
        try:
            problem = next(iterator)
        except StopIteration:
            break
        key = _problem_key(problem)
        if key in seen and key[0] is not None:
            break  # an endless stream started its next pass over the held-out documents
        seen.add(key)
        problems.append(problem)
    return problems


def scorer_choice(cfg: Config) -> str | None:
    """The HF dir that re-scores difficulty, or None (use the problems' own entropy / the model itself)."""
    scorer = cfg.eval.scorer_model
    if scorer and scorer != cfg.data.proxy_model:
        return scorer
    return None


def _proxy_entropies(model_dir: str, contexts: Sequence[Sequence[int]], problems: Sequence[Any],
                     top_k: int) -> list[float | None]:
    from megatron_rpt.data.entropy_filter import ProxyScorer

    if not Path(model_dir, "config.json").is_file():
        raise FileNotFoundError(f"eval.scorer_model={model_dir!r} is not a Hugging Face model directory "
                                "(no config.json); fix the path or set it to null")
    scorer = ProxyScorer(model_dir, top_k=top_k)
    docs = [list(c) + [int(p.target_ids[0])] for c, p in zip(contexts, problems)]
    scores = scorer.score(docs)
    return [float(s[-1]) if math.isfinite(float(s[-1])) else None for s in scores]


def load_validation_set(cfg: Config, tokenizer: Any, max_positions: int | None = None,
                        problems: Sequence[Any] | None = None) -> ValidationSet:
    """The held-out positions (``ProblemStream(split="val")`` unless ``problems`` are given) and their scorer."""
    limit = max_positions or cfg.eval.max_positions
    if problems is None:
        from megatron_rpt.data import ProblemStream

        stream = ProblemStream(cfg.data, tokenizer, dp_rank=0, dp_size=1, split="val")
        problems = take_problems(stream, limit)
    problems = list(problems)[:limit]
    if not problems:
        raise ValueError("the validation split has no positions: raise data.val_documents or check data.paths")
    contexts = [context_token_ids(p, tokenizer) for p in problems]
    scorer = scorer_choice(cfg)
    if scorer is not None:
        entropies = _proxy_entropies(scorer, contexts, problems, cfg.data.entropy_top_k)
        return ValidationSet(problems, contexts, entropies, f"eval.scorer_model={scorer}")
    carried = [getattr(p, "entropy", None) for p in problems]
    if any(e is not None for e in carried):
        source = cfg.data.proxy_model or cfg.data.prepared or "data pipeline"
        return ValidationSet(problems, contexts, [None if e is None else float(e) for e in carried],
                             f"data pipeline proxy ({source})")
    return ValidationSet(problems, contexts, None,
                         "the evaluated model itself (no eval.scorer_model or data.proxy_model configured)")


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
    from megatron_rpt.rollout.torch_decoder import Decoder

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
            cfg.rl.require_think, progress=progress)
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
    if res.standard is not None:
        accs[("standard", "accuracy")] = standard_accuracy(res.standard, val.entropies, th)
    if res.rewards is not None:
        kept = [(r, e) for r, e in zip(res.rewards, val.entropies) if r is not None]
        random1, pass_k = reasoning_accuracy([r for r, _ in kept], [e for _, e in kept], th)
        accs[("reasoning", "random@1")] = random1
        accs[("reasoning", "pass@k")] = pass_k
    return accs


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
        "positions": len(val),
        "positions_in_buckets": sum(1 for e in val.entropies or [] if e is not None and e > lowest),
        "difficulty_scorer": val.scorer,
        "entropy_top_k": cfg.data.entropy_top_k,
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


def evaluate_during_training(trainer_or_parts: Any, step: int, modes: Sequence[str] | None = None,
                             validation_set: ValidationSet | None = None) -> dict[str, float]:
    """Validation metrics for the training loop: ``val/standard_acc_easy``, ``val/reasoning_random1_hard``,
    ``val/reasoning_passk_medium``, ``val/count_easy``, ... plus ``val/positions`` and ``val/time_s``.

    Pass the :class:`~megatron_rpt.trainer.loop.Trainer` (collective: call it on every rank; each
    data-parallel rank evaluates its share of the ``eval.max_positions`` positions and the sums are
    all-reduced) or ``(cfg, engine, tokenizer)`` (one process). Modes default to ``eval.modes``;
    ``validation_set`` replaces the held-out positions (default: built once per config and cached).
    Rank 0 also writes ``<logging.dir>/eval/step_XXXXXX.{json,md}``.
    """
    import torch.distributed as dist

    cfg, engine, tokenizer, dp_rank, dp_size, contributes, _ = _unpack(trainer_or_parts)
    modes = tuple(modes or getattr(cfg.eval, "modes", MODES))
    start = time.perf_counter()
    keys = [("standard", "accuracy")] if "standard" in modes else []
    if "reasoning" in modes:
        keys += [("reasoning", "random@1"), ("reasoning", "pass@k")]
    n_buckets = len(cfg.data.difficulty_thresholds)
    local = [0.0] * (2 * n_buckets * len(keys) + 2)
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
        accs = accumulators(cfg, shard, res)
        flat: list[float] = []
        for key in keys:
            flat += accs[key].sums + [float(c) for c in accs[key].counts]
        local = flat + [float(len(shard)), float(res.generated_tokens)]
    total = all_reduce_numbers(local)
    report_accs: dict[tuple[str, str], BucketAccumulator] = {}
    for i, key in enumerate(keys):
        acc = BucketAccumulator(cfg.data.difficulty_thresholds)
        base = 2 * n_buckets * i
        acc.merge_counts(total[base:base + n_buckets], [int(c) for c in total[base + n_buckets:base + 2 * n_buckets]])
        report_accs[key] = acc
    seconds = time.perf_counter() - start
    meta = {"step": step, "positions": int(total[-2]), "generated_tokens": int(total[-1]), "modes": ", ".join(modes)}
    report = build_report(cfg, f"step {step}", report_accs, meta)
    metrics = flat_metrics(report)
    metrics["val/positions"] = total[-2]
    metrics["val/generated_tokens"] = total[-1]
    metrics["val/time_s"] = seconds
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            from megatron_rpt.eval.report import write_report

            write_report(report, Path(cfg.logging.dir) / "eval", stem=f"step_{step:06d}")
        except OSError as exc:  # a full disk must not kill the training run
            log.warning("could not write the evaluation report for step %d: %s", step, exc)
    return metrics
