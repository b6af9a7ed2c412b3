"""Data-parallel, resumable entropy scoring (tools/prepare_data.py, megatron_rpt/data/scoring.py)
of ../shared's three math corpora as a weighted mixture, with a tiny random proxy (Qwen vocabulary).

The reference everywhere is one uninterrupted single-worker run: other worker counts, torchrun
with a kill -9 halfway and a rerun, and every on-disk state a kill can leave must give the same
shards and manifest, byte for byte. The manifest is also checked against the shards themselves
(counts recomputed in float64, corpus columns counted, sha256 recomputed); then the trainer
trains on the prepared mixture and reports the mixture it consumed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest

from megatron_rpt.atomic import OutputExistsError
from megatron_rpt.data.run_state import RunMismatch
from megatron_rpt.data.tiny_proxy import make_tiny_proxy
from tests.helpers_data import (
    MAX_DOCS,
    REPO,
    mixture_config,
    mixture_data_dir,
    output_bytes,
    prepare_args,
    prepare_data,
    prepare_in_process,
    progress_records,
    reference_run,
    run_quiet,
    subprocess_env,
    torchrun_prepare,
    wait_for_shards,
)

N_SHARDS = 8


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return reference_run(tmp_path_factory)


def read_rows(out: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return [r for f in sorted(out.glob("shard-*.parquet")) for r in pq.read_table(f).to_pylist()]


def test_manifest_agrees_with_the_shards(env):
    m, rows = env["manifest"], read_rows(env["ref"])
    assert json.loads((env["ref"] / "manifest.json").read_text()) == m
    assert m["num_docs"] == len(rows) == MAX_DOCS and len(m["shards"]) == N_SHARDS
    ent = np.concatenate([np.asarray(r["entropy"][1:], dtype=np.float64) for r in rows])
    assert m["counts"] == {"scored": ent.size, "kept": int((ent > 0.5).sum()), "easy": int((ent > 0.5).sum()),
                           "medium": int((ent > 1.0).sum()), "hard": int((ent > 1.5).sum())}
    for s in m["shards"]:
        assert s["sha256"] == hashlib.sha256((env["ref"] / s["file"]).read_bytes()).hexdigest()
    # Shares of 0.5 / 0.3 / 0.2 over 24 documents: 12 / 7.2 / 4.8, each corpus within one document.
    drawn = {c["name"]: c for c in m["mixture"]["corpora"]}
    per_corpus = {n: [r for r in rows if r["corpus"] == n] for n in drawn}
    assert {n: len(v) for n, v in per_corpus.items()} == {n: c["docs"] for n, c in drawn.items()} == {
        "omni_math": 12, "gsm8k": 7, "math": 5}
    assert {n: sum(len(r["token_ids"]) for r in v) for n, v in per_corpus.items()} == {
        n: c["tokens"] for n, c in drawn.items()}
    assert all(r["doc_id"].startswith(r["corpus"] + "/") for r in rows)
    assert drawn["math"]["too_short"] > 0  # min_chars: 64 dropped some one-line MATH problems
    assert m["mixture_spec"]["corpora"][1]["text_fields"] == ["question"] and m["mixture_spec"]["dedup"] is True


def test_any_number_of_workers_writes_the_same_bytes(env, tmp_path):
    out = tmp_path / "three"
    results = [prepare_in_process(prepare_args(env["config"], env["proxy"], out, "--worker-id", str(w),
                                               "--num-workers", "3")) for w in (2, 0, 1)]
    assert results[:2] == [None, None] and results[2] == env["manifest"]  # the last one to finish merges
    assert output_bytes(out) == output_bytes(env["ref"])
    owner = {r["shard"]: r["worker"] for r in progress_records(out)}
    assert owner == {k: k % 3 for k in range(N_SHARDS)}


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_rerun_redoes_only_what_a_kill_left_unfinished(env, tmp_path):
    """The states a kill -9 can leave, built from the finished reference run, then the same command."""
    out = tmp_path / "killed"
    shutil.copytree(env["ref"], out)
    (out / "manifest.json").unlink()
    progress = out / "workers/w00000/progress.jsonl"
    lines = progress.read_text().splitlines(keepends=True)
    # Shards 0-4 recorded; shard 5 renamed into place but its line torn mid-write; shard 6 half
    # written to its temporary name; shard 7 not started; shard 2's file lost (size no longer matches).
    progress.write_text("".join(lines[:5]) + lines[5][:40])
    tmp6 = out / f".shard-00006.parquet.tmp-{dead_pid()}"
    tmp6.write_bytes((out / "shard-00006.parquet").read_bytes()[:100])
    (out / "shard-00006.parquet").unlink()
    (out / "shard-00007.parquet").unlink()
    (out / "shard-00002.parquet").write_bytes(b"PAR1")
    assert prepare_in_process(prepare_args(env["config"], env["proxy"], out)) == env["manifest"]
    assert output_bytes(out) == output_bytes(env["ref"])
    redone = [r["shard"] for r in progress_records(out)][5:]
    assert sorted(redone) == [2, 5, 6, 7]  # the recorded, intact shards 0, 1, 3, 4 were skipped
    assert not tmp6.exists() and not list(out.glob(".*tmp*"))
    # Finished: the same command again changes nothing.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert prepare_in_process(prepare_args(env["config"], env["proxy"], out)) == env["manifest"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_a_shard_changed_after_it_was_recorded_is_caught_at_the_merge(env, tmp_path):
    out = tmp_path / "flipped"
    shutil.copytree(env["ref"], out)
    (out / "manifest.json").unlink()
    shard = out / "shard-00003.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(prepare_data.UserError, match=r"shard .*shard-00003.parquet changed after it was written"):
        prepare_in_process(prepare_args(env["config"], env["proxy"], out))
    assert not shard.exists() and not (out / "manifest.json").exists()
    prepare_in_process(prepare_args(env["config"], env["proxy"], out))
    assert output_bytes(out) == output_bytes(env["ref"])


def test_a_run_with_other_inputs_proxy_or_settings_is_not_resumed(env, tmp_path):
    data, proxy = tmp_path / "data", tmp_path / "proxy"
    shutil.copytree(mixture_data_dir(), data)
    shutil.copytree(env["proxy"], proxy)
    out = tmp_path / "out"
    args = prepare_args(mixture_config(tmp_path, data), proxy, out, "--worker-id", "1", "--num-workers", "2")
    assert prepare_in_process(args) is None  # worker 1's half of the shards
    state = sorted((p.relative_to(out), p.stat().st_size) for p in out.rglob("*") if p.is_file())

    make_tiny_proxy(proxy, seed=1)  # a retrained proxy: same config, other weights
    with pytest.raises(RunMismatch, match=r"holds a run with other inputs or settings \(proxy.files.model"
                                          r".safetensors.sha256: \"[0-9a-f]{64}\" there, \"[0-9a-f]{64}\" here\)"):
        prepare_in_process(args)
    shutil.rmtree(proxy)
    shutil.copytree(env["proxy"], proxy)
    size = (data / "gsm8k_train.jsonl").stat().st_size
    row = (json.dumps({"question": "one more", "answer": "row"}) + "\n").encode()
    with open(data / "gsm8k_train.jsonl", "ab") as f:
        f.write(row)
    with pytest.raises(RunMismatch, match=rf"inputs\..*gsm8k_train.jsonl.bytes: {size} there, {size + len(row)} here; "
                                          r"inputs\..*gsm8k_train.jsonl.sha256: "):
        prepare_in_process(args)
    i = args.index("--shard-size")
    with pytest.raises(RunMismatch, match=r"scoring.shard_size: 3 there, 4 here"):
        prepare_in_process([*args[:i], "--shard-size", "4", *args[i + 2:]])
    assert sorted((p.relative_to(out), p.stat().st_size) for p in out.rglob("*") if p.is_file()) == state


def test_a_second_process_of_the_same_worker_is_refused(env, tmp_path):
    out = tmp_path / "busy"
    base = prepare_args(env["config"], env["proxy"], out)
    assert prepare_in_process([*base, "--worker-id", "1", "--num-workers", "2"]) is None
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from pathlib import Path; from megatron_rpt.data.run_state import lock_worker; "
        f"lock_worker(Path({str(out)!r}), 0); print('locked', flush=True); time.sleep(600)")],
        env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputExistsError, match=rf"worker 0='{out}/workers/w00000' is in use by pid "
                                                     rf"{holder.pid} .*: prepare_data worker 0 is writing {out}"):
            prepare_in_process([*base, "--worker-id", "0", "--num-workers", "2"])
        assert len(progress_records(out)) == N_SHARDS // 2 and not (out / "manifest.json").exists()
    finally:
        holder.kill()  # kill -9: its lock file stays, the kernel drops the lock, the next worker takes over
        holder.wait()
    assert prepare_in_process([*base, "--worker-id", "0", "--num-workers", "2"]) == env["manifest"]


@pytest.mark.slow
def test_two_torchrun_workers_killed_halfway_then_rerun(env, tmp_path):
    """The issue's 'done when', on torchrun: 2 workers, kill -9 halfway, the same command again."""
    out = tmp_path / "torchrun"
    cmd = torchrun_prepare(prepare_args(env["config"], env["proxy"], out), nproc=2)
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        wait_for_shards(out, 3, lambda: proc.poll() is not None, what=lambda: "(first torchrun)")
        workers = psutil.Process(proc.pid).children(recursive=True)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's group; its workers lead sessions of their own
        proc.communicate(timeout=60)
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"workers outlived the killed torchrun: {alive}"
    before = {r["shard"] for r in progress_records(out)}
    assert 3 <= len(before) < N_SHARDS and not (out / "manifest.json").exists()
    run_quiet(cmd)
    assert output_bytes(out) == output_bytes(env["ref"])
    shards = [r["shard"] for r in progress_records(out)]
    assert sorted(set(shards)) == list(range(N_SHARDS))
    assert all(shards.count(k) == 1 for k in before)  # shards done before the kill were not scored again
    assert {r["num_workers"] for r in progress_records(out)} == {2}
    env["torchrun_out"] = out


