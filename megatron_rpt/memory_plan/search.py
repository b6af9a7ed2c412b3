"""The layout search: every valid TP / PP / CP / EP / DP x recompute layout of a GPU count, evaluated
(memory and step time), those that fit ranked fastest first, and the fewest GPUs that fit."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from megatron_rpt.config import ConfigError
from megatron_rpt.memory_plan.inputs import Hardware, Layout, Workload
from megatron_rpt.memory_plan.step_time import StepTime, estimate_step_time
from megatron_rpt.memory_plan.terms import RECOMPUTE_CHOICES, GiB, MemoryEstimate, estimate_memory
from megatron_rpt.model.hf_config import ArchConfig
from megatron_rpt.rollout.layout import engine_layout_problem

# ----------------------------------------------------------------------------- search


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layout_problems(arch: ArchConfig, work: Workload, layout: Layout) -> list[str]:
    """Why a layout cannot run (divisibility, batch), empty when it can."""
    out = []
    if arch.num_attention_heads % layout.tp or arch.num_key_value_heads % layout.tp:
        out.append(f"TP={layout.tp} must divide heads={arch.num_attention_heads} and "
                   f"kv heads={arch.num_key_value_heads}")
    try:
        layout.stage_layers(arch.num_layers)
    except ConfigError as exc:
        out.append(str(exc))
    if layout.cp > 1 and work.seq_len % (2 * layout.cp):
        out.append(f"CP={layout.cp} needs the sequence length {work.seq_len} divisible by 2*CP")
    stage_ranks = layout.tp * layout.cp * layout.dp  # megatron-core's expert grid: EP x expert-TP x expert-DP
    if layout.ep > 1 and (not arch.num_experts or arch.num_experts % layout.ep):
        out.append(f"EP={layout.ep} must divide num_experts={arch.num_experts}")
    if stage_ranks % (layout.ep * layout.expert_tp):
        out.append(f"EP*expert-TP={layout.ep}*{layout.expert_tp} must divide TP*CP*DP={stage_ranks}")
    per_mini = work.sequences_per_step / work.mini_batches
    if per_mini % (layout.dp * work.micro_batch):
        out.append(f"a mini-batch of {per_mini:g} sequences is not divisible by DP*micro_batch = "
                   f"{layout.dp}*{work.micro_batch}")
    if work.rollout_engine == "vllm" and layout.gpus % work.rollout_tp:
        out.append(f"rollout TP={work.rollout_tp} must divide the {layout.gpus} GPUs")
    elif work.rollout_engine == "vllm" and work.prompts_per_step % (layout.gpus // work.rollout_tp):
        # check_rollout_layout's rule: every engine draws the same number of prompts.
        out.append(f"rl.prompts_per_step={work.prompts_per_step} is not divisible by the "
                   f"{layout.gpus // work.rollout_tp} rollout engines ({layout.gpus} GPUs / rollout TP "
                   f"{work.rollout_tp})")
    elif work.rollout_engine == "vllm" and not out:
        # A vLLM engine's ranks must train one data-parallel replica (rollout/layout.py).
        problem = engine_layout_problem(layout.parallel(), layout.gpus, work.rollout_tp)
        if problem:
            out.append(problem)
    return out


def balanced_uneven_split(num_layers: int, pp: int) -> tuple[int, int] | None:
    """(first, last) stage layers when ``pp`` does not divide the layers: the largest equal first and last
    counts, no more than a middle stage's, that leave the middle stages an even share (NeMo-RL's 235B split:
    94 layers over PP8 as 11 + 6 x 12 + 11); None when ``pp`` divides them or no such split exists."""
    if pp < 3 or num_layers % pp == 0:
        return None
    for ends in range(num_layers // pp, 0, -1):
        middle, rest = divmod(num_layers - 2 * ends, pp - 2)
        if not rest and middle >= ends:
            return ends, ends
    return None


def _pipeline_splits(num_layers: int) -> Iterator[tuple[int, int | None, int | None]]:
    """(PP, first, last): every even split, and the balanced uneven one of each PP that cannot split evenly."""
    for pp in range(1, num_layers + 1):
        if num_layers % pp == 0:
            yield pp, None, None
        elif (ends := balanced_uneven_split(num_layers, pp)) is not None:
            yield pp, *ends


def enumerate_layouts(arch: ArchConfig, work: Workload, hw: Hardware,
                      distributed_optimizer: bool = True) -> Iterator[Layout]:
    """Every valid TP/PP/CP/EP/DP x recompute layout of ``hw.gpus`` GPUs (SP on whenever TP > 1), with the
    balanced uneven pipeline split where PP does not divide the layers and, for MoE, expert TP = TP or 1."""
    tps = [t for t in _divisors(arch.num_attention_heads)
           if arch.num_key_value_heads % t == 0 and t <= hw.max_tensor_parallel and hw.gpus % t == 0]
    recomputes = (None, "full") if work.flash_attention else RECOMPUTE_CHOICES
    for tp, (pp, first, last), cp in itertools.product(tps, _pipeline_splits(arch.num_layers), (1, 2, 4, 8)):
        if hw.gpus % (tp * pp * cp):
            continue
        dp = hw.gpus // (tp * pp * cp)
        eps = [e for e in _divisors(arch.num_experts) if (tp * dp * cp) % e == 0] if arch.num_experts else [1]
        etps = [None, 1] if arch.num_experts and tp > 1 else [None]
        for ep, etp, recompute in itertools.product(eps, etps, recomputes):
            layout = Layout(tp=tp, pp=pp, cp=cp, ep=ep, dp=dp, recompute=recompute, sequence_parallel=tp > 1,
                            distributed_optimizer=distributed_optimizer, etp=etp, first_stage_layers=first,
                            last_stage_layers=last)
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
                       "cpu_optimizer": round(self.time.cpu_optimizer.total_s, 2),
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

