"""The run's remaining sections: ``optim``, ``train``, ``ntp``, ``checkpoint``, ``logging`` and ``eval``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from megatron_rpt.config.kinds import (
    EvalMode,
    Fraction,
    LRSchedule,
    NonNegFloat,
    NonNegInt,
    Objective,
    PosFloat,
    PosInt,
)
from megatron_rpt.config_schema import ConfigError, Range, Section


@dataclass
class OptimConfig(Section):
    lr: PosFloat = 1e-6
    """Peak learning rate (reached after warm-up)."""
    min_lr: NonNegFloat = 0.0
    """Learning rate at the end of a cosine or linear decay."""
    weight_decay: NonNegFloat = 0.01
    """Decoupled (AdamW) weight decay."""
    beta1: Annotated[float, Range(ge=0, lt=1)] = 0.9
    """Adam's first-moment decay."""
    beta2: Annotated[float, Range(ge=0, lt=1)] = 0.999
    """Adam's second-moment decay."""
    eps: PosFloat = 1e-8
    """Adam's epsilon."""
    clip_grad: NonNegFloat = 1.0
    """Clip the global gradient norm to this; 0: no clipping."""
    warmup_steps: NonNegInt = 0
    """Steps of linear warm-up from 0 to optim.lr."""
    lr_schedule: LRSchedule = "constant"
    """After warm-up: constant, or a cosine / linear decay to optim.min_lr at train.steps."""
    cpu_offload: bool = False
    """Keep the Adam state and step on the CPU (megatron-core's HybridDeviceOptimizer): GPU room for rollouts."""
    offload_fraction: Fraction = 1.0
    """Share of the optimizer state optim.cpu_offload moves to the CPU (1.0: all of it, as verl and slime run)."""

    def check(self) -> None:
        if self.lr_schedule != "constant" and self.min_lr > self.lr:
            raise ConfigError(f"optim.min_lr={self.min_lr} is above optim.lr={self.lr}; the {self.lr_schedule} "
                              "decay goes down to min_lr: lower it")


@dataclass
class TrainConfig(Section):
    steps: PosInt = 1000
    """Training steps of the run; a resumed run continues up to this step."""
    seed: int = 1234
    """Seed of random initialisation and of Megatron's RNG trackers."""
    eval_interval: NonNegInt = 0
    """Evaluate on the held-out split every N steps; 0: never."""
    objective: Objective = "rpt"
    """rpt: GRPO on next-token reasoning; ntp: plain next-token (LM loss) training on the same corpus (a baseline;
    it builds a rollout engine only when train.eval_interval > 0)."""


@dataclass
class NTPConfig(Section):
    seq_length: Annotated[int, Range(ge=2)] = 2048
    """Tokens per training sequence of train.objective=ntp (the train split's documents, packed, EOS between)."""
    sequences_per_step: PosInt = 64
    """Sequences per NTP step over all data-parallel ranks (a multiple of the DP size)."""
    micro_batch_size: PosInt = 4
    """Sequences per forward/backward pass of an NTP step."""


@dataclass
class CheckpointConfig(Section):
    dir: str | None = None
    """The run's checkpoint directory (locked while the run lives; one run per directory); null: no checkpoints."""
    save_interval: NonNegInt = 100
    """Save every N steps; 0: only at the end and on SIGTERM/SIGUSR1 (checkpoint.save_on_exit)."""
    keep_last: NonNegInt = 3
    """Checkpoints kept, the newest ones; 0: keep all."""
    async_save: bool = False
    """Write the tensors in a background process while training continues."""
    save_on_exit: bool = True
    """Save when the run ends or is told to stop (SIGTERM / SIGUSR1)."""


@dataclass
class LoggingConfig(Section):
    dir: str = "runs/default"
    """Run directory: metrics.jsonl, TensorBoard, config.yaml, rollouts/ (locked while the run lives)."""
    jsonl: bool = True
    """Write one JSON line of metrics per step to metrics.jsonl."""
    tensorboard: bool = True
    """Write TensorBoard event files."""
    wandb_project: str | None = None
    """Weights & Biases project (needs pip install wandb); null: off."""
    wandb_run_name: str | None = None
    """Weights & Biases run name."""
    save_rollouts: bool = True
    """Save every rollout (prompt, response, reward) as JSONL under rollouts/."""
    progress_bar: bool = True
    """Show a progress bar on rank 0."""


@dataclass
class EvalConfig(Section):
    scorer_model: str | None = None
    """HF model whose entropy buckets evaluation positions (paper: R1-Distill-Qwen-14B); null: data.proxy_model."""
    positions_per_doc: PosInt | None = None
    """At most this many positions per held-out document (a seeded draw); null: every position (the paper)."""
    max_positions: PosInt | None = None
    """At most this many positions in all, a seeded uniform draw over every held-out document; null: no cap."""
    pass_k: PosInt = 8
    """Samples per position in next-token reasoning (Pass@k)."""
    temperature: NonNegFloat = 0.8
    """Sampling temperature of reasoning evaluation; 0: greedy."""
    max_response_tokens: PosInt | None = None
    """Longest evaluation response; null: rollout.max_response_tokens."""
    modes: list[EvalMode] = field(default_factory=lambda: ["standard", "reasoning"])
    """Evaluation modes run by default: standard (argmax next token) and/or reasoning."""

    def check(self) -> None:
        if not self.modes:
            raise ConfigError("eval.modes is empty; give standard, reasoning or both")
