"""Process-group and Megatron parallel-state set-up, for torchrun and for tests.

Owns: picking the backend (on GPU ``cpu:gloo,cuda:nccl``: NCCL for CUDA tensors and gloo for
CPU tensors in every group; gloo on CPU), the process-group timeout, enabling the CPU shim,
initialising ``megatron.core.parallel_state`` from a :class:`ParallelConfig`, seeding
Megatron's RNG trackers, the small collectives of Python numbers every other module uses
(:func:`all_reduce_numbers`: the tensor goes on the device the group's backend needs, so
NCCL never sees a CPU tensor), and :func:`spawn` — a small ``torch.multiprocessing``
launcher that runs a function on N local ranks (used by tests and ``tools/convert.py``), whose ranks
call :func:`megatron_rpt.processes.die_with_parent` so that none outlives its parent.
"""

from __future__ import annotations

import datetime
import io
import os
import queue as queue_module
import sys
import time
import traceback
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from megatron.core import parallel_state
from megatron.core import tensor_parallel as mtp

from megatron_rpt.config import ParallelConfig
from megatron_rpt.model import cpu_compat
from megatron_rpt.processes import die_with_parent, free_port


def process_group_backend(cuda: bool) -> str:
    """The backend of the world group: ``cpu:gloo,cuda:nccl`` on GPU, ``gloo`` on CPU.

    Why two on GPU: NCCL rejects CPU tensors ("No backend type associated with device type
    cpu"), and CPU tensors reach collectives from many places (a few Python numbers, object
    collectives, a benchmark's host buffer). Megatron's ``parallel_state`` creates its groups
    with ``backend=None``, which ``torch.distributed.new_group`` resolves to the world group's
    backend string, so every Megatron group gets both too: CUDA tensors still go over NCCL.
    """
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def init_distributed(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    context_parallel: int = 1,
    expert_parallel: int = 1,
    virtual_pipeline: int | None = None,
    seed: int = 1234,
    timeout_minutes: int = 30,
    expert_tensor_parallel: int | None = None,
) -> None:
    """Initialise torch.distributed (from torchrun env vars) and Megatron's parallel state.

    ``timeout_minutes`` (``parallel.distributed_timeout_minutes``) bounds every collective of
    the world group and of Megatron's groups: ranks that finish their rollouts first wait for
    the slowest one at the next collective, and torch's own NCCL default (10 minutes) is
    shorter than a long-response rollout phase. ``expert_tensor_parallel`` None: the expert MLPs
    are split like the dense ones (``tensor_parallel``), megatron-core's default.
    """
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        cpu_compat.enable()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        # A world of one (no launcher set WORLD_SIZE): rank 0 hosts the store and nobody else needs
        # its port, so port 0 lets the kernel pick a free one at the bind, with no race.
        os.environ.setdefault("MASTER_PORT", "0" if "WORLD_SIZE" not in os.environ else str(free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        if on_gpu:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend=process_group_backend(on_gpu),
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    layout = ParallelConfig(tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel,
                            context_parallel=context_parallel, expert_parallel=expert_parallel,
                            virtual_pipeline=virtual_pipeline, expert_tensor_parallel=expert_tensor_parallel)
    layout.data_parallel_size(dist.get_world_size())  # the layout's own check, before Megatron asserts
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline,
        context_parallel_size=context_parallel,
        expert_model_parallel_size=expert_parallel,
        expert_tensor_parallel_size=expert_tensor_parallel,
        distributed_timeout_minutes=timeout_minutes,
    )
    mtp.model_parallel_cuda_manual_seed(seed)


def collective_device(group: Any = None) -> torch.device:
    """The device a tensor must live on for a collective over ``group`` (default: the world).

    NCCL only moves CUDA tensors ("No backend type associated with device type cpu"); gloo
    moves CPU tensors. A group created with both (``cpu:gloo,cuda:nccl``, what
    :func:`init_distributed` creates on GPU) takes either; CUDA is used then, so the numbers
    travel over NCCL with the rest of the step's traffic.
    """
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_numbers(values: Sequence[float], op: dist.ReduceOp = dist.ReduceOp.SUM,
                       group: Any = None) -> list[float]:
    """Reduce a few Python numbers over ``group`` (float64, on the backend's device).

    Without torch.distributed (a single process) the values come back unchanged.
    """
    if not dist.is_initialized():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=collective_device(group))
    dist.all_reduce(t, op=op, group=group)
    return t.cpu().tolist()


