"""This rank's place in Megatron's parallel groups, as one object.

Owns :class:`Topology`: the sizes, ranks and process groups of tensor, pipeline, data, context
and expert parallelism, read once from ``megatron.core.parallel_state`` (which
:func:`megatron_rpt.distributed.init_distributed` sets up). The trainer, the policy, the HF loader
and the weight bridge read the layout from it instead of calling ``parallel_state`` getters here
and there, and a test can build one by hand (:meth:`Topology.single`, or the constructor) to
exercise layout logic without ``torch.distributed``. Only this module, :mod:`megatron_rpt.distributed` (which sets the
parallel state up) and the stage flags of ``model/build.py`` touch ``parallel_state``; everything
else is handed a :class:`Topology` or one of its groups (``tests/test_topology_owner.py`` checks it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from megatron.core import parallel_state as ps


@dataclass(frozen=True)
class Topology:
    """Sizes, ranks and groups of this rank (all sizes 1 and no groups in a single process)."""

    tp_size: int = 1
    tp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0
    vp_size: int | None = None  # virtual pipeline chunks per rank (None: no interleaving)
    dp_size: int = 1  # data parallel without context parallelism
    dp_rank: int = 0
    cp_size: int = 1
    cp_rank: int = 0
    ep_size: int = 1
    ep_rank: int = 0
    etp_size: int = 1  # expert tensor parallelism
    etp_rank: int = 0
    tp_group: Any = None
    pp_group: Any = None
    dp_group: Any = None
    dp_cp_group: Any = None  # data x context parallel: the replicas DDP averages over
    cp_group: Any = None
    mp_group: Any = None  # model parallel: TP x PP (x CP), the ranks that hold one model replica
    expert_group: Any = None  # expert-TP x expert-parallel group of this stage
    mp_rank: int = 0  # this rank's index in mp_group
    mp_src: int = 0  # global rank of mp_group's first member

    @classmethod
    def single(cls) -> Topology:
        """One process, no parallelism."""
        return cls()

    @classmethod
    def current(cls) -> Topology:
        """This rank's topology from Megatron's parallel state (:meth:`single` without torch.distributed)."""
        if not dist.is_initialized():
            return cls.single()
        if not ps.model_parallel_is_initialized():
            raise RuntimeError("Megatron's parallel state is not initialised; call "
                               "megatron_rpt.distributed.init_distributed() first")
        mp_group = ps.get_model_parallel_group()
        return cls(
            tp_size=ps.get_tensor_model_parallel_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
            pp_size=ps.get_pipeline_model_parallel_world_size(), pp_rank=ps.get_pipeline_model_parallel_rank(),
            vp_size=ps.get_virtual_pipeline_model_parallel_world_size(),
            dp_size=ps.get_data_parallel_world_size(), dp_rank=ps.get_data_parallel_rank(),
            cp_size=ps.get_context_parallel_world_size(), cp_rank=ps.get_context_parallel_rank(),
            ep_size=ps.get_expert_model_parallel_world_size(), ep_rank=ps.get_expert_model_parallel_rank(),
            etp_size=ps.get_expert_tensor_parallel_world_size(), etp_rank=ps.get_expert_tensor_parallel_rank(),
            tp_group=ps.get_tensor_model_parallel_group(), pp_group=ps.get_pipeline_model_parallel_group(),
            dp_group=ps.get_data_parallel_group(),
            dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
            cp_group=ps.get_context_parallel_group(), mp_group=mp_group,
            expert_group=ps.get_expert_tensor_and_model_parallel_group(),
            mp_rank=dist.get_rank(mp_group), mp_src=dist.get_global_rank(mp_group, 0),
        )

    @property
    def is_first_stage(self) -> bool:
        """First pipeline stage (ignoring virtual chunks): it holds the embedding."""
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """Last pipeline stage (ignoring virtual chunks): it holds the output layer and the loss."""
        return self.pp_rank == self.pp_size - 1

    @property
    def expert_world(self) -> int:
        """Ranks in :attr:`expert_group` (expert-TP x expert-parallel)."""
        return self.ep_size * self.etp_size

    def expert_offset(self, num_experts: int) -> int:
        """Global index of this rank's first local expert (0 without experts)."""
        return self.ep_rank * (num_experts // self.ep_size) if num_experts else 0

