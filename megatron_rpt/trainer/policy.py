"""The policy on Megatron-Core: logprobs and GRPO updates through Megatron's schedules.

Owns: running micro-batches through ``get_forward_backward_func()`` (1F1B / interleaved
pipeline schedules or no pipelining), computing token logprobs and entropy on the last
pipeline stage through the vocab-parallel path (full-vocabulary logits are never
gathered), scaling the GRPO loss so that micro-batch and data-parallel averaging inside
Megatron reproduce the loss of the whole global batch, and the optimizer step.

Context parallelism: callers hand over whole (unsplit) micro-batches; ``_run`` pads them to
``seq_multiple`` and keeps this CP rank's load-balanced share for the forward, and
``compute_logprobs`` gathers the CP shares back so every CP rank returns full-length
logprobs (see :mod:`megatron_rpt.rl.context_parallel`).

Packed micro-batches (:mod:`megatron_rpt.rl.packing`, built with :attr:`MegatronPolicy.packing`,
the default) run as THD rows: the forward gets ``PackedSeqParams(qkv_format="thd")`` built from
their ``cu_seqlens`` (Transformer Engine attention on GPU; the local spec's
``PackedDotProductAttention`` applies the block-diagonal causal mask on CPU), RoPE restarts per
sequence, and sequence-mean losses and counts follow ``segment_ids``. With expert parallelism
every data-parallel rank runs the same number of micro-batches (the expert collectives span
them): the ranks with fewer add empty ones.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_rpt.config import Config
from megatron_rpt.distributed import all_reduce_numbers
from megatron_rpt.errors import TrainingDiverged
from megatron_rpt.model.hf_config import ArchConfig
from megatron_rpt.rl import (
    PackingSpec,
    check_context_parallel_config,
    chunked_logprobs_and_entropy,
    gather_from_context_parallel,
    grpo_loss,
    grpo_loss_scale,
    is_packed,
    merge_metrics,
    packed_sequence_multiple,
    sequence_multiple,
    split_for_context_parallel,
    vocab_parallel_logprobs_and_entropy,
)
from megatron_rpt.rl.packing import empty_packed, token_budget
from megatron_rpt.topology import Topology


def packing_spec(cfg: Config) -> PackingSpec | None:
    """The packed micro-batch layout this config's parallel layout runs (None: rl.sequence_packing=false)."""
    if not cfg.rl.sequence_packing:
        return None
    p = cfg.parallel
    multiple = sequence_multiple(p.context_parallel, p.tensor_parallel, p.sequence_parallel)
    budget = -(-token_budget(cfg) // multiple) * multiple
    # Pipeline p2p buffers and the expert-parallel token exchange need one row length everywhere.
    return PackingSpec(max_tokens=budget, pad_to_multiple_of=multiple,
                       seq_multiple=packed_sequence_multiple(p.context_parallel),
                       fixed_length=p.pipeline_parallel > 1 or p.expert_parallel > 1)


def packed_seq_params(mb: dict[str, torch.Tensor]) -> Any:
    """Megatron-Core's ``PackedSeqParams`` (THD) of a packed micro-batch, on its tokens' device."""
    device = mb["tokens"].device
    cu = mb["cu_seqlens"].to(device=device, dtype=torch.int32)
    padded = mb["cu_seqlens_padded"].to(device=device, dtype=torch.int32)
    longest = int(mb["max_seqlen"])
    # With per-sequence padding (context parallelism) TE reads the layout from the padded offsets.
    has_padding = not torch.equal(cu, padded)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           cu_seqlens_q_padded=padded if has_padding else None,
                           cu_seqlens_kv_padded=padded if has_padding else None,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def _pad_to_multiple(batch: dict[str, torch.Tensor], multiple: int) -> dict[str, torch.Tensor]:
    seq = batch["tokens"].shape[1]
    target = int(math.ceil(seq / multiple) * multiple)
    if target == seq:
        return batch
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == seq:
            pad = value.new_zeros(value.shape[0], target - seq, *value.shape[2:])
            if key == "position_ids":
                pad = value[:, -1:] + torch.arange(1, target - seq + 1, dtype=value.dtype).unsqueeze(0)
            out[key] = torch.cat([value, pad], dim=1)
        else:
            out[key] = value
    return out


class MegatronPolicy:
    """DDP-wrapped Megatron model chunks of this rank plus their optimizer and LR schedule."""

    def __init__(self, cfg: Config, arch: ArchConfig, model_chunks: list[Any], optimizer: Any, scheduler: Any,
                 topo: Topology | None = None):
        self.cfg = cfg
        self.arch = arch
        self.chunks = model_chunks
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.temperature = cfg.rollout.temperature
        self.topo = topo if topo is not None else Topology.current()  # the trainer hands down its own
        self.is_last_stage = self.topo.is_last_stage
        check_context_parallel_config(cfg)
        self.dp_size = self.topo.dp_size  # without CP: see grpo_loss_scale
        self.cp_size = self.topo.cp_size
        self.cp_rank = self.topo.cp_rank
        p = cfg.parallel
        self.seq_multiple = sequence_multiple(self.cp_size, p.tensor_parallel, p.sequence_parallel)
        self.packing = packing_spec(cfg)  # how callers build micro-batches for this policy
        self.ep_size = p.expert_parallel

    # ------------------------------------------------------------------ schedule plumbing

    def _run(self, micro_batches: list[dict[str, torch.Tensor]], loss_fn, forward_only: bool) -> list[Any]:
        micro_batches = [mb if is_packed(mb) else _pad_to_multiple(mb, self.seq_multiple) for mb in micro_batches]
        # Micro-batches are built on the CPU (rollouts, packing); the model may live on a GPU.
        device = next(self.chunks[0].parameters()).device
        micro_batches = [{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                          for k, v in mb.items()} for mb in micro_batches]
        for mb in micro_batches:
            if mb["tokens"].shape[1] % self.seq_multiple:
                raise ValueError(f"a packed micro-batch of {mb['tokens'].shape[1]} tokens is not a multiple of "
                                 f"{self.seq_multiple} (CP / sequence parallel); build it with policy.packing")
        shapes = {tuple(mb["tokens"].shape) for mb in micro_batches}
        if len(shapes) != 1 and self.cfg.parallel.pipeline_parallel > 1:
            raise ValueError(f"micro-batches must share one [batch, seq] shape for pipeline p2p, got {sorted(shapes)}")
        # (Without pipelining the schedule ignores the shape; the schedule divides seq_length by CP itself.)
        micro_batch_size, seq_length = max(shapes)
        if self.cp_size > 1:
            micro_batches = [split_for_context_parallel(mb, self.cp_size, self.cp_rank) for mb in micro_batches]

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            kwargs = {"packed_seq_params": packed_seq_params(mb)} if is_packed(mb) else {}
            output = model(mb["tokens"], mb["position_ids"], None, **kwargs)
            return output, partial(loss_fn, mb)

        vp = len(self.chunks)
        iterators = [iter(micro_batches) for _ in range(vp)] if vp > 1 else iter(micro_batches)
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators,
            model=self.chunks if vp > 1 else self.chunks[0],
            num_microbatches=len(micro_batches),
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=forward_only,
        )

    def _logprobs(self, mb: dict[str, torch.Tensor], logits: torch.Tensor, entropy_grad: bool = False,
                  temperature: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logprobs, entropy) of the labels from this rank's vocabulary slice of the logits, at
        ``temperature`` (default the rollout's)."""
        temperature = temperature or self.temperature
        chunk = self.cfg.rl.logprob_chunk_tokens
        if chunk:  # the logits as the model returned them: no float32 copy
            return chunked_logprobs_and_entropy(logits, mb["labels"], temperature=temperature,
                                                true_vocab_size=self.arch.vocab_size, chunk_tokens=chunk,
                                                entropy_grad=entropy_grad, tp_group=self.topo.tp_group)
        return vocab_parallel_logprobs_and_entropy(
            logits.float(), mb["labels"], temperature=temperature, true_vocab_size=self.arch.vocab_size,
            entropy_grad=entropy_grad, tp_group=self.topo.tp_group,
        )

    def _same_count_over_data_parallel(self, micro_batches: list[dict[str, torch.Tensor]]) -> list[dict]:
        """Expert parallelism exchanges tokens between data-parallel ranks in every forward, so
        they must all run as many micro-batches: the ranks with fewer add empty packed ones."""
        if self.ep_size == 1 or not micro_batches or not is_packed(micro_batches[0]):
            return micro_batches
        (most,) = all_reduce_numbers([len(micro_batches)], op=torch.distributed.ReduceOp.MAX,
                                     group=self.topo.dp_group)
        extra = int(most) - len(micro_batches)
        sample = micro_batches[0]
        names = [k for k in ("advantages", "old_logprobs", "ref_logprobs") if k in sample]
        return micro_batches + [empty_packed(sample["tokens"].shape[1], 0, names) for _ in range(extra)]

    # ------------------------------------------------------------------ public API

    @torch.no_grad()
    def compute_logprobs(self, micro_batches: list[dict[str, torch.Tensor]],
                         temperature: float | None = None) -> list[torch.Tensor] | None:
        """Per-token logprobs [b, s] of each micro-batch's labels (last pipeline stage; None elsewhere).

        ``temperature``: default the rollout's (the policy ratio's); 1 for the language model's own
        probabilities (the dense reward's P(y0 | x<t)).
        """
        for chunk in self.chunks:
            chunk.eval()

        def loss_fn(mb, logits):
            logprobs, _ = self._logprobs(mb, logits, temperature=temperature)
            return logits.new_zeros(()), {"logprobs": logprobs.detach()}

        count = len(micro_batches)
        micro_batches = self._same_count_over_data_parallel(micro_batches)
        seqs = [mb["tokens"].shape[1] for mb in micro_batches]
        out = self._run(micro_batches, loss_fn, forward_only=True)
        if not self.is_last_stage:
            return None
        if self.cp_size > 1:  # every CP rank of this (last) stage joins the gather
            out = [{"logprobs": gather_from_context_parallel(o["logprobs"], self.topo.cp_group,
                                                             cu_seqlens_padded=mb.get("cu_seqlens_padded"))}
                   for o, mb in zip(out, micro_batches)]
        # Back on the CPU beside the micro-batches they are attached to (response_values reads both).
        return [o["logprobs"][:, :s].cpu() for o, s in zip(out, seqs)][:count]

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], num_global_tokens: int,
                   num_global_seqs: int) -> dict[str, float]:
        """One optimizer step over ``micro_batches`` (this data-parallel rank's share).

        ``num_global_tokens`` / ``num_global_seqs`` count response tokens / sequences of the whole
        mini-batch over all data-parallel ranks, so every aggregation mode equals the loss of the
        global batch: Megatron divides each micro-batch loss by the number of micro-batches (and
        multiplies it by the CP size) and DDP averages gradients over the dp*cp ranks; we multiply
        by ``grpo_loss_scale`` (micro-batches * dp) so that the product is exactly 1.
        """
        micro_batches = self._same_count_over_data_parallel(micro_batches)
        scale = grpo_loss_scale(len(micro_batches), self.dp_size)

        def loss_fn(mb, logits):
            logprobs, entropy = self._logprobs(mb, logits, entropy_grad=self.cfg.rl.entropy_coef > 0)
            loss, metrics = grpo_loss(
                logprobs,
                mb["old_logprobs"],
                mb["advantages"],
                mb["loss_mask"],
                cfg=self.cfg.rl,
                ref_logprobs=mb.get("ref_logprobs"),
                entropy=entropy,
                num_global_tokens=num_global_tokens,
                num_global_seqs=num_global_seqs,
                segment_ids=mb.get("segment_ids"),
            )
            return loss * scale, metrics

        return self._optimizer_step(micro_batches, loss_fn)

    def lm_train_step(self, micro_batches: list[dict[str, torch.Tensor]], num_global_tokens: int) -> dict[str, float]:
        """One optimizer step of the plain next-token (language-model) loss: the cross-entropy of
        ``labels`` where ``loss_mask`` is 1, at temperature 1, averaged over the ``num_global_tokens``
        tokens of the whole batch (all data-parallel ranks); scaled like :meth:`train_step`."""
        micro_batches = self._same_count_over_data_parallel(micro_batches)
        scale = grpo_loss_scale(len(micro_batches), self.dp_size)

        def loss_fn(mb, logits):
            logprobs, _ = self._logprobs(mb, logits, temperature=1.0)
            mask = mb["loss_mask"].float()
            loss = -(logprobs * mask).sum() / num_global_tokens
            tokens = mask.sum()
            return loss * scale, {"loss": loss.detach(), "num_tokens": tokens.detach(),
                                  "cross_entropy": (-(logprobs.detach() * mask).sum() / tokens.clamp(min=1))}

        return self._optimizer_step(micro_batches, loss_fn)

    def _optimizer_step(self, micro_batches: list[dict[str, torch.Tensor]], loss_fn) -> dict[str, float]:
        for chunk in self.chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        try:
            outputs = self._run(micro_batches, loss_fn, forward_only=False)
        except RuntimeError as exc:
            if self._local_grads_finite():
                raise
            # Megatron's DDP (check_for_nan_in_grad) stops a backward whose gradients are NaN/Inf
            # before they reach the optimizer: the update is not applied.
            reason = (str(exc).strip().splitlines() or [""])[-1][:200]
            raise TrainingDiverged(f"non-finite gradients in the backward pass ({reason})") from exc
        update_ok, grad_norm, _ = self.optimizer.step()
        if update_ok:
            self.scheduler.step(increment=1)
        metrics: dict[str, float] = {
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "update_skipped": float(not update_ok),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
        }
        if self.is_last_stage and outputs:
            metrics.update(self._merge_cp_metrics(outputs, micro_batches))
        return metrics

    def _local_grads_finite(self) -> bool:
        for chunk in self.chunks:
            for param in chunk.parameters():
                grad = getattr(param, "main_grad", None)
                if grad is not None and not torch.isfinite(grad).all():
                    return False
        return True

    def _merge_cp_metrics(self, outputs: list[dict[str, torch.Tensor]],
                          micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Loss metrics of the whole sequences: each CP rank saw only its share of the tokens."""
        if self.cp_size == 1:
            return merge_metrics(outputs)

        local = [{k: float(v) for k, v in o.items()} for o in outputs]
        gathered: list[list[dict[str, float]]] = [None] * self.cp_size  # type: ignore[list-item]
        dist.all_gather_object(gathered, local, group=self.topo.cp_group)
        merged = merge_metrics([m for rank in gathered for m in rank])
        # A sequence split over CP ranks was counted once per rank; count it from the whole batch.
        merged["num_seqs"] = float(sum(_sequences_with_loss(mb) for mb in micro_batches))
        return merged


def _sequences_with_loss(mb: dict[str, torch.Tensor]) -> int:
    """Sequences of a whole micro-batch with at least one response token (rows, or packed segments)."""
    if not is_packed(mb):
        return int((mb["loss_mask"].sum(-1) > 0).sum())
    return int(mb["segment_ids"][mb["loss_mask"].bool()].unique().numel())
