"""Sequence packing: prompt+response samples packed into token budgets (THD micro-batches).

Owns: :class:`PackingSpec` (the token budget and padding rules of one parallel layout),
:func:`pack_micro_batches` (which samples go into which micro-batch and the packed tensors),
and reading per-sample values back out of packed micro-batches (:func:`response_values`).

A packed micro-batch is one row ``[1, T]`` holding several ``prompt + response`` sequences
back to back, with the same next-token alignment as :mod:`megatron_rpt.rl.batch` *inside*
each sequence: the last token of a sequence predicts nothing (its label is ``pad_id`` and it
carries no loss), so no label crosses into the next sequence. Per sequence:

    position_ids   restart at 0
    cu_seqlens     int32 [n + 1] offsets of the sequences (Transformer Engine's THD
                   ``cu_seqlens``); the padding at the end of the row is one more sequence
    segment_ids    [1, T] index of the sequence a token belongs to, -1 on padding
    sample_index   [n] the sample each sequence came from (its index in the mini-batch)

Attention must not cross sequences: on GPU the policy hands ``cu_seqlens`` to Transformer
Engine as ``PackedSeqParams(qkv_format="thd")``; with Megatron-Core's local spec (CPU) the
attention is the row's block-diagonal causal mask, evaluated block by block
(:func:`megatron_rpt.model.specs.packed_local_attention`). Context parallelism needs every sequence split
into ``2 * cp`` equal chunks (Transformer Engine's THD load balancing), so with CP each
sequence is padded to ``seq_multiple``: ``cu_seqlens_padded`` then holds the padded offsets
and ``cu_seqlens`` the real ones. (That layout and its split are checked by hand, but CP runs
only on a GPU and has not run packed there: the config refuses packing with CP for now, see
:func:`~megatron_rpt.rl.context_parallel.check_context_parallel_config`.)

Micro-batches are filled by first-fit decreasing on the (padded) sequence lengths: every
micro-batch holds at most ``max_tokens`` tokens, the number of micro-batches is close to
``total tokens / max_tokens``, and the order is deterministic (ties keep the sample order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

PACKED_KEY = "cu_seqlens"  # a micro-batch dict with this key is packed


@dataclass(frozen=True)
class PackingSpec:
    """How one parallel layout wants its packed micro-batches."""

    max_tokens: int  # token budget of one micro-batch (rl.micro_batch_tokens)
    pad_to_multiple_of: int = 1  # the row length is a multiple of this (sequence parallel, CP, alignment)
    seq_multiple: int = 1  # every sequence padded to a multiple of this (2 * CP with context parallelism)
    fixed_length: bool = False  # every row exactly max_tokens long (pipeline p2p, expert-parallel collectives)

    def __post_init__(self) -> None:
        for name in ("max_tokens", "pad_to_multiple_of", "seq_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"PackingSpec.{name}={getattr(self, name)} must be >= 1")
        if self.max_tokens % self.pad_to_multiple_of:
            raise ValueError(f"PackingSpec.max_tokens={self.max_tokens} must be a multiple of "
                             f"pad_to_multiple_of={self.pad_to_multiple_of}")
        if self.max_tokens % self.seq_multiple:
            raise ValueError(f"PackingSpec.max_tokens={self.max_tokens} must be a multiple of "
                             f"seq_multiple={self.seq_multiple}")


def token_budget(cfg: Any) -> int:
    """Tokens of one packed micro-batch before rounding: ``rl.micro_batch_tokens``, or room for
    ``rl.micro_batch_size`` samples of the longest length (the padded path's worst case)."""
    if cfg.rl.micro_batch_tokens is not None:
        return cfg.rl.micro_batch_tokens
    return cfg.rl.micro_batch_size * (cfg.data.max_prompt_tokens + cfg.rollout.max_response_tokens)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def assign_bins(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """First-fit decreasing: lists of sample indices whose lengths sum to at most ``max_tokens``."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        if lengths[i] > max_tokens:
            raise ValueError(f"sample {i} is {lengths[i]} tokens > the micro-batch token budget {max_tokens}; "
                             "raise rl.micro_batch_tokens or shorten data.max_prompt_tokens / "
                             "rollout.max_response_tokens")
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_tokens - lengths[i])
    return bins


def pack_micro_batches(
    prompts: Sequence[list[int]],
    responses: Sequence[list[int]],
    per_token: dict[str, Sequence[Tensor]],
    spec: PackingSpec,
    pad_id: int = 0,
) -> list[dict[str, Tensor]]:
    """Packed micro-batches of ``prompt + response`` samples.

    ``per_token[name][i]`` is a float tensor of sample ``i``'s values per response token
    (advantages, old / ref log-probs); each lands on the positions that predict those tokens.
    """
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    padded = [_round_up(n, spec.seq_multiple) for n in lengths]
    return [_pack_one(rows, prompts, responses, per_token, padded, spec, pad_id)
            for rows in assign_bins(padded, spec.max_tokens)]


def _pack_one(rows: list[int], prompts, responses, per_token, padded: list[int], spec: PackingSpec,
              pad_id: int) -> dict[str, Tensor]:
    used = sum(padded[i] for i in rows)
    width = spec.max_tokens if spec.fixed_length else _round_up(max(used, 1), spec.pad_to_multiple_of)
    out = empty_packed(width, pad_id, per_token)
    real, offsets = [0], [0]
    at = 0
    for seq, i in enumerate(rows):
        p, r = prompts[i], responses[i]
        n = len(p) + len(r)
        span = slice(at, at + n)
        row = torch.tensor(list(p) + list(r), dtype=torch.long)
        out["tokens"][0, span] = row
        out["labels"][0, at:at + n - 1] = row[1:]
        out["position_ids"][0, at:at + padded[i]] = torch.arange(padded[i])
        out["segment_ids"][0, at:at + padded[i]] = seq
        if r:
            # Response token j sits at at + len(p) + j and is predicted one position earlier.
            loss = slice(at + len(p) - 1, at + len(p) - 1 + len(r))
            out["loss_mask"][0, loss] = 1.0
            for name, values in per_token.items():
                out[name][0, loss] = values[i]
        real.append(at + n)
        at += padded[i]
        offsets.append(at)
    if at < width:  # the padding at the end of the row is one more (loss-free) sequence
        out["position_ids"][0, at:] = torch.arange(width - at)
        real.append(width)
        offsets.append(width)
    out["cu_seqlens"] = torch.tensor(real, dtype=torch.int32)
    out["cu_seqlens_padded"] = torch.tensor(offsets, dtype=torch.int32)
    out["max_seqlen"] = torch.tensor(int((out["cu_seqlens_padded"].diff()).max()), dtype=torch.int32)
    out["sample_index"] = torch.tensor(rows, dtype=torch.long)
    return out


def empty_packed(width: int, pad_id: int, per_token: dict[str, Sequence[Tensor]] | Sequence[str]) -> dict[str, Tensor]:
    """A packed row of ``width`` padding tokens: no sequence, no loss (also what fills up a
    data-parallel rank that has fewer micro-batches than the others)."""
    out = {
        "tokens": torch.full((1, width), pad_id, dtype=torch.long),
        "position_ids": torch.arange(width, dtype=torch.long).unsqueeze(0),
        "labels": torch.full((1, width), pad_id, dtype=torch.long),
        "loss_mask": torch.zeros((1, width), dtype=torch.float32),
        "segment_ids": torch.full((1, width), -1, dtype=torch.long),
        "cu_seqlens": torch.tensor([0, width], dtype=torch.int32),
        "cu_seqlens_padded": torch.tensor([0, width], dtype=torch.int32),
        "max_seqlen": torch.tensor(width, dtype=torch.int32),
        "sample_index": torch.zeros(0, dtype=torch.long),
    }
    for name in per_token:
        out[name] = torch.zeros((1, width), dtype=torch.float32)
    return out


def is_packed(micro_batch: dict[str, Tensor]) -> bool:
    return PACKED_KEY in micro_batch


def response_values(micro_batches: Sequence[dict[str, Tensor]], values: Sequence[Tensor]) -> list[Tensor]:
    """Per sample (mini-batch order): ``values`` on the positions that carry its response's loss.

    ``values[k]`` is shaped like micro-batch ``k``'s ``loss_mask``. Works on packed micro-batches
    (sequences located by ``segment_ids`` / ``sample_index``) and on padded ones (one row per
    sample, in order; the empty rows that pad a pipeline's last micro-batch are skipped).
    """
    found: dict[int, Tensor] = {}
    rows: list[Tensor] = []
    for mb, vals in zip(micro_batches, values):
        mask = mb["loss_mask"].bool()
        if is_packed(mb):
            for seq, sample in enumerate(mb["sample_index"].tolist()):
                found[sample] = vals[0][mask[0] & (mb["segment_ids"][0] == seq)]
            continue
        real = mb["prompt_lengths"] > 0 if "prompt_lengths" in mb else mask.any(-1)  # not shape padding
        rows.extend(vals[r][mask[r]] for r in range(mask.shape[0]) if real[r])
    if found:
        return [found[i] for i in sorted(found)]
    return rows
