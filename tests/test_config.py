"""Config tree: YAML loading, --set overrides, and validation errors that name the key."""

import json

import pytest

from megatron_rpt.config import Config, ConfigError, load_config, parse_override
from megatron_rpt.model.hf_config import arch_from_dict, load_hf_config


def _hf_config(tmp_path, **overrides):
    cfg = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 96, "num_hidden_layers": 6,
        "num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 160, "vocab_size": 1000,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    }
    cfg.update(overrides)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def _write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_paper_recipe():
    cfg = Config()
    assert (cfg.rl.prompts_per_step, cfg.rollout.samples_per_prompt, cfg.rollout.temperature) == (256, 8, 0.8)
    assert (cfg.optim.lr, cfg.rl.kl_coef, cfg.rl.clip_low, cfg.rl.dynamic_sampling_from_step) == (1e-6, 0.0, 0.2, 500)


def test_yaml_and_overrides(tmp_path):
    path = _write(tmp_path, "rollout:\n  temperature: 1.0\nrl:\n  clip_high: 0.28\n")
    cfg = load_config(path, ["rollout.temperature=0.8", "data.paths=[a.jsonl, b.jsonl]", "model.fp8=null"],
                      validate_paths=False)
    assert cfg.rollout.temperature == 0.8
    assert cfg.rl.clip_high == 0.28
    assert cfg.data.paths == ["a.jsonl", "b.jsonl"]
    assert cfg.optim.lr == 1e-6  # int/float coercion of YAML "1e-6" strings is not needed: it is a float


def test_int_is_accepted_for_float_but_not_the_reverse(tmp_path):
    assert load_config(None, ["rollout.temperature=1"], validate_paths=False).rollout.temperature == 1.0
    with pytest.raises(ConfigError, match=r"rollout\.samples_per_prompt: expected an integer"):
        load_config(None, ["rollout.samples_per_prompt=2.5"], validate_paths=False)


@pytest.mark.parametrize("override, message", [
    ("rollout.temprature=0.8", r"unknown key\(s\) rollout\.temprature.*valid keys there:.*temperature"),
    ("bogus.x=1", r"unknown key\(s\) bogus"),
    ("rollout.temperature=hot", r"rollout\.temperature: expected a number"),
    ("parallel.sequence_parallel=maybe", r"parallel\.sequence_parallel: expected true/false"),
    ("rollout.engine=sglang", r"rollout\.engine='sglang' is not one of"),
    ("rl.dual_clip=0.5", r"rl\.dual_clip=0\.5 must be > 1"),
    ("rollout.temperature", r"expected KEY=VALUE"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override], validate_paths=False)


def test_unknown_key_in_yaml(tmp_path):
    path = _write(tmp_path, "optim:\n  learning_rate: 1e-6\n")
    with pytest.raises(ConfigError, match=r"optim\.learning_rate"):
        load_config(path, validate_paths=False)


def test_parallel_layout_against_the_architecture(tmp_path):
    hf = _hf_config(tmp_path)
    ok = load_config(None, [f"model.hf_config={hf}", "parallel.tensor_parallel=2", "parallel.pipeline_parallel=3",
                            "parallel.world_size=12"], validate_paths=False)
    assert ok.parallel.tensor_parallel == 2
    with pytest.raises(ConfigError, match=r"parallel\.tensor_parallel=4 does not divide the model's "
                                          r"num_attention_heads=6; use one of \[1, 2, 3, 6\]"):
        load_config(None, [f"model.hf_config={hf}", "parallel.tensor_parallel=4"], validate_paths=False)
    with pytest.raises(ConfigError, match=r"num_key_value_heads=2"):
        load_config(None, [f"model.hf_config={hf}", "parallel.tensor_parallel=3"], validate_paths=False)
    with pytest.raises(ConfigError, match=r"parallel\.pipeline_parallel=4 .*num_hidden_layers=6"):
        load_config(None, [f"model.hf_config={hf}", "parallel.pipeline_parallel=4"], validate_paths=False)
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible by .* = 2\*2\*1 = 4"):
        load_config(None, [f"model.hf_config={hf}", "parallel.tensor_parallel=2", "parallel.pipeline_parallel=2",
                           "parallel.world_size=6"], validate_paths=False)


def test_missing_paths_are_reported(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.paths\[0\]='nope\.jsonl' does not exist"):
        load_config(None, ["model.hf_checkpoint=auto:tiny-qwen2", "data.paths=[nope.jsonl]"])
    with pytest.raises(ConfigError, match=r"model\.hf_checkpoint='auto:gpt5'"):
        load_config(None, ["model.hf_checkpoint=auto:gpt5"])
    with pytest.raises(ConfigError, match=r"model\.hf_config and model\.hf_checkpoint are both empty"):
        load_config(None, [])


def test_env_expansion(tmp_path, monkeypatch):
    monkeypatch.setenv("RPT_TEST_DIR", "/somewhere")
    path = _write(tmp_path, "logging:\n  dir: ${RPT_TEST_DIR}/logs\ncheckpoint:\n  dir: ${RPT_UNSET_VAR:-fallback}\n")
    cfg = load_config(path, validate_paths=False)
    assert cfg.logging.dir == "/somewhere/logs"
    assert cfg.checkpoint.dir == "fallback"


def test_parse_override_parses_yaml_values():
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a.b=null") == (["a", "b"], None)


def test_hf_config_both_transformers_shapes(tmp_path):
    base = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 100, "intermediate_size": 128}
    v4 = arch_from_dict({**base, "rope_theta": 500000.0,
                         "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    v5 = arch_from_dict({**base, "rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 32.0,
                                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 8192}})
    assert v4 == v5
    assert (v4.rope_theta, v4.rope_scaling_factor, v4.num_key_value_heads, v4.head_dim) == (500000.0, 32.0, 4, 16)
    plain = arch_from_dict({**base, "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}})
    assert plain.rope_scaling_factor is None and plain.rope_theta == 1e6


def test_hf_config_rejects_unsupported(tmp_path):
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*not supported"):
        arch_from_dict({"architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match="yarn"):
        arch_from_dict({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 8, "num_hidden_layers": 1,
                        "num_attention_heads": 2, "vocab_size": 10, "rope_scaling": {"rope_type": "yarn"}})


def test_real_r1_distill_config(shared):
    arch = load_hf_config(shared("tokenizers/r1_distill_qwen/config_r1_distill_qwen_1.5b.json"))
    assert (arch.family, arch.hidden_size, arch.num_layers, arch.num_attention_heads) == ("qwen2", 1536, 28, 12)
    assert (arch.num_key_value_heads, arch.qkv_bias, arch.tie_word_embeddings) == (2, True, False)
    # 1.78B parameters incl. embeddings, as published for R1-Distill-Qwen-1.5B
    assert 1.7e9 < arch.num_parameters() < 1.8e9
