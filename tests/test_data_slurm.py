"""examples/prepare_data.sh on a real one-node SLURM cluster (tests/slurm_cluster.py): ../shared's
three math corpora as a weighted mixture scored by a 2-task job array with a tiny proxy.

* the issue's 'done when': the array is cancelled halfway (scancel), the same sbatch command is
  submitted again, and the shards and manifest equal an uninterrupted single-worker run's;
* the time limit: SIGUSR1 to one task's batch shell stops its worker, the task requeues itself
  and the requeued task finishes the job, again equal to the single-worker run.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from tests.helpers_data import (
    REPO,
    output_bytes,
    prepare_args,
    progress_records,
    reference_run,
    wait_for_shards,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
SCRIPT = "examples/prepare_data.sh"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return reference_run(tmp_path_factory)


def script_args(env) -> list[str]:
    args = prepare_args(env["config"], env["proxy"], Path("unused"))
    i = args.index("--out")
    return args[:i] + args[i + 2:]  # the script names the output directory itself


def submit(cluster, env, out: Path, logs: Path, wait: bool):
    return cluster.sbatch(SCRIPT, *script_args(env), cwd=REPO, wait=wait, timeout=600,
                          sbatch_args=("--array=0-1", "--cpus-per-task=1", f"--output={logs}/%x-%A_%a.out"),
                          env={"RPT_DATA_OUT": str(out), "RPT_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})


def tasks(cluster, job_id: int) -> dict[str, tuple[str, str]]:
    """{'<job>_<task>': (state, reason)} of the array's tasks still known to squeue."""
    for _ in range(20):
        proc = cluster.run("squeue", "-h", "-r", "-j", str(job_id), "-o", "%i %T %r", check=False)
        if proc.returncode == 0:  # a busy slurmctld can time out: ask again rather than read "no tasks"
            return {f[0]: (f[1], f[2]) for f in (line.split() for line in proc.stdout.splitlines()) if len(f) == 3}
        time.sleep(0.5)
    raise RuntimeError(f"squeue keeps failing: {proc.stderr}")


def wait_gone(cluster, job_id: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while tasks(cluster, job_id):
        assert time.monotonic() < deadline, cluster.diagnostics(job_id)
        time.sleep(0.3)


def logs_text(logs: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(logs.glob("*.out")))


def test_array_cancelled_halfway_then_resubmitted(cluster, env, tmp_path):
    out, logs = tmp_path / "out", tmp_path / "logs"
    logs.mkdir()
    job = submit(cluster, env, out, logs, wait=False)
    wait_for_shards(out, 3, lambda: not tasks(cluster, job.job_id), what=lambda: logs_text(logs))
    cluster.run("scancel", str(job.job_id))
    wait_gone(cluster, job.job_id)
    before = {r["shard"] for r in progress_records(out)}
    assert 3 <= len(before) < 8 and not (out / "manifest.json").exists(), logs_text(logs)

    again = submit(cluster, env, out, logs, wait=True)
    log = logs_text(logs)
    assert again.returncode == 0, log + cluster.diagnostics(again.job_id)
    assert output_bytes(out) == output_bytes(env["ref"]), log
    shards = [r["shard"] for r in progress_records(out)]
    assert sorted(set(shards)) == list(range(8)) and all(shards.count(k) == 1 for k in before)
    assert "[preflight] prepare_data: ok (worker 1 of 2 from SLURM array" in log
    assert "wrote 8 shard(s) and manifest.json" in log


def test_time_limit_signal_requeues_the_task_which_finishes_the_job(cluster, env, tmp_path):
    out, logs = tmp_path / "out", tmp_path / "logs"
    logs.mkdir()
    job = submit(cluster, env, out, logs, wait=False)
    # Task 0 itself mid-run (a shard of its own done: its signal handler is installed). Two shards of
    # the whole array were not enough under load: task 1 wrote both while task 0 was still importing,
    # and the signal killed it before its handler existed.
    wait_for_shards(out, 1, lambda: not tasks(cluster, job.job_id), what=lambda: logs_text(logs), worker=0)
    first = f"{job.job_id}_0"
    # What --signal=B:USR1@120 does before the time limit: signal the batch shell of the task.
    cluster.run("scancel", "--signal=USR1", "--batch", first)
    _, released = cluster.wait_requeued_job(first)
    wait_gone(cluster, job.job_id)
    log = logs_text(logs)
    assert released and "stopped for the time limit" in log and "requeueing task" in log, log
    assert "interrupted (SIGUSR1)" in log, log
    assert output_bytes(out) == output_bytes(env["ref"]), log
    assert len({r["shard"] for r in progress_records(out)}) == 8
