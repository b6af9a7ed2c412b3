"""The RPT training loop end to end, as a user runs it (real megatron-core on CPU over gloo).

* the toy task is learned from scratch with vLLM rollouts (reward from ~1/17 to > 0.6), and the same
  run with a broken weight sync (vLLM) or a flipped advantage sign (built-in engine) does NOT learn;
* TP=2/PP=2 (4 ranks) and DP=2 runs with the built-in engine, and TP=2 with one vLLM TP=2 engine and PP=2
  with a vLLM engine per stage (torchrun) train, every step generates rl.prompts_per_step distinct prompts
  (each engine its own prompts), and the rollout engine's logprobs equal Megatron's (the bridge delivered
  the trained weights);
* kill (SIGTERM) + resume with vLLM rollouts continues the exact data stream and reproduces the
  uninterrupted run (the built-in engine's exact resume is checked under SLURM, tests/test_slurm.py);
* the OmniMATH main-job config runs on a tiny model with the real Qwen2.5 vocabulary.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import require_vllm
from helpers_toy import metrics, run_trainer, toy_env, trainer_args

from megatron_rpt.toy import prepare_toy

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory) -> Path:
    return prepare_toy(tmp_path_factory.mktemp("toy") / "toy")


def _train(toy: Path, run: Path, *overrides: str, nproc: int = 1, resume: str = "none",
           timeout: int = 300) -> subprocess.CompletedProcess:
    """The toy run with the config's own evaluation and checkpoint settings unless ``overrides`` change them."""
    return run_trainer(toy, trainer_args(run, *overrides, resume=resume), nproc=nproc, timeout=timeout)


def _mean(values):
    values = list(values)
    return sum(values) / len(values)


def test_toy_learns_with_vllm_rollouts(toy_dir, tmp_path):
    # Learned from scratch with vLLM's CPU build as the rollout engine, whose logprobs of its samples equal
    # Megatron's every step: the sync delivered the weights. (The built-in engine learns in the parallel
    # layouts below.)
    require_vllm()
    proc = _train(toy_dir, tmp_path / "run", "rollout.engine=vllm", "train.eval_interval=0")
    rows = metrics(tmp_path / "run")
    rewards = [r["reward/mean"] for r in rows]
    assert len(rewards) == 40
    assert _mean(rewards[:3]) < 0.2, rewards
    assert _mean(rewards[-5:]) > 0.6, rewards
    assert max(r["rollout/engine_logprob_abs_diff"] for r in rows) < 1e-4
    assert "reward           first" in proc.stdout
    assert "1 vllm rollout engine(s)" in proc.stderr


def test_engine_logprobs_match_megatron_at_temperature_0_8(toy_dir, tmp_path):
    # The paper samples at T=0.8: the engine and Megatron both score log_softmax(logits / T)
    # of the sampled tokens, so the sync check holds (and is logged) at every temperature.
    _train(toy_dir, tmp_path / "run", "train.steps=3", "train.eval_interval=0", "rollout.temperature=0.8")
    rows = metrics(tmp_path / "run")
    assert len(rows) == 3
    assert max(r["rollout/engine_logprob_abs_diff"] for r in rows) < 1e-4
    # The planner's prediction is logged beside the measured peak every step (CPU: the process's
    # peak RSS, which also holds Python and the libraries: above the planned training tensors).
    for r in rows:
        assert 0 < r["memory/planned_train_gib"] < r["memory/planned_peak_gib"], r
        assert r["memory/measured_peak_gib"] > r["memory/planned_train_gib"], r


# ----------------------------------------------------------------------------- sabotage


def _run_sabotaged(toy: str, run: str, sabotage: str, engine: str = "builtin") -> list[float]:
    """Module-level so that ``spawn`` can import it: the toy run with one deliberate bug."""
    os.environ["RPT_TOY_DIR"] = toy
    from megatron_rpt.config import load_config
    from megatron_rpt.trainer.trainer import Trainer

    cfg = load_config(REPO / "configs/toy_learn.yaml",
                      [f"logging.dir={run}", "logging.progress_bar=false", "train.steps=30", "train.eval_interval=0",
                       f"rollout.engine={engine}"])
    trainer = Trainer(cfg, resume=None)
    if sabotage == "no_sync":
        real_sync, calls = trainer.bridge.sync, []

        def initial_sync_only(engine):  # the engine keeps the initial weights forever
            calls.append(engine)
            return real_sync(engine) if len(calls) == 1 else None

        trainer.bridge.sync = initial_sync_only
    elif sabotage == "flipped_sign":  # patched where the trainer looks it up
        import megatron_rpt.trainer.trainer as trainer_module

        original = trainer_module.group_advantages
        trainer_module.group_advantages = lambda *a, **k: -original(*a, **k)
    return [h["reward/mean"] for h in trainer.run()["history"]]


