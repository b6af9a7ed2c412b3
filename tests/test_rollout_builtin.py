"""The built-in rollout engine: sampling, stopping, continuous batching, weight sync, factory."""

import math
import random

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from megatron_rpt.config import Config
from megatron_rpt.model.hf_config import arch_from_dict
from megatron_rpt.rollout import BuiltinEngine, SamplingParams, make_engine
from megatron_rpt.rollout.builtin import sample_tokens

VOCAB = 97


@pytest.fixture(scope="module")
def hf_model():
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=96, tie_word_embeddings=False)
    cfg.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # a peakier next-token distribution, so greedy has no near-ties
        model.lm_head.weight.mul_(8.0)
    return model, arch_from_dict(cfg.to_dict())


def engine_for(hf_model, **kwargs) -> BuiltinEngine:
    model, arch = hf_model
    engine = BuiltinEngine(arch, **{"max_batch_size": 3, "max_seq_len": 64, **kwargs})
    engine.update_weights(model.state_dict().items())
    return engine


PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15], [20, 21]]


class CharTokenizer:
    """Stand-in for a transformers tokenizer's decode: token i -> 'a' or 'b' repeated 1-3 times."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join("ab"[i % 2] * (1 + i % 3) for i in ids)


def teacher_forced_logprobs(model, prompt, completion, temperature=1.0):
    with torch.no_grad():
        logits = (model(torch.tensor([prompt + completion])).logits[0].double() / temperature).log_softmax(-1)
    return [logits[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(completion)]


def test_greedy_matches_transformers_generate_with_refill(hf_model):
    model, _ = hf_model
    # Pick an EOS id that greedy decoding of prompt 0 actually reaches, so rows end at different steps.
    probe = model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=6, do_sample=False, pad_token_id=0)[0]
    eos = probe[len(PROMPTS[0]) + 3].item()
    engine = engine_for(hf_model, eos_token_ids=[eos])
    out = engine.generate(PROMPTS, SamplingParams(n=2, temperature=0.0, max_tokens=10))
    for i, prompt in enumerate(PROMPTS):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                             eos_token_id=eos, pad_token_id=0)[0, len(prompt):].tolist()
        if eos in ref:
            ref = ref[: ref.index(eos) + 1]
        for j, g in enumerate(out[i]):
            assert (g.prompt_index, g.sample_index) == (i, j)
            assert g.token_ids == ref
            assert g.finish_reason == ("stop" if ref[-1] == eos else "length")
    reasons = {g.finish_reason for row in out for g in row}
    assert reasons == {"stop", "length"}


@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_sampled_rollouts_carry_teacher_forced_logprobs(hf_model, temperature):
    """Rows finish at random steps and are refilled: cache copies must never corrupt a row.
    Logprobs are those of the temperature-scaled distribution (what Megatron recomputes)."""
    model, _ = hf_model
    eos_ids = list(range(0, VOCAB, 7))  # ~1 in 7 tokens ends a row
    engine = engine_for(hf_model, eos_token_ids=eos_ids)
    params = SamplingParams(n=4, temperature=temperature, max_tokens=12, seed=0)
    out = engine.generate(PROMPTS, params)
    lengths = set()
    for i, prompt in enumerate(PROMPTS):
        assert [g.sample_index for g in out[i]] == [0, 1, 2, 3]
        for g in out[i]:
            lengths.add(len(g.token_ids))
            assert 1 <= len(g.token_ids) <= 12 and len(g.logprobs) == len(g.token_ids)
            assert (g.token_ids[-1] in eos_ids) == (g.finish_reason == "stop")
            assert not any(t in eos_ids for t in g.token_ids[:-1])
            ref = teacher_forced_logprobs(model, prompt, g.token_ids, temperature)
            assert max(abs(a - b) for a, b in zip(g.logprobs, ref)) < 1e-4
    assert len(lengths) > 3  # the schedule really mixed short and long rows


def test_prompt_logprobs_are_teacher_forced_at_temperature_1(hf_model):
    model, _ = hf_model
    engine = engine_for(hf_model)
    got = engine.prompt_logprobs(PROMPTS)
    for prompt, row in zip(PROMPTS, got):
        ref = teacher_forced_logprobs(model, prompt[:1], prompt[1:])
        assert len(row) == len(prompt) - 1
        assert max((abs(a - b) for a, b in zip(row, ref)), default=0.0) < 1e-5


def test_seeded_generation_is_reproducible(hf_model):
    engine = engine_for(hf_model)
    params = SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=7)
    ids = lambda out: [[g.token_ids for g in row] for row in out]  # noqa: E731
    first = ids(engine.generate(PROMPTS, params))
    assert ids(engine.generate(PROMPTS, params)) == first
    assert ids(engine.generate(PROMPTS, SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=8))) != first
    # Samples of one prompt are independent draws, not copies.
    assert len({tuple(t) for t in first[1]}) > 1


def test_sampler_matches_temperature_and_top_p_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0])
    temperature, top_p, draws = 0.7, 0.8, 40000
    # Hand-derived float64 reference: softmax(l / T), keep the smallest top set with mass >= top_p.
    p = [math.exp(v / temperature) for v in logits.tolist()]
    p = [v / sum(p) for v in p]
    keep = 1
    while sum(p[:keep]) < top_p:
        keep += 1
    expected = [v / sum(p[:keep]) if k < keep else 0.0 for k, v in enumerate(p)]
    gen = torch.Generator().manual_seed(0)
    tokens, logprobs = sample_tokens(logits.repeat(draws, 1), temperature, top_p, gen)
    freq = torch.bincount(tokens, minlength=5).double() / draws
    assert freq[keep:].sum() == 0  # outside the nucleus: never
    assert 0.5 * (freq - torch.tensor(expected, dtype=torch.float64)).abs().sum() < 0.01
    # Logprobs are those of softmax(logits / T) before the top-p cut (rollout/base.py).
    scaled = (logits.double() / temperature).log_softmax(-1)
    assert torch.allclose(logprobs.double(), scaled[tokens], atol=1e-6)


def test_stop_strings_end_generation_at_the_first_match(hf_model):
    engine = engine_for(hf_model, tokenizer=CharTokenizer())
    tok = CharTokenizer()
    out = engine.generate(PROMPTS, SamplingParams(n=4, temperature=1.0, max_tokens=30, stop=["bab"], seed=1))
    stopped = 0
    for g in (g for row in out for g in row):
        # Independent reference: the first prefix whose full decode contains the stop string.
        first = next((k for k in range(1, len(g.token_ids) + 1) if "bab" in tok.decode(g.token_ids[:k])), None)
        if g.finish_reason == "stop":
            stopped += 1
            assert first == len(g.token_ids)
            full = tok.decode(g.token_ids)
            assert g.text == full[: full.index("bab") + 3] and g.text.endswith("bab")
        else:
            assert first is None and len(g.token_ids) == 30 and g.text == tok.decode(g.token_ids)
    assert stopped > 10


def test_stop_token_ids_and_length_limits(hf_model):
    model, _ = hf_model
    probe = model.generate(torch.tensor([PROMPTS[1]]), max_new_tokens=3, do_sample=False, pad_token_id=0)[0]
    stop_id = probe[len(PROMPTS[1]) + 1].item()
    engine = engine_for(hf_model, max_seq_len=12, tokenizer=CharTokenizer())
    out = engine.generate([PROMPTS[1]], SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=[stop_id]))
    g = out[0][0]
    assert g.finish_reason == "stop" and g.token_ids[-1] == stop_id and len(g.token_ids) == 2
    assert g.text == CharTokenizer().decode(g.token_ids[:-1])  # the stop token is not in the text
    # max_seq_len caps prompt + completion: 7 prompt tokens leave room for 5.
    out = engine.generate([PROMPTS[1]], SamplingParams(temperature=0.0, max_tokens=10))
    assert out[0][0].finish_reason == "length" and len(out[0][0].token_ids) == 5
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.generate([list(range(12))], SamplingParams())
    with pytest.raises(ValueError, match="outside"):
        engine.generate([[VOCAB]], SamplingParams())
    with pytest.raises(ValueError, match="tokenizer"):
        engine_for(hf_model).generate([[1]], SamplingParams(stop=["a"]))


def test_update_weights_in_buckets_any_dtype_any_order(hf_model):
    model, arch = hf_model
    engine = BuiltinEngine(arch, max_batch_size=2, max_seq_len=32)
    with pytest.raises(RuntimeError, match="update_weights"):
        engine.generate([[1, 2]], SamplingParams())
    items = [(k, v.to(torch.bfloat16)) for k, v in model.state_dict().items()]
    random.Random(0).shuffle(items)
    for start in range(0, len(items), 5):  # buckets of 5 tensors
        engine.update_weights(iter(items[start:start + 5]))
    view = engine.model.hf_parameters()
    assert set(view) == {k for k, _ in items}
    for name, tensor in items:
        assert torch.equal(view[name], tensor.float()), name  # bit-exact after the cast
    assert view["model.layers.0.self_attn.q_proj.bias"].dtype == torch.float32

    with pytest.raises(KeyError, match="model.layers.0.self_attn.qkv_proj.weight"):
        engine.update_weights([("model.layers.0.self_attn.qkv_proj.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="padded vocabulary"):
        engine.update_weights([("model.embed_tokens.weight", torch.zeros(128, 64))])
    with pytest.raises(ValueError, match=r"expects \(64,\)"):
        engine.update_weights([("model.norm.weight", torch.zeros(65))])


def test_sleep_frees_the_cache_and_wake_up_restores_generation(hf_model):
    engine = engine_for(hf_model)
    params = SamplingParams(n=2, temperature=0.0, max_tokens=6)
    before = engine.generate(PROMPTS, params)
    assert engine._kv is not None
    engine.sleep()
    assert engine._kv is None
    after = engine.generate(PROMPTS, params)  # generate wakes the engine itself
    assert [[g.token_ids for g in r] for r in after] == [[g.token_ids for g in r] for r in before]


def test_make_engine_builds_the_builtin_engine_from_config(hf_model):
    _, arch = hf_model
    cfg = Config()
    cfg.rollout.batch_size, cfg.rollout.max_response_tokens, cfg.data.max_prompt_tokens = 4, 100, 28
    engine = make_engine(cfg, arch, tokenizer=CharTokenizer())
    assert isinstance(engine, BuiltinEngine)
    assert (engine.max_batch_size, engine.max_seq_len) == (4, 128)
