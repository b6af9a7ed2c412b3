"""The one configuration tree of megatron-rpt: its sections, their rules, loading and ``explain``.

Owns the dataclasses (model, parallel, data, rollout, rl, optim, train, checkpoint, logging,
eval). Each field carries its type (``Literal`` choices, ``Annotated`` ranges: checked by the
loader in :mod:`megatron_rpt.config_schema`) and the one-line description under it, which
``python -m megatron_rpt.config explain [KEY]`` prints. A section's own rules are its ``check()``;
:func:`validate` adds only the rules that join sections (and the world size, the architecture and
paths). Every bad value raises :class:`ConfigError` naming the key, both values and the fix.

Relative paths are resolved against the current directory (run from the repository root, as
the README and the SLURM launchers do); ``${VAR}`` and ``${VAR:-default}`` environment
references are expanded; ``base: other.yaml`` merges this file over another one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from megatron_rpt.config_schema import (
    ConfigError,
    Range,
    Section,
    apply_override,
    build,
    check_fields,
    expand_env,
    explain,
    load_yaml_tree,
    parse_override,
)

__all__ = ["Config", "ConfigError", "load_config", "from_dict", "validate", "dump_yaml", "parse_override",
           "load_yaml_tree"]

REPO_ROOT = Path(__file__).resolve().parent.parent

PosInt = Annotated[int, Range(ge=1)]
NonNegInt = Annotated[int, Range(ge=0)]
PosFloat = Annotated[float, Range(gt=0)]
NonNegFloat = Annotated[float, Range(ge=0)]
Fraction = Annotated[float, Range(gt=0, le=1)]
Dtype = Literal["float32", "bfloat16", "float16"]
TransformerImpl = Literal["auto", "local", "transformer_engine"]
Fp8Format = Literal["hybrid", "e4m3"]
Fp8Recipe = Literal["delayed", "tensorwise", "mxfp8", "blockwise"]
Recompute = Literal["selective", "full"]
EngineKind = Literal["builtin", "vllm"]
Template = Literal["v0", "v1", "v2", "v3", "v4", "v5", "v6", "raw"]
KLType = Literal["k1", "k3"]
LossAggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
RewardKind = Literal["prefix", "first_token", "dense", "conditional_dense"]
AnswerFormat = Literal["boxed", "raw"]
LRSchedule = Literal["constant", "cosine", "linear"]
EvalMode = Literal["standard", "reasoning"]
Objective = Literal["rpt", "ntp"]


@dataclass
class ModelConfig(Section):
    hf_config: str = ""
    """Hugging Face config.json (file or model directory) of the architecture; empty: model.hf_checkpoint's."""
    hf_checkpoint: str | None = None
    """Hugging Face model directory to initialise from (converted in memory), or auto:smollm2 / auto:tiny-qwen2."""
    load: str | None = None
    """Megatron dist checkpoint to initialise the weights from (convert.py output or a run's iter_X/dist), any TP/PP."""
    tokenizer: str = ""
    """Tokenizer directory (tokenizer.json, optional chat template); empty: the model directory's."""
    random_init: bool = False
    """Start from random weights when no checkpoint is given (toy runs and CPU tests)."""
    params_dtype: Dtype = "float32"
    """Dtype of the trained parameters (bfloat16/float16 keep float32 master weights in the optimizer)."""
    transformer_impl: TransformerImpl = "auto"
    """Layer implementation; auto: Transformer Engine on a GPU where it is installed, else Megatron-Core's local."""
    fp8: Fp8Format | None = None
    """FP8 format (Transformer Engine on Hopper or newer); null: no FP8."""
    fp8_recipe: Fp8Recipe = "delayed"
    """FP8 scaling recipe (mxfp8 needs Blackwell)."""
    make_vocab_size_divisible_by: PosInt = 128
    """Pad the vocabulary to a multiple of this times TP; the padding rows are never sampled."""
    recompute: Recompute | None = None
    """Activation recomputation: full layers, selective (attention core), or null for none."""
    max_position_embeddings: PosInt | None = None
    """Longest sequence the model accepts; null: the HF config's."""
    init_std: NonNegFloat = 0.02
    """Standard deviation of random initialisation (model.random_init)."""

    def check(self) -> None:
        if self.fp8 and self.transformer_impl == "local":
            raise ConfigError(f"model.fp8={self.fp8!r} needs Transformer Engine but model.transformer_impl=local: "
                              "set model.transformer_impl=auto or transformer_engine")


