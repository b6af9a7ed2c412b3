"""A real one-node SLURM cluster (munged + slurmctld + slurmd) in a temporary directory.

Owns: writing ``slurm.conf`` for this machine (CPUs / memory from ``slurmd -C``), a private
munge key and socket, starting the three daemons in the foreground as child processes,
waiting until the node is idle, thin wrappers around the client commands (``sbatch``,
``squeue``, ``scontrol``, ``scancel``) and a teardown that cancels jobs and stops every
daemon it started, even when the test failed.

Needs root and the Debian packages ``slurm-wlm`` and ``munge``: slurmd must be root to
launch jobs, munged runs as the ``munge`` user. :func:`missing_requirements` says why a
cluster cannot be started here (tests skip with that reason).

Usage::

    with SlurmCluster(tmp_dir) as cluster:
        job = cluster.sbatch("examples/rpt_tiny_cpu.sh", "--set", "train.steps=2", cwd=repo)
        assert job.returncode == 0, cluster.diagnostics(job.job_id)
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_rpt.processes import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "sinfo", "squeue", "scontrol", "scancel")


def _find(name: str) -> str | None:
    # Daemons live in /usr/sbin, which is not on every user's PATH.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")


def missing_requirements() -> str | None:
    """Why a local SLURM cluster cannot run on this machine, or None when it can."""
    missing = [n for n in DAEMONS + CLIENTS if _find(n) is None]
    if missing:
        return (f"needs SLURM and munge ({', '.join(missing)} not found); install them with "
                "`apt-get install -y slurm-wlm munge`")
    if os.geteuid() != 0:
        return "needs root: slurmd must run as root to launch jobs (and munged as the munge user)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "there is no 'munge' user to run munged as; reinstall the munge package"
    return None


def node_hardware() -> dict[str, int]:
    """CPUs, sockets, cores, threads and RealMemory (MiB) as ``slurmd -C`` reports them."""
    out = subprocess.run([_find("slurmd"), "-C"], capture_output=True, text=True, timeout=30).stdout
    fields = dict(re.findall(r"(\w+)=(\S+)", out.splitlines()[0] if out else ""))
    hw = {}
    for key in ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory"):
        if key in fields:
            hw[key] = int(fields[key])
    if "CPUs" not in hw:
        hw = {"CPUs": os.cpu_count() or 1}
    return hw


FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


@dataclass
class JobResult:
    job_id: int
    returncode: int
    stdout: str
    stderr: str


class SlurmCluster:
    """One controller + one compute node named ``localhost`` with this machine's CPUs."""

    def __init__(self, root: str | Path | None = None, cluster_name: str = "rpttest", partition: str = "debug"):
        # munged refuses keys/sockets in directories other users can write, and the munge
        # user must be able to reach them: a fresh 0755 directory directly under /tmp works
        # where pytest's 0700 tmp_path would not.
        self._own_root = root is None
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="rpt-slurm-"))
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        self.cluster_name = cluster_name
        self.partition = partition
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        for k in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if k != "SLURM_CONF":  # a surrounding SLURM job must not leak into ours
                del self.env[k]
        self._procs: dict[str, subprocess.Popen] = {}
        self._logs: dict[str, Path] = {}

    # ------------------------------------------------------------------ set-up

    def _write_munge_key(self, munge_user: str) -> Path:
        mdir = self.root / "munge"
        mdir.mkdir(exist_ok=True)
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        pw = pwd.getpwnam(munge_user)
        for p in (mdir, key):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        os.chmod(mdir, 0o755)  # the socket lives here: clients need execute permission
        os.chmod(key, 0o400)
        return key

    def _write_conf(self) -> None:
        hw = node_hardware()
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(exist_ok=True)
        node = " ".join(f"{k}={v}" for k, v in hw.items())
        self.ctld_port, self.slurmd_port = free_port(), free_port()
        r = self.root
        self.conf.write_text("\n".join([
            f"ClusterName={self.cluster_name}",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # Containers have no usable cgroup hierarchy: track processes by parent pid.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "ReturnToService=2",
            # Keep finished jobs visible to `scontrol show job` and tear down quickly.
            "MinJobAge=600",
            "KillWait=10",
            "InactiveLimit=0",
            "SchedulerType=sched/builtin",
            f"NodeName=localhost NodeAddr=127.0.0.1 {node} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def _spawn(self, name: str, cmd: list[str], user: str | None = None) -> None:
        log = self.root / "log" / f"{name}.stdout"
        self._logs[name] = log
        kwargs = {}
        if user is not None:
            pw = pwd.getpwnam(user)
            kwargs = dict(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
        with open(log, "ab") as fh:
            self._procs[name] = subprocess.Popen(
                cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                cwd=self.root, start_new_session=True, **kwargs,
            )

    def _check_alive(self) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode}:\n{self.logs(name)}")

    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        reason = missing_requirements()
        if reason:
            raise RuntimeError(reason)
        key = self._write_munge_key("munge")
        self._write_conf()
        (self.root / "log").mkdir(exist_ok=True)
        self._spawn("munged", [
            _find("munged"), "--foreground", f"--key-file={key}", f"--socket={self.munge_socket}",
            f"--pid-file={self.root / 'munge' / 'munged.pid'}", f"--log-file={self.root / 'munge' / 'munged.log'}",
            f"--seed-file={self.root / 'munge' / 'munged.seed'}", "--num-threads=2",
        ], user="munge")
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged to create its socket")
        self._spawn("slurmctld", [_find("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self.run("sinfo", "-h", check=False).returncode == 0, timeout, "slurmctld to answer")
        self._spawn("slurmd", [_find("slurmd"), "-D", "-f", str(self.conf), "-N", "localhost"])
        self._wait(lambda: self.node_state().startswith("idle"), timeout, "node localhost to become idle")
        return self

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if ready():
                return
            time.sleep(0.2)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.diagnostics()}")

    # ------------------------------------------------------------------ clients

    def run(self, *cmd: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster."""
        proc = subprocess.run([_find(cmd[0]) or cmd[0], *cmd[1:]], capture_output=True, text=True,
                              env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def node_state(self) -> str:
        proc = self.run("sinfo", "-h", "-N", "-n", "localhost", "-o", "%T", check=False)
        return proc.stdout.strip().lower() if proc.returncode == 0 else ""

    def sbatch(self, script: str | Path, *script_args: str, sbatch_args: tuple[str, ...] = (),
               env: dict[str, str] | None = None, wait: bool = True, timeout: float = 600.0,
               cwd: str | Path | None = None) -> JobResult:
        """Submit ``script``; with ``wait`` block until it ends (sbatch --wait returns its exit code)."""
        job_env = dict(self.env, **(env or {}))
        cmd = [_find("sbatch"), "--parsable", *(["--wait"] if wait else []), *sbatch_args, str(script), *script_args]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=job_env,
                                cwd=cwd)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            ids = re.findall(r"^(\d+)", out, re.M)
            if ids:
                self.run("scancel", ids[0], check=False)
            job_id = int(ids[0]) if ids else None
            raise TimeoutError(f"job did not finish in {timeout:.0f}s\n{self.diagnostics(job_id)}")
        ids = re.findall(r"^(\d+)", out, re.M)
        if not ids:
            raise RuntimeError(f"sbatch did not submit (exit {proc.returncode}): {err.strip()}")
        return JobResult(int(ids[0]), proc.returncode, out, err)

    def job_info(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, StdOut, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id), check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def start_now(self, job_id: int) -> None:
        """Let a requeued job start at once: slurmctld holds requeued jobs ~2 minutes (BeginTime)."""
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    def wait_job(self, job_id: int, timeout: float = 300.0, states: tuple[str, ...] = FINAL_STATES) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout:.0f}s\n{self.diagnostics(job_id)}")

    def wait_requeued_job(self, job_id: int | str, timeout: float = 300.0) -> tuple[dict[str, str], bool]:
        """Until a job (or an array task, ``"<job>_<task>"``) that requeues itself has ended; its requeued
        instance is started at once. Returns the job's final ``scontrol`` info and whether a requeued
        instance was started.

        slurmctld holds a requeued job for about two minutes (``Reason=BeginTime``), hence
        :meth:`start_now`; slurmd refuses to launch a job whose previous instance it is still cleaning up
        ("Job N already killed, do not launch batch job"), hence the pause before it.
        """
        deadline, released = time.monotonic() + timeout, False
        while True:
            info = self.job_info(job_id)
            if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime" and not released:
                time.sleep(3)
                self.start_now(job_id)
                released = True
            if info.get("JobState") in FINAL_STATES:
                return info, released
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} did not end within {timeout:.0f}s\n{self.diagnostics(job_id)}")
            time.sleep(0.3)

    # ------------------------------------------------------------------ diagnostics & teardown

    def logs(self, name: str, tail: int = 40) -> str:
        paths = [self._logs.get(name), self.root / "log" / f"{name}.log", self.root / "munge" / f"{name}.log"]
        chunks = []
        for p in paths:
            if p and p.exists():
                lines = p.read_text(errors="replace").splitlines()[-tail:]
                chunks.append(f"--- {p}\n" + "\n".join(lines))
        return "\n".join(chunks)

    def diagnostics(self, job_id: int | None = None) -> str:
        parts = [self.logs(n) for n in DAEMONS]
        if job_id is not None:
            parts.append(f"--- scontrol show job {job_id}\n{self.job_info(job_id)}")
        return "\n".join(p for p in parts if p)

    def stop(self) -> None:
        """Cancel every job, then stop slurmd, slurmctld and munged (the processes this object started)."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--user", "root", check=False, timeout=10)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                out = self.run("squeue", "-h", "-o", "%i", check=False, timeout=10)
                if out.returncode != 0 or not out.stdout.strip():
                    break
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "SlurmCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
