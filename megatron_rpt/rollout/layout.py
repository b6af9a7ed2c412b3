"""Which ranks generate which prompts: rollout engines inside Megatron's data-parallel layout.

Owns the rule (one engine per prompt stream): the world holds ``world / rollout.tensor_parallel``
rollout engines, engine ``k`` being the consecutive global ranks ``[k*t, (k+1)*t)`` (how vLLM's
external launcher groups ranks; the built-in engine is ``t = 1``: one engine on every rank). Every
engine draws its own prompts (shard ``k`` of the data stream) with its own seed, so no two engines
decode the same prompt. A Megatron data-parallel replica (the TP x CP x PP ranks sharing one
data-parallel rank) trains on the samples of the engines inside it, gathered in engine order, so
every rank of the replica holds the same batch. Hence an engine must lie inside one replica:
:func:`engine_layout_problem` derives Megatron's data-parallel rank of every global rank with
:func:`replica_ranks` (the arithmetic of megatron-core's ``RankGenerator`` in the default order
``tp-cp-ep-dp-pp`` of 0.16 and 0.19, kept here free of megatron-core because the config check and
the planner import this module; tests/test_rollout_layout.py pins it to the real one) and names a
working ``rollout.tensor_parallel`` when an engine would span two replicas.

:func:`engine_count` is what the config check and the planner count; :class:`RolloutLayout` is the
same layout at run time (this rank's engine, its replica's engines and a process group over them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from megatron_rpt.config import Config, ConfigError, ParallelConfig

if TYPE_CHECKING:  # only an annotation: megatron_rpt.topology imports megatron-core
    from megatron_rpt.topology import Topology


def replica_ranks(world_size: int, tensor_parallel: int, context_parallel: int,
                  pipeline_parallel: int) -> list[list[int]]:
    """Global ranks of each data-parallel replica (index: the data-parallel rank), as megatron-core's
    ``RankGenerator`` assigns them in ``initialize_model_parallel``'s default order ``tp-cp-ep-dp-pp``
    (tensor fastest; expert parallelism is 1 for the dense dimensions): rank =
    ``t + TP * (c + CP * (d + DP * p))``, each replica listed in ascending order."""
    data_parallel = world_size // (tensor_parallel * context_parallel * pipeline_parallel)
    return [[t + tensor_parallel * (c + context_parallel * (d + data_parallel * p))
             for p in range(pipeline_parallel) for c in range(context_parallel) for t in range(tensor_parallel)]
            for d in range(data_parallel)]


def engine_count(world_size: int, rollout_tp: int) -> int:
    """Rollout engines (= prompt streams) in a world of ``world_size`` ranks."""
    if rollout_tp < 1 or world_size % rollout_tp:
        raise ConfigError(f"rollout.tensor_parallel={rollout_tp} must divide the world size {world_size}")
    return world_size // rollout_tp


def data_parallel_ranks(parallel: ParallelConfig, world_size: int) -> list[int]:
    """Megatron's data-parallel rank of every global rank."""
    parallel.data_parallel_size(world_size)  # the layout's own check (ConfigError), before Megatron asserts
    out = [0] * world_size
    replicas = replica_ranks(world_size, parallel.tensor_parallel, parallel.context_parallel,
                             parallel.pipeline_parallel)
    for dp_rank, ranks in enumerate(replicas):
        for rank in ranks:
            out[rank] = dp_rank
    return out


def _spanning_engine(dp_of: list[int], rollout_tp: int) -> list[int] | None:
    for start in range(0, len(dp_of), rollout_tp):
        ranks = list(range(start, start + rollout_tp))
        if len({dp_of[r] for r in ranks}) > 1:
            return ranks
    return None


def engine_layout_problem(parallel: ParallelConfig, world_size: int, rollout_tp: int) -> str | None:
    """Why engines of ``rollout_tp`` consecutive ranks cannot feed Megatron's replicas (None: they can)."""
    if rollout_tp == 1 or parallel.data_parallel_size(world_size) == 1:
        return None  # one rank per engine, or one replica holding every rank
    dp_of = data_parallel_ranks(parallel, world_size)
    ranks = _spanning_engine(dp_of, rollout_tp)
    if ranks is None:
        return None
    working = max(t for t in range(1, rollout_tp) if world_size % t == 0 and _spanning_engine(dp_of, t) is None)
    p = parallel
    return (f"rollout.tensor_parallel={rollout_tp} puts global ranks {ranks} in one vLLM engine, but Megatron gives "
            f"them data-parallel ranks {sorted({dp_of[r] for r in ranks})} (parallel.tensor_parallel="
            f"{p.tensor_parallel} x context_parallel={p.context_parallel} consecutive ranks per data-parallel rank, "
            f"pipeline_parallel={p.pipeline_parallel}), so its samples cannot train one replica: set "
            f"rollout.tensor_parallel={working}, or parallel.tensor_parallel x context_parallel to a multiple of "
            f"{rollout_tp}")