@dataclass
class ParallelConfig(Section):
    tensor_parallel: PosInt = 1
    """Tensor-parallel size; must divide the attention heads and the KV heads."""
    pipeline_parallel: PosInt = 1
    """Pipeline stages; pipeline_parallel x virtual_pipeline must divide the layers."""
    virtual_pipeline: PosInt | None = None
    """Model chunks per pipeline rank (interleaved 1F1B); needs pipeline_parallel >= 2."""
    context_parallel: PosInt = 1
    """Context-parallel size: each sequence is split over this many ranks (needs Transformer Engine)."""
    expert_parallel: PosInt = 1
    """Expert-parallel size of a MoE model; must divide the experts and data_parallel x context_parallel."""
    expert_tensor_parallel: PosInt | None = None
    """Tensor-parallel size of the expert MLPs; null: tensor_parallel (peers run 1 with expert_parallel >= 8)."""
    first_stage_layers: PosInt | None = None
    """Decoder layers on the first pipeline stage (uneven split, e.g. fewer beside the embedding); null: even."""
    last_stage_layers: PosInt | None = None
    """Decoder layers on the last pipeline stage (uneven split, e.g. fewer beside the output layer); null: even."""
    sequence_parallel: bool = False
    """Shard norm and dropout activations over the TP ranks (needs tensor_parallel > 1)."""
    distributed_optimizer: bool = True
    """Shard the optimizer state over data-parallel ranks (replicated on CPU with DP > 1: gloo lacks reduce-scatter)."""
    world_size: PosInt | None = None
    """Ranks a recipe is written for, checked at load (SLURM recipes set it); null: whatever is launched."""
    distributed_timeout_minutes: Annotated[int, Range(ge=1, le=1440)] = 30
    """Timeout of every collective: ranks that finish their rollouts first wait for the slowest (peers: 20-30)."""

    def check(self) -> None:
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tensor_parallel > 1")
        if self.virtual_pipeline is not None and self.pipeline_parallel < 2:
            raise ConfigError(f"parallel.virtual_pipeline={self.virtual_pipeline} needs parallel.pipeline_parallel "
                              f">= 2 (it is {self.pipeline_parallel}); set virtual_pipeline=null")
        for key in ("first_stage_layers", "last_stage_layers"):
            layers = getattr(self, key)
            if layers is not None and self.pipeline_parallel < 2:
                raise ConfigError(f"parallel.{key}={layers} needs parallel.pipeline_parallel >= 2 (it is "
                                  f"{self.pipeline_parallel}); set {key}=null")
            if layers is not None and self.virtual_pipeline and layers % self.virtual_pipeline:
                raise ConfigError(f"parallel.{key}={layers} is not divisible by parallel.virtual_pipeline="
                                  f"{self.virtual_pipeline} (each model chunk of the stage gets the same layers); "
                                  f"use a multiple of {self.virtual_pipeline}")

    @property
    def expert_tensor_size(self) -> int:
        """The expert MLPs' tensor-parallel size (megatron-core's default: the dense tensor_parallel)."""
        return self.tensor_parallel if self.expert_tensor_parallel is None else self.expert_tensor_parallel

    def stage_layers(self, num_layers: int) -> list[int]:
        """Decoder layers of each pipeline rank (megatron-core's split: first / last stage as set, the rest
        even); the one owner of the split for the architecture check, HybridModel's pattern and the planner."""
        pp, vp = self.pipeline_parallel, self.virtual_pipeline or 1
        first, last = self.first_stage_layers, self.last_stage_layers
        middle_stages = pp - (first is not None) - (last is not None)
        middle_layers = num_layers - (first or 0) - (last or 0)
        uneven = first is not None or last is not None
        what = (f"num_hidden_layers={num_layers} with parallel.first_stage_layers={first}, last_stage_layers={last}"
                if uneven else f"num_hidden_layers={num_layers}")
        if middle_layers < 0 or bool(middle_layers) != bool(middle_stages) or (
                middle_stages and middle_layers % (middle_stages * vp)):
            raise ConfigError(
                f"parallel.pipeline_parallel={pp}{f' x virtual_pipeline={vp}' if vp > 1 else ''} cannot split "
                f"{what}: the {max(middle_layers, 0)} remaining layers must fill the {middle_stages} middle stages "
                f"evenly{' (and their model chunks)' if vp > 1 else ''}; change the stage layer counts or the "
                "pipeline size")
        per_middle = middle_layers // middle_stages if middle_stages else 0
        counts = [per_middle] * pp
        if first is not None:
            counts[0] = first
        if last is not None:
            counts[-1] = last
        return counts

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.context_parallel

    def data_parallel_size(self, world_size: int) -> int:
        """The data-parallel size at ``world_size`` ranks; the one check that the layout fits them."""
        mp = self.model_parallel_size
        if world_size % mp:
            raise ConfigError(
                f"world size {world_size} is not divisible by parallel.tensor_parallel*pipeline_parallel*"
                f"context_parallel = {self.tensor_parallel}*{self.pipeline_parallel}*{self.context_parallel} = "
                f"{mp}; launch a multiple of {mp} ranks or change parallel.*"
            )
        dp = world_size // mp
        expert_ranks = self.expert_parallel * self.expert_tensor_size
        stage_ranks = self.tensor_parallel * self.context_parallel * dp  # the ranks of one pipeline stage
        if expert_ranks > 1 and stage_ranks % expert_ranks:
            raise ConfigError(f"parallel.expert_parallel*expert_tensor_parallel = {self.expert_parallel}*"
                              f"{self.expert_tensor_size} = {expert_ranks} must divide tensor_parallel*"
                              f"context_parallel*data_parallel = {stage_ranks} for world size {world_size}")
        return dp


