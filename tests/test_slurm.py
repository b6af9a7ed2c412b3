"""The SLURM launch path, tested on a real scheduler.

Checks that the examples/*.sh recipes agree with their configs and are shellcheck-clean,
that examples/lib/launch.sh hands the trainer the right arguments and environment and forwards
SIGUSR1 (with a stand-in trainer, no scheduler), and, on a REAL one-node SLURM cluster started by
the test (tests/slurm_cluster.py: munged + slurmctld + slurmd in a temp dir), that the real
trainer launched by examples/rpt_tiny_cpu.sh through sbatch -> srun -> torchrun, signalled with
USR1 mid-run as at the time limit, saves, requeues itself and resumes into exactly the
uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from slurm_cluster import SlurmCluster, node_hardware  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GPU_RECIPES = {
    "rpt_14b.sh": "configs/rpt_14b.yaml",
    "rpt_32b.sh": "configs/rpt_32b.yaml",
    "rpt_72b.sh": "configs/rpt_72b.yaml",
    "rpt_moe_30b_a3b.sh": "configs/rpt_moe_30b_a3b.yaml",
    "rpt_qwen3_235b_a22b.sh": "configs/rpt_qwen3_235b_a22b.yaml",
}
LAUNCH_LIB = REPO / "examples" / "lib" / "launch.sh"

# Stand-in for megatron_rpt.trainer, to test the launcher alone: records its argv and
# environment; with STUB_WAIT_FOR_SIGNAL=1 on the first run it waits for a signal, then
# "checkpoints" (writes a file) and exits 0 the way the trainer does after saving.
STUB_TRAINER = r'''
import argparse, json, os, signal, sys, time
from pathlib import Path

p = argparse.ArgumentParser()
p.add_argument("--config", required=True)
p.add_argument("--resume")
p.add_argument("--set", action="append", default=[])
args = p.parse_args()
sets = dict(s.split("=", 1) for s in args.set)
run_dir, ckpt = Path(sets["logging.dir"]), Path(sets["checkpoint.dir"])
restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append("USR1"))
signal.signal(signal.SIGTERM, lambda *_: got.append("TERM"))
record = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_JOB_ID", "SLURM_RESTART_COUNT",
                                         "CUDA_DEVICE_MAX_CONNECTIONS", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
                                         "CUDA_VISIBLE_DEVICES")}
record.update(argv=sys.argv[1:], resume_found=sorted(os.listdir(ckpt)) if ckpt.is_dir() else [])
if os.environ.get("STUB_WAIT_FOR_SIGNAL") == "1" and restart == 0:
    (run_dir / "stub-waiting").write_text("1")
    deadline = time.time() + 120
    while not got and time.time() < deadline:
        time.sleep(0.05)
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "iter_0000005").write_text("saved on " + ",".join(sorted(set(got))))
record["signals"] = sorted(set(got))
(run_dir / f"stub-run{restart}.json").write_text(json.dumps(record))
'''


def sbatch_directives(script: Path) -> dict[str, str]:
    """``#SBATCH --key=value`` lines of a script ({'nodes': '4', 'requeue': '', ...})."""
    out = {}
    for line in script.read_text().splitlines():
        m = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
        if m:
            out[m.group(1)] = m.group(2) or ""
    return out


def stub_env(tmp: Path, **extra: str) -> dict[str, str]:
    (tmp / "rpt_stub_trainer.py").write_text(STUB_TRAINER)
    # The stub replaces the trainer, so the preflight of the trainer's needs is off (tested below).
    env = {"PYTHONPATH": str(tmp), "RPT_TRAIN_MODULE": "rpt_stub_trainer", "RPT_CONFIG": "configs/rpt_14b.yaml",
           "RPT_RUN_DIR": str(tmp / "run"), "RPT_PREFLIGHT": "0"}
    env.update(extra)
    return env


# ----------------------------------------------------------------------------- scripts


