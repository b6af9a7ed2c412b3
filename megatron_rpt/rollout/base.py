"""The rollout-engine contract shared by the built-in torch engine and vLLM.

Owns: :class:`SamplingParams`, :class:`Generation`, the :class:`RolloutEngine` protocol,
and :func:`hf_parameter_shapes`, the table of Hugging Face parameter names and shapes an
engine accepts in ``update_weights`` (both engines validate pushed weights against it).

Log-probability convention: ``Generation.logprobs[i]`` is the log-probability of the sampled
token at step ``i`` under the temperature-scaled distribution ``log_softmax(logits / T)``,
before top-p truncation -- the quantity the trainer recomputes with Megatron for GRPO's old
policy (``MegatronPolicy`` scales by ``rollout.temperature``), so the two can be compared at
every temperature. Greedy decoding (``T == 0``) reports ``log_softmax(logits)``.
vLLM (``logprobs_mode="processed_logprobs"``) reports exactly this when ``top_p == 1``; with
``top_p < 1`` it renormalises over the nucleus, so its value is larger by ``-log(nucleus mass)``
(vLLM exposes no pre-top-p processed log-probability).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch

from megatron_rpt.model.hf_config import ArchConfig

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature == 0`` means greedy; ``seed`` None = engine's own RNG stream."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"SamplingParams.n={self.n} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p={self.top_p} must be in (0, 1]")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens={self.max_tokens} must be >= 1")
        if any(not s for s in self.stop):
            raise ValueError("SamplingParams.stop must not contain empty strings")


@dataclass
class Generation:
    """One sampled completion of one prompt.

    ``token_ids`` holds every generated token, including the stop token id that ended it
    (EOS or one of ``stop_token_ids``); ``logprobs`` has one entry per token id (see the
    module docstring for what they are). ``text`` is the decoded completion without a
    trailing stop token; when a stop string ended it, the text ends right after that string.
    """

    prompt_index: int
    sample_index: int
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: FinishReason


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer needs from an inference engine (built-in torch or vLLM)."""

    #: True when ``update_weights`` keeps references to pushed tensors and reads them after
    #: asking for the next one (vLLM's in-place reload buffers a layer's tensors until the layer
    #: is complete): the weight bridge then never reuses the memory behind a yielded tensor.
    retains_pushed_tensors: bool

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Generation]]:
        """``params.n`` samples per prompt: ``result[i][j]`` is sample j of prompt i."""
        ...

    def update_weights(self, stream: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the engine's weights in place (any dtype, any order,
        any bucketing; a partial stream updates only the names it carries). Raises
        ``KeyError`` on an unknown name and ``ValueError`` on a shape mismatch."""
        ...

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """``log p(x_t | x_<t)`` at temperature 1 for t = 1 .. len-1 of each sequence.

        Checks the engine's weights from the outside (against Megatron's log-probabilities),
        without reading its parameters, which vLLM's CPU backend repacks into kernel layouts."""
        ...

    def sleep(self) -> None:
        """Free accelerator memory (KV cache, and weights where the engine can restore them)."""
        ...

    def wake_up(self) -> None:
        """Restore what :meth:`sleep` freed. ``generate`` also wakes the engine itself."""
        ...


def hf_parameter_shapes(arch: ArchConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter name of the HF checkpoint of ``arch`` with its shape.

    ``lm_head.weight`` is absent when the embeddings are tied (as in HF safetensors).
    """
    h, hd = arch.hidden_size, arch.head_dim
    q_dim, kv_dim = arch.num_attention_heads * hd, arch.num_key_value_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (arch.vocab_size, h)}
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (q_dim, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv_dim, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv_dim, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, q_dim)
        if arch.qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q_dim,)
            shapes[p + "self_attn.k_proj.bias"] = (kv_dim,)
            shapes[p + "self_attn.v_proj.bias"] = (kv_dim,)
        if arch.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (hd,)
            shapes[p + "self_attn.k_norm.weight"] = (hd,)
        if arch.num_experts:
            inter = arch.moe_intermediate_size
            shapes[p + "mlp.gate.weight"] = (arch.num_experts, h)
            for e in range(arch.num_experts):
                shapes[p + f"mlp.experts.{e}.gate_proj.weight"] = (inter, h)
                shapes[p + f"mlp.experts.{e}.up_proj.weight"] = (inter, h)
                shapes[p + f"mlp.experts.{e}.down_proj.weight"] = (h, inter)
        else:
            shapes[p + "mlp.gate_proj.weight"] = (arch.intermediate_size, h)
            shapes[p + "mlp.up_proj.weight"] = (arch.intermediate_size, h)
            shapes[p + "mlp.down_proj.weight"] = (h, arch.intermediate_size)
    shapes["model.norm.weight"] = (h,)
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    return shapes


def check_hf_tensor(name: str, tensor: torch.Tensor, shapes: dict[str, tuple[int, ...]], arch: ArchConfig) -> None:
    """Raise a clear error when ``name`` is not a parameter of ``arch`` or has the wrong shape."""
    expected = shapes.get(name)
    if expected is None and name == "lm_head.weight" and arch.tie_word_embeddings:
        # Tied: some exporters still write it; engines treat it as the embedding.
        expected = shapes["model.embed_tokens.weight"]
    if expected is None:
        layer_hint = f"model.layers.0..{arch.num_layers - 1}" if arch.num_layers else "no layers"
        raise KeyError(
            f"update_weights: unknown parameter {name!r} for a {arch.hf_architecture} with {layer_hint}; "
            "expected Hugging Face names such as 'model.layers.0.self_attn.q_proj.weight' "
            "(the Megatron->HF bridge must export HF names)"
        )
    if tuple(tensor.shape) != expected:
        hint = ""
        if name in ("model.embed_tokens.weight", "lm_head.weight") and tensor.shape[0] > arch.vocab_size:
            hint = f" (looks like Megatron's padded vocabulary: trim rows to vocab_size={arch.vocab_size})"
        raise ValueError(
            f"update_weights: {name} has shape {tuple(tensor.shape)}, the engine expects {expected}{hint}"
        )
