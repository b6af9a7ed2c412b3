"""``benchmarks/gpu.sh``, the one prepared GPU run (issue 11): its CPU dry run in CI.

The dry run goes through the same stages and entry points as the GPU run (tools/convert.py,
bench_train_step.py in bf16 with the local spec and the built-in engine, bench_weight_sync.py,
bench_rollout.py) with tiny sizes, and must leave one JSON with every stage's numbers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu.sh"


def test_header_names_the_wheel_and_its_real_platform_tag():
    text = SCRIPT.read_text()
    assert "--platform manylinux_2_28_x86_64" in text and "megatron-core==0.16.1" in text
    assert "manylinux_2_17" not in text  # megatron-core publishes no such wheel
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout


@pytest.mark.slow
def test_dry_run_writes_one_json_with_every_stage(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable,
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu.json"]
    data = json.loads((tmp_path / "gpu.json").read_text())
    stages = data["stages"]
    assert data["ok"] and data["dry_run"]
    assert list(stages) == ["env", "roofline", "convert", "train", "sync", "rollout"]
    assert all(stage["ok"] for stage in stages.values())
    assert stages["roofline"]["matmul"]["tflops"] > 0 and stages["roofline"]["copy"]["gb_per_s"] > 0
    verify = stages["convert"]["verify_checkpoint"]["report"]
    assert verify["ok"] and verify["source"] == "megatron-checkpoint" and verify["max_abs_logit_diff"] <= 1e-4
    train = stages["train"]["report"]
    assert (train["params_dtype"], train["transformer_impl"], train["rollout_engine"]) == ("bfloat16", "local",
                                                                                          "builtin")
    assert train["steps_measured"] == 1 and train["trained_tokens_per_step"] > 0 and train["train_tokens_per_s"] > 0
    (sync,) = stages["sync"]["report"]["results"]
    assert sync["device"] == "cpu" and sync["bridge_bytes"] == sync["model_bytes_engine"] and sync["memcpy_gbps"] > 0
    rollout = stages["rollout"]["report"]["results"]
    assert [r["scenario"] for r in rollout] == ["batch 1", "batch 2", "grpo 1x2"]
    assert all(r["builtin_tok_s"] > 0 and r["hf_batched_tok_s"] > 0 for r in rollout)
    assert "all stages ok" in proc.stdout
