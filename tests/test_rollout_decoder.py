"""The plain-torch decoder against transformers: full forward, KV-cache decoding, batching."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from megatron_rpt.model.hf_config import UnsupportedArchitecture, arch_from_dict
from megatron_rpt.rollout.base import hf_parameter_shapes
from megatron_rpt.rollout.builtin import BuiltinEngine
from megatron_rpt.rollout.torch_decoder import Decoder, KVCache

TOL = 1e-4
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
FAMILIES = {
    # Llama 3 rope scaling, untied head, GQA
    "llama": (LlamaForCausalLM, LlamaConfig, dict(max_position_embeddings=16384, rope_parameters=LLAMA3_ROPE)),
    # QKV bias, tied embeddings
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, dict(tie_word_embeddings=True)),
    # per-head q/k RMSNorm, head_dim != hidden / heads
    "qwen3": (Qwen3ForCausalLM, Qwen3Config, dict(head_dim=24, tie_word_embeddings=False)),
}


def tiny_hf(family: str, seed: int = 0):
    model_cls, config_cls, extra = FAMILIES[family]
    cfg = config_cls(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=96, **extra)
    cfg.architectures = [model_cls.__name__]
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # HF zero-inits biases and ones-inits norms: randomise so they matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model, arch_from_dict(cfg.to_dict())


def decoder_from(model, arch) -> Decoder:
    decoder = Decoder(arch)
    decoder.load_hf_weights(model.state_dict().items())
    return decoder


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request):
    model, arch = tiny_hf(request.param)
    return model, arch, decoder_from(model, arch)


def test_full_forward_matches_transformers(pair):
    model, _, decoder = pair
    tokens = torch.randint(0, 97, (3, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(tokens).logits
    assert (decoder(tokens) - ref).abs().max() < TOL


def test_incremental_decoding_with_cache_matches_full_forward(pair):
    model, arch, decoder = pair
    tokens = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(tokens).logits
    cache = KVCache(arch, batch=2, max_len=16, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        parts = [decoder(tokens[:, :6], cache=cache)]  # prefill
        parts.append(decoder(tokens[:, 6:8], start_pos=[6, 6], cache=cache))  # a 2-token chunk
        for t in range(8, 12):  # then one token at a time
            parts.append(decoder(tokens[:, t:t + 1], start_pos=[t, t], cache=cache))
    assert (torch.cat(parts, dim=1) - ref).abs().max() < TOL


def test_rows_of_different_lengths_batch_like_one_by_one(pair):
    """Right-padded prefill, then decoding with a different position in every row."""
    model, arch, decoder = pair
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 97, (n,), generator=gen) for n in (9, 14, 11)]  # full sequences
    prompt_lens = [3, 8, 5]
    cache = KVCache(arch, batch=3, max_len=16, dtype=torch.float32, device="cpu")
    padded = torch.zeros(3, max(prompt_lens), dtype=torch.long)
    for b, (seq, n) in enumerate(zip(seqs, prompt_lens)):
        padded[b, :n] = seq[:n]
    with torch.no_grad():
        prefill = decoder(padded, cache=cache, rows=slice(0, 3))
        steps = []
        for step in range(6):
            tok = torch.stack([seq[n + step] for seq, n in zip(seqs, prompt_lens)]).unsqueeze(1)
            steps.append(decoder(tok, start_pos=[n + step for n in prompt_lens], cache=cache, rows=slice(0, 3))[:, 0])
        for b, (seq, n) in enumerate(zip(seqs, prompt_lens)):
            ref = model(seq[: n + 6].unsqueeze(0)).logits[0]
            alone = decoder(seq[: n + 6].unsqueeze(0))[0]
            assert (prefill[b, :n] - ref[:n]).abs().max() < TOL
            assert (torch.stack([s[b] for s in steps]) - ref[n:]).abs().max() < TOL
            assert (alone - ref).abs().max() < TOL


def test_logits_index_picks_one_position_per_row(pair):
    _, _, decoder = pair
    tokens = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = decoder(tokens)
        picked = decoder(tokens, logits_index=torch.tensor([2, 6]))
    assert torch.allclose(picked, torch.stack([full[0, 2], full[1, 6]]), atol=1e-6)


def test_hf_parameter_names_and_shapes_match_transformers(pair):
    model, arch, decoder = pair
    hf_state = model.state_dict()
    if arch.tie_word_embeddings:
        hf_state.pop("lm_head.weight")  # transformers lists the tied head; safetensors exports drop it
    assert {k: tuple(v.shape) for k, v in hf_state.items()} == hf_parameter_shapes(arch)
    views = decoder.hf_parameters()
    assert all(torch.equal(views[k], v) for k, v in hf_state.items())


def test_tiny_random_llama_from_shared_matches_transformers(shared):
    path = shared("models/tiny_random_llama")
    engine = BuiltinEngine.from_hf_dir(path, max_seq_len=64)
    ref_model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens = torch.randint(0, engine.arch.vocab_size, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = ref_model(tokens).logits
        assert (engine.model(tokens) - ref).abs().max() < TOL
    assert engine.eos_token_ids == [1]


def test_moe_is_rejected_with_a_pointer_to_vllm():
    arch = arch_from_dict({"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 32, "num_hidden_layers": 1,
                           "num_attention_heads": 4, "vocab_size": 50, "num_experts": 4, "num_experts_per_tok": 2,
                           "moe_intermediate_size": 16})
    with pytest.raises(UnsupportedArchitecture, match="rollout.engine=vllm"):
        Decoder(arch)