def check_engine_layout(parallel: ParallelConfig, world_size: int, rollout_tp: int) -> None:
    """Raise :class:`ConfigError` when an engine would span two data-parallel replicas."""
    problem = engine_layout_problem(parallel, world_size, rollout_tp)
    if problem:
        raise ConfigError(problem)


def check_rollout_layout(cfg: Config, world_size: int) -> None:
    """The config's rules that join the rollout layout to the world size (``config.validate``): the
    Megatron layout fits, engines fit the world and Megatron's replicas, the prompts split evenly
    over the engines, and every mini-batch gets a sample of every replica."""
    dp = cfg.parallel.data_parallel_size(world_size)
    t = cfg.rollout.tensor_parallel
    engines = engine_count(world_size, t)
    if cfg.rl.prompts_per_step % engines:
        raise ConfigError(f"rl.prompts_per_step={cfg.rl.prompts_per_step} is not divisible by the {engines} rollout "
                          f"engines (world size {world_size} / rollout.tensor_parallel={t}; each engine draws its own "
                          f"prompts); make it a multiple of {engines}")
    check_engine_layout(cfg.parallel, world_size, t)
    n, per_replica = cfg.rollout.samples_per_prompt, cfg.rl.prompts_per_step // dp
    dynamic = cfg.rl.dynamic_sampling_from_step is not None
    least = n if dynamic else n * per_replica  # dynamic sampling may leave a replica a single group
    if cfg.rl.mini_batches_per_step > least:
        what = f"rollout.samples_per_prompt={n}" + ("" if dynamic else f" x {per_replica} prompts per replica")
        raise ConfigError(f"rl.mini_batches_per_step={cfg.rl.mini_batches_per_step} is more than the {least} samples "
                          f"a data-parallel replica may train on in a step ({what}); lower it to {least} or fewer")


@dataclass(frozen=True)
class RolloutLayout:
    """This rank's place in the rollout layout (see the module docstring)."""

    engine: int  # this rank's engine (= its prompt stream)
    engines: int  # engines in the world
    engine_ranks: tuple[int, ...]  # global ranks of this rank's engine
    replica_engines: tuple[int, ...]  # engines inside this rank's data-parallel replica, in order
    replica_group: Any = None  # process group of the replica's ranks (None: this rank alone)

    @property
    def leader(self) -> bool:
        """The engine's first rank: the one that reports, saves and sends the engine's samples."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        return rank == self.engine_ranks[0]

    @classmethod
    def single(cls) -> RolloutLayout:
        """One process, one engine."""
        return cls(engine=0, engines=1, engine_ranks=(0,), replica_engines=(0,))

    @classmethod
    def build(cls, parallel: ParallelConfig, rollout_tp: int, topo: Topology) -> RolloutLayout:
        """Collective (every rank, after Megatron's parallel state is initialised): this rank's layout,
        with a process group per data-parallel replica (the ranks that train on the same batch);
        ``topo`` gives this rank's data-parallel rank."""
        if not dist.is_initialized():
            return cls.single()
        world, rank = dist.get_world_size(), dist.get_rank()
        engines = engine_count(world, rollout_tp)
        check_engine_layout(parallel, world, rollout_tp)
        # Megatron's own assignment, gathered: the groups below are exactly its replicas.
        dp_of: list[int] = [0] * world
        dist.all_gather_object(dp_of, topo.dp_rank)
        replicas: dict[int, list[int]] = {}
        for r, d in enumerate(dp_of):
            replicas.setdefault(d, []).append(r)
        group = None
        for d in sorted(replicas):  # every rank creates every group, in the same order
            ranks = replicas[d]
            created = dist.new_group(ranks) if len(ranks) > 1 else None
            if rank in ranks:
                group = created
        engine = rank // rollout_tp
        mine = replicas[dp_of[rank]]
        return cls(engine=engine, engines=engines,
                   engine_ranks=tuple(range(engine * rollout_tp, (engine + 1) * rollout_tp)),
                   replica_engines=tuple(sorted({r // rollout_tp for r in mine})), replica_group=group)
