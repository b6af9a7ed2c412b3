"""The ``model`` and ``parallel`` sections: the policy's architecture and weights, and its split over ranks.

:meth:`ParallelConfig.stage_layers` and :meth:`ParallelConfig.data_parallel_size` are the one owner of
the pipeline split and of the data-parallel size at a world size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from megatron_rpt.config.kinds import Dtype, Fp8Format, Fp8Recipe, NonNegFloat, PosInt, Recompute, TransformerImpl
from megatron_rpt.config_schema import ConfigError, Range, Section


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
