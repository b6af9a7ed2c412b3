"""Per-GPU memory of one RL step, term by term.

Memory model (bytes per GPU, worst pipeline stage):

* weights ``P_gpu * b_param`` where ``P_gpu`` are this rank's parameters: attention and
  MLP matrices split by TP, experts split by EP and expert-TP (``parallel.expert_tensor_parallel``,
  TP by default), layers split by PP (evenly, or with ``parallel.first_stage_layers`` /
  ``last_stage_layers``), embedding on the first and output layer on the last stage; every
  distinct stage (first, a middle one, last) is evaluated and the worst one reported.
* grads ``P_gpu * 4``: Megatron's DDP accumulates and reduces gradients in an fp32 buffer
  for bf16/fp16 training; the distributed optimizer keeps that buffer whole (ZeRO-1).
* optimizer ``P_gpu * 12`` (fp32 master + Adam m + v; 8 for fp32 params, which are their
  own master), divided by the data-parallel size (DP*CP for dense parameters, the expert
  data-parallel size TP*CP*DP/(EP*expert-TP) for experts) with ``parallel.distributed_optimizer``
  and not divided without it; ``optim.cpu_offload`` keeps ``1 - optim.offload_fraction`` of it
  on the GPU.
* activations: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models", Sec. 4, per layer ``s*b*h*(34 + 5*a*s/h)`` bytes for GPT
  (16-bit, with dropout), split as 10*sbh replicated across TP unless sequence parallel,
  24*sbh + 5*a*s^2*b split by TP. :func:`layer_activation_bytes` keeps the paper's terms
  but takes the real shapes (GQA, SwiGLU, QK-norm, MoE top-k, no dropout) and reduces to
  the paper's numbers for a GPT layer. The ``a*s^2`` attention-matrix term is dropped
  for selective recompute (the paper's definition) and for flash/fused attention, which
  Megatron-Core uses on GPU (Transformer Engine) and which never stores it. Full
  recompute keeps only each layer's input (2*sbh, /TP with SP) plus one layer's working
  set. CP splits the sequence. With 1F1B the first stage holds PP micro-batches in
  flight (x(1 + (PP-1)/(PP*VP)) with interleaving), the last holds one but also the
  output layer: logits ``s*b*V/TP`` at 4 bytes (bf16 logits and their gradient) plus 18
  bytes per element of one ``rl.logprob_chunk_tokens`` chunk (float32 temporaries); 22
  bytes per element unchunked (:func:`logit_bytes`, measured by ``bench_logprobs.py``).
* rollout: vLLM claims ``gpu_memory_utilization * gpu memory`` for its weights and KV
  cache; the KV cache a full batch would need is ``seqs * (prompt+response) * layers * 2
  * kv_heads * head_dim * bytes / rollout TP`` (reported, and used to say how many
  sequences decode concurrently). Engines are counted as the trainer places them
  (:mod:`megatron_rpt.rollout.layout`): ``gpus / rollout TP``, each decoding its share. The
  built-in engine is one engine per GPU (rollout TP 1) holding the whole model at the rollout
  dtype and the KV of ``rollout.batch_size`` sequences.
* bridge bucket: ``rollout.bucket_mb`` while weights are pushed to vLLM.
* overhead: CUDA context, NCCL buffers and allocator fragmentation (``Hardware.overhead_gib``).

The step needs ``max(train phase, rollout phase)``: training holds state + activations
(+ the vLLM reservation unless it sleeps between phases); rollout holds state + vLLM +
bucket. Training state stays resident during rollout (no offload is assumed).
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field

from megatron_rpt.config import Recompute
from megatron_rpt.memory_plan.inputs import Hardware, Layout, Workload
from megatron_rpt.model.hf_config import ArchConfig, padded_vocab_size
from megatron_rpt.rollout.layout import engine_count

GiB = float(2**30)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Log-prob pass, bytes per logit element, as measured by benchmarks/bench_logprobs.py (RESULTS.md):
LOGIT_BYTES_FULL = 22  # rl.logprob_chunk_tokens=0: bf16 logits + 20 B/elt of float32 copies and temporaries
LOGIT_BYTES_CHUNKED = 4  # bf16 logits + their bf16 gradient (rl.logprob_chunk_tokens > 0) ...
CHUNK_TEMP_BYTES = 18  # ... + float32 temporaries per element of one chunk x V/TP
RECOMPUTE_CHOICES = (None, *typing.get_args(Recompute))

# ----------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class LayerShape:
    """The shapes that set a transformer layer's stored activations."""

    hidden: int
    heads: int
    q_dim: int  # heads * head_dim
    kv_dim: int  # kv_heads * head_dim
    ffn: int  # dense intermediate size, or one expert's
    gated: bool = True  # SwiGLU (fc1 produces 2*ffn)
    dropout: bool = False
    qk_norm: bool = False
    num_experts: int = 0
    top_k: int = 0

    @classmethod
    def from_arch(cls, arch: ArchConfig) -> "LayerShape":
        return cls(
            hidden=arch.hidden_size, heads=arch.num_attention_heads, q_dim=arch.num_attention_heads * arch.head_dim,
            kv_dim=arch.num_key_value_heads * arch.head_dim,
            ffn=arch.moe_intermediate_size if arch.num_experts else arch.intermediate_size,
            gated=True, dropout=False, qk_norm=arch.qk_norm, num_experts=arch.num_experts,
            top_k=arch.num_experts_per_tok,
        )

    @classmethod
    def gpt(cls, hidden: int, heads: int) -> "LayerShape":
        """The layer of Korthikanti et al.: MHA, 4h GeLU MLP, dropout."""
        return cls(hidden=hidden, heads=heads, q_dim=hidden, kv_dim=hidden, ffn=4 * hidden, gated=False, dropout=True)

    def _mlp_bytes_per_token(self) -> int:
        # fc1 output (2f when gated) is kept for the activation's backward, the activation
        # output for the gate product, and the fc2 input.
        return 2 * self.ffn * (4 if self.gated else 2)

    def per_token_bytes(self) -> tuple[int, int]:
        """(bytes replicated across TP unless sequence parallel, bytes split by TP) per token."""
        h = self.hidden
        replicated = 2 * h + 2 * h  # attention norm input, QKV input
        replicated += 2 * h  # MLP norm input
        sharded = 2 * self.q_dim + 2 * 2 * self.kv_dim + 2 * self.q_dim  # Q, K, V, context (out-proj input)
        if self.qk_norm:
            sharded += 2 * (self.q_dim + self.kv_dim)  # q/k norm inputs
        if self.dropout:
            replicated += h + h  # 1-byte masks after attention and MLP
        if self.num_experts:
            replicated += 4 * self.num_experts  # fp32 router logits
            sharded += self.top_k * (2 * h + self._mlp_bytes_per_token())  # each token visits top_k experts
        else:
            replicated += 2 * h  # fc1 input
            sharded += self._mlp_bytes_per_token()
        return replicated, sharded

    def attention_matrix_bytes(self, seq: int, micro_batch: int) -> int:
        """The a*s^2 term: softmax output (2) [+ dropout mask (1) + dropout output (2)]."""
        return self.heads * seq * seq * micro_batch * (5 if self.dropout else 2)


