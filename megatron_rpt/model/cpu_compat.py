"""Run Megatron-Core on machines without CUDA.

Megatron-Core assumes a GPU: it allocates with ``device=torch.cuda.current_device()``,
forks CUDA RNG states for tensor-parallel initialisation and synchronises streams and events
(0.19's gradient sync waits on ``torch.cuda.current_stream()`` even without overlap).
This module owns the small shim that makes those calls land on the CPU, so that
the *real* megatron-core code (TP/PP over gloo) runs in CI. It is enabled only when
``torch.cuda.is_available()`` is False; on a GPU machine :func:`enable` is a no-op.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.tensor_parallel import random as mrandom
from megatron.core.transformer.moe import moe_utils
from torch.overrides import TorchFunctionMode

_ENABLED = False
_MODE: "_CudaToCpuMode | None" = None


def _is_cuda_device(device: object) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True  # megatron passes torch.cuda.current_device() (an int) as device
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device=cuda``/int device arguments and ``.cuda()`` calls to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        name = getattr(func, "__name__", "")
        if name == "cuda":
            return args[0]
        if name == "to":
            args = tuple("cpu" if _is_cuda_device(a) and not isinstance(a, int) else a for a in args)
        return func(*args, **kwargs)


def _cpu_rng_state(*_args, **_kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, *_args, **_kwargs) -> None:
    torch.set_rng_state(new_state)


_ORIGINAL_TENSOR_TYPE = torch.Tensor.type


def _cuda_named_type(self: torch.Tensor, dtype=None, non_blocking: bool = False, **kwargs):
    """Megatron's optimizers branch on ``param.type() == 'torch.cuda.FloatTensor'``: report CPU
    tensors under their CUDA type names, and accept CUDA type names as conversion targets."""
    if dtype is None:
        name = _ORIGINAL_TENSOR_TYPE(self)
        if self.device.type == "cpu" and not name.startswith("torch.cuda."):
            return name.replace("torch.", "torch.cuda.", 1)
        return name
    if isinstance(dtype, str):
        dtype = dtype.replace("torch.cuda.", "torch.")
    return _ORIGINAL_TENSOR_TYPE(self, dtype, non_blocking, **kwargs)


class _CpuStream(torch.cpu.Stream):
    """torch's device-agnostic CPU stream (every op is synchronous on the CPU), constructible
    the way Megatron constructs CUDA streams (``torch.cuda.Stream(device=...)``)."""

    def __init__(self, device: object = None, priority: int = 0, **_kwargs: object) -> None:
        super().__init__(priority)

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _CpuEvent(torch.cpu.Event):
    """torch's CPU event (always complete), constructible like ``torch.cuda.Event(enable_timing=...)``."""

    def __init__(self, *_args: object, **_kwargs: object) -> None:
        super().__init__()

    def elapsed_time(self, _end: object) -> float:
        return 0.0


_CURRENT_STREAM = _CpuStream()


def _seed_cpu_generator(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def enabled() -> bool:
    return _ENABLED


def enable() -> bool:
    """Install the shim when no CUDA device exists. Returns True when it is active."""
    global _ENABLED, _MODE
    if _ENABLED:
        return True
    if torch.cuda.is_available():
        return False

    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.get_rng_state = _cpu_rng_state  # type: ignore[assignment]
    torch.cuda.set_rng_state = _set_cpu_rng_state  # type: ignore[assignment]
    # torch.manual_seed itself calls torch.cuda.manual_seed_all, so seed the CPU generator directly.
    torch.cuda.manual_seed = _seed_cpu_generator  # type: ignore[assignment]
    torch.cuda.manual_seed_all = lambda seed: None  # type: ignore[assignment]
    torch.cuda.empty_cache = lambda: None  # type: ignore[assignment]
    torch.cuda.memory_allocated = lambda *a, **k: 0  # type: ignore[assignment]
    torch.cuda.max_memory_allocated = lambda *a, **k: 0  # type: ignore[assignment]
    torch.cuda.reset_peak_memory_stats = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.Stream = _CpuStream  # type: ignore[assignment,misc]
    torch.cuda.Event = _CpuEvent  # type: ignore[assignment,misc]
    torch.cuda.current_stream = lambda *a, **k: _CURRENT_STREAM  # type: ignore[assignment]
    torch.cuda.default_stream = lambda *a, **k: _CURRENT_STREAM  # type: ignore[assignment]
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()  # type: ignore[assignment]
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[assignment]
    torch.Tensor.type = _cuda_named_type  # type: ignore[assignment]

    mrandom._get_cuda_rng_state = _cpu_rng_state
    mrandom._set_cuda_rng_state = _set_cpu_rng_state

    # megatron-core 0.16 only binds te_general_gemm when Transformer Engine imports, then tests it
    # for None in the MoE router: define the fallback so the router uses torch matmuls.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    _MODE = _CudaToCpuMode()
    _MODE.__enter__()
    _ENABLED = True
    return True


@contextlib.contextmanager
def suspended():
    """Temporarily leave the device-rewriting mode (e.g. around code that must see real devices)."""
    if _MODE is None:
        yield
        return
    _MODE.__exit__(None, None, None)
    try:
        yield
    finally:
        _MODE.__enter__()


def default_device() -> torch.device:
    """The device megatron modules live on: the current CUDA device, or the CPU under the shim."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