@pytest.mark.parametrize("sabotage, engine", [("flipped_sign", "builtin"), ("no_sync", "vllm")])
def test_toy_does_not_learn_when_broken(toy_dir, tmp_path, sabotage, engine):
    from megatron_rpt.distributed import spawn

    if engine == "vllm":
        require_vllm()
    (rewards,) = spawn(_run_sabotaged, 1, str(toy_dir), str(tmp_path / "run"), sabotage, engine)
    assert len(rewards) == 30
    assert _mean(rewards[-5:]) < 0.25, rewards


# ----------------------------------------------------------------------------- parallel layouts


VLLM = ["rollout.engine=vllm", "rollout.temperature=0.8"]  # the paper's temperature: the logprob check holds at T


@pytest.mark.parametrize("layout, nproc, engines", [
    (["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"], 4, 4),
    ([], 2, 2),
    (["parallel.tensor_parallel=2", *VLLM, "rollout.tensor_parallel=2"], 2, 1),  # one vLLM TP2 engine
    (["parallel.pipeline_parallel=2", *VLLM], 2, 2),  # a vLLM TP1 engine on each pipeline stage
], ids=["tp2pp2", "dp2", "tp2-vllm-tp2", "pp2-vllm-tp1"])
def test_parallel_runs_train_and_sync(toy_dir, tmp_path, layout, nproc, engines):
    if "rollout.engine=vllm" in layout:
        require_vllm()
    run = tmp_path / "run"
    ckpt = tmp_path / "ckpt"
    _train(toy_dir, run, "train.steps=10", "train.eval_interval=0", f"checkpoint.dir={ckpt}",
           "checkpoint.save_interval=5", "logging.save_rollouts=true", *layout, nproc=nproc)
    # One engine per rollout.tensor_parallel ranks, each with its own prompts: every step generates
    # exactly rl.prompts_per_step distinct prompts (32 in the toy config), none twice, whatever the layout.
    for step in range(1, 11):
        rows = [json.loads(line) for path in sorted((run / "rollouts").glob(f"step_{step:06d}_engine*.jsonl"))
                for line in path.read_text().splitlines()]
        assert len({r["engine"] for r in rows}) == engines
        prompts = [(r["doc_id"], r["position"]) for r in rows[::8]]  # 8 samples per prompt, consecutive rows
        assert all((r["doc_id"], r["position"]) == prompts[i // 8] for i, r in enumerate(rows))
        assert len(prompts) == len(set(prompts)) == 32, f"step {step}: {len(set(prompts))} distinct of {len(prompts)}"
    # Resume from step 10's checkpoint on the same layout and train two more steps.
    _train(toy_dir, run, "train.steps=12", "train.eval_interval=0", f"checkpoint.dir={ckpt}",
           "checkpoint.save_interval=0", *layout, nproc=nproc, resume="auto")
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert max(r["rollout/engine_logprob_abs_diff"] for r in rows) < 1e-4
    assert all(r["train/grad_norm"] > 0 for r in rows)
    assert _mean(r["reward/mean"] for r in rows[-3:]) > _mean(r["reward/mean"] for r in rows[:3])


def test_moe_rl_with_vllm_rollouts_and_expert_parallelism(toy_dir, tmp_path):
    """A tiny Qwen3-MoE (4 experts, top-2) on the toy task: GRPO steps with vLLM rollouts (one
    engine per rank) and the experts split over 2 ranks (EP=2, DP=2)."""
    require_vllm()
    from helpers_models import make_tiny_hf_checkpoint

    moe = make_tiny_hf_checkpoint("qwen3_moe", tmp_path / "moe", tokenizer=False, vocab_size=17, hidden_size=64,
                                  num_attention_heads=2, num_key_value_heads=2, head_dim=32, intermediate_size=128,
                                  eos_token_id=16, bos_token_id=16, max_position_embeddings=512)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (toy_dir / "model" / name).is_file():
            (moe / name).write_bytes((toy_dir / "model" / name).read_bytes())
    run = tmp_path / "run"
    _train(toy_dir, run, f"model.hf_checkpoint={moe}", "parallel.expert_parallel=2", *VLLM, "train.steps=3",
           "train.eval_interval=0", nproc=2)
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["train/grad_norm"] > 0 and r["rollout/samples"] == 16 * 8 for r in rows)  # per engine: 16 prompts
    assert max(r["rollout/engine_logprob_abs_diff"] for r in rows) < 1e-4


# ----------------------------------------------------------------------------- checkpoint / resume


def _rollouts(run: Path, step: int) -> list[tuple]:
    lines = (run / "rollouts" / f"step_{step:06d}_engine0000.jsonl").read_text().splitlines()
    return [(r["doc_id"], r["position"], r["response"], r["reward"]) for r in map(json.loads, lines)]


# With the built-in engine the same exact resume is checked under SLURM (USR1), in tests/test_slurm.py.
@pytest.mark.parametrize("engine", ["vllm"])
def test_sigterm_saves_and_resume_continues_exactly(toy_dir, tmp_path, engine):
    require_vllm()
    common = ["train.eval_interval=0", "logging.save_rollouts=true", "checkpoint.save_interval=0",
              f"rollout.engine={engine}"]

    # Interrupted run: SIGTERM once two steps are logged, as SLURM does before a preemption.
    run = tmp_path / "interrupted"
    ckpt = tmp_path / "ckpt"
    args = [sys.executable, "-m", "megatron_rpt.trainer", "--config", "configs/toy_learn.yaml", "--resume", "auto"]
    for s in [f"logging.dir={run}", "logging.progress_bar=false", f"checkpoint.dir={ckpt}", *common,
              "train.steps=1000"]:
        args += ["--set", s]
    proc = subprocess.Popen(args, cwd=REPO, env=toy_env(toy_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if (run / "metrics.jsonl").exists() and len(metrics(run)) >= 2:
            break
        if proc.poll() is not None:
            pytest.fail(proc.stdout.read())
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "(signal)" in out
    saved_step = int((ckpt / "latest").read_text().strip().split("_")[1])
    assert saved_step >= 2
    assert [r["step"] for r in metrics(run)][-1] == saved_step
    final_step = saved_step + 3

    # The same run without interruption.
    straight = tmp_path / "straight"
    _train(toy_dir, straight, *common, f"train.steps={final_step}")

    # A corrupt newer checkpoint that `latest` points at must be skipped (with a log line).
    corrupt = ckpt / "iter_9999999"
    (corrupt / "dist").mkdir(parents=True)
    (corrupt / "complete.json").write_text("{}")
    (ckpt / "latest").write_text("iter_9999999\n")
    proc = _train(toy_dir, run, *common, f"train.steps={final_step}", f"checkpoint.dir={ckpt}", resume="auto")
    assert "iter_9999999 is unusable" in proc.stderr + proc.stdout
    for step in range(saved_step + 1, final_step + 1):
        assert _rollouts(run, step) == _rollouts(straight, step), f"step {step} differs after resume"
    assert [r["step"] for r in metrics(run)][-3:] == [saved_step + 1, saved_step + 2, final_step]


def test_main_job_config_on_tiny_model(shared, tmp_path):
    # The main job rolls out with vLLM (its CPU build, in-process).
    require_vllm()
    tokenizer = shared("tokenizers/qwen2_5")
    data = shared("data/omni_math_rule.jsonl")
    run = tmp_path / "run"
    args = [sys.executable, "-m", "megatron_rpt.trainer", "--config", "configs/tiny_cpu.yaml", "--resume", "auto"]
    for s in [f"logging.dir={run}", f"checkpoint.dir={tmp_path / 'ckpt'}", "logging.progress_bar=false",
              "model.hf_checkpoint=auto:tiny-qwen2", f"model.tokenizer={tokenizer}", f"data.paths=[{data}]",
              "train.steps=2", "checkpoint.save_interval=1"]:
        args += ["--set", s]
    env = toy_env(tmp_path)
    env["RPT_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["rollout/samples"] == 16 for r in rows)  # 4 prompts x 4 samples
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "iter_0000002"
    assert (tmp_path / "ckpt" / "iter_0000002" / "complete.json").is_file()
    assert "megatron-rpt: 2 steps done" in proc.stdout
    # The run records the model auto:tiny-qwen2 resolved to; tools/plot.py counts it from there.
    from megatron_rpt.model.hf_config import load_hf_config

    recorded = json.loads((run / "model.json").read_text())
    assert recorded["num_parameters"] == load_hf_config(recorded["hf_dir"]).num_parameters()
    plot = subprocess.run([sys.executable, "tools/plot.py", "--run", str(run)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert plot.returncode == 0 and (run / "plots" / "training_curves.png").is_file(), plot.stderr
    assert "no held-out accuracy" in plot.stderr  # the main job logs no val/*: no silent training-accuracy fit
    assert "1 vllm rollout engine(s) of 1 rank(s)" in proc.stderr
    # vLLM's logprobs of its samples equal Megatron's (fp32 both): the weights arrived in vLLM.
    assert max(r["rollout/engine_logprob_abs_diff"] for r in rows) < 1e-4


def test_main_job_without_vllm_says_how_to_install_it(toy_dir, tmp_path):
    from megatron_rpt.rollout.vllm_engine import MISSING_VLLM

    run, ckpt = tmp_path / "run", tmp_path / "ckpt"
    # `import vllm` fails in the trainer's process, as on a machine without it.
    code = ("import runpy, sys; sys.modules['vllm'] = None; "
            "runpy.run_module('megatron_rpt.trainer', run_name='__main__')")
    args = [sys.executable, "-c", code, "--config", "configs/toy_learn.yaml"]
    for s in [f"logging.dir={run}", f"checkpoint.dir={ckpt}", "rollout.engine=vllm"]:
        args += ["--set", s]
    proc = subprocess.run(args, cwd=REPO, env=toy_env(toy_dir), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == f"error: {MISSING_VLLM}"
    assert "Traceback" not in proc.stderr
    assert not run.exists() and not ckpt.exists()  # nothing half-written


def test_async_checkpoints_finalize_and_resume(toy_dir, tmp_path):
    run, ckpt = tmp_path / "run", tmp_path / "ckpt"
    common = ["train.eval_interval=0", f"checkpoint.dir={ckpt}", "checkpoint.async_save=true",
              "rl.mini_batches_per_step=2"]
    proc = _train(toy_dir, run, *common, "train.steps=4", "checkpoint.save_interval=2")
    assert proc.stderr.count("(async)") == 2
    assert (ckpt / "latest").read_text().strip() == "iter_0000004"
    assert sorted(p.name for p in ckpt.iterdir()) == ["iter_0000002", "iter_0000004", "latest"]
    assert all((ckpt / name / "complete.json").is_file() for name in ("iter_0000002", "iter_0000004"))
    _train(toy_dir, run, *common, "train.steps=6", "checkpoint.save_interval=0", resume="auto")
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # Two mini-batches per step (this run): the logged update metrics cover both optimizer steps.
    assert all(r["train/optimizer_steps"] == 2 and r["train/num_seqs"] == 32 * 8 for r in rows)
    assert all(r["train/grad_norm_max"] >= r["train/grad_norm"] > 0 for r in rows)


def test_dynamic_sampling_drops_and_refills(toy_dir, tmp_path):
    run = tmp_path / "run"
    _train(toy_dir, run, "train.eval_interval=0", "train.steps=6", "rl.dynamic_sampling_from_step=2",
           "rl.max_refill_rounds=3")
    rows = metrics(run)
    # Off before step 2 (0-based), on after: all-0 groups of a near-random policy are dropped and refilled.
    assert [r["dynamic/rounds"] for r in rows[:2]] == [1.0, 1.0]
    assert all(r["dynamic/dropped_groups"] == 0 for r in rows[:2])
    assert sum(r["dynamic/dropped_groups"] for r in rows[2:]) > 0
    assert all(r["dynamic/rounds"] > 1 for r in rows[2:] if r["dynamic/dropped_groups"] > 0)
    # The batch is full unless the refill rounds ran out (1 + rl.max_refill_rounds generations).
    assert all(r["dynamic/kept_groups"] == 32 or r["dynamic/rounds"] == 4 for r in rows)
    assert all(0 < r["dynamic/kept_groups"] <= 32 for r in rows)
    # Logged every step: the share of the batch filled with informative groups (1 with dynamic sampling off).
    assert [r["dynamic/fill_fraction"] for r in rows[:2]] == [1.0, 1.0]
    assert all(r["dynamic/fill_fraction"] == r["dynamic/kept_groups"] / 32 for r in rows[2:])


def test_kl_to_a_frozen_reference(toy_dir, tmp_path):
    run = tmp_path / "run"
    _train(toy_dir, run, "train.eval_interval=0", "train.steps=5", "rl.kl_coef=0.1", "rl.kl_type=k3")
    kl = [r["train/kl_to_ref"] for r in metrics(run)]
    # The reference is the initial policy: no divergence before the first update, then growing.
    assert kl[0] == pytest.approx(0.0, abs=1e-6)
    assert 0 < kl[1] < kl[-1] < 1.0, kl