def layer_activation_bytes(shape: LayerShape, seq: int, micro_batch: int, tp: int = 1,
                           sequence_parallel: bool = False, recompute: str | None = None,
                           flash_attention: bool = False) -> float:
    """Activation bytes one layer keeps for backward for one micro-batch (Korthikanti et al. 2022).

    ``seq`` is the sequence length on this rank (already divided by CP).
    """
    if recompute not in RECOMPUTE_CHOICES:
        raise ValueError(f"recompute={recompute!r} is not one of {RECOMPUTE_CHOICES}")
    tokens = seq * micro_batch
    if recompute == "full":
        return 2.0 * tokens * shape.hidden / (tp if sequence_parallel else 1)
    replicated, sharded = shape.per_token_bytes()
    total = tokens * (replicated / (tp if sequence_parallel else 1) + sharded / tp)
    if recompute != "selective" and not flash_attention:
        total += shape.attention_matrix_bytes(seq, micro_batch) / tp
    return float(total)


# ----------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class StageParams:
    dense: int  # parameters whose optimizer state shards over DP*CP
    expert: int  # expert parameters (shard over DP*CP/EP)

    @property
    def total(self) -> int:
        return self.dense + self.expert


def distinct_stages(layout: Layout) -> list[int]:
    """The pipeline stages whose parameters can differ: first, a middle one, last (the middle ones are alike)."""
    return sorted({0, min(1, layout.pp - 1), layout.pp - 1})


def optimizer_shard_params(params: StageParams, layout: Layout) -> float:
    """Parameters whose optimizer state one GPU holds: its stage's parameters over the data-parallel size
    (DP*CP for dense ones, the expert data-parallel size for experts) with the distributed optimizer, all of
    them without it. The one owner of the shard for the memory term and the CPU optimizer step's time."""
    dense_shards = layout.dp * layout.cp if layout.distributed_optimizer else 1
    expert_dp = layout.tp * layout.cp * layout.dp // (layout.ep * layout.expert_tp)  # megatron's expert DP group
    expert_shards = max(1, expert_dp) if layout.distributed_optimizer else 1
    return params.dense / dense_shards + params.expert / expert_shards


