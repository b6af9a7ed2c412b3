"""No run lost, no corrupt or foreign state loaded (issue 12, items 1-6, 8, 11, 12).

Fault injection on the toy run (real megatron-core on CPU): damaged shards, every checkpoint
damaged, ``--resume none`` over an older run, another run's checkpoints, a changed learning
rate, a second trainer on a locked directory, another parallel layout, a diverging run.
The decision rules are also called directly (no trainer) where that is enough.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers_toy import REPO, error_line, listing, metrics, toy_env, train

from megatron_rpt.config import ConfigError, load_config
from megatron_rpt.toy import prepare_toy
from megatron_rpt.trainer.checkpointing import prune
from megatron_rpt.trainer.ckpt_manifest import verify_manifest
from megatron_rpt.trainer.metrics import drop_rows_after
from megatron_rpt.trainer.resume import plan_resume
from megatron_rpt.trainer.run_lock import DirLock
from megatron_rpt.weights.hf_io import CheckpointError

pytestmark = pytest.mark.slow
BASE_SETS = ("train.steps=4", "checkpoint.save_interval=2", "checkpoint.keep_last=3")


@dataclass
class Base:
    toy: Path
    run: Path
    ckpt: Path

    def copy(self, dest: Path) -> "Base":
        shutil.copytree(self.run, dest / "run")
        shutil.copytree(self.ckpt, dest / "ckpt")
        return Base(self.toy, dest / "run", dest / "ckpt")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    """One 4-step toy run with checkpoints at steps 2 and 4 (learning rate 3e-3)."""
    root = tmp_path_factory.mktemp("base")
    toy = prepare_toy(root / "toy")
    train(toy, root / "run", root / "ckpt", *BASE_SETS, resume="none")
    return Base(toy, root / "run", root / "ckpt")


def _cfg(b: Base, *sets: str):
    import os

    os.environ["RPT_TOY_DIR"] = str(b.toy)
    return load_config(REPO / "configs/toy_learn.yaml", [f"logging.dir={b.run}", "logging.progress_bar=false",
                                                         "logging.tensorboard=false", "train.eval_interval=0",
                                                         f"checkpoint.dir={b.ckpt}", *BASE_SETS, *sets])


def _shard(iter_dir: Path) -> Path:
    return max((iter_dir / "dist").glob("*.distcp"), key=lambda p: p.stat().st_size)


def _flip(path: Path, count: int = 400) -> None:
    data = bytearray(path.read_bytes())
    start = len(data) // 2
    for i in range(start, start + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- verification, no trainer


def test_every_damaged_file_fails_verification(base, tmp_path):
    src = base.ckpt / "iter_0000004"
    meta = json.loads((src / "complete.json").read_text())
    # The manifest is sha256 and size of every file, as hashlib computes them here.
    expected = {p.relative_to(src).as_posix(): [p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()]
                for p in src.rglob("*") if p.is_file() and p.name != "complete.json"}
    assert meta["files"] == expected
    # megatron-core 0.16 writes dist/common.pt; 0.19 keeps the common state in .metadata (no common.pt).
    assert {"dist/.metadata", "dist/metadata.json", "trainer/rank_00000.pt"} <= set(expected)
    assert meta["layout"] == {"tensor_parallel": 1, "pipeline_parallel": 1, "virtual_pipeline": None,
                              "context_parallel": 1, "expert_parallel": 1, "data_parallel": 1, "world_size": 1,
                              "rollout_engines": 1, "expert_tensor_parallel": 1, "first_stage_layers": None,
                              "last_stage_layers": None}
    assert verify_manifest(src, meta["files"]) is None
    shard = _shard(src).relative_to(src).as_posix()
    damages = {
        "flipped": (lambda d: _flip(d / shard), f"{shard} does not match its checksum"),
        "truncated": (lambda d: (d / shard).write_bytes((d / shard).read_bytes()[:100]), f"{shard} has 100 bytes"),
        "empty-metadata": (lambda d: (d / "dist/.metadata").write_bytes(b""), "dist/.metadata has 0 bytes"),
        "missing-metadata": (lambda d: (d / "dist/.metadata").unlink(), "dist/.metadata is missing"),
        "rank-file": (lambda d: _flip(d / "trainer/rank_00000.pt", 8), "trainer/rank_00000.pt does not match"),
    }
    for name, (damage, message) in damages.items():
        copy = tmp_path / name
        shutil.copytree(src, copy)
        damage(copy)
        reason = verify_manifest(copy, meta["files"])
        assert reason is not None and message in reason, (name, reason)


def test_resume_rules(base, tmp_path, caplog):
    b = base.copy(tmp_path)
    cfg = _cfg(b)
    plan = plan_resume(cfg, "auto", world_size=1)
    assert plan.checkpoint == b.ckpt / "iter_0000004" and plan.set_aside == []
    assert plan.run_id == json.loads((b.ckpt / "iter_0000004/complete.json").read_text())["run_id"]
    # --resume none over existing checkpoints (item 1): refused, not pruned away.
    with pytest.raises(ConfigError, match=r"--resume none: checkpoint\.dir='.*ckpt' already holds checkpoints "
                                          r"\(up to iter_0000004\)"):
        plan_resume(cfg, "none", world_size=1)
    # Another run's checkpoint directory (item 4): refused unless forced.
    with pytest.raises(ConfigError, match=r"belongs to run .*: train\.seed=1234 there, 7 here.*--force-resume"):
        plan_resume(_cfg(b, "train.seed=7"), "auto", world_size=1)
    assert plan_resume(_cfg(b, "train.seed=7"), "auto", world_size=1, force=True).checkpoint == plan.checkpoint
    # Another layout (item 11): what cannot be resharded, and how to carry the weights over.
    with pytest.raises(CheckpointError, match=r"written at TP=1 PP=1 VP=None CP=1 EP=1 DP=1 with 1 rollout "
                                              r"engines \(1 ranks\); this run is TP=2 PP=1 VP=None CP=1 EP=1 DP=1 "
                                              r"with 2 rollout engines \(2 ranks\).*optimizer state .*"
                                              r"--set model\.load=.*iter_0000004/dist"):
        plan_resume(_cfg(b, "parallel.tensor_parallel=2"), "auto", world_size=2)
    with pytest.raises(CheckpointError, match=r"DP=1 with 1 rollout engines \(1 ranks\); this run is .* DP=2 "
                                              r"with 2 rollout engines \(2 ranks\)"):
        plan_resume(cfg, "auto", world_size=2)
    # The stage split and expert TP are part of the layout; a checkpoint written before they were recorded
    # has megatron-core's defaults (even split, expert TP = TP) and still resumes.
    done = b.ckpt / "iter_0000004" / "complete.json"
    written = done.read_text()
    meta = json.loads(written)
    for key in ("expert_tensor_parallel", "first_stage_layers", "last_stage_layers"):
        meta["layout"].pop(key)
    done.write_text(json.dumps(meta))
    assert plan_resume(cfg, "auto", world_size=1).checkpoint == b.ckpt / "iter_0000004"
    for key, value, shown in (("expert_tensor_parallel", 2, "TP=1 PP=1 ETP=2 VP=None"),
                              ("first_stage_layers", 3, "TP=1 PP=1 first_stage_layers=3 VP=None")):
        done.write_text(json.dumps({**meta, "layout": {**meta["layout"], key: value}}))
        with pytest.raises(CheckpointError, match=rf"written at {shown} CP=1 EP=1 DP=1 .*; this run is TP=1 PP=1 "
                                                  r"VP=None"):
            plan_resume(cfg, "auto", world_size=1)
    done.write_text(written)
    # Rewinding inside checkpoint.dir sets the newer checkpoint aside (after the load).
    rewind = plan_resume(cfg, str(b.ckpt / "iter_0000002"), world_size=1)
    assert rewind.checkpoint == b.ckpt / "iter_0000002"
    assert rewind.set_aside == [(b.ckpt / "iter_0000004", "superseded")]
    # The newest one damaged (item 3): the previous one, the damaged one to be set aside.
    _flip(_shard(b.ckpt / "iter_0000004"))
    fallback = plan_resume(cfg, "auto", world_size=1)
    assert fallback.checkpoint == b.ckpt / "iter_0000002"
    assert fallback.set_aside == [(b.ckpt / "iter_0000004", "rejected")]
    assert "iter_0000004 is unusable (dist/__" in caplog.text and "falling back to the previous one" in caplog.text
    # Named explicitly, a damaged checkpoint is not silently replaced by another one.
    with pytest.raises(CheckpointError, match=r"no usable checkpoint .*iter_0000004: dist/__.* checksum"):
        plan_resume(cfg, str(b.ckpt / "iter_0000004"), world_size=1)
    # Every candidate damaged (item 2): refuse to start.
    (b.ckpt / "iter_0000002" / "dist" / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"no usable checkpoint in .*ckpt \(iter_0000004: .*; iter_0000002: "
                                              r"dist/\.metadata is missing\); the run does not start"):
        plan_resume(cfg, "auto", world_size=1)


def test_resume_paths(base, tmp_path):
    b = base.copy(tmp_path)
    with pytest.raises(ConfigError, match=r"--resume /nonexistent/ckpt: no such directory"):
        plan_resume(_cfg(b), "/nonexistent/ckpt", world_size=1)
    # From another directory into one that has checkpoints of its own: two runs would mix.
    other = tmp_path / "other"
    shutil.copytree(b.ckpt, other)
    with pytest.raises(ConfigError, match=r"already holds checkpoints of its own \(up to iter_0000004\)"):
        plan_resume(_cfg(b), str(other), world_size=1)
    # checkpoint.dir null: the named checkpoint still loads (item 6).
    plan = plan_resume(_cfg(b, "checkpoint.dir=null"), str(other / "iter_0000002"), world_size=1)
    assert plan.checkpoint == other / "iter_0000002" and plan.set_aside == []


def test_pruning_keeps_the_new_checkpoint(tmp_path):
    for step in (2, 4, 6, 8, 10):
        (tmp_path / f"iter_{step:07d}").mkdir()
        (tmp_path / f"iter_{step:07d}" / "complete.json").write_text("{}")
    (tmp_path / "iter_0000001.tmp").mkdir()
    prune(tmp_path, keep_last=1, current=4)  # an older run left higher step numbers behind
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "iter_0000004", "iter_0000006", "iter_0000008", "iter_0000010"]
    prune(tmp_path, keep_last=2, current=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000008", "iter_0000010"]


def test_metrics_rows_after_the_resume_step_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in range(1, 7)) + '{"step": 7, "x"')
    drop_rows_after(path, 4)  # a kill -9 after step 6 (torn row 7); the checkpoint is step 4
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_lock_names_its_holder_and_stale_locks_are_taken_over(tmp_path, caplog):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from megatron_rpt.trainer.run_lock import DirLock; "
         f"DirLock({str(tmp_path)!r}, 'checkpoint.dir').acquire(); print('locked', flush=True); sys.stdin.read()"],
        cwd=REPO, env=toy_env(tmp_path), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        import socket

        with pytest.raises(ConfigError, match=rf"checkpoint\.dir='.*' is in use by pid {holder.pid} on host "
                                              rf"{socket.gethostname()} \(since .*\): another trainer runs there"):
            DirLock(tmp_path, "checkpoint.dir").acquire()
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, the kernel drops the lock
        holder.wait()
    assert (tmp_path / ".rpt-lock").is_file()
    lock = DirLock(tmp_path, "checkpoint.dir")
    lock.acquire()
    assert f"the lock of pid {holder.pid}" in caplog.text and "is stale" in caplog.text
    lock.release()
    assert not (tmp_path / ".rpt-lock").exists()


def test_a_run_locks_its_checkpoint_and_logging_dirs(base, tmp_path):
    from megatron_rpt.trainer.run_lock import lock_run_dirs

    b = Base(base.toy, tmp_path / "run", tmp_path / "ckpt")
    locks = lock_run_dirs(_cfg(b))
    try:
        assert (b.run / ".rpt-lock").is_file() and (b.ckpt / ".rpt-lock").is_file()
        with pytest.raises(ConfigError, match=r"logging\.dir='.*run' is already used by this process"):
            DirLock(b.run, "logging.dir").acquire()
    finally:
        for lock in locks:
            lock.release()


# ----------------------------------------------------------------------------- the trainer


def test_damaged_newest_checkpoint_falls_back_and_resumes_exactly(base, tmp_path):
    b = base.copy(tmp_path)
    _flip(_shard(b.ckpt / "iter_0000004"))  # 400 flipped bytes load silently without checksums
    proc = train(b.toy, b.run, b.ckpt, *BASE_SETS[1:], "train.steps=5")
    log = proc.stderr + proc.stdout
    assert "iter_0000004 is unusable (dist/__" in log and "does not match its checksum" in log
    assert "resumed from " + str(b.ckpt / "iter_0000002") in log
    assert sorted(p.name for p in b.ckpt.iterdir()) == [
        "iter_0000002", "iter_0000004", "iter_0000004.rejected", "iter_0000005", "latest"]
    rows, before = metrics(b.run), metrics(base.run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]  # steps 3-4 re-done once, not appended twice
    # Steps 3 and 4 re-done from step 2's state reproduce the original run: nothing of the damaged
    # checkpoint was mixed in.
    for step in (3, 4):
        assert rows[step - 1]["reward/mean"] == before[step - 1]["reward/mean"]
        assert rows[step - 1]["train/grad_norm"] == before[step - 1]["train/grad_norm"]


def test_no_usable_checkpoint_stops_with_one_line(base, tmp_path):
    b = base.copy(tmp_path)
    (_shard(b.ckpt / "iter_0000004")).write_bytes(b"")
    (b.ckpt / "iter_0000002" / "dist" / ".metadata").unlink()
    before = listing(tmp_path)
    proc = train(b.toy, b.run, b.ckpt, *BASE_SETS[1:], "train.steps=6", expect=2)
    assert error_line(proc).startswith(f"error: no usable checkpoint in {b.ckpt} (iter_0000004: dist/__")
    assert listing(tmp_path) == before  # nothing trained, saved, pruned or set aside


def test_changed_learning_rate_applies_and_killed_steps_are_logged_once(base, tmp_path):
    b = base.copy(tmp_path)
    with open(b.run / "metrics.jsonl", "a") as f:  # what a kill -9 after step 5 leaves: a row past the checkpoint
        f.write(json.dumps({"step": 5, "reward/mean": 0.5}) + '\n{"step": 6, "rew')
    proc = train(b.toy, b.run, b.ckpt, *BASE_SETS[1:], "train.steps=6", "optim.lr=1e-3")
    log = proc.stderr + proc.stdout
    assert "config changed since iter_0000004; the new values apply: " in log
    assert "optim.lr 0.003 -> 0.001" in log and "train.steps 4 -> 6" in log
    rows = metrics(b.run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["train/lr"] for r in rows] == [3e-3] * 4 + [1e-3] * 2


def test_resume_without_a_checkpoint_dir_and_from_a_missing_one(base, tmp_path):
    b = base.copy(tmp_path)
    run = tmp_path / "new_run"
    proc = train(b.toy, run, None, "train.steps=6", resume=str(b.ckpt / "iter_0000004"))
    assert "resumed from " + str(b.ckpt / "iter_0000004") in proc.stderr + proc.stdout
    assert [r["step"] for r in metrics(run)] == [5, 6]
    missing = train(b.toy, run, None, "train.steps=6", resume=str(tmp_path / "nope"), expect=2)
    assert error_line(missing) == (f"error: --resume {tmp_path / 'nope'}: no such directory; give a checkpoint "
                                   "(iter_XXXXXXX), a checkpoint directory, auto or none")


def test_second_trainer_on_a_locked_directory_is_refused(base, tmp_path):
    b = base.copy(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from megatron_rpt.trainer.run_lock import DirLock; "
         f"DirLock({str(b.ckpt)!r}, 'checkpoint.dir').acquire(); print('locked', flush=True); sys.stdin.read()"],
        cwd=REPO, env=toy_env(b.toy), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = listing(b.ckpt)
        proc = train(b.toy, tmp_path / "second", b.ckpt, *BASE_SETS[1:], "train.steps=6", expect=2)
        assert error_line(proc).startswith(f"error: checkpoint.dir='{b.ckpt}' is in use by pid {holder.pid} on host ")
        assert listing(b.ckpt) == before and not (tmp_path / "second" / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()


def test_weights_carry_over_to_another_layout(base, tmp_path):
    """Another layout is refused before anything is loaded, and the advice in the message works."""
    b = base.copy(tmp_path)
    refused = train(b.toy, b.run, b.ckpt, "train.steps=6", "parallel.tensor_parallel=2", nproc=2, expect=1)
    assert f"error: checkpoint {b.ckpt / 'iter_0000004'} was written at TP=1 PP=1 VP=None CP=1 EP=1 DP=1 with 1 " \
           "rollout engines (1 ranks); this run is TP=2" in refused.stderr
    assert "[rank0]: Traceback" not in refused.stderr and "[rank1]: Traceback" not in refused.stderr
    # model.load loads strictly (every weight must be found), resharded from TP=1 to TP=2.
    run = tmp_path / "tp2"
    train(b.toy, run, tmp_path / "tp2_ckpt", "train.steps=1", "parallel.tensor_parallel=2",
          f"model.load={b.ckpt / 'iter_0000004' / 'dist'}", resume="none", nproc=2)
    assert [r["step"] for r in metrics(run)] == [1]


def _diverge(toy: str, root: str, how: str) -> str:
    """Module-level for ``spawn``: a toy run whose step 3 goes non-finite; returns the error message."""
    import math
    import os

    import torch

    from megatron_rpt.bridge.name_maps import unwrap
    from megatron_rpt.errors import TrainingDiverged
    from megatron_rpt.trainer.trainer import Trainer

    os.environ["RPT_TOY_DIR"] = toy
    cfg = load_config(REPO / "configs/toy_learn.yaml", [
        f"logging.dir={root}/run", "logging.progress_bar=false", "logging.tensorboard=false", "train.steps=6",
        "train.eval_interval=0", f"checkpoint.dir={root}/ckpt", "checkpoint.save_interval=2"])
    trainer = Trainer(cfg, resume="none")
    if how == "nan_weights":  # a NaN in the policy's weights after step 2's sync: the engine still samples
        real_sync, calls = trainer.sync_weights, []

        def sync():
            out = real_sync()
            calls.append(1)
            if len(calls) == 3:  # the initial sync, then steps 1 and 2
                with torch.no_grad():
                    decoder = unwrap(trainer.policy.chunks[0]).decoder  # HybridModel (0.19) names it final_norm
                    (getattr(decoder, "final_layernorm", None) or decoder.final_norm).weight.fill_(math.nan)
            return out

        trainer.sync_weights = sync
    else:  # an overflowing gradient norm that Megatron's NaN check does not see
        real_step = trainer.policy.train_step

        def train_step(*args, **kwargs):
            out = real_step(*args, **kwargs)
            return {**out, "grad_norm": math.inf} if trainer.step == 2 else out

        trainer.policy.train_step = train_step
    try:
        trainer.run()
    except TrainingDiverged as exc:
        return str(exc)
    return "no error"


@pytest.mark.parametrize("how", ["nan_weights", "inf_grad_norm"])
def test_divergence_stops_without_saving(base, tmp_path, how):
    from megatron_rpt.distributed import spawn

    (message,) = spawn(_diverge, 1, str(base.toy), str(tmp_path), how)
    ckpt = tmp_path / "ckpt"
    assert message.startswith("training diverged at step 3: ")
    assert f"stopped without saving this state (the last good checkpoint is {ckpt / 'iter_0000002'})" in message
    if how == "inf_grad_norm":
        assert "train/grad_norm=inf" in message
    else:
        assert "non-finite gradients in the backward pass" in message
    assert sorted(p.name for p in ckpt.iterdir()) == ["iter_0000002", "latest"]
    assert (ckpt / "latest").read_text().strip() == "iter_0000002"


def test_user_errors_in_the_trainer_are_one_line(base, tmp_path):
    val = train(base.toy, tmp_path / "run", None, "train.steps=1", "data.val_documents=100000", resume="none",
                expect=2)
    assert error_line(val) == ("error: data.val_documents=100000 holds out every document of the corpus (512 rows), "
                               "leaving nothing to train on; lower it below 512 (the paper holds out 200)")
    # Optimizer offload is megatron-core's GPU -> CPU move: refused on a CPU-only machine before anything is written.
    offload = train(base.toy, tmp_path / "offload", tmp_path / "offload_ckpt", "train.steps=1",
                    "optim.cpu_offload=true", resume="none", expect=2)
    assert error_line(offload) == ("error: optim.cpu_offload=true needs a GPU (it moves the optimizer state from the "
                                   "GPU to the CPU; here there is no GPU and the state is in CPU memory already); set "
                                   "optim.cpu_offload=false")
    assert not (tmp_path / "offload_ckpt").exists()
    truncated = tmp_path / "truncated"
    shutil.copytree(base.ckpt / "iter_0000004" / "dist", truncated)
    shard = max(truncated.glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:1000])
    load = train(base.toy, tmp_path / "run", None, "train.steps=1", f"model.load={truncated}", resume="none",
                 expect=2)
    assert error_line(load).startswith(f"error: could not load model weights from {truncated}: ")