def test_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install -y shellcheck)")
    scripts = sorted(str(p.relative_to(REPO)) for p in (REPO / "examples").glob("*.sh")) + [
        str(LAUNCH_LIB.relative_to(REPO))]
    proc = subprocess.run(["shellcheck", "-x", *scripts], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script,config", sorted(GPU_RECIPES.items()))
def test_gpu_recipe_matches_its_config(script, config, monkeypatch):
    from megatron_rpt.config import load_config

    monkeypatch.chdir(REPO)  # recipes name configs/hf/*.json relative to the repository
    path = REPO / "examples" / script
    d = sbatch_directives(path)
    assert d["ntasks-per-node"] == "1" and d["gpus-per-node"] == "8"
    assert d["output"] == "logs/%x-%j.out" and "requeue" in d and d.get("open-mode") == "append"
    lead = int(re.fullmatch(r"B:USR1@(\d+)", d["signal"]).group(1))
    text = path.read_text()
    grace = int(re.search(r"RPT_SAVE_GRACE_S:-(\d+)", text).group(1))
    # SLURM sends the signal up to a minute early or late: the lead must cover the grace and that.
    assert lead >= grace + 60, f"the USR1 lead time ({lead} s) must exceed the save grace ({grace} s) by 60 s"
    assert f"RPT_CONFIG:-{config}" in text and "rpt_launch" in text and "examples/lib/launch.sh" in text
    cfg = load_config(REPO / config, validate_paths=False)
    assert cfg.parallel.world_size == int(d["nodes"]) * int(d["gpus-per-node"]), (
        f"{script} asks for {d['nodes']} x 8 GPUs but {config} has world_size {cfg.parallel.world_size}")
    _assert_grace_covers_a_step(script, cfg, grace)


def _assert_grace_covers_a_step(script: str, cfg, grace: int) -> None:
    """The trainer stops between RL steps: after the signal it finishes the step and saves.

    Two lower bounds on a step, from the planner's model on H100s (megatron_rpt/memory_plan/): its
    estimate, doubled (it is a simple throughput model); and the longest response decoded one
    token at a time at 50 ms per token (decoding a 72B model at TP8) plus its training time.
    """
    from megatron_rpt.memory_plan import Hardware, plan_config

    planned = plan_config(cfg, Hardware(gpus=cfg.parallel.world_size)).configured.time
    latency_bound = cfg.rollout.max_response_tokens * 0.050 + planned.train_s
    need = max(2 * planned.total_s, latency_bound)
    assert grace >= need, (f"{script}: RPT_SAVE_GRACE_S={grace} s is shorter than one RL step plus its save "
                           f"(planner {planned.total_s:.0f} s x 2, decode bound {latency_bound:.0f} s)")


def test_tiny_cpu_script_shape():
    d = sbatch_directives(REPO / "examples" / "rpt_tiny_cpu.sh")
    assert d["nodes"] == "1" and d["ntasks-per-node"] == "1" and "gpus-per-node" not in d
    text = (REPO / "examples" / "rpt_tiny_cpu.sh").read_text()
    assert "NPROC_PER_NODE=1" in text and "configs/tiny_cpu.yaml" in text and 'CUDA_VISIBLE_DEVICES=""' in text


def test_launcher_without_slurm_passes_args_and_env(tmp_path):
    """Outside SLURM the script runs one local node: same trainer command line and environment."""
    env = dict(os.environ, **stub_env(tmp_path, RPT_EXTRA_ARGS="--set train.steps=2 --set rl.kl_coef=0.0"))
    for k in [k for k in env if k.startswith("SLURM_")]:
        del env[k]
    proc = subprocess.run(["bash", "examples/rpt_tiny_cpu.sh", "--set", "train.seed=7"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rec = json.loads((tmp_path / "run" / "stub-run0.json").read_text())
    run = tmp_path / "run"
    assert rec["argv"] == ["--config", "configs/rpt_14b.yaml", "--resume", "auto",
                           "--set", f"checkpoint.dir={run}/checkpoints", "--set", f"logging.dir={run}",
                           "--set", "train.steps=2", "--set", "rl.kl_coef=0.0", "--set", "train.seed=7"]
    assert (rec["RANK"], rec["WORLD_SIZE"], rec["LOCAL_RANK"]) == ("0", "1", "0")
    assert rec["CUDA_DEVICE_MAX_CONNECTIONS"] == "1" and rec["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert rec["CUDA_VISIBLE_DEVICES"] == ""
    assert "trainer finished with exit code 0" in proc.stdout


@pytest.mark.parametrize("path", ["torchrun-forwards", "launcher-relays"])
def test_launcher_forwards_usr1_to_the_trainer(tmp_path, path):
    """SIGUSR1 to the batch shell reaches the rank (torch >= 2.8 torchrun forwards it; for
    older torch the launcher relays it and keeps torchrun from dying on it)."""
    env = dict(os.environ, **stub_env(tmp_path, STUB_WAIT_FOR_SIGNAL="1"))
    for k in [k for k in env if k.startswith("SLURM_")]:
        del env[k]
    if path == "launcher-relays":
        env["RPT_PYTHON"] = "false"  # the torch probe fails: take the older-torch branch
    proc = subprocess.Popen(["bash", "examples/rpt_tiny_cpu.sh"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while not (tmp_path / "run" / "stub-waiting").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    rec = json.loads((tmp_path / "run" / "stub-run0.json").read_text())
    assert rec["signals"] == ["USR1"], out
    assert (tmp_path / "run" / "checkpoints" / "iter_0000005").read_text() == "saved on USR1"
    assert "got SIGUSR1" in out and "not requeueing" in out  # no SLURM job to requeue
    # torchrun logs "Received 10 death signal" only when it handles the signal itself
    assert ("death signal" in out) == (path == "torchrun-forwards"), out


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("RPT_RUN_DIR", "RPT_RUNS_ROOT", "SCRATCH", "RPT_RDZV_PORT")}
    env.update(extra)
    return env


def test_checkpoints_never_default_into_the_repository(tmp_path):
    """A GPU recipe without RPT_RUN_DIR / RPT_RUNS_ROOT / SCRATCH stops before anything runs."""
    env = _clean_env(**stub_env(tmp_path), NPROC_PER_NODE="1")
    del env["RPT_RUN_DIR"]
    before = sorted((REPO / "runs").glob("*")) if (REPO / "runs").is_dir() else []
    proc = subprocess.run(["bash", "examples/rpt_14b.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "set RPT_RUN_DIR (this run) or RPT_RUNS_ROOT or SCRATCH" in proc.stderr
    assert (sorted((REPO / "runs").glob("*")) if (REPO / "runs").is_dir() else []) == before
    # $SCRATCH is the default parent when set.
    env["SCRATCH"] = str(tmp_path / "scratch")
    proc = subprocess.run(["bash", "examples/rpt_14b.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (record,) = (tmp_path / "scratch" / "megatron-rpt").glob("rpt_14b-local-*/stub-run0.json")
    assert f"logging.dir={record.parent}" in json.loads(record.read_text())["argv"]


def _local_port_range() -> tuple[int, int]:
    path = Path("/proc/sys/net/ipv4/ip_local_port_range")
    lo, hi = (int(x) for x in path.read_text().split()) if path.is_file() else (32768, 60999)
    return lo, hi


def test_rendezvous_port_stays_out_of_the_ephemeral_range(tmp_path):
    lo, hi = _local_port_range()
    env = _clean_env(**stub_env(tmp_path))
    proc = subprocess.run(["bash", "examples/rpt_tiny_cpu.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    port = int(re.search(r"rendezvous 127\.0\.0\.1:(\d+)", proc.stdout).group(1))
    assert 20000 <= port < 30000 and not lo <= port <= hi, port
    env["RPT_RDZV_PORT"] = str((lo + hi) // 2)
    proc = subprocess.run(["bash", "examples/rpt_tiny_cpu.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and f"inside this node's ephemeral port range {lo}-{hi}" in proc.stderr, proc.stderr


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="needs torchrun on PATH")
def test_preflight_runs_before_the_trainer(tmp_path):
    """The real preflight with the trainer's arguments: a config whose Transformer Engine does not
    import here stops the job before torchrun starts; the same config with the local spec runs."""
    from megatron_rpt.toy import prepare_toy

    toy = prepare_toy(tmp_path / "toy")
    env = _clean_env(**{**stub_env(tmp_path), "RPT_PREFLIGHT": "1", "RPT_CONFIG": "configs/toy_learn.yaml",
                        "RPT_TOY_DIR": str(toy), "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"})
    proc = subprocess.run(["bash", "examples/rpt_tiny_cpu.sh", "--set", "model.transformer_impl=transformer_engine"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "model.transformer_impl=transformer_engine but `import transformer_engine.pytorch` fails" in proc.stderr
    assert "the preflight failed" in proc.stderr
    assert not (tmp_path / "run" / "stub-run0.json").exists()  # the trainer never started
    proc = subprocess.run(["bash", "examples/rpt_tiny_cpu.sh", "--set", "model.transformer_impl=local"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[preflight]" in proc.stdout and ": ok (0 GPU(s) expected" in proc.stdout
    assert (tmp_path / "run" / "stub-run0.json").exists()


def test_launcher_refuses_missing_config(tmp_path):
    env = dict(os.environ, RPT_CONFIG="configs/does_not_exist.yaml", RPT_RUN_DIR=str(tmp_path / "run"))
    env.pop("SLURM_JOB_ID", None)
    proc = subprocess.run(["bash", "examples/rpt_tiny_cpu.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "configs/does_not_exist.yaml not found" in proc.stderr


# ----------------------------------------------------------------------------- real SLURM


def _job_args(cluster: SlurmCluster, out_dir: Path) -> tuple[str, ...]:
    cpus = min(2, node_hardware()["CPUs"])
    return (f"--output={out_dir}/%x-%j.out", f"--cpus-per-task={cpus}")


def _rollout_rows(run: Path) -> dict[str, list[tuple]]:
    """Every saved rollout file of a run (logging.save_rollouts): what each step generated and its rewards."""
    out = {}
    for path in sorted((run / "rollouts").glob("step_*.jsonl")):
        rows = map(json.loads, path.read_text().splitlines())
        out[path.name] = [(r["doc_id"], r["position"], r["target"], r["response"], r["reward"], r["kept"])
                          for r in rows]
    return out


@pytest.mark.slurm
@pytest.mark.slow
def test_sbatch_real_trainer_usr1_requeue_resumes_exactly(cluster, tmp_path):
    """The REAL trainer (toy config) under sbatch: USR1 mid-run -> it saves at its step, the job requeues
    itself, the requeued run resumes from that checkpoint and finishes, and every step's rollouts and
    rewards equal an uninterrupted run's (the data stream and sampling seeds resume exactly)."""
    from helpers_toy import metrics, train

    from megatron_rpt.toy import prepare_toy

    steps = 20
    toy = prepare_toy(tmp_path / "toy")
    sets = ["logging.progress_bar=false", "logging.tensorboard=false", "logging.save_rollouts=true",
            "train.eval_interval=0", "checkpoint.save_interval=0", "rollout.engine=builtin", f"train.steps={steps}"]
    run = tmp_path / "run"
    env = {"PYTHONPATH": str(REPO), "RPT_TOY_DIR": str(toy), "OMP_NUM_THREADS": "1", "RPT_RUN_DIR": str(run),
           "RPT_CONFIG": "configs/toy_learn.yaml", "RPT_MAX_REQUEUES": "1",
           "RPT_EXTRA_ARGS": " ".join(f"--set {s}" for s in sets)}
    job = cluster.sbatch("examples/rpt_tiny_cpu.sh", sbatch_args=_job_args(cluster, tmp_path), env=env, wait=False,
                         cwd=REPO)
    deadline = time.monotonic() + 300
    while not ((run / "metrics.jsonl").exists() and len(metrics(run)) >= 2):
        assert time.monotonic() < deadline, cluster.diagnostics(job.job_id)
        assert cluster.job_info(job.job_id).get("JobState") in ("PENDING", "RUNNING"), cluster.diagnostics(job.job_id)
        time.sleep(0.2)
    signalled_after = len(metrics(run))
    cluster.run("scancel", "--signal=USR1", "--batch", str(job.job_id))
    info, _ = cluster.wait_requeued_job(job.job_id)
    log = next(tmp_path.glob("rpt-tiny-cpu-*.out")).read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-6000:] + cluster.diagnostics(job.job_id)
    assert "received SIGUSR1: will save a checkpoint" in log, f"the trainer never got SIGUSR1:\n{log[-6000:]}"
    assert info["Restarts"] == "1" and "requeueing job" in log, f"the job did not requeue itself:\n{log[-6000:]}"
    assert "trainer finished with exit code 0" in log, f"the requeued run did not end cleanly:\n{log[-6000:]}"
    resumed = re.findall(r"resumed from (\S+) \(step (\d+),", log)
    assert len(resumed) == 1, f"expected one 'resumed from' line (the requeued run), got {resumed}:\n{log[-6000:]}"
    saved_step = int(resumed[0][1])
    assert Path(resumed[0][0]) == run / "checkpoints" / f"iter_{saved_step:07d}", resumed
    assert signalled_after <= saved_step < steps, (
        f"the signal came after step {signalled_after} but the run saved and resumed at step {saved_step} of {steps}")
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), "each step must be trained exactly once"

    # The same config without interruption, no SLURM: one process.
    straight = tmp_path / "straight"
    train(toy, straight, None, *sets, resume="none")
    assert [r["reward/mean"] for r in rows] == [r["reward/mean"] for r in metrics(straight)], (
        "per-step mean rewards differ from the uninterrupted run")
    got, want = _rollout_rows(run), _rollout_rows(straight)
    assert sorted(want) == [f"step_{s:06d}_engine0000.jsonl" for s in range(1, steps + 1)], sorted(want)
    for name in sorted(want):
        assert got.get(name) == want[name], f"{name}: the requeued run's rollouts differ from the uninterrupted run's"