def padded_vocab(arch: ArchConfig, divisible_by: int, tp: int) -> int:
    """Megatron's padding rule (the builder's, one place)."""
    return padded_vocab_size(arch.vocab_size, divisible_by, tp)


def stage_params(arch: ArchConfig, layout: Layout, vocab: int, stage: int) -> StageParams:
    """Parameters held by one GPU of pipeline stage ``stage`` (vocab already padded)."""
    h, hd, tp = arch.hidden_size, arch.head_dim, layout.tp
    q, kv = arch.num_attention_heads * hd, arch.num_key_value_heads * hd
    attn = h * (q + 2 * kv) + q * h + ((q + 2 * kv) if arch.qkv_bias else 0)
    replicated = 2 * h + (2 * hd if arch.qk_norm else 0)  # two RMSNorms (+ q/k norms)
    dense_layer = attn // tp + replicated
    expert_layer = 0
    if arch.num_experts:
        dense_layer += h * arch.num_experts  # router, replicated across TP
        expert_layer = arch.num_experts * 3 * h * arch.moe_intermediate_size // (layout.ep * layout.expert_tp)
    else:
        dense_layer += 3 * h * arch.intermediate_size // tp
    layers = layout.stage_layers(arch.num_layers)[stage]
    dense = layers * dense_layer
    first, last = stage == 0, stage == layout.pp - 1
    embedding = vocab * h // tp
    if first:
        dense += embedding
    if last:
        dense += h  # final norm
        if not arch.tie_word_embeddings or layout.pp > 1:
            dense += embedding  # output layer (a tied copy when the stages differ)
    return StageParams(dense=dense, expert=layers * expert_layer)


def active_params(arch: ArchConfig) -> int:
    """Parameters touched per token, without the input embedding lookup (for FLOPs)."""
    n = arch.num_parameters() - arch.vocab_size * arch.hidden_size
    if arch.tie_word_embeddings:
        n += arch.vocab_size * arch.hidden_size  # the output projection still multiplies
    if arch.num_experts:
        idle = arch.num_experts - arch.num_experts_per_tok
        n -= arch.num_layers * idle * 3 * arch.hidden_size * arch.moe_intermediate_size
    return n


# ----------------------------------------------------------------------------- memory


@dataclass
class MemoryEstimate:
    """Bytes per GPU on the worst pipeline stage."""

    weights: float
    grads: float
    optimizer: float
    activations: float
    rollout: float
    bucket: float
    overhead: float
    train_phase: float
    rollout_phase: float
    params_per_gpu: int
    stage: int
    kv_bytes_per_token: float
    kv_needed: float
    concurrent_sequences: int
    problems: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        return max(self.train_phase, self.rollout_phase)

    def gib(self) -> dict[str, float]:
        keys = ("weights", "grads", "optimizer", "activations", "rollout", "bucket", "overhead", "train_phase",
                "rollout_phase", "kv_needed")
        out = {k: round(getattr(self, k) / GiB, 3) for k in keys}
        out["peak"] = round(self.peak / GiB, 3)
        return out


def microbatches(work: Workload, layout: Layout) -> float:
    """Micro-batches per data-parallel rank per mini-batch (optimizer step)."""
    return work.sequences_per_step / work.mini_batches / (layout.dp * work.micro_batch)


def _optimizer_bytes_per_param(work: Workload) -> int:
    return 12 if work.param_dtype in ("bfloat16", "float16") else 8


def _stage_activations(shape: LayerShape, arch: ArchConfig, work: Workload, layout: Layout, vocab: int,
                       stage: int) -> float:
    seq = work.seq_len / layout.cp
    b = work.micro_batch
    layers = layout.stage_layers(arch.num_layers)[stage]
    in_flight = min(layout.pp - stage, max(1, math.ceil(microbatches(work, layout))))
    if stage == 0 and layout.vp and layout.pp > 1:
        in_flight *= 1 + (layout.pp - 1) / (layout.pp * layout.vp)
    per_layer = layer_activation_bytes(shape, seq, b, layout.tp, layout.sequence_parallel, layout.recompute,
                                       work.flash_attention)
    total = layers * per_layer * in_flight
    if layout.recompute == "full":
        # The layer being recomputed in backward rebuilds its whole working set.
        total += layer_activation_bytes(shape, seq, b, layout.tp, layout.sequence_parallel, None,
                                        work.flash_attention)
    if stage == layout.pp - 1:
        sp = layout.tp if layout.sequence_parallel else 1
        total += seq * b * (2 * 2 * arch.hidden_size) / sp  # final norm input, output-layer input
        total += logit_bytes(seq * b, vocab / layout.tp, work.logprob_chunk_tokens)
    return total


