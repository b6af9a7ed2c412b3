"""Context parallelism (CP) for the GRPO training path.

Owns: Megatron's load-balanced sequence split of a micro-batch across the CP ranks (as
``megatron.core.utils.get_batch_on_this_cp_rank``: the sequence is cut into ``2 * cp``
chunks and rank ``r`` keeps chunks ``r`` and ``2 * cp - 1 - r``, so every rank gets the
same share of causal-attention work), its inverse (gathering per-rank pieces back into
sequence order), the padding multiple CP needs, the loss scale that makes Megatron's
schedule and DDP reproduce the global-batch GRPO loss, and the config checks for CP.

Loss scaling. With a 2-tuple ``loss_func`` return, ``forward_step_calc_loss`` in
megatron-core's pipeline schedules multiplies every micro-batch loss by the CP size and
divides it by the number of micro-batches ``M``; DDP then averages gradients over the
data-parallel group WITH context parallel (``dp * cp`` ranks: ``gradient_scaling_factor =
1 / dp_cp_group.size()`` followed by a sum). A rank's loss therefore reaches the update
with weight ``cp / (M * dp * cp) = 1 / (M * dp)``: the CP factor cancels. Our GRPO loss is a
sum over local tokens divided by global counts, so multiplying it by ``M * dp`` makes the
sum over (dp, cp, micro-batch) pieces equal the global loss.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_rpt.config import Config, ConfigError
from megatron_rpt.model.specs import resolve_transformer_impl


def context_parallel_positions(seq_len: int, cp_size: int, cp_rank: int) -> Tensor:
    """Sequence positions (int64) that CP rank ``cp_rank`` keeps, in the order it keeps them."""
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank={cp_rank} must lie in [0, cp_size={cp_size})")
    if seq_len % (2 * cp_size):
        raise ValueError(
            f"sequence length {seq_len} is not a multiple of 2*context_parallel={2 * cp_size}; "
            "pad micro-batches to seq_multiple (MegatronPolicy does) before splitting"
        )
    chunk = seq_len // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * chunk, (2 * cp_size - cp_rank) * chunk)
    return torch.cat([first, second])


def packed_context_parallel_positions(cu_seqlens_padded: Tensor, cp_size: int, cp_rank: int) -> Tensor:
    """Positions CP rank ``cp_rank`` keeps of a packed row: the same two chunks of EVERY sequence.

    Transformer Engine's THD context parallelism (``thd_get_partitioned_indices``) balances each
    packed sequence on its own: sequence ``[a, a + L)`` (``L`` a multiple of ``2 * cp``, see
    :class:`~megatron_rpt.rl.packing.PackingSpec`) is cut into ``2 * cp`` chunks and rank ``r``
    keeps chunks ``r`` and ``2 * cp - 1 - r`` of it.
    """
    starts = cu_seqlens_padded[:-1].tolist()
    lengths = cu_seqlens_padded.diff().tolist()
    pieces = []
    for start, length in zip(starts, lengths):
        if length % (2 * cp_size):
            raise ValueError(f"packed sequence of {length} tokens at offset {start} is not a multiple of "
                             f"2*context_parallel={2 * cp_size}; pack with PackingSpec.seq_multiple={2 * cp_size}")
        pieces.append(context_parallel_positions(length, cp_size, cp_rank) + start)
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def context_parallel_index(batch: dict[str, Tensor], cp_size: int, cp_rank: int) -> Tensor:
    """The sequence positions of ``batch`` that CP rank ``cp_rank`` keeps (packed or padded rows)."""
    if "cu_seqlens_padded" in batch:
        return packed_context_parallel_positions(batch["cu_seqlens_padded"], cp_size, cp_rank)
    return context_parallel_positions(batch["tokens"].shape[1], cp_size, cp_rank)


def split_for_context_parallel(batch: dict[str, Tensor], cp_size: int, cp_rank: int) -> dict[str, Tensor]:
    """This CP rank's share of a micro-batch (a new dict; the input is not modified).

    Every tensor whose dim 1 is the sequence (``[b, s, ...]``, same ``s`` as ``tokens``)
    is split; per-sample tensors such as ``prompt_lengths`` ``[b]`` and a packed row's
    ``cu_seqlens`` (global offsets, as Transformer Engine takes them) pass through.
    """
    if cp_size == 1:
        return dict(batch)
    seq_len = batch["tokens"].shape[1]
    index = context_parallel_index(batch, cp_size, cp_rank)
    out = {}
    for key, value in batch.items():
        if isinstance(value, Tensor) and value.dim() >= 2 and value.shape[1] == seq_len:
            value = value.index_select(1, index.to(value.device))
        out[key] = value
    return out


def unsplit_context_parallel(pieces: list[Tensor]) -> Tensor:
    """Inverse of the split: ``pieces[r]`` is rank ``r``'s ``[b, s / cp, ...]`` share -> ``[b, s, ...]``."""
    cp_size = len(pieces)
    local = pieces[0].shape[1]
    if local % 2 or any(p.shape != pieces[0].shape for p in pieces):
        raise ValueError(f"CP pieces must share one shape with an even sequence dim, got "
                         f"{[tuple(p.shape) for p in pieces]}")
    half = local // 2
    chunks: list[Tensor | None] = [None] * (2 * cp_size)
    for rank, piece in enumerate(pieces):
        chunks[rank] = piece[:, :half]
        chunks[2 * cp_size - 1 - rank] = piece[:, half:]
    return torch.cat(chunks, dim=1)  # type: ignore[arg-type]