@dataclass
class CorpusConfig(Section):
    name: str = ""
    """Name of the corpus: prefixes its document ids (name/file:row) and labels it in the manifest and metrics."""
    paths: list[str] = field(default_factory=list)
    """JSONL / Parquet files or directories of them."""
    weight: PosFloat = 1.0
    """Sampling weight: the corpus's share of the mixture's documents is weight / (sum of the weights)."""
    text_fields: list[str] = field(default_factory=lambda: ["text"])
    """Row fields joined (in this order) into a document's text."""
    text_separator: str = "\n\n"
    """String placed between the text fields."""
    min_chars: NonNegInt = 0
    """Documents with fewer characters are dropped (length filter)."""
    max_chars: PosInt | None = None
    """Documents with more characters are dropped (length filter); null: no upper limit."""

    def check(self) -> None:
        if not self.name or any(c in self.name for c in "/:") or self.name != self.name.strip():
            raise ConfigError(f"data.mixture: corpus name {self.name!r} must be non-empty, without '/', ':' or "
                              "surrounding spaces (it prefixes document ids), e.g. name: gsm8k")
        if not self.paths:
            raise ConfigError(f"data.mixture corpus {self.name!r} has no paths; list its JSONL/Parquet files")
        if not self.text_fields:
            raise ConfigError(f"data.mixture corpus {self.name!r}: text_fields is empty; name the row field(s) "
                              "holding the text, e.g. [text]")
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ConfigError(f"data.mixture corpus {self.name!r}: max_chars={self.max_chars} is below "
                              f"min_chars={self.min_chars}; raise max_chars or lower min_chars")