def destroy_distributed() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    vllm_engines = sys.modules.get("megatron_rpt.rollout.vllm_engine")
    if vllm_engines is not None:  # vLLM's own shutdown ends with destroying the default group
        vllm_engines.close_all()
    if dist.is_initialized():
        dist.destroy_process_group()


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, queue: Any, parent_pid: int) -> None:
    die_with_parent(parent_pid)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        result = fn(*args)
        # Serialise to bytes: tensors put on a multiprocessing queue travel as shared-memory file
        # descriptors, which die with this process if it exits before the parent has read them.
        buffer = io.BytesIO()
        torch.save(result, buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            destroy_distributed()
        except Exception:  # noqa: BLE001
            pass


_PORT_TAKEN = ("EADDRINUSE", "Address already in use")
SPAWN_ATTEMPTS = 3


def spawn(fn: Callable, world_size: int, *args: Any, timeout: float = 900.0) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` local ranks; return each rank's result (rank order).

    ``fn`` must be importable (module-level). Raises RuntimeError with the failing rank's
    traceback when any rank fails. The ranks die with this process: killed when it is
    interrupted (Ctrl-C, or SIGTERM turned into an exception) and, through
    :func:`die_with_parent`, when it is killed outright.

    The rendezvous port is chosen here and bound by rank 0 seconds later; if another process
    took it meanwhile (rank 0 fails with EADDRINUSE before any rank finished), the ranks are
    started again on a new port, up to ``SPAWN_ATTEMPTS`` times, as PyTorch's own distributed
    tests do. ``fn`` should therefore do nothing it cannot repeat before it initialises the
    process group (every caller's first step).
    """
    attempt = 1
    while True:
        results, errors = _spawn_once(fn, world_size, args, timeout, free_port())
        if not errors:
            return [results[r] for r in range(world_size)]
        port_taken = not results and any(marker in e for e in errors for marker in _PORT_TAKEN)
        if not port_taken or attempt == SPAWN_ATTEMPTS:
            raise RuntimeError("\n".join(errors))
        print(f"[rpt] spawn: the rendezvous port was taken by another process; retrying "
              f"({attempt}/{SPAWN_ATTEMPTS})", file=sys.stderr, flush=True)
        attempt += 1


def _spawn_once(fn: Callable, world_size: int, args: tuple, timeout: float,
                port: int) -> tuple[dict[int, Any], list[str]]:
    """Start the ranks on ``port``, wait for them; their results by rank, and the errors."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, os.getpid()), daemon=False)
        for r in range(world_size)
    ]
    results: dict[int, Any] = {}
    errors: list[str] = []
    finished = False
    try:
        for p in procs:
            p.start()
        _collect(procs, queue, results, errors, timeout)
        finished = True
    finally:
        for p in procs:
            if finished and p.pid is not None:
                p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
            if p.pid is not None:
                p.join()
    return results, errors


def _collect(procs: list[Any], queue: Any, results: dict[int, Any], errors: list[str], timeout: float) -> None:
    """Wait for every rank's result (or the first failure) from ``queue``."""
    deadline = time.monotonic() + timeout
    while len(results) < len(procs) and not errors:
        try:
            rank, status, payload = queue.get(timeout=1.0)
        except queue_module.Empty:
            dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
            if dead:
                errors.append(f"rank(s) {dead} died with exit codes {[procs[r].exitcode for r in dead]}")
            elif time.monotonic() > deadline:
                errors.append(f"timed out after {timeout:.0f}s waiting for ranks")
            continue
        if status == "ok":
            results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        else:
            errors.append(f"rank {rank} failed:\n{payload}")
