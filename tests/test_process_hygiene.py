"""Nothing outlives an interrupted or killed command, nothing half-written stays (issue 12, items 13-15).

* ``tools/convert.py`` interrupted (SIGINT to the parent only) stops its ranks and removes its
  temporary output; killed outright (SIGKILL), its ranks die with it;
* a trainer killed with SIGKILL leaves no helper process behind (Megatron's checkpoint-writer
  manager, the multiprocessing resource tracker);
* two writers of one output directory: one result, one clear error, no temporary directory;
* ranks started while other processes bind ports (two test environments side by side) find their
  rendezvous: the chosen port lies outside the kernel's ephemeral range, and a port taken anyway
  starts the ranks again on another one.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers_toy import REPO, toy_env, train_args

import megatron_rpt.distributed as distributed
from megatron_rpt.atomic import OutputExistsError, atomic_output_dir
from megatron_rpt.processes import ephemeral_port_range, free_port
from megatron_rpt.toy import prepare_toy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return prepare_toy(tmp_path_factory.mktemp("toy") / "toy")


def _wait(condition, what: str, proc: subprocess.Popen | None = None, limit: float = 240.0):
    """Poll ``condition`` until it is truthy (a generous bound, not a timing assertion)."""
    deadline = time.monotonic() + limit
    while True:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process exited ({proc.returncode}) before {what}:\n{proc.stdout.read()[-4000:]}")
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.2)


def _wait_gone(procs: list[psutil.Process], limit: float = 120.0) -> None:
    """Wait (a generous bound) until none of ``procs`` runs; fail naming the ones still running."""
    deadline = time.monotonic() + limit
    while _alive(procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(procs), f"still running: {_alive(procs)}"


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid}: {' '.join(p.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return out


def _spawned_ranks(pid: int) -> list[psutil.Process]:
    found = []
    for p in psutil.Process(pid).children():
        try:
            if "spawn_main" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def _writing(pid: int) -> list[psutil.Process]:
    """The trainer's descendants, if a forked checkpoint writer (same command line) is among them."""
    procs = _descendants(pid)
    try:
        forked = [p for p in procs if "megatron_rpt.trainer" in " ".join(p.cmdline())]
    except psutil.Error:
        return []
    return procs if forked else []


def _convert(toy: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "tools/convert.py", "hf-to-mcore", "--hf", str(toy / "model"), "--out",
                             str(out), "--tp", "2", "--no-progress"], cwd=REPO, env=toy_env(toy),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_interrupted_conversion_leaves_no_rank_and_no_output(toy, tmp_path, sig):
    out = tmp_path / "out"
    proc = _convert(toy, out)
    try:
        # Both ranks past start-up: each has built its model and made its scratch files.
        _wait(lambda: len(list(tmp_path.glob("out.scratch-*/rank*"))) == 2, "the ranks' scratch files", proc)
        children = _descendants(proc.pid)
        assert len(_spawned_ranks(proc.pid)) == 2
        proc.send_signal(sig)  # to the parent only, not to its process group
        output, _ = proc.communicate(timeout=120)
        _wait_gone(children)
        # The ranks stopped with their parent instead of finishing the checkpoint on their own.
        assert not list(tmp_path.glob("out.tmp-*/metadata.json")) and not out.exists()
        if sig == signal.SIGINT:
            assert proc.returncode == 130, output
            assert output.strip().splitlines()[-1] == ("error: interrupted; the conversion ranks were stopped and "
                                                      "nothing was written")
            assert list(tmp_path.iterdir()) == []  # no out.tmp-*, no out.scratch-*
        else:
            assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in _descendants(proc.pid):
            p.kill()


def test_killed_trainer_leaves_no_process(toy, tmp_path):
    run, ckpt = tmp_path / "run", tmp_path / "ckpt"
    args = train_args(run, ckpt, "train.steps=1000", "checkpoint.save_interval=1", "checkpoint.async_save=true",
                      resume="none")
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=toy_env(toy), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        # After a finalised save, Megatron's writer-result manager and the resource tracker exist;
        # kill while a save is being written: the forked writer and its per-bucket writers run.
        _wait(lambda: (ckpt / "latest").is_file(), "a finalised asynchronous checkpoint", proc)
        children = _wait(lambda: _writing(proc.pid), "an asynchronous checkpoint being written", proc)
        proc.kill()
        proc.wait(timeout=60)
        _wait_gone(children)
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in _descendants(proc.pid):
            p.kill()


def test_concurrent_writers_of_one_output(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputExistsError, match=r"output .*out was created by another process while this one"):
        with atomic_output_dir(out) as tmp:
            (tmp / "mine").write_text("loser")
            out.mkdir()  # the other writer finished first
            (out / "theirs").write_text("winner")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["theirs"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_output_dir(empty) as tmp:  # an existing empty directory is no result to protect
        (tmp / "mine").write_text("ok")
    assert (empty / "mine").read_text() == "ok"


def test_free_port_is_outside_the_ephemeral_range_and_bindable():
    """A port-0 bind anywhere on the machine (gloo's pair sockets, vLLM's) can never be handed it."""
    lo, hi = ephemeral_port_range()
    assert (lo, hi) == tuple(int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    for _ in range(20):
        port = free_port()
        assert not lo <= port <= hi, (port, lo, hi)
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def _sum_of_ranks() -> float:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    t = torch.tensor([dist.get_rank() + 1.0])
    dist.all_reduce(t)
    return t.item()


def test_spawn_starts_again_when_its_rendezvous_port_was_taken(monkeypatch):
    """Another process binds the chosen port before rank 0 does (the CI failure: EADDRINUSE)."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        ports = [squatter.getsockname()[1], free_port()]  # the first is taken
        monkeypatch.setattr(distributed, "free_port", lambda: ports.pop(0))
        assert distributed.spawn(_sum_of_ranks, 2, timeout=300) == [3.0, 3.0]  # 1 + 2 on both ranks
        assert ports == [], "both ports were handed out: the ranks started a second time"