@dataclass
class DataConfig(Section):
    paths: list[str] = field(default_factory=list)
    """JSONL / Parquet files, directories of them, or one prepared directory (with manifest.json)."""
    hf_dataset: str | None = None
    """Hugging Face dataset name or local dataset directory, read when data.paths is empty."""
    hf_split: str = "train"
    """Split of data.hf_dataset to read."""
    hf_streaming: bool = True
    """Stream data.hf_dataset instead of downloading it whole."""
    text_fields: list[str] = field(default_factory=lambda: ["problem", "solution"])
    """Row fields joined (in this order) into a document's text."""
    text_separator: str = "\n\n"
    """String placed between the text fields."""
    prepared: str | None = None
    """Directory written by tools/prepare_data.py (documents tokenised and scored; preferred at scale)."""
    proxy_model: str | None = None
    """HF model scoring positions by entropy on the fly; null: positions drawn uniformly (seeded)."""
    entropy_top_k: PosInt = 16
    """The filter's entropy is over the proxy's renormalised top-k next-token probabilities."""
    entropy_threshold: float = 0.5
    """Only positions whose proxy entropy is above this become problems (when scored)."""
    difficulty_thresholds: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5])
    """Increasing entropy thresholds of the easy / medium / hard splits (metrics and evaluation)."""
    max_positions_per_doc: PosInt = 8
    """At most this many problems per document per epoch."""
    min_context_tokens: NonNegInt = 16
    """A position needs at least this many tokens of context before it."""
    max_prompt_tokens: PosInt = 4096
    """Longest prompt (template + context, the context cut from the left on a token boundary)."""
    target_tokens: PosInt | None = None
    """Ground-truth tokens kept per problem; null: the rest of the document (eq. 3: no prediction is cut short)."""
    template: Template = "v0"
    """Prompt template of the paper's table 10 (v0 is the one it trains with), or raw: the bare context."""
    use_chat_template: bool = True
    """Wrap the prompt in the tokenizer's chat template (R1-Distill: <｜User｜>...<｜Assistant｜><think>)."""
    val_documents: NonNegInt = 200
    """Documents held out for validation; the train split never sees them."""
    seed: int = 1234
    """Seed of position sampling, shuffling and the held-out split."""
    mixture: list[CorpusConfig] = field(default_factory=list)
    """Several corpora sampled by weight, instead of data.paths (the same list for prepare_data and on the fly)."""
    dedup: bool = True
    """Drop exact duplicate documents of data.mixture (same text, by sha256) after their first occurrence."""

    def check(self) -> None:
        if self.mixture and (self.paths or self.hf_dataset):
            raise ConfigError("data.mixture replaces data.paths / data.hf_dataset: list every corpus under "
                              "data.mixture and leave data.paths empty and data.hf_dataset null")
        names = [c.name for c in self.mixture]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"data.mixture names corpus {dup[0]!r} twice; give every corpus its own name")
        if sorted(self.difficulty_thresholds) != self.difficulty_thresholds:
            raise ConfigError(f"data.difficulty_thresholds={self.difficulty_thresholds} must be increasing, "
                              "e.g. [0.5, 1.0, 1.5]")
        if self.template == "raw" and self.use_chat_template:
            raise ConfigError("data.template=raw is the bare context: set data.use_chat_template=false")
        if not self.text_fields:
            raise ConfigError("data.text_fields is empty; name the row field(s) holding the text, e.g. [text]")


@dataclass
class RolloutConfig(Section):
    engine: EngineKind = "builtin"
    """Rollout engine: builtin (torch, static KV cache) or vllm."""
    samples_per_prompt: PosInt = 8
    """Responses sampled per prompt (the GRPO group size)."""
    temperature: PosFloat = 0.8
    """Sampling temperature (the trainer's logprobs use the same one)."""
    top_p: Fraction = 1.0
    """Nucleus-sampling probability mass; 1 = off."""
    max_response_tokens: PosInt = 8192
    """Longest response (thinking and answer) in tokens."""
    stop: list[str] = field(default_factory=list)
    """Extra strings that end a response."""
    batch_size: PosInt = 64
    """Prompts the builtin engine generates at once."""
    dtype: Dtype = "float32"
    """Dtype of the engine's weights (the weight sync casts to it)."""
    bucket_mb: PosInt = 512
    """Weight-sync bucket size in MB: the peak extra memory of a sync is about one bucket."""
    tensor_parallel: PosInt = 1
    """Ranks per rollout engine (vLLM TP; builtin: 1): world / this many engines, each with its own prompts."""
    model_dir: str = ""
    """HF model directory vLLM starts from (config.json, tokenizer; weights unless model.load); empty: the model's."""
    gpu_memory_utilization: Fraction = 0.5
    """Fraction of GPU memory vLLM may take."""
    enforce_eager: bool = False
    """vLLM without CUDA graphs: slower decoding, less memory, faster start."""
    sleep_between_phases: bool = True
    """Release the engine's memory while the policy trains (vLLM sleep mode)."""
    seed: int = 0
    """Base seed of sampling (combined with the step and the engine's index)."""

    def check(self) -> None:
        if self.engine == "builtin" and self.tensor_parallel != 1:
            raise ConfigError(f"rollout.tensor_parallel={self.tensor_parallel} but the builtin engine runs one "
                              "engine per rank: set rollout.tensor_parallel=1, or rollout.engine=vllm")