@pytest.mark.slow
def test_trainer_trains_on_the_prepared_mixture(env, tmp_path):
    prepared = env.get("torchrun_out", env["ref"])
    run = tmp_path / "run"
    sets = [f"data.prepared={prepared}", f"logging.dir={run}", "checkpoint.dir=null", "logging.progress_bar=false",
            "logging.tensorboard=false", "train.steps=2", "rl.prompts_per_step=4", "rollout.samples_per_prompt=2",
            "data.max_positions_per_doc=1"]
    cmd = [sys.executable, "-m", "megatron_rpt.trainer", "--config", str(env["config"]), "--resume", "none"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(subprocess_env(), RPT_CACHE_DIR=str(tmp_path / "cache")),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    # Independent count: the corpus prefix of every trained problem's document id in the rollouts.
    drawn: dict[str, int] = {}
    for step in (1, 2):
        seen = {}
        for line in (run / "rollouts" / f"step_{step:06d}_engine0000.jsonl").read_text().splitlines():
            rec = json.loads(line)
            seen[(rec["doc_id"], rec["position"])] = rec["doc_id"].split("/")[0]
        for corpus in seen.values():
            drawn[corpus] = drawn.get(corpus, 0) + 1
        row = rows[step - 1]
        total = sum(drawn.values())
        for corpus in ("omni_math", "gsm8k", "math"):
            assert row[f"mixture/{corpus}/problems"] == drawn.get(corpus, 0), (step, corpus, row)
            assert row[f"mixture/{corpus}/share"] == pytest.approx(drawn.get(corpus, 0) / total)
    assert sum(drawn.values()) == 8


def test_on_the_fly_and_prepared_paths_read_the_same_mixture(env):
    """data.mixture scored on the fly gives the problems the prepared directory gives (same documents,
    positions, targets; entropies equal up to packing), and the per-corpus counts resume exactly."""
    from megatron_rpt.config import load_config
    from megatron_rpt.data import ProblemStream, load_tokenizer
    from megatron_rpt.data.entropy_filter import ProxyScorer
    from megatron_rpt.data.mixture import Mixture
    from megatron_rpt.data.shards import ScoredDoc

    cfg = load_config(env["config"], ["data.val_documents=0", "data.max_positions_per_doc=2"], validate_paths=False)
    tok = load_tokenizer(cfg.model.tokenizer)
    fly = ProblemStream(cfg.data, tok, proxy=ProxyScorer(env["proxy"], device="cpu"))
    problems = [next(fly) for _ in range(12)]
    ids = [d.doc_id for n, d in Mixture.from_config(cfg.data) if n < MAX_DOCS]
    assert list(dict.fromkeys(p.doc_id for p in problems)) == ids[:len({p.doc_id for p in problems})]
    prepared = {r["doc_id"]: r for r in read_rows(env["ref"])}
    assert list(prepared) == ids  # the prepared shards hold the first MAX_DOCS documents, in sequence order
    cfg.data.prepared = str(env["ref"])
    reader = ProblemStream(cfg.data, tok)  # data.mixture next to data.prepared: checked to be the same mixture

    for p in problems:
        row = prepared[p.doc_id]
        doc = ScoredDoc(p.doc_id, row["token_ids"], np.asarray(row["entropy"], dtype=np.float32), row["corpus"])
        (same,) = [q for q in reader.problems_for(doc) if q.position == p.position]
        assert (same.target_ids, same.prompt_ids, same.corpus) == (p.target_ids, p.prompt_ids, p.corpus)
        assert same.entropy == pytest.approx(p.entropy, abs=2e-4) and p.corpus == p.doc_id.split("/")[0]
    # The counts the trainer logs, against an independent count, and after a resume.
    counted = {c: sum(p.corpus == c for p in problems) for c in ("omni_math", "gsm8k", "math")}
    metrics = fly.mixture_metrics()
    assert {c: metrics[f"mixture/{c}/problems"] for c in counted} == counted
    state = json.loads(json.dumps(fly.state_dict()))
    more = [next(fly) for _ in range(3)]
    resumed = ProblemStream(dataclasses.replace(cfg.data, prepared=None), tok,
                            proxy=ProxyScorer(env["proxy"], device="cpu"))
    resumed.load_state_dict(state)
    assert [next(resumed) for _ in range(3)] == more
    assert resumed.mixture_metrics() == fly.mixture_metrics()
