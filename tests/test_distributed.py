"""Process groups as a GPU run creates them (issue 11, items 1 and 5), checked on CPU.

* On GPU the world group is ``cpu:gloo,cuda:nccl``; torch's own ``BackendConfig`` says which
  backend serves each device type, so a CPU tensor never reaches NCCL.
* The trainer's collectives (rollout broadcast, numbers, stop flag, logprobs, bridge, eval,
  Megatron's DDP and pipeline p2p) run under a wrapper that asserts each tensor's device is
  served by the backend its group would have in a GPU run: the backend ``init_distributed``
  asks for on GPU, inherited by Megatron's groups unless a group was created with its own.
  On CPU every tensor is a CPU tensor, so the check is conservative: it requires a CPU-capable
  backend for every tensor collective (the model's tensors would be CUDA there, also served).
* ``parallel.distributed_timeout_minutes`` reaches the world group and Megatron's groups.
"""

from __future__ import annotations

import inspect
import os
import traceback
from pathlib import Path

import pytest
import torch
from torch.distributed.distributed_c10d import BackendConfig

from megatron_rpt.config import ConfigError, from_dict
from megatron_rpt.distributed import process_group_backend, spawn
from megatron_rpt.toy import prepare_toy

REPO = Path(__file__).resolve().parent.parent
PACKAGE = str(REPO / "megatron_rpt")
TENSOR_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
                      "reduce_scatter", "reduce", "gather", "scatter", "send", "recv", "all_to_all_single",
                      "all_to_all", "batch_isend_irecv")


def test_gpu_world_group_serves_cpu_and_cuda_tensors():
    # torch's own parser of backend strings decides which backend moves which device's tensors.
    assert BackendConfig(process_group_backend(cuda=True)).get_device_backend_map() == {"cpu": "gloo",
                                                                                          "cuda": "nccl"}
    assert BackendConfig(process_group_backend(cuda=False)).get_device_backend_map()["cpu"] == "gloo"


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if hasattr(value, "tensor") and hasattr(value, "group"):  # P2POp
        return [value.tensor]
    return []


def _site() -> str:
    """The megatron_rpt frames that led to the collective, outermost first."""
    frames = [f"{Path(f.filename).relative_to(REPO)}:{f.name}" for f in traceback.extract_stack()[:-2]
              if f.filename.startswith(PACKAGE)]
    return " > ".join(frames) or "other"


def _install_device_check(gpu_backend: str) -> tuple[list[str], list[str]]:
    """Wrap torch.distributed's tensor collectives and new_group; return (sites seen, violations)."""
    import torch.distributed as dist

    created: dict[int, str | None] = {}  # id(group) -> backend asked for at creation
    seen: list[str] = []
    violations: list[str] = []
    real_new_group = dist.new_group

    def new_group(*args, **kwargs):
        bound = inspect.signature(real_new_group).bind(*args, **kwargs)
        group = real_new_group(*args, **kwargs)
        created[id(group)] = bound.arguments.get("backend")
        return group

    def gpu_backend_of(group) -> str:
        if group is None or group is dist.group.WORLD:
            return gpu_backend
        return created.get(id(group)) or gpu_backend  # backend=None inherits the world group's

    def wrap(name: str, real):
        signature = inspect.signature(real)

        def checked(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            site = _site()
            seen.append(site)
            if name == "batch_isend_irecv":
                pairs = [(op.group, [op.tensor]) for op in bound.arguments["p2p_op_list"]]
            else:
                tensors = [t for key, v in bound.arguments.items() if key != "group" for t in _tensors(v)]
                pairs = [(bound.arguments.get("group"), tensors)]
            for group, tensors in pairs:
                served = BackendConfig(gpu_backend_of(group)).get_device_backend_map()
                for t in tensors:
                    if t.device.type not in served:
                        violations.append(f"{name} at {site}: a {t.device.type} tensor {tuple(t.shape)} on a group "
                                          f"whose GPU-run backend {gpu_backend_of(group)!r} serves {sorted(served)}")
            return real(*args, **kwargs)

        return checked

    dist.new_group = new_group
    for name in TENSOR_COLLECTIVES:
        setattr(dist, name, wrap(name, getattr(dist, name)))
    return seen, violations


def _trainer_under_device_check(toy: str, run: str, layout: list[str]) -> dict:
    os.environ["RPT_TOY_DIR"] = toy
    seen, violations = _install_device_check(process_group_backend(cuda=True))
    from megatron_rpt.config import load_config
    from megatron_rpt.trainer.trainer import Trainer

    cfg = load_config(REPO / "configs/toy_learn.yaml",
                      [f"logging.dir={run}", "logging.progress_bar=false", "train.steps=2", "train.eval_interval=1",
                       "eval.max_positions=8", f"checkpoint.dir={run}/ckpt", "checkpoint.save_interval=1", *layout])
    Trainer(cfg, resume=None).run()
    return {"seen": sorted(set(seen)), "calls": len(seen), "violations": violations}


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory) -> Path:
    return prepare_toy(tmp_path_factory.mktemp("toy") / "toy")


@pytest.mark.slow
@pytest.mark.parametrize("layout,expected", [
    (["parallel.tensor_parallel=2"], {"megatron_rpt/rl/logprobs.py", "megatron_rpt/bridge/resharding.py"}),
    (["parallel.pipeline_parallel=2"], {"megatron_rpt/bridge/resharding.py"}),
], ids=["tp2", "pp2"])
def test_trainer_collectives_hand_each_backend_a_device_it_serves(toy_dir, tmp_path, layout, expected):
    results = spawn(_trainer_under_device_check, 2, str(toy_dir), str(tmp_path / "run"), layout)
    for rank, result in enumerate(results):
        assert not result["violations"], f"rank {rank}:\n" + "\n".join(result["violations"][:20])
        files = {frame.split(":")[0] for site in result["seen"] for frame in site.split(" > ")}
        # The wrapper saw the trainer's own collectives: numbers and stop flag, and the layout's. (Evaluation
        # gathers Python objects, which torch moves to the device the backend serves itself.)
        assert {"megatron_rpt/distributed.py"} | expected <= files, result["seen"]


def _timeouts(minutes: int) -> dict[str, float]:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_rpt.distributed import init_distributed

    init_distributed(timeout_minutes=minutes)
    cpu = torch.device("cpu")
    return {name: group._get_backend(cpu).options._timeout.total_seconds()
            for name, group in (("world", dist.group.WORLD), ("data_parallel", ps.get_data_parallel_group()),
                                ("model_parallel", ps.get_model_parallel_group()))}


def test_timeout_reaches_the_world_group_and_megatron_groups():
    (timeouts,) = spawn(_timeouts, 1, 7)
    assert timeouts == {"world": 420.0, "data_parallel": 420.0, "model_parallel": 420.0}


def test_timeout_config_is_range_checked():
    assert from_dict({}).parallel.distributed_timeout_minutes == 30
    with pytest.raises(ConfigError, match=r"parallel.distributed_timeout_minutes=0 must be >= 1 and <= 1440"):
        from_dict({"parallel": {"distributed_timeout_minutes": 0}})
