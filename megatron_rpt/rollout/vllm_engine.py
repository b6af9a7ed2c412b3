"""The production rollout engine: vLLM colocated with Megatron training in one torchrun world.

Owns: :class:`VLLMEngine` (``vllm.LLM`` with ``distributed_executor_backend="external_launcher"``
and sleep mode), the conversion of vLLM ``RequestOutput`` objects into :class:`Generation`
(:func:`generations_from_request_outputs`), in-place weight pushes through the model's own
``load_weights`` (which fuses q/k/v and gate/up and shards for vLLM's tensor parallelism),
and the HF-named view of vLLM's fused weights (:func:`hf_views_from_vllm`).

Written against vLLM's V1 engine (0.10 - 0.33 API): with the external launcher every
rank runs its own engine in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the model
is reachable directly at ``llm.llm_engine.model_executor.driver_worker...model_runner``
-- the same path verl's colocated rollout uses. All ranks of one rollout tensor-parallel
group must call ``generate`` with the same prompts and params (vLLM relies on identical
scheduling across them). vLLM is imported lazily: nothing here needs it until an engine
is built.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from megatron_rpt.model.hf_config import ArchConfig
from megatron_rpt.rollout.base import Generation, SamplingParams, check_hf_tensor, hf_parameter_shapes

MISSING_VLLM = (
    "rollout.engine=vllm needs vLLM: pip install -e '.[vllm]' on a CUDA machine, or set rollout.engine=builtin"
)


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(MISSING_VLLM) from exc
    return vllm


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
            raise RuntimeError(f"vLLM returned {len(completions)} samples for request {request.request_id}, expected {n}")
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
            logprobs = []
            for position, token in enumerate(token_ids):
                entry = c.logprobs[position]
                if entry is None or token not in entry:
                    raise RuntimeError(
                        f"vLLM request {request.request_id} sample {c.index}: no logprob for the sampled token "
                        f"{token} at position {position}"
                    )
                logprobs.append(float(entry[token].logprob))
            samples.append(Generation(prompt_index, c.index, token_ids, c.text, logprobs, c.finish_reason))
        results.append(samples)
    return results


def hf_views_from_vllm(named: dict[str, torch.Tensor], arch: ArchConfig) -> dict[str, torch.Tensor]:
    """HF-named row slices of an unsharded (tensor_parallel=1) vLLM Llama/Qwen2/Qwen3 model.

    vLLM fuses ``q/k/v_proj`` into ``qkv_proj`` (in that order), ``gate/up_proj`` into
    ``gate_up_proj``, and pads the vocabulary rows of the embedding and ``lm_head``.
    """
    if arch.num_experts:
        raise NotImplementedError("state_dict_view is not implemented for vLLM MoE models (fused expert weights)")
    q_dim, kv_dim = arch.num_attention_heads * arch.head_dim, arch.num_key_value_heads * arch.head_dim
    inter, vocab = arch.intermediate_size, arch.vocab_size
    views: dict[str, torch.Tensor] = {}
    for name, tensor in named.items():
        prefix, _, leaf = name.rpartition(".")  # leaf: weight | bias
        if prefix.endswith("self_attn.qkv_proj"):
            base = prefix[: -len("qkv_proj")]
            for proj, part in zip("qkv", tensor.split([q_dim, kv_dim, kv_dim], dim=0)):
                views[f"{base}{proj}_proj.{leaf}"] = part
        elif prefix.endswith("mlp.gate_up_proj"):
            base = prefix[: -len("gate_up_proj")]
            gate, up = tensor.split(inter, dim=0)
            views[f"{base}gate_proj.{leaf}"], views[f"{base}up_proj.{leaf}"] = gate, up
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            views[name] = tensor[:vocab]
        else:
            views[name] = tensor
    if arch.tie_word_embeddings:
        views.pop("lm_head.weight", None)
    expected = set(hf_parameter_shapes(arch))
    if set(views) != expected:
        raise RuntimeError(
            f"vLLM parameter names do not map onto HF names: missing {sorted(expected - set(views))[:3]}, "
            f"unexpected {sorted(set(views) - expected)[:3]}"
        )
    return views


class VLLMEngine:
    """vLLM rollouts, colocated with training; weights pushed in place, memory freed by sleep mode.

    Build it on every rank at the same time (it joins the existing torch.distributed
    world). ``sleep_level=1`` offloads weights to CPU and drops the KV cache; level 2
    drops both and is only safe when every update pushes the full model.
    """

    def __init__(self, model_dir: str | Path, arch: ArchConfig, *, tokenizer_dir: str | Path | None = None,
                 tensor_parallel: int = 1, dtype: str = "bfloat16", gpu_memory_utilization: float = 0.5,
                 enforce_eager: bool = False, seed: int = 0, max_model_len: int | None = None,
                 max_num_seqs: int = 256, load_format: str = "auto", enable_sleep_mode: bool = True,
                 sleep_level: int = 1, **llm_kwargs: Any):
        vllm = import_vllm()
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level={sleep_level} must be 1 (offload weights) or 2 (discard weights)")
        in_torchrun = "RANK" in os.environ or (torch.distributed.is_available() and torch.distributed.is_initialized())
        if in_torchrun:
            # The external launcher needs in-process engines for deterministic, lock-step ranks.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        kwargs: dict[str, Any] = dict(
            model=str(model_dir),
            tokenizer=str(tokenizer_dir or model_dir),
            tensor_parallel_size=tensor_parallel,
            distributed_executor_backend="external_launcher" if in_torchrun else None,
            enable_sleep_mode=enable_sleep_mode,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            seed=seed,
            dtype=dtype,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            load_format=load_format,
            enable_prefix_caching=True,
        )
        if _engine_arg_exists("logprobs_mode"):
            kwargs["logprobs_mode"] = "raw_logprobs"  # log_softmax of raw logits: see rollout/base.py
        kwargs.update(llm_kwargs)
        self.arch = arch
        self.llm = vllm.LLM(**kwargs)
        self._vllm = vllm
        self._shapes = hf_parameter_shapes(arch)
        self.tensor_parallel = tensor_parallel
        self.enable_sleep_mode, self.sleep_level = enable_sleep_mode, sleep_level
        self._asleep: set[str] = set()  # vLLM memory tags currently released
        self._prefix_cache_stale = False

    # ------------------------------------------------------------------ RolloutEngine protocol

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Generation]]:
        if not prompts:
            return []
        self.wake_up()
        if self._prefix_cache_stale:  # cached KV was computed by the old weights
            self.llm.reset_prefix_cache()
            self._prefix_cache_stale = False
        # vLLM gives child sample k of a seeded request seed + k; spacing by n keeps prompts apart.
        per_prompt = [self._sampling_params(params, None if params.seed is None else params.seed + i * params.n)
                      for i in range(len(prompts))]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], per_prompt, use_tqdm=False)
        return generations_from_request_outputs(outputs, params.n)

    def update_weights(self, stream: Iterable[tuple[str, torch.Tensor]]) -> None:
        if "weights" in self._asleep:  # writing into released memory would fault: restore weights only
            self.llm.wake_up(tags=["weights"])
            self._asleep.discard("weights")
        self._model().load_weights(self._checked(stream))
        self._prefix_cache_stale = True

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

    def state_dict_view(self) -> dict[str, torch.Tensor]:
        if self.tensor_parallel != 1:
            raise NotImplementedError("state_dict_view needs rollout.tensor_parallel=1 (vLLM holds TP shards)")
        return hf_views_from_vllm(dict(self._model().named_parameters()), self.arch)

    # ------------------------------------------------------------------ helpers

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

    def _model(self) -> torch.nn.Module:
        return vllm_model(self.llm)


def vllm_model(llm: Any) -> torch.nn.Module:
    """The in-process model of a V1 ``LLM`` built without engine multiprocessing."""
    executor = getattr(llm.llm_engine, "model_executor", None)
    worker = getattr(executor, "driver_worker", None)
    worker = getattr(worker, "worker", worker)  # WorkerWrapperBase -> Worker
    runner = getattr(worker, "model_runner", None)
    if runner is None:
        raise RuntimeError(
            "cannot reach vLLM's model in this process: build the engine under torchrun "
            "(external_launcher) or set VLLM_ENABLE_V1_MULTIPROCESSING=0"
        )
    return runner.get_model() if hasattr(runner, "get_model") else runner.model


def _engine_arg_exists(name: str) -> bool:
    try:
        from vllm.engine.arg_utils import EngineArgs
    except ImportError:
        return False
    return dataclasses.is_dataclass(EngineArgs) and name in {f.name for f in dataclasses.fields(EngineArgs)}
