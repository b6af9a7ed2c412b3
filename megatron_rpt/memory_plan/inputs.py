"""The planner's inputs: the hardware, what one RL step asks of it (read from a config), and a layout.

Owns :class:`Hardware` (GPU count, memory, bandwidths, the efficiencies the step-time model
assumes), :class:`Workload` (sequence lengths, batch, dtypes, rollout engine settings) and
:class:`Layout` (TP / PP / CP / EP / DP, recompute, sequence parallel, optimizer sharding).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_rpt.config import Config, ParallelConfig


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
    # optim.cpu_offload's step (step_time.py). A DGX H100 has 2 Xeon Platinum 8480C with 8 DDR5-4800 channels
    # each: 2 x 8 x 38.4 = 614 GB/s peak per node, ~400 GB/s sustained (STREAM-like, ~65%), shared by 8 GPUs.
    host_mem_gbps: float = 50.0  # this GPU's share of the host's memory bandwidth, GB/s
    # Each H100 SXM reaches the host over PCIe Gen5 x16: 64 GB/s per direction raw, ~50 GB/s with pinned buffers
    # (GH200's NVLink-C2C: 450 GB/s per direction; set it with tools/plan.py --host-link-gbps).
    host_link_gbps: float = 50.0  # GPU <-> host copy bandwidth, GB/s
    max_tensor_parallel: int = 8

    def __post_init__(self) -> None:
        for name in ("gpus", "gpus_per_node", "max_tensor_parallel"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("gpu_mem_gib", "peak_tflops", "train_mfu", "rollout_mfu", "intra_node_gbps", "inter_node_gbps",
                     "host_mem_gbps", "host_link_gbps"):
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
    optimizer_offload_fraction: float = 0.0  # share of the optimizer state on the CPU (optim.cpu_offload)
    prompts_per_step: int = 0  # each rollout engine draws its own share of them (0: not checked)

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
            optimizer_offload_fraction=cfg.optim.offload_fraction if cfg.optim.cpu_offload else 0.0,
            prompts_per_step=cfg.rl.prompts_per_step,
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
    etp: int | None = None  # expert tensor parallel (None: tp, megatron-core's default)
    first_stage_layers: int | None = None  # uneven pipeline split (None: even)
    last_stage_layers: int | None = None

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    def parallel(self) -> ParallelConfig:
        """The ``parallel`` section of this layout (its checks and its pipeline split are the trainer's)."""
        return ParallelConfig(tensor_parallel=self.tp, pipeline_parallel=self.pp, context_parallel=self.cp,
                              expert_parallel=self.ep, virtual_pipeline=self.vp, expert_tensor_parallel=self.etp,
                              first_stage_layers=self.first_stage_layers, last_stage_layers=self.last_stage_layers)

    def stage_layers(self, num_layers: int) -> list[int]:
        """Decoder layers of each pipeline stage (:meth:`ParallelConfig.stage_layers`; ConfigError when invalid)."""
        return self.parallel().stage_layers(num_layers)

    def label(self) -> str:
        parts = [f"TP{self.tp}", f"PP{self.pp}"]
        if self.first_stage_layers is not None or self.last_stage_layers is not None:
            parts[-1] += f"(first {self.first_stage_layers}, last {self.last_stage_layers})"
        if self.vp:
            parts.append(f"VP{self.vp}")
        parts.append(f"CP{self.cp}")
        if self.ep > 1:
            parts.append(f"EP{self.ep}")
        if self.etp is not None and self.etp != self.tp:
            parts.append(f"ETP{self.etp}")
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
                   distributed_optimizer=p.distributed_optimizer, vp=p.virtual_pipeline,
                   etp=p.expert_tensor_parallel, first_stage_layers=p.first_stage_layers,
                   last_stage_layers=p.last_stage_layers)

