"""The production rollout engine: vLLM colocated with Megatron training in one torchrun world.

Owns: :class:`VLLMEngine` (``vllm.LLM`` run in-process, ``external_launcher`` under torchrun),
the conversion of vLLM ``RequestOutput`` objects into :class:`Generation`
(:func:`generations_from_request_outputs`), the weight push (vLLM's in-place reload, or the
model's ``load_weights`` on releases without it) and the CPU KV-cache size (:func:`kv_cache_bytes`).

How ranks and engines relate (what the trainer must respect):

* Building is collective: every rank of the torch.distributed world builds its engine at the
  same time with the same ``tensor_parallel``. The engine is in-process on every rank
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), which is also what lets ``update_weights`` reach
  the model; the executor joins the existing world (``distributed_executor_backend=
  "external_launcher"``; a script using it needs the ``if __name__ == "__main__":`` guard).
* One engine = one vLLM tensor-parallel group = ``tensor_parallel`` *consecutive* global
  ranks: ranks ``[k*t, (k+1)*t)`` hold engine k (vLLM builds its groups from the world in rank
  order). Different groups are independent engines.
* All ranks of one group call :meth:`generate` together, with the same prompts and the same
  :class:`SamplingParams` (seed included): each rank schedules and samples on its own and vLLM
  relies on identical inputs to keep them in lock-step through the TP all-reduces.
* Seeds: ``SamplingParams.seed = s`` draws sample j of prompt i with seed ``s + i*n + j``
  (vLLM seeds child j of a request with ``seed + j``), the same on every rank of a group. Two
  engines given the same ``s`` and prompts draw the same samples: give each group its own
  ``s``. The constructor's ``seed`` seeds vLLM's global generator (unseeded requests) and
  must be equal across the ranks of a group.
* :meth:`update_weights`: every rank of a group pushes the *full* HF tensors (vLLM's weight
  loaders narrow them to their TP rank), and all of them must push.
* :meth:`sleep` / :meth:`wake_up` free and restore accelerator memory with vLLM's sleep mode;
  they are no-ops where vLLM has none (CPU).

Tested with vLLM 0.32 (CPU build): its ``Worker.reload_weights`` re-runs the post-load
processing (the CPU backend repacks linear weights into kernel layouts, FP8 re-quantises),
buffering the tensors of each layer until the layer is complete -- hence
``retains_pushed_tensors``. vLLM is imported lazily: nothing here needs it until an engine is built.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Iterable, Iterator, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from megatron_rpt.errors import UserError
from megatron_rpt.model.dtypes import DTYPES
from megatron_rpt.model.hf_config import ArchConfig
from megatron_rpt.rollout.base import Generation, SamplingParams, check_hf_tensor, hf_parameter_shapes

MISSING_VLLM = (
    "rollout.engine=vllm needs vLLM: pip install -e '.[vllm]' on a CUDA machine, "
    "bash tools/install_vllm_cpu.sh on a CPU one, or set rollout.engine=builtin"
)
CPU_BLOCK_SIZE = 128  # vLLM's CPU default; the KV-cache size is a whole number of blocks per sequence
CPU_BATCHED_TOKENS = 4096  # vLLM's CPU default token budget of one scheduler step


class WeightPush(Enum):
    """How :meth:`VLLMEngine.update_weights` reaches vLLM's weights."""

    IN_PLACE_RELOAD = "in_place_reload"  # Worker.reload_weights: checkpoint format + post-processing
    LOAD_WEIGHTS = "load_weights"  # model.load_weights: copies into unprocessed parameters


class VLLMUnavailable(UserError, ImportError):
    """``import vllm`` fails here: the message is the fix (install it, or use the built-in engine)."""


def import_vllm() -> Any:
    """The ``vllm`` module, or :class:`VLLMUnavailable` with the install line (the command lines print it)."""
    try:
        import vllm  # lazy: optional dependency (vllm)
    except ImportError as exc:
        raise VLLMUnavailable(MISSING_VLLM) from exc
    except Exception as exc:  # noqa: BLE001 - a broken install (e.g. a torchvision built for another torch)
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise VLLMUnavailable(f"{MISSING_VLLM} (`import vllm` fails: {type(exc).__name__}: {reason})") from exc
    return vllm


