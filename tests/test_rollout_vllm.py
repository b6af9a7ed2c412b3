"""The vLLM engine's own code, without vLLM: the missing-vLLM error, the conversion of
vLLM outputs into Generations, and the HF view of vLLM's fused weights.

The stand-ins below carry the attribute names of vLLM's ``RequestOutput``,
``CompletionOutput`` and ``Logprob`` (vllm/outputs.py, vllm/logprobs.py, v0.11 - v0.33).
"""

import importlib.util
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from megatron_rpt.config import Config
from megatron_rpt.model.hf_config import arch_from_dict
from megatron_rpt.rollout import make_engine
from megatron_rpt.rollout.vllm_engine import (MISSING_VLLM, VLLMEngine, generations_from_request_outputs,
                                              hf_views_from_vllm)

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list
    cumulative_logprob: float | None
    logprobs: list | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list
    prompt_logprobs: list | None
    outputs: list
    finished: bool


def completion(index, token_ids, lps, finish="stop", text="x"):
    # logprobs=0: one entry per position, the sampled token (vLLM may add nothing else).
    entries = [{t: Logprob(lp, rank=1)} for t, lp in zip(token_ids, lps)]
    return CompletionOutput(index, text, token_ids, sum(lps), entries, finish)


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_missing_vllm_raises_the_install_hint():
    with pytest.raises(ImportError) as info:
        VLLMEngine("/nonexistent", arch=None)
    assert str(info.value) == MISSING_VLLM
    cfg = Config()
    cfg.rollout.engine = "vllm"
    cfg.model.hf_config = "/nonexistent/config.json"
    with pytest.raises(ImportError, match=r"pip install -e '\.\[vllm\]'"):
        make_engine(cfg, arch=None)


def test_request_outputs_become_generations_in_prompt_and_sample_order():
    outputs = [
        RequestOutput("0", None, [1, 2], None, [
            completion(1, [7, 8, 2], [-0.5, -1.0, -0.25], "stop", "b"),
            completion(0, [5, 6], [-0.1, -0.2], "length", "a"),
        ], True),
        RequestOutput("1", None, [3], None, [
            completion(0, [9], [-2.0], "stop", "c"),
            completion(1, [4, 4], [-0.3, -0.4], "length", "d"),
        ], True),
    ]
    gens = generations_from_request_outputs(outputs, n=2)
    assert [[(g.prompt_index, g.sample_index) for g in row] for row in gens] == [[(0, 0), (0, 1)], [(1, 0), (1, 1)]]
    assert gens[0][1].token_ids == [7, 8, 2] and gens[0][1].logprobs == [-0.5, -1.0, -0.25]
    assert gens[0][1].text == "b" and gens[0][1].finish_reason == "stop"
    assert gens[1][1].finish_reason == "length" and gens[1][1].logprobs == [-0.3, -0.4]


@pytest.mark.parametrize("broken, message", [
    (dict(finish_reason="abort"), "finish_reason='abort'"),
    (dict(logprobs=None), "logprobs=0"),
    (dict(logprobs=[{99: Logprob(-1.0)}]), "no logprob for the sampled token 5"),
])
def test_bad_vllm_outputs_raise_clear_errors(broken, message):
    c = completion(0, [5], [-0.1])
    for key, value in broken.items():
        setattr(c, key, value)
    with pytest.raises(RuntimeError, match=message):
        generations_from_request_outputs([RequestOutput("r", None, [1], None, [c], True)], n=1)
    with pytest.raises(RuntimeError, match="expected 2"):
        generations_from_request_outputs([RequestOutput("r", None, [1], None, [completion(0, [5], [-0.1])], True)], n=2)


def vllm_layout(hf_state, arch, vocab_pad_to=64):
    """HF weights in vLLM's parameter layout: fused qkv / gate_up, vocab rows padded to 64."""
    named = {}
    padded = -(-arch.vocab_size // vocab_pad_to) * vocab_pad_to
    for name, t in hf_state.items():
        if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name or ".mlp.up_proj." in name:
            continue
        if ".self_attn.q_proj." in name:
            parts = [hf_state[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            named[name.replace("q_proj", "qkv_proj")] = torch.cat(parts)
        elif ".mlp.gate_proj." in name:
            named[name.replace("gate_proj", "gate_up_proj")] = torch.cat([t, hf_state[name.replace("gate", "up")]])
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            named[name] = F.pad(t, (0, 0, 0, padded - arch.vocab_size), value=123.0)
        else:
            named[name] = t
    if arch.tie_word_embeddings:
        named.pop("lm_head.weight", None)  # vLLM ties it to the embedding: one parameter
    return named


@pytest.mark.parametrize("model_cls, config_cls, extra", [
    (Qwen2ForCausalLM, Qwen2Config, dict(tie_word_embeddings=True)),
    (Qwen3ForCausalLM, Qwen3Config, dict(head_dim=24, tie_word_embeddings=False)),
])
def test_hf_views_unfuse_vllm_weights_exactly(model_cls, config_cls, extra):
    cfg = config_cls(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=96, **extra)
    cfg.architectures = [model_cls.__name__]
    torch.manual_seed(0)
    hf_state = model_cls(cfg).state_dict()
    arch = arch_from_dict(cfg.to_dict())
    views = hf_views_from_vllm(vllm_layout(hf_state, arch), arch)
    if arch.tie_word_embeddings:
        hf_state.pop("lm_head.weight")
    assert set(views) == set(hf_state)
    for name, tensor in hf_state.items():
        assert torch.equal(views[name], tensor), name
