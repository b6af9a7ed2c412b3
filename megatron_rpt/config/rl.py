"""The ``rollout`` and ``rl`` sections: sampling responses and the GRPO update."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from megatron_rpt.config.kinds import (
    AnswerFormat,
    Dtype,
    EngineKind,
    Fraction,
    KLType,
    LossAggregation,
    NonNegFloat,
    NonNegInt,
    PosFloat,
    PosInt,
    RewardKind,
)
from megatron_rpt.config_schema import ConfigError, Range, Section


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