def kv_cache_bytes(arch: ArchConfig, max_num_seqs: int, max_model_len: int, dtype_bytes: int,
                   block_size: int = CPU_BLOCK_SIZE) -> int:
    """KV-cache bytes for ``max_num_seqs`` sequences of ``max_model_len`` tokens (+1 block each, +10 %).

    vLLM's CPU backend reads ``gpu_memory_utilization`` as a fraction of the NUMA node's memory,
    which fails on small nodes and over-reserves on large ones; the size is explicit there.
    """
    per_token = 2 * arch.num_layers * arch.num_key_value_heads * arch.head_dim * dtype_bytes
    blocks_per_seq = -(-max_model_len // block_size) + 1
    return int(1.1 * max_num_seqs * blocks_per_seq * block_size * per_token)


def generations_from_request_outputs(outputs: Sequence[Any], n: int) -> list[list[Generation]]:
    """vLLM ``RequestOutput`` list (input order) -> ``result[prompt][sample]``.

    Each ``CompletionOutput`` must carry ``logprobs`` (requested with ``logprobs=0``): a
    sequence with, per generated position, a mapping token id -> ``Logprob(logprob=...)``
    that contains the sampled token (``list[dict]`` or vLLM's ``FlatLogprobs``).
    """
    results: list[list[Generation]] = []
    for prompt_index, request in enumerate(outputs):
        completions = sorted(request.outputs, key=lambda c: c.index)
        if len(completions) != n:
            raise RuntimeError(f"vLLM returned {len(completions)} samples for request {request.request_id}, "
                               f"expected {n}")
        samples = []
        for c in completions:
            if c.finish_reason not in ("stop", "length"):
                raise RuntimeError(
                    f"vLLM request {request.request_id} sample {c.index} ended with finish_reason={c.finish_reason!r} "
                    "(aborted or unfinished); rollouts must finish with 'stop' or 'length'"
                )
            token_ids = list(c.token_ids)
            if c.logprobs is None or len(c.logprobs) != len(token_ids):
                raise RuntimeError(
                    f"vLLM request {request.request_id} sample {c.index} has no per-token logprobs; "
                    "the engine must request them with SamplingParams(logprobs=0)"
                )
            samples.append(Generation(prompt_index, c.index, token_ids, c.text,
                                      _token_logprobs(c.logprobs, token_ids, f"request {request.request_id} sample "
                                                      f"{c.index}"), c.finish_reason))
        results.append(samples)
    return results


def _token_logprobs(entries: Sequence[Any], token_ids: Sequence[int], what: str) -> list[float]:
    out = []
    for position, token in enumerate(token_ids):
        entry = entries[position]
        if entry is None or token not in entry:
            raise RuntimeError(f"vLLM {what}: no logprob for the token {token} at position {position}")
        out.append(float(entry[token].logprob))
    return out


_LIVE: list[VLLMEngine] = []  # engines not closed yet (see VLLMEngine.close)


def close_all() -> None:
    """Close every live engine (``megatron_rpt.distributed.destroy_distributed`` calls this)."""
    for engine in list(_LIVE):
        engine.close()


class VLLMEngine:
    """vLLM rollouts, colocated with training; weights pushed in place, memory freed by sleep mode.

    See the module docstring for which ranks must call what together. ``sleep_level=1``
    offloads weights to CPU and drops the KV cache; level 2 drops both and is only safe when
    every update pushes the full model. ``kv_cache_memory_bytes`` (None: :func:`kv_cache_bytes`
    off CUDA, ``gpu_memory_utilization`` on CUDA) sizes the KV cache.

    An engine lives until :meth:`close`, even unreferenced: vLLM shuts an in-process engine
    down when it is garbage collected, and that shutdown destroys torch.distributed's default
    process group, which Megatron is still using.
    """

    def __init__(self, model_dir: str | Path, arch: ArchConfig, *, tokenizer_dir: str | Path | None = None,
                 tensor_parallel: int = 1, dtype: str = "bfloat16", gpu_memory_utilization: float = 0.5,
                 enforce_eager: bool = False, seed: int = 0, max_model_len: int | None = None,
                 max_num_seqs: int = 256, load_format: str = "auto", enable_sleep_mode: bool = True,
                 sleep_level: int = 1, kv_cache_memory_bytes: int | None = None, **llm_kwargs: Any):
        vllm = import_vllm()
        from vllm.platforms import current_platform  # lazy: optional dependency (vllm)

        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level={sleep_level} must be 1 (offload weights) or 2 (discard weights)")
        in_torchrun = "RANK" in os.environ or (torch.distributed.is_available() and torch.distributed.is_initialized())
        # In-process engine: the external launcher needs it for lock-step ranks, and
        # update_weights needs the model in this process.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        on_cuda = current_platform.is_cuda_alike()
        if current_platform.is_cpu():
            _check_cpu_head_dim(arch)
        self.enable_sleep_mode = enable_sleep_mode and current_platform.is_sleep_mode_available()
        kwargs: dict[str, Any] = dict(
            model=str(model_dir),
            tokenizer=str(tokenizer_dir or model_dir),
            tensor_parallel_size=tensor_parallel,
            distributed_executor_backend="external_launcher" if in_torchrun else None,
            enable_sleep_mode=self.enable_sleep_mode,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            seed=seed,
            dtype=dtype,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            load_format=load_format,
            enable_prefix_caching=True,
        )
        if current_platform.is_cpu():
            # A prefill split over two scheduler steps rewinds the request's seeded generator, which
            # CPU generators cannot do ("CPU Generator does not use offset"): schedule whole prompts.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(max_model_len or arch.max_position_embeddings, max_num_seqs,
                                                   CPU_BATCHED_TOKENS)
        if kv_cache_memory_bytes is None and not on_cuda and _engine_arg_exists("kv_cache_memory_bytes"):
            kv_cache_memory_bytes = kv_cache_bytes(arch, max_num_seqs, max_model_len or arch.max_position_embeddings,
                                                   DTYPES[dtype].itemsize)
        if kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = kv_cache_memory_bytes
        if _engine_arg_exists("logprobs_mode"):
            kwargs["logprobs_mode"] = "processed_logprobs"  # after temperature: see rollout/base.py
        kwargs.update(llm_kwargs)
        self.arch = arch
        threads = torch.get_num_threads()
        self.llm = vllm.LLM(**kwargs)
        # vLLM sets torch to one intra-op thread "for serving" unless OMP_NUM_THREADS is set. The
        # engine shares this process with the trainer (in-process engines), whose forward, backward
        # and optimizer then ran single-threaded: give the process its threads back.
        torch.set_num_threads(threads)
        self._vllm = vllm
        self._shapes = hf_parameter_shapes(arch)
        self.tensor_parallel = tensor_parallel
        self.sleep_level = sleep_level
        self.weight_push = weight_push_path(self.llm)
        self._asleep: set[str] = set()  # vLLM memory tags currently released
        self._prefix_cache_stale = False
        _LIVE.append(self)

    @property
    def retains_pushed_tensors(self) -> bool:
        """vLLM's in-place reload keeps each layer's tensors until the layer is complete."""
        return self.weight_push is WeightPush.IN_PLACE_RELOAD

    # ------------------------------------------------------------------ RolloutEngine protocol

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Generation]]:
        if not prompts:
            return []
        self._ready()
        # Child sample k of a seeded request gets seed + k; spacing by n keeps prompts apart.
        per_prompt = [self._sampling_params(params, None if params.seed is None else params.seed + i * params.n)
                      for i in range(len(prompts))]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], per_prompt, use_tqdm=False)
        return generations_from_request_outputs(outputs, params.n)

    def update_weights(self, stream: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push HF tensors; with the in-place reload a partial stream must carry whole vLLM
        layers (e.g. q, k and v together), as the bridge's full stream does."""
        if "weights" in self._asleep:  # writing into released memory would fault: restore weights only
            self.llm.wake_up(tags=["weights"])
            self._asleep.discard("weights")
        checked = self._checked(stream)
        if self.weight_push is WeightPush.IN_PLACE_RELOAD:
            worker = vllm_worker(self.llm)
            worker.reload_weights(weights_iterator=checked)
            _redo_skipped_post_load_processing(worker)
        else:
            vllm_model(self.llm).load_weights(checked)
        self._prefix_cache_stale = True  # cached KV blocks were computed by the old weights

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        if not sequences:
            return []
        self._ready()
        # prompt_logprobs requests skip the prefix cache in vLLM: every position is recomputed.
        params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": list(s)} for s in sequences], params, use_tqdm=False)
        return [_token_logprobs(out.prompt_logprobs[1:], seq[1:], f"prompt {i}")
                for i, (out, seq) in enumerate(zip(outputs, sequences))]

    def sleep(self) -> None:
        if not self.enable_sleep_mode or self._asleep:
            return
        self.llm.sleep(level=self.sleep_level)
        self._asleep = {"weights", "kv_cache"}

    def wake_up(self) -> None:
        if not self._asleep:
            return
        self.llm.wake_up(tags=sorted(self._asleep))
        self._asleep.clear()

    def close(self) -> None:
        """Shut vLLM down; this also destroys torch.distributed's default process group (vLLM's
        doing), so close engines last: ``destroy_distributed`` does it for every live engine."""
        if self in _LIVE:
            _LIVE.remove(self)
            self.llm.llm_engine.engine_core.shutdown()

    # ------------------------------------------------------------------ helpers

    def _ready(self) -> None:
        self.wake_up()
        if self._prefix_cache_stale:
            self.llm.reset_prefix_cache()
            self._prefix_cache_stale = False

    def _sampling_params(self, params: SamplingParams, seed: int | None) -> Any:
        return self._vllm.SamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_tokens,
            stop=list(params.stop) or None,
            stop_token_ids=list(params.stop_token_ids) or None,
            seed=seed,
            logprobs=0,  # only the sampled token's logprob
            include_stop_str_in_output=True,  # same text convention as the built-in engine
        )

    def _checked(self, stream: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in stream:
            check_hf_tensor(name, tensor, self._shapes, self.arch)
            yield name, tensor


def vllm_worker(llm: Any) -> Any:
    """The in-process worker of a V1 ``LLM`` built without engine multiprocessing."""
    executor = getattr(llm.llm_engine, "model_executor", None)
    worker = getattr(executor, "driver_worker", None)
    worker = getattr(worker, "worker", worker)  # WorkerWrapperBase -> Worker
    if worker is None or getattr(worker, "model_runner", None) is None:
        raise RuntimeError(
            "cannot reach vLLM's model in this process: build the engine under torchrun "
            "(external_launcher) or with VLLM_ENABLE_V1_MULTIPROCESSING=0"
        )
    return worker


def vllm_model(llm: Any) -> torch.nn.Module:
    runner = vllm_worker(llm).model_runner
    return runner.get_model() if hasattr(runner, "get_model") else runner.model


def _redo_skipped_post_load_processing(worker: Any) -> None:
    """Redo what vLLM 0.32's in-place reload leaves stale (the reload re-runs post-load
    processing per module it loads, from the module's fresh checkpoint-format weights):

    * a tied ``lm_head`` shares the embedding's weight but is never loaded itself, so what the
      CPU backend built from that weight (a oneDNN matmul with its own packed copy) keeps
      computing with the old one;
    * the CPU MoE experts prepack ``w13`` / ``w2`` into their grouped-GEMM layout only on the
      first load (``UnquantizedFusedMoEMethod._setup_kernel`` skips it on "weight updates",
      assuming kernels read the parameters), so after a reload the prepacked parameters hold
      the new weights in the unpacked layout. Prepacking them again restores the layout.
    Both are checked by tests/test_rollout_vllm.py (tied Llama, SmolLM2, Qwen3-MoE).
    """
    from vllm.config import set_current_vllm_config  # lazy: optional dependency (vllm)
    from vllm.platforms import current_platform  # lazy: optional dependency (vllm)

    model = worker.model_runner.get_model()
    with set_current_vllm_config(worker.vllm_config):
        lm_head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        method = getattr(lm_head, "quant_method", None)
        if method is not None and embed is not None and getattr(lm_head, "weight", None) is getattr(embed, "weight", 0):
            method.process_weights_after_loading(lm_head)
        if not current_platform.is_cpu():
            return
        for module in model.modules():
            kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
            experts = getattr(kernel, "fused_experts", None)
            if experts is not None and hasattr(module, "w13_weight"):
                experts.process_weights_after_loading(module)


def weight_push_path(llm: Any) -> WeightPush:
    """In-place reload where vLLM has it, else ``load_weights``; a clear error otherwise."""
    worker = vllm_worker(llm)
    # Worker.reload_weights(*args, **kwargs) sets vLLM's current config and forwards to the runner's.
    runner_reload = getattr(worker.model_runner, "reload_weights", None)
    if (hasattr(worker, "reload_weights") and runner_reload is not None
            and "weights_iterator" in inspect.signature(runner_reload).parameters):
        return WeightPush.IN_PLACE_RELOAD
    if hasattr(vllm_model(llm), "load_weights"):
        return WeightPush.LOAD_WEIGHTS
    import vllm  # lazy: optional dependency (vllm)

    raise RuntimeError(
        f"vLLM {vllm.__version__} offers no way to push weights in place: its worker has no "
        "reload_weights(weights_iterator=...) and its model no load_weights; install vLLM 0.32 (tested)"
    )


def _check_cpu_head_dim(arch: ArchConfig) -> None:
    """vLLM's CPU attention kernels exist for a few head sizes only; say so before vLLM fails deep inside."""
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend  # lazy: optional dependency (vllm)
    except ImportError:  # another layout of vLLM: let vLLM itself decide
        return
    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if arch.head_dim not in sizes:
        raise ValueError(
            f"vLLM's CPU build supports head_dim in {sizes}, the model has head_dim={arch.head_dim} "
            f"(hidden_size {arch.hidden_size} / {arch.num_attention_heads} heads); use rollout.engine=builtin "
            "for it, or a model with a supported head size"
        )


def _engine_arg_exists(name: str) -> bool:
    try:
        from vllm.engine.arg_utils import EngineArgs  # lazy: optional dependency (vllm)
    except ImportError:
        return False
    return dataclasses.is_dataclass(EngineArgs) and name in {f.name for f in dataclasses.fields(EngineArgs)}