def unsplit_packed_context_parallel(pieces: list[Tensor], cu_seqlens_padded: Tensor) -> Tensor:
    """Inverse of the packed split: ``pieces[r]`` is rank ``r``'s ``[1, T / cp, ...]`` share."""
    cp_size = len(pieces)
    total = int(cu_seqlens_padded[-1])
    out = pieces[0].new_empty(pieces[0].shape[0], total, *pieces[0].shape[2:])
    for rank, piece in enumerate(pieces):
        out[:, packed_context_parallel_positions(cu_seqlens_padded, cp_size, rank).to(piece.device)] = piece
    return out


def gather_from_context_parallel(local: Tensor, group: dist.ProcessGroup,
                                 cu_seqlens_padded: Tensor | None = None) -> Tensor:
    """All-gather every CP rank's ``[b, s / cp, ...]`` share and restore sequence order.

    ``group``: the context-parallel group (the policy's ``topo.cp_group``); a collective over it.
    Packed rows pass their ``cu_seqlens_padded`` (each sequence was split on its own).
    """
    size = dist.get_world_size(group)
    if size == 1:
        return local
    local = local.contiguous()
    pieces = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(pieces, local, group=group)
    if cu_seqlens_padded is not None:
        return unsplit_packed_context_parallel(pieces, cu_seqlens_padded)
    return unsplit_context_parallel(pieces)


def grpo_loss_scale(num_microbatches: int, data_parallel_size: int) -> int:
    """Factor on a rank's GRPO loss so Megatron's schedule + DDP scalings give the global loss.

    ``data_parallel_size`` is the pure DP size (without CP); see the module docstring for
    why the CP size does not appear.
    """
    if num_microbatches < 1 or data_parallel_size < 1:
        raise ValueError(f"num_microbatches={num_microbatches} and data_parallel_size={data_parallel_size} "
                         "must be >= 1")
    return num_microbatches * data_parallel_size


def packed_sequence_multiple(context_parallel: int) -> int:
    """Each packed sequence is padded to this: ``2 * cp`` equal chunks with context parallelism."""
    return 2 * context_parallel if context_parallel > 1 else 1


def sequence_multiple(context_parallel: int, tensor_parallel: int, sequence_parallel: bool) -> int:
    """Micro-batch sequence lengths are padded to a multiple of this.

    CP splits the sequence into ``2 * cp`` chunks; sequence parallelism then splits each
    rank's ``s / cp`` tokens over TP, so it needs ``2 * cp * tp``. 8 keeps kernels aligned.
    """
    need = 2 * context_parallel if context_parallel > 1 else 1
    if sequence_parallel:
        need *= tensor_parallel
    return math.lcm(8, need)


def check_context_parallel_config(cfg: Config) -> None:
    """ConfigError unless this config can train with ``parallel.context_parallel`` > 1.

    ``cfg`` is a :class:`megatron_rpt.config.Config`. CP needs Transformer Engine's
    attention (Megatron-Core's local spec asserts CP == 1), and ``seq-mean-token-mean``
    needs each sequence's full response length, which a CP rank holding part of the
    sequence does not see (``token-mean`` and ``seq-mean-token-sum`` are sums over tokens
    with global denominators, so they split exactly).
    """
    cp = cfg.parallel.context_parallel
    if cp <= 1:
        return
    if cfg.rl.sequence_packing:
        # The packed THD split (packed_context_parallel_positions) follows Transformer Engine's,
        # but CP runs only on a GPU and packing with CP has not been run there yet.
        raise ConfigError(
            f"rl.sequence_packing=true is not supported with parallel.context_parallel={cp} (packed THD rows "
            "with context parallelism are untested); set rl.sequence_packing=false or parallel.context_parallel=1"
        )
    if cfg.rl.loss_aggregation == "seq-mean-token-mean":
        raise ConfigError(
            f"rl.loss_aggregation=seq-mean-token-mean is not supported with parallel.context_parallel={cp} "
            "(each CP rank sees only part of a sequence's response tokens); use rl.loss_aggregation="
            "token-mean or seq-mean-token-sum, or set parallel.context_parallel=1"
        )
    if resolve_transformer_impl(cfg.model) != "transformer_engine":
        raise ConfigError(
            f"parallel.context_parallel={cp} needs Transformer Engine attention (Megatron-Core's local "
            "spec supports only CP=1): run on a CUDA machine with Transformer Engine installed "
            "(pip install -e '.[gpu]', model.transformer_impl=auto or transformer_engine), "
            "or set parallel.context_parallel=1"
        )
