"""Shared by the data-at-scale tests: a small config over ../shared's three math corpora, the
prepare_data command line, the uninterrupted single-worker reference run, reading an output directory
back, and waiting for a run to be halfway."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from megatron_rpt.data.run_state import progress_path
from megatron_rpt.data.tiny_proxy import make_tiny_proxy
from tests.conftest import shared_path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))  # tools/ is not a package
import prepare_data  # noqa: E402

MAX_DOCS = 24
SHARD_SIZE = 3  # 8 shards: enough to be killed halfway through


def mixture_data_dir() -> Path:
    return shared_path("data")


def mixture_config(root: Path, data: Path | None = None) -> Path:
    """configs/math_mixture_cpu.yaml with short documents (one text field per corpus) and absolute paths."""
    data = data or mixture_data_dir()
    tree = {
        "base": str(REPO / "configs/math_mixture_cpu.yaml"),
        "model": {"tokenizer": str(shared_path("tokenizers/r1_distill_qwen"))},
        "data": {"val_documents": 2, "max_prompt_tokens": 256, "mixture": [
            {"name": "omni_math", "paths": [str(data / "omni_math_rule.jsonl")], "weight": 0.5,
             "text_fields": ["problem"]},
            {"name": "gsm8k", "paths": [str(data / "gsm8k_train.jsonl")], "weight": 0.3, "text_fields": ["question"]},
            {"name": "math", "paths": [str(data / "math_test_5000.jsonl")], "weight": 0.2, "text_fields": ["problem"],
             "min_chars": 64},
        ]},
    }
    path = root / f"math_mixture_test_{len(list(root.glob('math_mixture_test*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def prepare_args(config: Path, proxy: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(config), "--proxy", str(proxy), "--out", str(out), "--max-docs", str(MAX_DOCS),
            "--shard-size", str(SHARD_SIZE), "--threads", "1", "--device", "cpu", "--no-progress", *extra]


def prepare_in_process(args: list[str]):
    """tools/prepare_data.py's main() in this process (its return: the manifest, or None for a worker
    that did not merge)."""
    threads = torch.get_num_threads()
    try:
        return prepare_data.main(args)
    finally:
        torch.set_num_threads(threads)  # --threads 1 must not slow the rest of the session


_REFERENCE: dict = {}


def reference_run(tmp_path_factory) -> dict:
    """The run every data-at-scale test compares with, made once per session: one uninterrupted
    single-worker run of the mixture with a tiny random proxy (root, proxy, config, ref = its output
    directory, manifest). Each caller gets its own copy of the dict."""
    if not _REFERENCE:
        root = tmp_path_factory.mktemp("scored_mixture")
        proxy = make_tiny_proxy(root / "proxy")
        config = mixture_config(root)
        ref = root / "reference"
        manifest = prepare_in_process(prepare_args(config, proxy, ref))
        _REFERENCE.update(root=root, proxy=proxy, config=config, ref=ref, manifest=manifest)
    return dict(_REFERENCE)


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def torchrun_prepare(args: list[str], nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            str(REPO / "tools/prepare_data.py"), *args]


def output_bytes(out: Path) -> dict[str, bytes]:
    """The result of a run: every shard and the manifest (run.json and workers/ are bookkeeping)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name.startswith("shard-")
            or p.name == "manifest.json"}


def progress_records(out: Path, worker: int | None = None) -> list[dict]:
    """Every complete progress line of every worker, or of ``worker`` only (torn lines skipped)."""
    recs = []
    paths = sorted(out.glob("workers/w*/progress.jsonl")) if worker is None else [progress_path(out, worker)]
    for path in (p for p in paths if p.exists()):
        for line in path.read_text().splitlines():
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return recs


def wait_for_shards(out: Path, n: int, done: Callable[[], bool], timeout: float = 300.0,
                    what: Callable[[], str] = str, worker: int | None = None) -> None:
    """Until ``n`` shards are recorded (by ``worker`` if given); fails if the run ends (``done()``) first
    (``what()``: its log)."""
    deadline = time.monotonic() + timeout
    while len(progress_records(out, worker)) < n:
        assert not done(), f"the run ended before {n} shards were done\n{what()}"
        assert time.monotonic() < deadline, f"no {n} shards after {timeout:.0f}s\n{what()}"
        time.sleep(0.05)


def run_quiet(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc
