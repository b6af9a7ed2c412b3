"""megatron_rpt.rl — the GRPO pieces the train loop calls.

rewards -> :func:`filter_groups` (DAPO dynamic sampling) -> :func:`group_advantages`
-> :func:`build_batch` / :func:`split_micro_batches` -> policy forward ->
:func:`vocab_parallel_logprobs_and_entropy` -> :func:`grpo_loss`.
"""

from megatron_rpt.rl.advantages import group_advantages
from megatron_rpt.rl.batch import TrainBatch, build_batch, build_micro_batches, split_micro_batches
from megatron_rpt.rl.context_parallel import (
    check_context_parallel_config,
    gather_from_context_parallel,
    grpo_loss_scale,
    packed_context_parallel_positions,
    packed_sequence_multiple,
    sequence_multiple,
    split_for_context_parallel,
    unsplit_context_parallel,
)
from megatron_rpt.rl.dynamic_sampling import (
    GroupFilter,
    classify_groups,
    dynamic_sampling_active,
    filter_groups,
    needs_refill,
    refill_prompt_count,
)
from megatron_rpt.rl.grpo_loss import aggregate_loss, grpo_loss, kl_penalty, merge_metrics
from megatron_rpt.rl.logprobs import (
    chunked_logprobs_and_entropy,
    scaled_logits,
    vocab_parallel_entropy,
    vocab_parallel_logprobs,
    vocab_parallel_logprobs_and_entropy,
)
from megatron_rpt.rl.packing import PackingSpec, is_packed, response_values

__all__ = [
    "GroupFilter",
    "PackingSpec",
    "TrainBatch",
    "aggregate_loss",
    "build_batch",
    "build_micro_batches",
    "check_context_parallel_config",
    "chunked_logprobs_and_entropy",
    "classify_groups",
    "dynamic_sampling_active",
    "filter_groups",
    "gather_from_context_parallel",
    "group_advantages",
    "grpo_loss",
    "grpo_loss_scale",
    "is_packed",
    "kl_penalty",
    "merge_metrics",
    "needs_refill",
    "packed_context_parallel_positions",
    "packed_sequence_multiple",
    "refill_prompt_count",
    "response_values",
    "scaled_logits",
    "sequence_multiple",
    "split_for_context_parallel",
    "split_micro_batches",
    "unsplit_context_parallel",
    "vocab_parallel_entropy",
    "vocab_parallel_logprobs",
    "vocab_parallel_logprobs_and_entropy",
]
