"""Per-GPU memory planner and parallel-layout search for RPT on Megatron-Core (+ vLLM).

Owns the per-GPU memory model of one RL step (training state, activations, rollout engine,
weight-sync bucket), a simple step-time model, enumerating TP/PP/CP/EP/DP layouts for a GPU
count, ranking those that fit, and the refusal when none does; ``tools/plan.py`` is the command
line. Split by concept: :mod:`.inputs` (hardware, workload, layout), :mod:`.terms` (the memory
arithmetic, term by term), :mod:`.step_time`, :mod:`.search` (the layouts) and :mod:`.report`
(a config's plan, the table, the refusal).

The model is counted per decoder layer, which fits both Megatron classes the policy is built as:
a HybridModel (megatron-core 0.19) attention + MLP layer pair holds exactly one GPTModel layer's
parameters and activations, and the builder cuts pipeline stages at the same decoder layers.
"""

from megatron_rpt.memory_plan.inputs import Hardware, Layout, Workload
from megatron_rpt.memory_plan.report import ConfigPlan, cpu_optimizer_line, plan_config, refusal, render_table
from megatron_rpt.memory_plan.search import (
    Candidate,
    Plan,
    enumerate_layouts,
    evaluate,
    layout_problems,
    min_gpus_that_fit,
    plan,
)
from megatron_rpt.memory_plan.step_time import CpuOptimizerStep, StepTime, cpu_optimizer_step, estimate_step_time
from megatron_rpt.memory_plan.terms import (
    CHUNK_TEMP_BYTES,
    DTYPE_BYTES,
    LOGIT_BYTES_CHUNKED,
    LOGIT_BYTES_FULL,
    GiB,
    LayerShape,
    MemoryEstimate,
    StageParams,
    active_params,
    estimate_memory,
    kv_bytes_per_token,
    layer_activation_bytes,
    logit_bytes,
    microbatches,
    padded_vocab,
    stage_params,
)

__all__ = [
    "CHUNK_TEMP_BYTES", "DTYPE_BYTES", "LOGIT_BYTES_CHUNKED", "LOGIT_BYTES_FULL", "Candidate", "ConfigPlan", "GiB",
    "Hardware", "LayerShape", "Layout", "MemoryEstimate", "Plan", "StageParams", "StepTime", "Workload",
    "active_params", "enumerate_layouts", "estimate_memory", "estimate_step_time", "evaluate", "kv_bytes_per_token",
    "layer_activation_bytes", "layout_problems", "logit_bytes", "microbatches", "min_gpus_that_fit", "padded_vocab",
    "plan", "plan_config", "refusal", "render_table", "stage_params",
    "CpuOptimizerStep", "cpu_optimizer_step", "cpu_optimizer_line",
]