def logit_bytes(tokens: float, vocab_per_gpu: float, chunk_tokens: int) -> float:
    """The log-prob pass's logits and temporaries (``rl.logprob_chunk_tokens``; 0: unchunked)."""
    if chunk_tokens <= 0:
        return tokens * vocab_per_gpu * LOGIT_BYTES_FULL
    return tokens * vocab_per_gpu * LOGIT_BYTES_CHUNKED + min(chunk_tokens, tokens) * vocab_per_gpu * CHUNK_TEMP_BYTES


def kv_bytes_per_token(arch: ArchConfig, tp: int, layers: int, dtype_bytes: int) -> float:
    """KV-cache bytes per token on one GPU: layers x (K, V) x kv_heads/TP x head_dim x bytes."""
    kv_heads = max(1.0, arch.num_key_value_heads / tp)  # fewer KV heads than ranks: replicated
    return layers * 2 * kv_heads * arch.head_dim * dtype_bytes


def estimate_memory(arch: ArchConfig, work: Workload, layout: Layout, hw: Hardware) -> MemoryEstimate:
    shape = LayerShape.from_arch(arch)
    vocab = padded_vocab(arch, work.make_vocab_size_divisible_by, layout.tp)
    pbytes = DTYPE_BYTES[work.param_dtype]
    grad_bytes = work.grad_bytes if pbytes < 4 else 4
    on_gpu = 1.0 - work.optimizer_offload_fraction
    overhead = hw.overhead_gib * GiB

    rollout, bucket, kv_token, kv_needed, concurrent = 0.0, 0.0, 0.0, 0.0, 0
    problems: list[str] = []
    seqs = work.sequences_per_step
    if work.rollout_engine == "vllm":
        reserve = work.gpu_memory_utilization * hw.gpu_mem_gib * GiB
        rbytes = DTYPE_BYTES[work.rollout_dtype]
        rollout_weights = arch.num_parameters() * rbytes / work.rollout_tp
        kv_token = kv_bytes_per_token(arch, work.rollout_tp, arch.num_layers, rbytes)
        engines = engine_count(hw.gpus, work.rollout_tp)
        kv_needed = math.ceil(seqs / engines) * work.seq_len * kv_token
        kv_capacity = reserve - rollout_weights - 1.0 * GiB  # ~1 GiB of vLLM activations / graphs
        concurrent = max(0, int(kv_capacity // (work.seq_len * kv_token)))
        if kv_capacity <= 0:
            problems.append(
                f"rollout.gpu_memory_utilization={work.gpu_memory_utilization} gives vLLM "
                f"{reserve / GiB:.1f} GiB but its weights alone need {rollout_weights / GiB:.1f} GiB at rollout "
                f"TP={work.rollout_tp}; raise it or rollout.tensor_parallel")
        rollout = reserve
        bucket = work.bucket_mb * 2**20
    else:
        rbytes = DTYPE_BYTES[work.rollout_dtype]
        kv_token = kv_bytes_per_token(arch, 1, arch.num_layers, rbytes)
        kv_needed = work.rollout_batch * work.seq_len * kv_token
        rollout = arch.num_parameters() * rbytes + kv_needed
        concurrent = work.rollout_batch

    best: MemoryEstimate | None = None
    for stage in distinct_stages(layout):
        params = stage_params(arch, layout, vocab, stage)
        weights = params.total * pbytes
        grads = params.total * grad_bytes
        opt = _optimizer_bytes_per_param(work) * optimizer_shard_params(params, layout) * on_gpu
        acts = _stage_activations(shape, arch, work, layout, vocab, stage)
        static = weights + grads + opt + overhead
        resident_vllm = work.rollout_engine == "vllm" and not work.sleep_between_phases
        train_phase = static + acts + (rollout if resident_vllm else 0)
        rollout_phase = static + rollout + bucket
        est = MemoryEstimate(weights, grads, opt, acts, rollout, bucket, overhead, train_phase, rollout_phase,
                             params.total, stage, kv_token, kv_needed, concurrent, list(problems))
        # Worst stage by peak; on (near) ties the one whose training phase is larger, so the
        # reported activations are the first stage's in-flight micro-batches.
        if best is None or (round(est.peak / 2**20), est.train_phase) > (round(best.peak / 2**20), best.train_phase):
            best = est
    assert best is not None
    return best