@dataclass
class RLConfig(Section):
    prompts_per_step: PosInt = 256
    """Prompts per training step over all data-parallel ranks (a multiple of the DP size)."""
    mini_batches_per_step: PosInt = 1
    """Optimizer steps per training step: the step's samples are split into this many mini-batches."""
    micro_batch_size: PosInt = 4
    """Sequences per forward/backward pass without packing; with packing it sizes the default token budget."""
    sequence_packing: bool = True
    """Pack samples into token budgets (THD: Transformer Engine on GPU, block-diagonal mask on CPU); false: pad rows."""
    micro_batch_tokens: PosInt | None = None
    """Token budget of a packed micro-batch; null: micro_batch_size x (data.max_prompt_tokens + max_response_tokens)."""
    logprob_chunk_tokens: NonNegInt = 1024
    """Tokens per chunk of the log-prob / entropy pass (no float32 copy of the logits); 0: all at once."""
    updates_per_batch: PosInt = 1
    """Passes over the step's samples (PPO epochs)."""
    clip_low: Annotated[float, Range(ge=0, lt=1)] = 0.2
    """PPO clip: the ratio's lower bound is 1 - clip_low."""
    clip_high: NonNegFloat = 0.2
    """PPO clip: the ratio's upper bound is 1 + clip_high (above clip_low: DAPO's clip-higher)."""
    dual_clip: Annotated[float, Range(gt=1)] | None = None
    """Dual clip c > 1: the loss of a negative-advantage token is at most -A*c (e.g. 3.0); null: off."""
    kl_coef: NonNegFloat = 0.0
    """Weight of the KL penalty to the frozen initial policy (0: none, as in the paper)."""
    kl_type: KLType = "k3"
    """KL estimator: k1 (log-ratio) or k3 (non-negative, low variance)."""
    entropy_coef: NonNegFloat = 0.0
    """Weight of the entropy bonus."""
    loss_aggregation: LossAggregation = "token-mean"
    """How token losses are averaged over the global batch (verl's modes)."""
    normalize_advantage_std: bool = True
    """Divide group advantages by the group's reward std (GRPO); false: Dr. GRPO's mean-centring only."""
    dynamic_sampling_from_step: NonNegInt | None = 500
    """From this step on, groups whose rewards are all equal are dropped and refilled; null: never."""
    max_refill_rounds: NonNegInt = 4
    """Extra generation rounds dynamic sampling may spend per step."""
    reward: RewardKind = "prefix"
    """Reward: prefix (the paper's eq. 3), first_token, dense or conditional_dense (appendix A: P(y0|x<t))."""
    answer_format: AnswerFormat = "boxed"
    """boxed: the prediction is the last \\boxed{} after </think> (the paper); raw: the whole continuation."""
    require_think: bool = True
    """With answer_format=boxed, a response without </think> scores 0."""
    box_escapes: bool = True
    """Inside \\boxed{}, a backslash pair (\\{ \\}) neither opens nor closes a group; false: every brace counts."""

    def check(self) -> None:
        if self.reward == "dense" and self.dynamic_sampling_from_step is not None:
            raise ConfigError(
                f"rl.reward=dense with rl.dynamic_sampling_from_step={self.dynamic_sampling_from_step}: dynamic "
                "sampling drops groups whose samples are all wrong, which the dense reward still scores; set "
                "rl.dynamic_sampling_from_step=null or use rl.reward=conditional_dense")


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
    """rpt: GRPO on next-token reasoning; ntp: plain next-token (LM loss) training on the same corpus (a baseline)."""


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


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy: architecture, initial weights, tokenizer, precision."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """How the policy is split over ranks."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus and problems."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling responses."""
    rl: RLConfig = field(default_factory=RLConfig)
    """GRPO."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Length and seed of the run."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving and resuming."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics and run directory."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation."""
    ntp: NTPConfig = field(default_factory=NTPConfig)
    """The next-token-prediction baseline (train.objective=ntp)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- validation


def validate(cfg: Config, world_size: int | None = None, check_paths: bool = False) -> None:
    """Raise :class:`ConfigError` naming the first bad key.

    Every section's fields (types, choices, ranges) and its own ``check()``, then the rules that
    join sections: the world size (``world_size``, default ``parallel.world_size``) against the
    parallel layout, the vLLM TP size and the prompts per step; the layout against the model's
    architecture; with ``check_paths``, that the paths it names exist.
    """
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        check_fields(section, f.name)
        section.check()
    p = cfg.parallel
    world = world_size if world_size is not None else p.world_size
    if world is not None:
        dp = p.data_parallel_size(world)
        if cfg.train.objective == "ntp" and cfg.ntp.sequences_per_step % dp:
            raise ConfigError(f"ntp.sequences_per_step={cfg.ntp.sequences_per_step} is not divisible by the "
                              f"data-parallel size {dp}; make it a multiple of {dp}")
        # lazy: cycle config <-> rollout.layout, and loading a config imports no torch until here
        from megatron_rpt.rollout.layout import check_rollout_layout

        check_rollout_layout(cfg, world)
    if cfg.optim.cpu_offload and not p.distributed_optimizer:
        raise ConfigError("optim.cpu_offload=true needs parallel.distributed_optimizer=true (megatron-core offloads "
                          "the distributed optimizer's state shards); set parallel.distributed_optimizer=true")
    longest = cfg.data.max_prompt_tokens + cfg.rollout.max_response_tokens
    if cfg.rl.sequence_packing and cfg.rl.micro_batch_tokens is not None and cfg.rl.micro_batch_tokens < longest:
        raise ConfigError(f"rl.micro_batch_tokens={cfg.rl.micro_batch_tokens} is below the longest sample, "
                          f"data.max_prompt_tokens + rollout.max_response_tokens = {longest}; raise it to at least "
                          f"{longest} (a sample is never split over micro-batches)")
    if cfg.model.hf_config or _is_local_dir(cfg.model.hf_checkpoint):
        _validate_against_architecture(cfg)
    elif check_paths and not cfg.model.hf_checkpoint:
        raise ConfigError("model.hf_config and model.hf_checkpoint are both empty: point one at a Hugging Face "
                          "config.json / model directory")
    if check_paths:
        _validate_paths(cfg)


