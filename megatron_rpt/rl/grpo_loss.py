"""The GRPO policy loss: clipped token-level surrogate, KL to a reference, entropy bonus.

Owns the per-token loss (its settings are the ``rl`` config section, :class:`~megatron_rpt.config.RLConfig`)

    pg_t      = max(-A_t * r_t, -A_t * clip(r_t, 1 - clip_low, 1 + clip_high))
    pg_t      = min(pg_t, -A_t * dual_clip)            where A_t < 0 (dual clip, optional)
    loss_t    = pg_t + kl_coef * KL_t(pi || pi_ref) - entropy_coef * H_t

with ``r_t = exp(logp_t - old_logp_t)``, its aggregation over a batch (verl's
``token-mean``, ``seq-mean-token-mean`` and ``seq-mean-token-sum``), and the training
metrics (clip fractions, approximate KL, ratio statistics).

Aggregation over a global batch that is split into micro-batches and data-parallel
ranks: pass ``num_global_tokens`` (token-mean) or ``num_global_seqs`` (seq-mean-*), the
counts over the WHOLE global batch. The returned micro-batch losses then SUM to the
full-batch loss (rather than being a mean of per-micro-batch means, which would weight
tokens of short micro-batches more). Scale the result to match how gradients are
reduced: multiply by the data-parallel size when DDP averages gradients, and by the
number of micro-batches when Megatron's pipeline schedule divides each one by it.
"""

from __future__ import annotations

import typing
from typing import Iterable

import torch
from torch import Tensor

from megatron_rpt.config import KLType, LossAggregation, RLConfig

