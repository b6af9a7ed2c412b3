"""What the planner tells the user: the plan of a config, the table of layouts, and the refusal when
nothing fits (the smallest requirement and what to change)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from rich.table import Table

from megatron_rpt.config import Config
from megatron_rpt.memory_plan.inputs import Hardware, Layout, Workload
from megatron_rpt.memory_plan.search import Candidate, Plan, evaluate, layout_problems, min_gpus_that_fit, plan
from megatron_rpt.memory_plan.step_time import CPU_ADAM_BYTES_PER_PARAM, OFFLOAD_LINK_BYTES_PER_PARAM
from megatron_rpt.memory_plan.terms import active_params
from megatron_rpt.model.hf_config import ArchConfig, load_hf_config


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


def cpu_optimizer_line(cp: ConfigPlan) -> str | None:
    """The configured layout's CPU optimizer step (optim.cpu_offload) with its arithmetic; None without offload."""
    if cp.configured is None or not cp.configured.time.cpu_optimizer.optimizer_steps:
        return None
    c, hw, work = cp.configured.time.cpu_optimizer, cp.plan.hardware, cp.plan.workload
    return (f"CPU optimizer step (optim.offload_fraction={work.optimizer_offload_fraction:g}): {c.total_s:.2f} s "
            f"per RL step (in train s) = {c.optimizer_steps} optimizer step(s) x {c.params / 1e9:.3f}B offloaded "
            f"params/GPU x ({CPU_ADAM_BYTES_PER_PARAM} B AdamW / {hw.host_mem_gbps:g} GB/s host memory + "
            f"{OFFLOAD_LINK_BYTES_PER_PARAM} B copies / {hw.host_link_gbps:g} GB/s GPU-host link) = "
            f"{c.host_adam_s:.2f} s + {c.copy_s:.2f} s")


def render_table(cp: ConfigPlan, top: int = 10) -> Any:
    """A rich Table of the fastest fitting layouts (and the configured one when it is not among them)."""
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