def _is_local_dir(value: str | None) -> bool:
    return bool(value) and not str(value).startswith("auto:") and Path(str(value)).is_dir()


def _validate_against_architecture(cfg: Config) -> None:
    from megatron_rpt.model.hf_config import check_parallel_layout, load_hf_config  # lazy: cycle config <-> hf_config

    key = "model.hf_config" if cfg.model.hf_config else "model.hf_checkpoint"
    path = Path(cfg.model.hf_config or cfg.model.hf_checkpoint or "")
    if not path.exists():
        raise ConfigError(f"{key}={str(path)!r} does not exist; give a config.json or HF model dir")
    check_parallel_layout(load_hf_config(path), cfg.parallel)


def _validate_paths(cfg: Config) -> None:
    for key, value in (("model.load", cfg.model.load), ("model.tokenizer", cfg.model.tokenizer),
                       ("data.prepared", cfg.data.prepared), ("data.proxy_model", cfg.data.proxy_model),
                       ("eval.scorer_model", cfg.eval.scorer_model)):
        if value and not Path(value).exists():
            raise ConfigError(f"{key}={value!r} does not exist; fix the path or set it to null")
    hf = cfg.model.hf_checkpoint
    if hf and not hf.startswith("auto:") and not Path(hf).exists():
        raise ConfigError(f"model.hf_checkpoint={hf!r} does not exist; give an HF model dir or auto:smollm2")
    if hf and hf.startswith("auto:") and hf not in ("auto:smollm2", "auto:tiny-qwen2"):
        raise ConfigError(f"model.hf_checkpoint={hf!r}: the automatic models are auto:smollm2 and auto:tiny-qwen2")
    for i, value in enumerate(cfg.data.paths):
        if not Path(value).exists():
            raise ConfigError(f"data.paths[{i}]={value!r} does not exist; fix the path")
    for corpus in cfg.data.mixture:
        for i, value in enumerate(corpus.paths):
            if not Path(value).exists():
                raise ConfigError(f"data.mixture corpus {corpus.name!r}: paths[{i}]={value!r} does not exist; "
                                  "fix the path")
    if cfg.rollout.engine == "vllm":
        from megatron_rpt.rollout import check_vllm_start  # lazy: cycle config <-> rollout; rollout imports torch

        check_vllm_start(cfg)


# ----------------------------------------------------------------------------- loading


def from_dict(data: dict[str, Any], overrides: list[str] | None = None, validate_paths: bool = False) -> Config:
    """The validated config of a YAML-shaped mapping with ``--set`` overrides applied."""
    tree = expand_env(json.loads(json.dumps(data)))
    for text in overrides or []:
        path, value = parse_override(text)
        apply_override(tree, path, value)
    cfg = build(Config, tree)
    validate(cfg, check_paths=validate_paths)
    return cfg


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None,
                validate_paths: bool = True) -> Config:
    """Load a YAML config (or defaults when ``path`` is None), apply ``--set`` overrides, validate."""
    tree = load_yaml_tree(path) if path else {}
    return from_dict(tree, overrides, validate_paths=validate_paths)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    """``python -m megatron_rpt.config explain [KEY]``: every config key, its type, default and meaning."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] != "explain" or len(args) > 2:
        print("usage: python -m megatron_rpt.config explain [SECTION | SECTION.KEY]", file=sys.stderr)
        return 2
    try:
        print(explain(Config, args[1] if len(args) == 2 else None))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
