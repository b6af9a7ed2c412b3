"""Per-GPU memory planner and parallel-layout search for RPT on Megatron-Core (+ vLLM).

Owns: the per-GPU memory model of one RL step (training state, activations, rollout
engine, weight-sync bucket), a simple step-time model, enumerating TP/PP/CP/EP/DP
layouts for a GPU count, ranking those that fit, and the refusal when none does.
``tools/plan.py`` is the command line.

The model is counted per decoder layer, which fits both Megatron classes the policy is built as:
a HybridModel (megatron-core 0.19) attention + MLP layer pair holds exactly one GPTModel layer's
parameters and activations, and the builder cuts pipeline stages at the same decoder layers.

Memory model (bytes per GPU, worst pipeline stage):

* weights ``P_gpu * b_param`` where ``P_gpu`` are this rank's parameters: attention and
  MLP matrices split by TP, experts split by EP and expert-TP (= TP, Megatron's default),
  layers split by PP, embedding on the first and output layer on the last stage.
* grads ``P_gpu * 4``: Megatron's DDP accumulates and reduces gradients in an fp32 buffer
  for bf16/fp16 training; the distributed optimizer keeps that buffer whole (ZeRO-1).
* optimizer ``P_gpu * 12`` (fp32 master + Adam m + v; 8 for fp32 params, which are their
  own master), divided by the data-parallel size (DP*CP for dense parameters, DP*CP/EP
  for experts) with ``parallel.distributed_optimizer`` and not divided without it.
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

Step-time model (documented, deliberately simple; use it to rank layouts, not to
promise wall-clock): ``N`` = active parameters without the input embedding.
Rollout = ``2*N`` FLOPs per prompt and generated token at ``rollout_mfu``; training =
``(6*updates + 2 [+2 reference] [+2*updates full recompute]) * N`` FLOPs per token at
``train_mfu``, times ``1 + (PP-1)/(m*VP)`` for the 1F1B bubble (m micro-batches per
mini-batch); plus un-overlapped TP/CP/EP communication at NVLink bandwidth inside a node
and InfiniBand bandwidth when the group crosses one (TP: 4 all-reduce-sized collectives
of ``2h`` bytes per token and layer per pass; CP: K/V ring passes; EP: 4 all-to-alls of
``top_k*2h`` bytes). Sequences are counted at full prompt+response length (upper bound).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from megatron_rpt.config import Config, ParallelConfig, Recompute
from megatron_rpt.model.hf_config import ArchConfig
from megatron_rpt.rollout.layout import engine_count, engine_layout_problem

GiB = float(2**30)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Log-prob pass, bytes per logit element, as measured by benchmarks/bench_logprobs.py (RESULTS.md):
LOGIT_BYTES_FULL = 22  # rl.logprob_chunk_tokens=0: bf16 logits + 20 B/elt of float32 copies and temporaries
LOGIT_BYTES_CHUNKED = 4  # bf16 logits + their bf16 gradient (rl.logprob_chunk_tokens > 0) ...
CHUNK_TEMP_BYTES = 18  # ... + float32 temporaries per element of one chunk x V/TP
RECOMPUTE_CHOICES = (None, *typing.get_args(Recompute))


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Hardware:
    gpus: int
    gpu_mem_gib: float = 80.0
    gpus_per_node: int = 8
    peak_tflops: float = 989.0  # H100 SXM dense bf16
    train_mfu: float = 0.35
    rollout_mfu: float = 0.10  # decode is bandwidth-bound
    intra_node_gbps: float = 300.0  # effective NVLink collective bandwidth per GPU, GB/s
    inter_node_gbps: float = 40.0  # effective InfiniBand bandwidth per GPU (400 Gb/s NIC), GB/s
    overhead_gib: float = 3.0  # CUDA context + NCCL buffers + fragmentation
    max_tensor_parallel: int = 8

    def __post_init__(self) -> None:
        for name in ("gpus", "gpus_per_node", "max_tensor_parallel"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("gpu_mem_gib", "peak_tflops", "train_mfu", "rollout_mfu", "intra_node_gbps", "inter_node_gbps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")


@dataclass(frozen=True)
class Workload:
    """What one RL step asks of the GPUs, read from a :class:`Config`."""

    prompt_len: int
    response_len: int
    micro_batch: int
    sequences_per_step: int
    mini_batches: int = 1
    updates_per_batch: int = 1
    param_dtype: str = "bfloat16"
    grad_bytes: int = 4
    reference_forward: bool = False
    rollout_engine: str = "vllm"
    rollout_tp: int = 1
    rollout_dtype: str = "bfloat16"
    rollout_batch: int = 64
    gpu_memory_utilization: float = 0.5
    sleep_between_phases: bool = True
    bucket_mb: int = 512
    logprob_chunk_tokens: int = 1024
    flash_attention: bool = True
    make_vocab_size_divisible_by: int = 128

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.response_len

    @classmethod
    def from_config(cls, cfg: Config, flash_attention: bool = True) -> "Workload":
        return cls(
            prompt_len=cfg.data.max_prompt_tokens,
            response_len=cfg.rollout.max_response_tokens,
            micro_batch=cfg.rl.micro_batch_size,
            sequences_per_step=cfg.rl.prompts_per_step * cfg.rollout.samples_per_prompt,
            mini_batches=cfg.rl.mini_batches_per_step,
            updates_per_batch=cfg.rl.updates_per_batch,
            param_dtype=cfg.model.params_dtype,
            grad_bytes=4,
            reference_forward=cfg.rl.kl_coef > 0,
            rollout_engine=cfg.rollout.engine,
            rollout_tp=cfg.rollout.tensor_parallel,
            rollout_dtype=cfg.rollout.dtype,
            rollout_batch=cfg.rollout.batch_size,
            gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
            sleep_between_phases=cfg.rollout.sleep_between_phases,
            bucket_mb=cfg.rollout.bucket_mb,
            logprob_chunk_tokens=cfg.rl.logprob_chunk_tokens,
            flash_attention=flash_attention,
            make_vocab_size_divisible_by=cfg.model.make_vocab_size_divisible_by,
        )


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    dp: int = 1
    recompute: str | None = None
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    vp: int | None = None

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def label(self) -> str:
        parts = [f"TP{self.tp}", f"PP{self.pp}"]
        if self.vp:
            parts.append(f"VP{self.vp}")
        parts.append(f"CP{self.cp}")
        if self.ep > 1:
            parts.append(f"EP{self.ep}")
        parts.append(f"DP{self.dp}")
        return " ".join(parts) + (f" {self.recompute}" if self.recompute else "")

    @classmethod
    def from_config(cls, cfg: Config, gpus: int) -> "Layout":
        p = cfg.parallel
        model_parallel = p.tensor_parallel * p.pipeline_parallel * p.context_parallel
        if gpus % model_parallel:
            raise ValueError(f"{gpus} GPUs are not divisible by TP*PP*CP = {model_parallel}")
        return cls(tp=p.tensor_parallel, pp=p.pipeline_parallel, cp=p.context_parallel, ep=p.expert_parallel,
                   dp=gpus // model_parallel, recompute=cfg.model.recompute, sequence_parallel=p.sequence_parallel,
                   distributed_optimizer=p.distributed_optimizer, vp=p.virtual_pipeline)


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


def padded_vocab(arch: ArchConfig, divisible_by: int, tp: int) -> int:
    from megatron_rpt.model.build import padded_vocab_size  # Megatron's padding rule, one place

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
        expert_layer = arch.num_experts * 3 * h * arch.moe_intermediate_size // (layout.ep * tp)
    else:
        dense_layer += 3 * h * arch.intermediate_size // tp
    layers = arch.num_layers // layout.pp
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
    layers = arch.num_layers // layout.pp
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
    dense_shards = layout.dp * layout.cp if layout.distributed_optimizer else 1
    expert_shards = max(1, layout.dp * layout.cp // layout.ep) if layout.distributed_optimizer else 1
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
    for stage in sorted({0, layout.pp - 1}):
        params = stage_params(arch, layout, vocab, stage)
        weights = params.total * pbytes
        grads = params.total * grad_bytes
        opt = _optimizer_bytes_per_param(work) * (params.dense / dense_shards + params.expert / expert_shards)
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


# ----------------------------------------------------------------------------- time


@dataclass
class StepTime:
    rollout_s: float
    train_compute_s: float
    bubble: float
    comm_s: float

    @property
    def train_s(self) -> float:
        return self.train_compute_s * (1 + self.bubble) + self.comm_s

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
    return StepTime(rollout_s, train_compute_s, bubble, comm)


# ----------------------------------------------------------------------------- search


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layout_problems(arch: ArchConfig, work: Workload, layout: Layout) -> list[str]:
    """Why a layout cannot run (divisibility, batch), empty when it can."""
    out = []
    if arch.num_attention_heads % layout.tp or arch.num_key_value_heads % layout.tp:
        out.append(f"TP={layout.tp} must divide heads={arch.num_attention_heads} and "
                   f"kv heads={arch.num_key_value_heads}")
    if arch.num_layers % (layout.pp * (layout.vp or 1)):
        out.append(f"PP={layout.pp} must divide layers={arch.num_layers}")
    if layout.cp > 1 and work.seq_len % (2 * layout.cp):
        out.append(f"CP={layout.cp} needs the sequence length {work.seq_len} divisible by 2*CP")
    if layout.ep > 1 and (not arch.num_experts or arch.num_experts % layout.ep or (layout.dp * layout.cp) % layout.ep):
        out.append(f"EP={layout.ep} must divide num_experts={arch.num_experts} and DP*CP={layout.dp * layout.cp}")
    per_mini = work.sequences_per_step / work.mini_batches
    if per_mini % (layout.dp * work.micro_batch):
        out.append(f"a mini-batch of {per_mini:g} sequences is not divisible by DP*micro_batch = "
                   f"{layout.dp}*{work.micro_batch}")
    if work.rollout_engine == "vllm" and layout.gpus % work.rollout_tp:
        out.append(f"rollout TP={work.rollout_tp} must divide the {layout.gpus} GPUs")
    elif work.rollout_engine == "vllm":
        # A vLLM engine's ranks must train one data-parallel replica (rollout/layout.py).
        parallel = ParallelConfig(tensor_parallel=layout.tp, pipeline_parallel=layout.pp,
                                  context_parallel=layout.cp, expert_parallel=layout.ep)
        problem = engine_layout_problem(parallel, layout.gpus, work.rollout_tp)
        if problem:
            out.append(problem)
    return out


def enumerate_layouts(arch: ArchConfig, work: Workload, hw: Hardware,
                      distributed_optimizer: bool = True) -> Iterator[Layout]:
    """Every valid TP/PP/CP/EP/DP x recompute layout of ``hw.gpus`` GPUs (SP on whenever TP > 1)."""
    tps = [t for t in _divisors(arch.num_attention_heads)
           if arch.num_key_value_heads % t == 0 and t <= hw.max_tensor_parallel and hw.gpus % t == 0]
    recomputes = (None, "full") if work.flash_attention else RECOMPUTE_CHOICES
    for tp, pp, cp in itertools.product(tps, _divisors(arch.num_layers), (1, 2, 4, 8)):
        if hw.gpus % (tp * pp * cp):
            continue
        dp = hw.gpus // (tp * pp * cp)
        eps = [e for e in _divisors(arch.num_experts) if (dp * cp) % e == 0] if arch.num_experts else [1]
        for ep, recompute in itertools.product(eps, recomputes):
            layout = Layout(tp=tp, pp=pp, cp=cp, ep=ep, dp=dp, recompute=recompute, sequence_parallel=tp > 1,
                            distributed_optimizer=distributed_optimizer)
            if not layout_problems(arch, work, layout):
                yield layout


@dataclass
class Candidate:
    layout: Layout
    memory: MemoryEstimate
    time: StepTime
    fits: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "layout": dataclasses.asdict(self.layout),
            "label": self.layout.label(),
            "memory_gib": self.memory.gib(),
            "params_per_gpu": self.memory.params_per_gpu,
            "worst_stage": self.memory.stage,
            "concurrent_rollout_sequences": self.memory.concurrent_sequences,
            "time_s": {"rollout": round(self.time.rollout_s, 2), "train": round(self.time.train_s, 2),
                       "comm": round(self.time.comm_s, 2), "bubble": round(self.time.bubble, 4),
                       "step": round(self.time.total_s, 2)},
            "fits": self.fits,
            "problems": self.memory.problems,
        }


def evaluate(arch: ArchConfig, work: Workload, layout: Layout, hw: Hardware) -> Candidate:
    mem = estimate_memory(arch, work, layout, hw)
    fits = mem.peak <= hw.gpu_mem_gib * GiB and not mem.problems
    return Candidate(layout, mem, estimate_step_time(arch, work, layout, hw), fits)


@dataclass
class Plan:
    hardware: Hardware
    workload: Workload
    fitting: list[Candidate]  # best first
    smallest: Candidate | None  # the least memory of all layouts (for the refusal)
    considered: int

    @property
    def ok(self) -> bool:
        return bool(self.fitting)


def _rank_key(c: Candidate) -> tuple[float, float]:
    return (round(c.time.total_s, 6), c.memory.peak)


def plan(arch: ArchConfig, work: Workload, hw: Hardware, distributed_optimizer: bool = True,
         layouts: Iterable[Layout] | None = None) -> Plan:
    """Evaluate every layout, keep those that fit in ``hw.gpu_mem_gib``, fastest first."""
    cands = [evaluate(arch, work, lay, hw)
             for lay in (layouts if layouts is not None else enumerate_layouts(arch, work, hw, distributed_optimizer))]
    fitting = sorted((c for c in cands if c.fits), key=_rank_key)
    smallest = min(cands, key=lambda c: c.memory.peak) if cands else None
    return Plan(hw, work, fitting, smallest, len(cands))


def min_gpus_that_fit(arch: ArchConfig, work: Workload, hw: Hardware, distributed_optimizer: bool = True,
                      max_nodes: int = 128) -> int | None:
    """The smallest multiple of ``gpus_per_node`` with a fitting layout (None up to ``max_nodes``)."""
    for nodes in range(1, max_nodes + 1):
        trial = dataclasses.replace(hw, gpus=nodes * hw.gpus_per_node)
        for lay in enumerate_layouts(arch, work, trial, distributed_optimizer):
            if evaluate(arch, work, lay, trial).fits:
                return trial.gpus
    return None


def refusal(arch: ArchConfig, result: Plan, distributed_optimizer: bool = True) -> str:
    """Why nothing fits, the smallest requirement, and what to change."""
    hw, work = result.hardware, result.workload
    head = (f"no layout of {hw.gpus} GPUs fits in {hw.gpu_mem_gib:g} GiB per GPU "
            f"({arch.num_parameters() / 1e9:.1f}B parameters, sequences of {work.seq_len} tokens, "
            f"{result.considered} layouts tried).")
    if result.smallest is None:
        return head + (f" No valid layout exists at all: TP must divide the heads, PP the layers, and DP*micro_batch "
                       f"the mini-batch of {work.sequences_per_step // work.mini_batches} sequences; "
                       f"try another GPU count.")
    s = result.smallest
    g = s.memory.gib()
    lines = [head,
             f"Smallest requirement: {g['peak']:.1f} GiB per GPU with {s.layout.label()} "
             f"(weights {g['weights']:.1f}, grads {g['grads']:.1f}, optimizer {g['optimizer']:.1f}, "
             f"activations {g['activations']:.1f}, rollout {g['rollout']:.1f}, bucket {g['bucket']:.1f}, "
             f"overhead {g['overhead']:.1f}).",
             *s.memory.problems]
    fixes = []
    if s.memory.problems:  # settings no GPU count can fix
        fixes.append("fix the rollout settings above")
    else:
        need = min_gpus_that_fit(arch, work, hw, distributed_optimizer)
        if need:
            fixes.append(f"use at least {need} GPUs ({need // hw.gpus_per_node} nodes of {hw.gpus_per_node})")
        if not distributed_optimizer:
            fixes.append("enable parallel.distributed_optimizer")
        if work.rollout_engine == "vllm" and s.memory.rollout_phase >= s.memory.train_phase:
            fixes.append("lower rollout.gpu_memory_utilization (vLLM then decodes fewer sequences at once)")
        fixes.append("shorten data.max_prompt_tokens / rollout.max_response_tokens or lower rl.micro_batch_size")
    lines.append("Fixes: " + "; ".join(fixes) + ".")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- from a config


@dataclass
class ConfigPlan:
    arch: ArchConfig
    plan: Plan
    configured: Candidate | None  # the config's own parallel layout on these GPUs
    configured_rank: int | None  # 1-based rank among the fitting layouts
    configured_problems: list[str]

    def to_dict(self, top: int | None = None) -> dict[str, Any]:
        hw, work = self.plan.hardware, self.plan.workload
        return {
            "model": {"family": self.arch.family, "params": self.arch.num_parameters(),
                      "active_params": active_params(self.arch)},
            "hardware": dataclasses.asdict(hw),
            "workload": {**dataclasses.asdict(work), "seq_len": work.seq_len},
            "considered": self.plan.considered,
            "fits": self.plan.ok,
            "layouts": [c.to_dict() for c in self.plan.fitting[:top]],
            "configured": self.configured.to_dict() if self.configured else None,
            "configured_rank": self.configured_rank,
            "configured_problems": self.configured_problems,
            "refusal": None if self.plan.ok else refusal(self.arch, self.plan),
        }


def plan_config(cfg: Config, hw: Hardware, flash_attention: bool = True) -> ConfigPlan:
    """Plan for a loaded config (its ``model.hf_config`` must exist) on ``hw``."""
    from megatron_rpt.model.hf_config import load_hf_config

    if not cfg.model.hf_config:
        raise ValueError("model.hf_config is empty: the planner needs the model's config.json")
    arch = load_hf_config(cfg.model.hf_config)
    work = Workload.from_config(cfg, flash_attention=flash_attention)
    result = plan(arch, work, hw, cfg.parallel.distributed_optimizer)
    configured, rank, problems = None, None, []
    try:
        layout = Layout.from_config(cfg, hw.gpus)
    except ValueError as exc:
        problems = [str(exc)]
    else:
        problems = layout_problems(arch, work, layout)
        configured = evaluate(arch, work, layout, hw)
        rank = next((i + 1 for i, c in enumerate(result.fitting) if c.layout == layout), None)
    return ConfigPlan(arch, result, configured, rank, problems)


def render_table(cp: ConfigPlan, top: int = 10) -> Any:
    """A rich Table of the fastest fitting layouts (and the configured one when it is not among them)."""
    from rich.table import Table

    hw, work = cp.plan.hardware, cp.plan.workload
    table = Table(title=(f"{cp.arch.family} {cp.arch.num_parameters() / 1e9:.1f}B on {hw.gpus} x "
                         f"{hw.gpu_mem_gib:g} GiB "
                         f"({hw.gpus_per_node}/node): {work.sequences_per_step} seqs x {work.seq_len} tokens, "
                         f"micro-batch {work.micro_batch}, rollout {work.rollout_engine} TP{work.rollout_tp}"),
                  caption="GiB per GPU (worst pipeline stage); time per RL step from the planner's simple model")
    for name in ("#", "layout", "weights", "grads", "optim", "activ", "rollout", "peak", "rollout s", "train s",
                 "bubble", "step s"):
        table.add_column(name, justify="left" if name == "layout" else "right", no_wrap=True)
    rows = [(str(i + 1), c) for i, c in enumerate(cp.plan.fitting[:top])]
    if cp.configured is not None and (cp.configured_rank is None or cp.configured_rank > top):
        rows.append((f"cfg{'' if cp.configured.fits else ' (no fit)'}", cp.configured))
    for tag, c in rows:
        g = c.memory.gib()
        mark = " *" if cp.configured is not None and c.layout == cp.configured.layout else ""
        table.add_row(tag, c.layout.label() + mark, f"{g['weights']:.1f}", f"{g['grads']:.1f}", f"{g['optimizer']:.1f}",
                      f"{g['activations']:.1f}", f"{g['rollout']:.1f}", f"{g['peak']:.1f}", f"{c.time.rollout_s:.0f}",
                      f"{c.time.train_s:.0f}", f"{100 * c.time.bubble:.1f}%", f"{c.time.total_s:.0f}")
    return table
