"""Config tree: YAML loading, --set overrides, and validation errors that name the key."""

import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from megatron_rpt.config import (
    Config,
    ConfigError,
    RewardKind,
    Template,
    from_dict,
    load_config,
    parse_override,
    validate,
)
from megatron_rpt.config_schema import explain, iter_fields
from megatron_rpt.model.hf_config import arch_from_dict, load_hf_config

REPO = Path(__file__).resolve().parent.parent


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


def test_policy_rewards_against_dynamic_sampling():
    # Dynamic sampling drops all-wrong groups, which the dense reward would still pay: refused.
    with pytest.raises(ConfigError, match=r"rl\.reward=dense with rl\.dynamic_sampling_from_step=500.*"
                                          r"dynamic_sampling_from_step=null"):
        load_config(None, ["rl.reward=dense"], validate_paths=False)
    assert load_config(None, ["rl.reward=dense", "rl.dynamic_sampling_from_step=null"],
                       validate_paths=False).rl.reward == "dense"
    # Conditional dense pays nothing in an all-wrong group, so dropping those groups changes nothing.
    assert load_config(None, ["rl.reward=conditional_dense"], validate_paths=False).rl.reward == "conditional_dense"


def test_unknown_key_in_yaml(tmp_path):
    path = _write(tmp_path, "optim:\n  learning_rate: 1e-6\n")
    with pytest.raises(ConfigError, match=r"optim\.learning_rate"):
        load_config(path, validate_paths=False)


def test_parallel_layout_against_the_architecture(tmp_path):
    hf = _hf_config(tmp_path)
    ok = load_config(None, [f"model.hf_config={hf}", "parallel.tensor_parallel=2", "parallel.pipeline_parallel=3",
                            "parallel.world_size=12", "rl.prompts_per_step=24"], validate_paths=False)
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


# ----------------------------------------------------------------------------- numbers, files, overrides


def test_numbers_are_read_as_python_reads_them(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-3 and 1_000.5 as strings; a numeric field takes them as numbers.
    path = _write(tmp_path, "optim:\n  lr: 1e-3\n  min_lr: 5E-6\ntrain:\n  steps: 1e3\nrollout:\n  top_p: .5\n"
                            "data:\n  difficulty_thresholds: [5e-1, 1, 1.5e0]\n")
    cfg = load_config(path, ["rl.clip_high=2.8e-1", "checkpoint.keep_last=1_0"], validate_paths=False)
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.train.steps, cfg.rollout.top_p) == (1e-3, 5e-6, 1000, 0.5)
    assert type(cfg.train.steps) is int and type(cfg.optim.lr) is float
    assert cfg.data.difficulty_thresholds == [0.5, 1.0, 1.5]
    assert (cfg.rl.clip_high, cfg.checkpoint.keep_last) == (0.28, 10)
    assert load_config(None, ["optim.lr=1e-3"], validate_paths=False).optim.lr == 1e-3
    # a string field keeps the text as written
    assert load_config(None, ["logging.wandb_run_name=1e-3"], validate_paths=False).logging.wandb_run_name == "1e-3"


@pytest.mark.parametrize("override, message", [
    ("optim.lr=.nan", r"optim\.lr=nan must be a finite number"),
    ("optim.lr=.inf", r"optim\.lr=inf must be a finite number"),
    ("optim.lr=nan", r"optim\.lr=nan must be a finite number"),
    ("rollout.temperature=-.inf", r"rollout\.temperature=-inf must be a finite number"),
    ("checkpoint.keep_last=-1", r"checkpoint\.keep_last=-1 must be >= 0"),
    ("checkpoint.save_interval=-5", r"checkpoint\.save_interval=-5 must be >= 0"),
    ("optim.lr=0", r"optim\.lr=0\.0 must be > 0"),
    ("rollout.top_p=1.5", r"rollout\.top_p=1\.5 must be > 0 and <= 1"),
    ("model.fp8=e5m2", r"model\.fp8='e5m2' is not one of \['hybrid', 'e4m3'\] \(or null\)"),
    ("eval.modes=[standard, greedy]", r"eval\.modes\[1\]='greedy' is not one of \['standard', 'reasoning'\]"),
    ("data.template=v9", r"data\.template='v9' is not one of"),
    ("rl.prompts_per_step=6", r"rl\.prompts_per_step=6 is not divisible by the 4 rollout engines"),
])
def test_out_of_range_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override, "parallel.world_size=4"], validate_paths=False)


def test_set_merges_a_mapping_into_its_section(tmp_path):
    path = _write(tmp_path, "optim:\n  lr: 3.0e-3\n  weight_decay: 0.0\n  warmup_steps: 5\n")
    cfg = load_config(path, ["optim={lr: 0.1}"], validate_paths=False)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_steps) == (0.1, 0.0, 5)


def test_empty_variable_takes_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv("RPT_EMPTY_VAR", "")
    path = _write(tmp_path, "logging:\n  dir: ${RPT_EMPTY_VAR:-runs/fallback}\n")
    assert load_config(path, validate_paths=False).logging.dir == "runs/fallback"


