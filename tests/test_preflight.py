"""The per-node preflight the SLURM launcher runs before a job starts (issue 11, item 7).

Real packages only: vLLM (the CPU build) imports here, Transformer Engine is not installed
and this machine has no GPU, so each failure below is a real one.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from megatron_rpt.config import from_dict
from megatron_rpt.preflight import check_node, main

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without GPUs")


def test_cpu_config_passes():
    assert check_node(from_dict({}), gpus=0) == ([], [])


def test_missing_gpus_are_reported():
    problems, _ = check_node(from_dict({}), gpus=8)
    assert len(problems) == 1 and "expected 8 GPUs" in problems[0] and "sees 0" in problems[0]


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is not None, reason="needs TE to be absent")
@pytest.mark.parametrize("section,key,value", [("model", "transformer_impl", "transformer_engine"),
                                               ("parallel", "context_parallel", 2)])
def test_transformer_engine_import_failure_names_the_setting_and_fix(section, key, value):
    problems, _ = check_node(from_dict({section: {key: value}}), gpus=0)
    assert len(problems) == 1, problems
    assert f"{section}.{key}={value}" in problems[0] and "import transformer_engine.pytorch" in problems[0]
    assert "pip install -e '.[gpu]'" in problems[0]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed here")
def test_vllm_engine_imports_here():
    assert check_node(from_dict({"rollout": {"engine": "vllm"}}), gpus=0) == ([], [])


def test_cli_exit_codes(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 1
    assert "config" in capsys.readouterr().err
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  hf_config: ''\n")
    # The trainer's own arguments pass through (--resume is the trainer's; --set overrides apply).
    assert main(["--gpus", "0", "--config", str(config), "--resume", "auto",
                 "--set", "model.hf_checkpoint=auto:smollm2", "--set", "data.paths=[]"]) == 0
    assert main(["--gpus", "2", "--config", str(config), "--set", "model.hf_checkpoint=auto:smollm2"]) == 1
    assert "expected 2 GPUs" in capsys.readouterr().err
