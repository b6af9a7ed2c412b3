"""The step-time model the layout search ranks by.

Step-time model (documented, deliberately simple; use it to rank layouts, not to
promise wall-clock): ``N`` = active parameters without the input embedding.
Rollout = ``2*N`` FLOPs per prompt and generated token at ``rollout_mfu``; training =
``(6*updates + 2 [+2 reference] [+2*updates full recompute]) * N`` FLOPs per token at
``train_mfu``, times ``1 + (PP-1)/(m*VP)`` for the 1F1B bubble (m micro-batches per
mini-batch); plus un-overlapped TP/CP/EP communication at NVLink bandwidth inside a node
and InfiniBand bandwidth when the group crosses one (TP: 4 all-reduce-sized collectives
of ``2h`` bytes per token and layer per pass; CP: K/V ring passes; EP: 4 all-to-alls of
``top_k*2h`` bytes). Sequences are counted at full prompt+response length (upper bound).
With ``optim.cpu_offload``, each optimizer step (mini-batches x updates per RL step) adds the
offloaded share of this GPU's optimizer shard stepped on the host (:func:`cpu_optimizer_step`).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_rpt.memory_plan.inputs import Hardware, Layout, Workload
from megatron_rpt.memory_plan.terms import (
    active_params,
    distinct_stages,
    microbatches,
    optimizer_shard_params,
    padded_vocab,
    stage_params,
)
from megatron_rpt.model.hf_config import ArchConfig

# megatron-core's HybridDeviceOptimizer (optimizer/cpu_offloading/hybrid_optimizer.py, on the precision-aware
# path the trainer takes) steps the offloaded parameters' fp32 masters with torch's fused AdamW on the host. An fp32
# AdamW update streams every state once: read param, grad, m, v and write param, m, v, 7 x 4 bytes per parameter;
# a vectorised CPU Adam (torch's fused one; DeepSpeed's CPU-Adam, ZeRO-Offload, Ren et al. 2021) runs near the
# host memory bandwidth, so it is counted at that (a lower bound where the cores, not the memory, limit it).
CPU_ADAM_BYTES_PER_PARAM = 28
# The fp32 main grad goes to the host (its pinned buffer has the fp32 master's dtype) and the updated fp32 master
# comes back into the GPU's parameter (a non-blocking host-to-device copy converts the dtype on the GPU, so fp32
# crosses the link): 4 + 4 bytes.
OFFLOAD_LINK_BYTES_PER_PARAM = 8


@dataclass(frozen=True)
class CpuOptimizerStep:
    """optim.cpu_offload's cost per RL step on one GPU (the worst pipeline stage's shard)."""

    params: float  # offloaded parameters of this GPU's optimizer shard
    optimizer_steps: int  # per RL step: rl.mini_batches_per_step x rl.updates_per_batch
    host_adam_s: float  # the AdamW updates on the host, all optimizer steps
    copy_s: float  # grads to the host and parameters back, all optimizer steps

    @property
    def total_s(self) -> float:
        return self.host_adam_s + self.copy_s


NO_CPU_OPTIMIZER = CpuOptimizerStep(0.0, 0, 0.0, 0.0)


def cpu_optimizer_step(arch: ArchConfig, work: Workload, layout: Layout, hw: Hardware) -> CpuOptimizerStep:
    """The host's Adam step and the copies over the GPU-host link, counted one after the other: an upper
    bound (megatron-core's overlap_cpu_optimizer_d2h_h2d pipelines them parameter by parameter)."""
    if work.optimizer_offload_fraction <= 0:
        return NO_CPU_OPTIMIZER
    vocab = padded_vocab(arch, work.make_vocab_size_divisible_by, layout.tp)
    shard = max(optimizer_shard_params(stage_params(arch, layout, vocab, s), layout) for s in distinct_stages(layout))
    params = work.optimizer_offload_fraction * shard
    steps = work.mini_batches * work.updates_per_batch
    host_adam_s = steps * params * CPU_ADAM_BYTES_PER_PARAM / (hw.host_mem_gbps * 1e9)
    copy_s = steps * params * OFFLOAD_LINK_BYTES_PER_PARAM / (hw.host_link_gbps * 1e9)
    return CpuOptimizerStep(params, steps, host_adam_s, copy_s)


@dataclass
class StepTime:
    rollout_s: float
    train_compute_s: float
    bubble: float
    comm_s: float
    cpu_optimizer: CpuOptimizerStep = NO_CPU_OPTIMIZER

    @property
    def train_s(self) -> float:
        return self.train_compute_s * (1 + self.bubble) + self.comm_s + self.cpu_optimizer.total_s

    @property
    def total_s(self) -> float:
        return self.rollout_s + self.train_s


def _group_bandwidth(span: int, hw: Hardware) -> float:
    """Bytes/s for a group of ``span`` consecutive ranks (Megatron orders TP fastest)."""
    gbps = hw.intra_node_gbps if span <= hw.gpus_per_node else hw.inter_node_gbps
    return gbps * 1e9


def estimate_step_time(arch: ArchConfig, work: Workload, layout: Layout, hw: Hardware) -> StepTime:
    n_active = active_params(arch)
    seqs = work.sequences_per_step
    tokens = seqs * work.seq_len
    peak = hw.gpus * hw.peak_tflops * 1e12
    rollout_s = 2.0 * n_active * tokens / (peak * hw.rollout_mfu)

    passes = 6 * work.updates_per_batch + 2 + (2 if work.reference_forward else 0)
    if layout.recompute == "full":
        passes += 2 * work.updates_per_batch
    flops = passes * n_active * tokens
    if layout.recompute == "selective":
        # recompute the attention core (QK^T and AV: 4*s*q_dim FLOPs per token and layer)
        q_dim = arch.num_attention_heads * arch.head_dim
        flops += work.updates_per_batch * arch.num_layers * 4 * work.seq_len * q_dim * tokens
    train_compute_s = flops / (peak * hw.train_mfu)
    m = microbatches(work, layout)
    bubble = (layout.pp - 1) / (m * (layout.vp or 1)) if layout.pp > 1 else 0.0

    # Communication per GPU. A "pass" is one forward (backward counts as one more): each
    # update is 2 passes (+1 with full recompute), the old-policy log-probs 1, the reference 1.
    passes = 2 * work.updates_per_batch + 1 + (1 if work.reference_forward else 0)
    if layout.recompute == "full":
        passes += work.updates_per_batch
    tokens_per_group = tokens / (layout.dp * layout.cp)  # what one model-parallel group processes
    layers = arch.num_layers / layout.pp
    h = arch.hidden_size
    comm = 0.0
    if layout.tp > 1:  # 2 all-reduce-sized collectives (attention, MLP) of 2h bytes per token and layer
        ring = 2 * (layout.tp - 1) / layout.tp
        comm += passes * tokens_per_group * layers * 2 * (2 * h) * ring / _group_bandwidth(layout.tp, hw)
    if layout.cp > 1:  # ring attention: this rank's K/V chunk visits the other CP-1 ranks
        kv_bytes = 2 * arch.num_key_value_heads * arch.head_dim * 2 / layout.tp
        comm += passes * tokens_per_group * layers * kv_bytes * (layout.cp - 1) / _group_bandwidth(
            layout.tp * layout.cp, hw)
    if arch.num_experts and layout.ep > 1:  # all-to-all dispatch + combine of top_k copies of 2h bytes
        tokens_per_gpu = tokens_per_group / layout.tp
        moved = 2 * arch.num_experts_per_tok * 2 * h * (layout.ep - 1) / layout.ep
        comm += passes * tokens_per_gpu * layers * moved / _group_bandwidth(layout.tp * layout.ep, hw)
    return StepTime(rollout_s, train_compute_s, bubble, comm, cpu_optimizer_step(arch, work, layout, hw))