LOSS_AGGREGATIONS = typing.get_args(LossAggregation)
KL_TYPES = typing.get_args(KLType)
# The log-ratio is clamped before exp() (as verl does) so that one stale token cannot overflow.
_MAX_LOG_RATIO = 20.0
# verl's low_var_kl caps the k3 estimate per token; beyond it the token's KL gradient stops.
_MAX_K3 = 10.0


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kl_type: KLType = "k3") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1 / k3).

    k1 = logp - ref_logp (unbiased, can be negative); k3 = exp(ref - logp) - (ref - logp) - 1
    (unbiased, >= 0, low variance; capped at 10 per token as verl's ``low_var_kl``).
    """
    if kl_type == "k1":
        return logprobs - ref_logprobs
    if kl_type == "k3":
        d = (ref_logprobs - logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        return (d.exp() - d - 1).clamp(max=_MAX_K3)
    raise ValueError(f"kl_type={kl_type!r} is not one of {list(KL_TYPES)}")


def aggregate_loss(
    token_loss: Tensor,
    response_mask: Tensor,
    mode: LossAggregation = "token-mean",
    num_global_tokens: int | float | Tensor | None = None,
    num_global_seqs: int | float | Tensor | None = None,
    segment_ids: Tensor | None = None,
) -> Tensor:
    """Reduce ``[b, s]`` per-token losses to a scalar as verl's ``agg_loss`` does.

    token-mean:          sum_{i,t} m l / N_tokens
    seq-mean-token-mean: sum_i (sum_t m l / n_i) / N_seqs
    seq-mean-token-sum:  sum_i (sum_t m l) / N_seqs
    ``N_tokens`` / ``N_seqs`` default to this batch's counts (sequences with no response
    token are not counted); pass the global-batch counts to get sum-decomposable losses.
    A sequence is a row, or with ``segment_ids`` (packed rows: ``[b, s]``, the sequence of each
    token, -1 on padding) the tokens sharing an id.
    """
    mask = response_mask.bool()
    if mask.shape != token_loss.shape:
        raise ValueError(f"response_mask shape {tuple(mask.shape)} != token loss shape {tuple(token_loss.shape)}")
    masked = torch.where(mask, token_loss, torch.zeros_like(token_loss))
    if mode == "token-mean":
        denom = _denominator(num_global_tokens, mask.sum(), "num_global_tokens")
        return masked.sum() / denom
    if mode not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss aggregation {mode!r} is not one of {list(LOSS_AGGREGATIONS)}")
    tokens_per_seq, seq_loss = _per_sequence(masked, mask, segment_ids)
    if mode == "seq-mean-token-mean":
        seq_loss = seq_loss / tokens_per_seq.clamp(min=1)
    denom = _denominator(num_global_seqs, (tokens_per_seq > 0).sum(), "num_global_seqs")
    return seq_loss.sum() / denom


def _per_sequence(masked: Tensor, mask: Tensor, segment_ids: Tensor | None) -> tuple[Tensor, Tensor]:
    """(response tokens, loss sum) per sequence: per row, or per segment of packed rows."""
    if segment_ids is None:
        return mask.sum(dim=-1), masked.sum(dim=-1)
    if segment_ids.shape != mask.shape:
        raise ValueError(f"segment_ids shape {tuple(segment_ids.shape)} != loss shape {tuple(mask.shape)}")
    # One id per (row, segment); padding (-1) goes to a bin of its own that carries no loss.
    width = int(segment_ids.max()) + 2 if segment_ids.numel() else 1
    rows = torch.arange(mask.shape[0], device=mask.device).unsqueeze(-1) * width
    ids = (rows + segment_ids + 1).reshape(-1)
    bins = mask.shape[0] * width
    tokens = torch.zeros(bins, dtype=masked.dtype, device=masked.device)
    tokens = tokens.index_add(0, ids, mask.reshape(-1).to(masked.dtype))
    loss = torch.zeros(bins, dtype=masked.dtype, device=masked.device).index_add(0, ids, masked.reshape(-1))
    return tokens, loss


def _denominator(given: int | float | Tensor | None, local: Tensor, name: str) -> Tensor | float:
    if given is None:
        return local.clamp(min=1)
    if float(given) <= 0:
        raise ValueError(f"{name}={float(given)} must be > 0 (the count over the whole global batch)")
    return given


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    ref_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
    cfg: RLConfig | None = None,
    *,
    num_global_tokens: int | float | Tensor | None = None,
    num_global_seqs: int | float | Tensor | None = None,
    segment_ids: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO loss of one micro-batch and its metrics.

    Shapes: ``logprobs``, ``old_logprobs``, ``response_mask`` (and ``ref_logprobs``,
    ``entropy`` when given) ``[b, s]``; ``advantages`` ``[b, s]`` per token or ``[b]`` per
    sequence. Positions outside ``response_mask`` contribute nothing (not even NaNs).
    ``ref_logprobs`` is required when ``cfg.kl_coef > 0``, ``entropy`` (with grad) when
    ``cfg.entropy_coef > 0``; each is used for metrics whenever given.

    Metrics are detached 0-d tensors: ``loss`` and ``pg_loss`` use the loss's own
    normalisation (they sum over micro-batches like the loss); ``clip_fraction``
    (``_low``, ``_high``, ``dual_clip_fraction``), ``approx_kl`` (k3 estimate of
    KL(old || new)), ``kl_to_ref``, ``entropy`` and ``ratio_mean`` are means over this
    micro-batch's response tokens (``num_tokens`` of them; combine with
    :func:`merge_metrics`); ``ratio_max`` is their max. ``segment_ids`` marks the sequences of
    packed rows (:mod:`megatron_rpt.rl.packing`) for the seq-mean modes and ``num_seqs``.
    """
    cfg = cfg or RLConfig()
    _check_shapes(logprobs, old_logprobs=old_logprobs, response_mask=response_mask,
                  ref_logprobs=ref_logprobs, entropy=entropy)
    if advantages.dim() == logprobs.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    elif advantages.shape != logprobs.shape:
        raise ValueError(
            f"advantages shape {tuple(advantages.shape)} must be [b, s] like logprobs {tuple(logprobs.shape)} or [b]"
        )
    if cfg.kl_coef > 0 and ref_logprobs is None:
        raise ValueError(
            "rl.kl_coef > 0 needs ref_logprobs (reference-policy log-probabilities); pass them or set kl_coef=0"
        )
    if cfg.entropy_coef > 0 and entropy is None:
        raise ValueError(
            "rl.entropy_coef > 0 needs the per-token entropy: "
            "vocab_parallel_logprobs_and_entropy(..., entropy_grad=True)"
        )
    if cfg.entropy_coef > 0 and torch.is_grad_enabled() and logprobs.requires_grad and not entropy.requires_grad:
        # A detached entropy would make the bonus a constant: the loss moves, the policy does not.
        raise ValueError(
            "rl.entropy_coef > 0 but the entropy carries no gradient; compute it with "
            "vocab_parallel_logprobs_and_entropy(..., entropy_grad=True)"
        )

    advantages = advantages.detach().to(logprobs.dtype)
    old_logprobs = old_logprobs.detach()
    log_ratio = (logprobs - old_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = log_ratio.exp()
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    if cfg.dual_clip is not None:
        pg_dual = -advantages * cfg.dual_clip
        dual_active = (advantages < 0) & (pg_dual < pg)
        pg = torch.where(advantages < 0, torch.minimum(pg, pg_dual), pg)

    token_loss = pg
    kl = None
    if ref_logprobs is not None:
        # Without a KL term the estimate is only a metric: keep it off the autograd graph.
        kl = kl_penalty(logprobs if cfg.kl_coef > 0 else logprobs.detach(), ref_logprobs.detach(), cfg.kl_type)
        if cfg.kl_coef > 0:
            token_loss = token_loss + cfg.kl_coef * kl
    if entropy is not None and cfg.entropy_coef > 0:
        token_loss = token_loss - cfg.entropy_coef * entropy

    agg = dict(mode=cfg.loss_aggregation, num_global_tokens=num_global_tokens, num_global_seqs=num_global_seqs,
               segment_ids=segment_ids)
    loss = aggregate_loss(token_loss, response_mask, **agg)

    with torch.no_grad():
        mask = response_mask.bool()
        num_tokens = mask.sum()

        zero = torch.zeros((), dtype=torch.float32, device=logprobs.device)

        def token_mean(x: Tensor) -> Tensor:
            return torch.where(mask, x.float(), zero).sum() / num_tokens.clamp(min=1)

        adv_b = advantages.expand_as(ratio)
        metrics: dict[str, Tensor] = {
            "loss": loss.detach(),
            "pg_loss": aggregate_loss(pg.detach(), response_mask, **agg),
            "clip_fraction": token_mean(pg_clipped > pg_unclipped),
            "clip_fraction_low": token_mean((adv_b < 0) & (ratio < 1.0 - cfg.clip_low)),
            "clip_fraction_high": token_mean((adv_b > 0) & (ratio > 1.0 + cfg.clip_high)),
            "approx_kl": token_mean(ratio - 1.0 - log_ratio),
            "ratio_mean": token_mean(ratio),
            "ratio_max": torch.where(mask, ratio.float(), zero).max() if mask.numel() else zero,
            "num_tokens": num_tokens.float(),
            "num_seqs": (_per_sequence(mask.float(), mask, segment_ids)[0] > 0).sum().float(),
        }
        if cfg.dual_clip is not None:
            metrics["dual_clip_fraction"] = token_mean(dual_active)
        if kl is not None:
            metrics["kl_to_ref"] = token_mean(kl)
        if entropy is not None:
            metrics["entropy"] = token_mean(entropy)
    return loss, metrics


_SUMMED = ("loss", "pg_loss", "num_tokens", "num_seqs")
_MAXED = ("ratio_max",)


def merge_metrics(per_micro_batch: Iterable[dict[str, Tensor]]) -> dict[str, float]:
    """Combine :func:`grpo_loss` metrics of several micro-batches (of one rank) into floats.

    Losses and counts are summed, ``ratio_max`` is maxed, every other metric is a
    token-weighted mean. Reduce across data-parallel ranks the same way.
    """
    items = list(per_micro_batch)
    if not items:
        return {}
    total_tokens = sum(float(m["num_tokens"]) for m in items)
    out: dict[str, float] = {}
    for key in items[0]:
        values = [float(m[key]) for m in items if key in m]
        if key in _SUMMED:
            out[key] = sum(values)
        elif key in _MAXED:
            out[key] = max(values)
        else:
            weights = [float(m["num_tokens"]) for m in items if key in m]
            out[key] = sum(v * w for v, w in zip(values, weights)) / max(sum(weights), 1.0)
    out["num_tokens"] = total_tokens
    return out


def _check_shapes(logprobs: Tensor, **others: Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.shape != logprobs.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != logprobs shape {tuple(logprobs.shape)}")
