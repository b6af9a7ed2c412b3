"""Rollouts into training micro-batches: right-padded rows, or packed (see :mod:`.packing`).

Owns: :class:`TrainBatch` and the alignment rule between tokens and what the loss
reads. A sample is ``prompt + response`` in one row; the logits at position ``t``
predict ``tokens[t + 1]``, so

    labels[t]      = tokens[t + 1]                (pad_id past the end)
    loss_mask[t]   = 1 iff tokens[t + 1] is a response token
    advantages[t], old_logprobs[t], ref_logprobs[t]  belong to that same token.

With prompt ``[p0, p1, p2]`` and response ``[r0, r1]`` the positions 2 and 3 carry the
loss (their logits predict r0 and r1). Right padding keeps every real token at its true
position under causal attention, so ``position_ids`` are plain ``0..s-1`` and no
attention mask is needed (``attention_mask=None`` with Megatron's causal masking).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Sequence

import torch
from torch import Tensor

from megatron_rpt.rl.packing import PackingSpec, pack_micro_batches

IntSeq = Sequence[int] | Tensor
FloatSeq = Sequence[float] | Tensor


@dataclass
class TrainBatch:
    tokens: Tensor  # [b, s] int64 input ids, right-padded with pad_id
    position_ids: Tensor  # [b, s] int64
    labels: Tensor  # [b, s] int64 next-token ids (pad_id where nothing is predicted)
    loss_mask: Tensor  # [b, s] float32, 1 on positions whose label is a response token
    advantages: Tensor  # [b, s] float32, 0 off the mask
    old_logprobs: Tensor | None  # [b, s] float32 behaviour-policy logprob of labels, 0 off the mask
    ref_logprobs: Tensor | None  # [b, s] float32 reference-policy logprob of labels, 0 off the mask
    prompt_lengths: Tensor  # [b] int64
    response_lengths: Tensor  # [b] int64
    pad_id: int = 0
    pad_to_multiple_of: int = 1

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_tokens(self) -> int:
        """Response tokens that carry loss (the token-mean denominator)."""
        return int(self.loss_mask.sum())

    @property
    def num_seqs(self) -> int:
        """Samples with at least one response token (the seq-mean denominator)."""
        return int((self.response_lengths > 0).sum())

    def as_dict(self) -> dict[str, Tensor]:
        """The tensors by field name (``old_logprobs`` / ``ref_logprobs`` left out when None)."""
        return {f.name: v for f in fields(self) if isinstance(v := getattr(self, f.name), Tensor)}

    def to(self, device: torch.device | str) -> "TrainBatch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, Tensor):
                moved[name] = value.to(device, non_blocking=True)
        return TrainBatch(**moved)


def _as_list(x: IntSeq | FloatSeq) -> list:
    return x.tolist() if isinstance(x, Tensor) else list(x)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def build_batch(
    prompt_ids: Sequence[IntSeq],
    response_ids: Sequence[IntSeq],
    advantages: FloatSeq | Sequence[FloatSeq],
    old_logprobs: Sequence[FloatSeq] | None = None,
    ref_logprobs: Sequence[FloatSeq] | None = None,
    pad_id: int = 0,
    pad_to_multiple_of: int = 1,
    max_length: int | None = None,
) -> TrainBatch:
    """Right-padded batch of ``prompt + response`` rows with next-token aligned targets.

    ``advantages`` holds one float per sample (GRPO: the sequence's group advantage,
    broadcast to its response tokens) or one sequence per sample with a value per
    response token. ``old_logprobs`` / ``ref_logprobs``, when given, hold one value per
    response token (as the rollout engine reports them). ``pad_to_multiple_of`` rounds
    the sequence length up (e.g. to the TP size with sequence parallelism).
    """
    prompts, responses = _check_samples(prompt_ids, response_ids, advantages, old_logprobs, ref_logprobs,
                                        max_length)
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of} must be >= 1")
    n = len(prompts)
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    seq_len = _round_up(max(lengths), pad_to_multiple_of)

    tokens = torch.full((n, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((n, seq_len), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((n, seq_len), dtype=torch.float32)
    adv = torch.zeros((n, seq_len), dtype=torch.float32)
    old = torch.zeros((n, seq_len), dtype=torch.float32) if old_logprobs is not None else None
    ref = torch.zeros((n, seq_len), dtype=torch.float32) if ref_logprobs is not None else None

    for i, (p, r) in enumerate(zip(prompts, responses)):
        row = torch.tensor(p + r, dtype=torch.long)
        tokens[i, : len(row)] = row
        labels[i, : len(row) - 1] = row[1:]
        if not r:
            continue
        # Response token j sits at index len(p) + j and is predicted at index len(p) + j - 1.
        span = slice(len(p) - 1, len(p) - 1 + len(r))
        loss_mask[i, span] = 1.0
        adv[i, span] = _per_token(advantages[i], len(r), "advantages", i)
        if old is not None:
            old[i, span] = _per_token(old_logprobs[i], len(r), "old_logprobs", i, per_sequence_ok=False)
        if ref is not None:
            ref[i, span] = _per_token(ref_logprobs[i], len(r), "ref_logprobs", i, per_sequence_ok=False)

    return TrainBatch(
        tokens=tokens,
        position_ids=torch.arange(seq_len, dtype=torch.long).unsqueeze(0).expand(n, -1).contiguous(),
        labels=labels,
        loss_mask=loss_mask,
        advantages=adv,
        old_logprobs=old,
        ref_logprobs=ref,
        prompt_lengths=torch.tensor([len(p) for p in prompts], dtype=torch.long),
        response_lengths=torch.tensor([len(r) for r in responses], dtype=torch.long),
        pad_id=pad_id,
        pad_to_multiple_of=pad_to_multiple_of,
    )


def _check_samples(prompt_ids, response_ids, advantages, old_logprobs, ref_logprobs,
                   max_length: int | None) -> tuple[list[list[int]], list[list[int]]]:
    """The samples as lists, after the checks both the padded and the packed layout need."""
    n = len(prompt_ids)
    if len(response_ids) != n:
        raise ValueError(f"{n} prompts but {len(response_ids)} responses; give one response per sample")
    if len(advantages) != n:
        raise ValueError(f"{n} samples but {len(advantages)} advantages; give one per sample")
    for name, extra in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if extra is not None and len(extra) != n:
            raise ValueError(f"{n} samples but {len(extra)} {name} rows; give one row per sample")
    if n == 0:
        raise ValueError("build_batch needs at least one sample")
    prompts = [_as_list(p) for p in prompt_ids]
    responses = [_as_list(r) for r in response_ids]
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if not p:
            raise ValueError(f"sample {i} has an empty prompt; the first response token needs a position to predict it")
        if max_length is not None and len(p) + len(r) > max_length:
            raise ValueError(
                f"sample {i} is {len(p) + len(r)} tokens (prompt {len(p)} + response {len(r)}) > "
                f"max_length={max_length}; shorten data.max_prompt_tokens or rollout.max_response_tokens"
            )
    return prompts, responses


def _per_token(value, length: int, name: str, index: int, per_sequence_ok: bool = True) -> Tensor:
    if isinstance(value, Tensor) and value.dim() == 0 or isinstance(value, (int, float)):
        if not per_sequence_ok:
            raise ValueError(f"{name}[{index}] is a scalar; give one value per response token ({length})")
        return torch.full((length,), float(value), dtype=torch.float32)
    values = torch.as_tensor(_as_list(value), dtype=torch.float32)
    if values.shape != (length,):
        raise ValueError(f"{name}[{index}] has {values.numel()} values but the response has {length} tokens")
    return values


def split_micro_batches(batch: TrainBatch, micro_batch_size: int, same_shape: bool = False) -> list[TrainBatch]:
    """Consecutive chunks of ``micro_batch_size`` rows.

    By default each chunk is trimmed to its own longest row (rounded up to the batch's
    ``pad_to_multiple_of``) and the last chunk may be smaller, so short micro-batches do
    not pay for long ones. ``same_shape=True`` gives every chunk the full batch width and
    fills the last one up with empty rows (all padding, no loss) — what pipeline
    parallelism needs, since its p2p buffers have one fixed ``[b, s]`` shape.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size} must be >= 1 (rl.micro_batch_size)")
    if same_shape and batch.size % micro_batch_size:
        batch = _append_empty_rows(batch, micro_batch_size - batch.size % micro_batch_size)
    out = []
    for start in range(0, batch.size, micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        width = batch.tokens.shape[1]
        if not same_shape:
            lengths = batch.prompt_lengths[rows] + batch.response_lengths[rows]
            width = min(_round_up(int(lengths.max()), batch.pad_to_multiple_of), width)
        chunk = {}
        for f in fields(batch):
            value = getattr(batch, f.name)
            if isinstance(value, Tensor):
                value = value[rows]
                if value.dim() == 2:
                    value = value[:, :width]
                value = value.contiguous()
            chunk[f.name] = value
        out.append(replace(batch, **chunk))
    return out


def _append_empty_rows(batch: TrainBatch, count: int) -> TrainBatch:
    grown = {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, Tensor):
            if f.name == "position_ids":
                extra = value[:1].expand(count, -1)
            elif f.name in ("tokens", "labels"):
                extra = torch.full((count, value.shape[1]), batch.pad_id, dtype=value.dtype)
            else:
                extra = torch.zeros((count, *value.shape[1:]), dtype=value.dtype)
            value = torch.cat([value, extra.to(value.device)])
        grown[f.name] = value
    return replace(batch, **grown)


def build_micro_batches(
    samples: Sequence[tuple[IntSeq, IntSeq]],
    advantages: FloatSeq | Sequence[FloatSeq],
    micro_batch_size: int,
    pad_token_id: int = 0,
    pad_to_multiple_of: int = 1,
    old_logprobs: Sequence[FloatSeq] | None = None,
    ref_logprobs: Sequence[FloatSeq] | None = None,
    same_shape: bool = True,
    packing: PackingSpec | None = None,
) -> list[dict[str, Tensor]]:
    """``(prompt_ids, response_ids)`` samples -> micro-batches as dicts of tensors.

    With ``packing`` (the policy's :attr:`~megatron_rpt.trainer.policy.MegatronPolicy.packing`):
    samples packed into token budgets (:mod:`megatron_rpt.rl.packing`; ``micro_batch_size`` and
    ``pad_to_multiple_of`` are then the spec's business). Without: :func:`build_batch` +
    :func:`split_micro_batches` (``same_shape=True`` by default, as Megatron's pipeline
    schedules need) + :meth:`TrainBatch.as_dict`.
    """
    if packing is not None:
        prompts, responses = _check_samples([p for p, _ in samples], [r for _, r in samples], advantages,
                                            old_logprobs, ref_logprobs, None)
        per_token = {"advantages": [_per_token(a, len(r), "advantages", i)
                                    for i, (a, r) in enumerate(zip(advantages, responses))]}
        for name, rows in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
            if rows is not None:
                per_token[name] = [_per_token(v, len(r), name, i, per_sequence_ok=False)
                                   for i, (v, r) in enumerate(zip(rows, responses))]
        return pack_micro_batches(prompts, responses, per_token, packing, pad_id=pad_token_id)
    batch = build_batch(
        [p for p, _ in samples], [r for _, r in samples], advantages, old_logprobs, ref_logprobs,
        pad_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of,
    )
    return [mb.as_dict() for mb in split_micro_batches(batch, micro_batch_size, same_shape=same_shape)]