def test_base_chains_fail_with_the_file_that_names_them(tmp_path):
    own = tmp_path / "self.yaml"
    own.write_text("base: self.yaml\n")
    with pytest.raises(ConfigError, match=r"self\.yaml: base: 'self\.yaml' makes a cycle"):
        load_config(own, validate_paths=False)
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("base: b.yaml\n")
    b.write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"b\.yaml: base: 'a\.yaml' makes a cycle \(.*a\.yaml -> .*b\.yaml -> "):
        load_config(a, validate_paths=False)
    child = tmp_path / "child.yaml"
    child.write_text("base: missing/parent.yaml\n")
    with pytest.raises(ConfigError, match=r"child\.yaml: base: 'missing/parent\.yaml' \(.*\) does not exist"):
        load_config(child, validate_paths=False)
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("logging:\n  dir: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"config file .*latin1\.yaml is not UTF-8 text \(byte 0xe9 at offset 19\)"):
        load_config(latin, validate_paths=False)


# ----------------------------------------------------------------------------- one owner per rule


def test_every_field_has_a_description_that_explain_prints():
    fields = list(iter_fields(Config))
    assert len(fields) > 90
    assert [f.key for f in fields if not f.doc] == []
    out = subprocess.run([sys.executable, "-m", "megatron_rpt.config", "explain", "optim.lr"], capture_output=True,
                         text=True, check=True, env=dict(os.environ, PYTHONPATH=str(REPO))).stdout
    assert out.splitlines() == ["optim.lr = 1e-06  (float > 0)", "    Peak learning rate (reached after warm-up)."]
    section = explain(Config, "rl")
    assert section.count("\n    ") == len([f for f in fields if f.key.startswith("rl.")])
    bad = subprocess.run([sys.executable, "-m", "megatron_rpt.config", "explain", "optim.learning_rate"],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert bad.returncode == 2 and bad.stderr.startswith("error: no config key 'optim.learning_rate'")


def test_choices_have_one_owner():
    from megatron_rpt.data.templates import TEMPLATES
    from megatron_rpt.reward import REWARD_KINDS
    from megatron_rpt.rl.grpo_loss import LOSS_AGGREGATIONS

    assert set(typing.get_args(Template)) == set(TEMPLATES)
    assert REWARD_KINDS == typing.get_args(RewardKind) == ("prefix", "first_token", "dense", "conditional_dense")
    assert LOSS_AGGREGATIONS == ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def test_world_size_rule_is_the_parallel_sections():
    from megatron_rpt.config import ParallelConfig

    layout = ParallelConfig(tensor_parallel=2, pipeline_parallel=2, expert_parallel=4)
    with pytest.raises(ConfigError, match=r"parallel\.expert_parallel\*expert_tensor_parallel = 4\*2 = 8 must divide "
                       r"tensor_parallel\*context_parallel\*data_parallel = 4"):
        layout.data_parallel_size(8)
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible"):
        layout.data_parallel_size(6)
    assert ParallelConfig(tensor_parallel=2).data_parallel_size(8) == 4
    # expert TP 1: the 4 ranks of a stage (TP2 x DP2) hold EP4 x ETP1, which the default ETP=TP cannot
    assert ParallelConfig(tensor_parallel=2, pipeline_parallel=2, expert_parallel=4,
                          expert_tensor_parallel=1).data_parallel_size(8) == 2


def test_optimizer_offload_settings_are_megatron_cores():
    """optim.cpu_offload: megatron-core's own OptimizerConfig fields (0.16 and 0.19), its preconditions refused
    with one line each (the CPU case through the trainer: test_checkpoint_safety)."""
    import dataclasses

    from megatron.core.optimizer import OptimizerConfig

    from megatron_rpt.trainer.optimizer import check_optimizer_offload, offload_settings

    cfg = from_dict({"optim": {"cpu_offload": True, "offload_fraction": 0.5}})
    settings = offload_settings(cfg)
    assert settings["optimizer_cpu_offload"] is True and settings["optimizer_offload_fraction"] == 0.5
    assert set(settings) <= {f.name for f in dataclasses.fields(OptimizerConfig)}
    assert offload_settings(from_dict({})) == {}
    check_optimizer_offload(cfg, on_gpu=True, te_available=True)
    with pytest.raises(ConfigError, match=r"optim\.cpu_offload=true needs a GPU"):
        check_optimizer_offload(cfg, on_gpu=False, te_available=True)
    with pytest.raises(ConfigError, match=r"optim\.cpu_offload=true needs Transformer Engine"):
        check_optimizer_offload(cfg, on_gpu=True, te_available=False)
    with pytest.raises(ConfigError, match=r"optim\.cpu_offload=true needs parallel\.distributed_optimizer=true"):
        validate(from_dict({"optim": {"cpu_offload": True}, "parallel": {"distributed_optimizer": False}}))


def test_uneven_pipeline_split():
    """megatron-core's split by hand: the set stage counts, the remaining layers even over the middle stages."""
    from megatron_rpt.config import ParallelConfig

    assert ParallelConfig(pipeline_parallel=2, first_stage_layers=3).stage_layers(4) == [3, 1]
    assert ParallelConfig(pipeline_parallel=8, first_stage_layers=11, last_stage_layers=11).stage_layers(94) == \
        [11, 12, 12, 12, 12, 12, 12, 11]  # 94 - 22 = 72 over 6 middle stages
    assert ParallelConfig(pipeline_parallel=4, last_stage_layers=4, virtual_pipeline=2).stage_layers(28) == \
        [8, 8, 8, 4]
    assert ParallelConfig(pipeline_parallel=4).stage_layers(28) == [7, 7, 7, 7]
    with pytest.raises(ConfigError, match=r"pipeline_parallel=4 cannot split num_hidden_layers=30 with parallel\."
                                          r"first_stage_layers=5, last_stage_layers=None: the 25 remaining layers "
                                          r"must fill the 3 middle stages evenly"):
        ParallelConfig(pipeline_parallel=4, first_stage_layers=5).stage_layers(30)
    with pytest.raises(ConfigError, match=r"the 2 remaining layers must fill the 0 middle stages"):
        ParallelConfig(pipeline_parallel=2, first_stage_layers=1, last_stage_layers=1).stage_layers(4)
    with pytest.raises(ConfigError, match=r"first_stage_layers=3 needs parallel\.pipeline_parallel >= 2 \(it is 1\)"):
        ParallelConfig(first_stage_layers=3).check()
    with pytest.raises(ConfigError, match=r"last_stage_layers=3 is not divisible by parallel\.virtual_pipeline=2"):
        ParallelConfig(pipeline_parallel=2, virtual_pipeline=2, last_stage_layers=3).check()


def test_recipes_evaluate_as_the_paper():
    """Every GPU recipe buckets evaluation by R1-Distill-Qwen-14B and logs held-out accuracy every 100 steps."""
    for recipe in ("rpt_14b", "rpt_32b", "rpt_72b", "rpt_moe_30b_a3b"):
        cfg = load_config(f"configs/{recipe}.yaml", validate_paths=False)
        assert cfg.eval.scorer_model.endswith("DeepSeek-R1-Distill-Qwen-14B"), recipe
        assert cfg.eval.scorer_model != cfg.data.proxy_model
        assert cfg.train.eval_interval == 100 and set(cfg.eval.modes) == {"standard", "reasoning"}, recipe
        assert (cfg.rl.clip_low, cfg.rl.clip_high, cfg.rl.dual_clip) == (0.2, 0.2, None), recipe


def test_a_missing_scorer_model_is_refused_at_load(tmp_path):
    with pytest.raises(ConfigError, match=r"eval\.scorer_model='.*nope' does not exist"):
        load_config(None, [f"eval.scorer_model={tmp_path / 'nope'}", "model.hf_checkpoint=auto:smollm2"],
                    validate_paths=True)


def test_vllm_needs_a_model_directory_to_start_from(tmp_path, monkeypatch):
    hf = _hf_config(tmp_path)  # a config.json without weights
    base = [f"model.hf_config={hf}", "rollout.engine=vllm", "data.paths=[]"]
    with pytest.raises(ConfigError, match=r"model\.hf_config='.*config\.json' has a config\.json but no weights .* "
                                          r"and model\.load is empty"):
        load_config(None, base)
    ckpt = tmp_path / "mcore"
    ckpt.mkdir()
    # A Megatron checkpoint: vLLM starts from the config with dummy weights and receives Megatron's.
    assert load_config(None, [*base, f"model.load={ckpt}"]).rollout.engine == "vllm"
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert load_config(None, base).rollout.engine == "vllm"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"rollout\.model_dir='.*empty' is not one \(no config\.json in it\): point "
                                          r"rollout\.model_dir at the model's Hugging Face directory \(the GPU recipes "
                                          r"read \$RPT_HF_DIR\), or set rollout\.engine=builtin"):
        load_config(None, [*base, f"rollout.model_dir={tmp_path / 'empty'}"])


def test_gpu_recipes_take_the_vllm_model_directory_from_the_environment(tmp_path, monkeypatch):
    for name in ("RPT_CKPT", "RPT_TOKENIZER", "RPT_PROXY_MODEL", "RPT_EVAL_SCORER"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    (tmp_path / "data.jsonl").write_text("")
    monkeypatch.setenv("RPT_DATA", str(tmp_path / "data.jsonl"))
    monkeypatch.setenv("RPT_HF_DIR", str(tmp_path / "missing"))
    for recipe in ("rpt_14b", "rpt_32b", "rpt_72b", "rpt_moe_30b_a3b"):
        with pytest.raises(ConfigError, match=r"rollout\.model_dir='.*missing' is not one \(no config\.json"):
            load_config(f"configs/{recipe}.yaml")
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    _hf_config(hf_dir)
    monkeypatch.setenv("RPT_HF_DIR", str(hf_dir))
    for recipe in ("rpt_14b", "rpt_32b", "rpt_72b", "rpt_moe_30b_a3b"):
        assert load_config(f"configs/{recipe}.yaml").rollout.model_dir == str(hf_dir)
