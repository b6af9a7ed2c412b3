#!/usr/bin/env python
"""A measured miniature of the RPT paper's Table 1: base vs continual NTP vs RPT at matched trained tokens.

    python benchmarks/mini_table1.py --out /tmp/mini_table1 [--steps 20] [--positions-per-doc 4] ...

SmolLM2-135M-Instruct (``model.hf_checkpoint: auto:smollm2``) on the OmniMATH file in ../shared, with the main
CPU job's data and rollout settings (``configs/tiny_cpu.yaml``: raw template, the raw continuation is
the prediction, 2-token responses), three models:

* **base**: the model as it is;
* **RPT**: ``--steps`` GRPO steps of the main job's recipe (prefix-match reward), learning rate ``--lr``;
* **NTP**: the same Megatron policy trained with the plain LM loss (``train.objective=ntp``) on every
  token of the same training documents, for as many trained tokens (forward + backward) as the RPT
  run logged in ``compute/trained_tokens`` (rounded to whole steps of ``--ntp-sequences`` windows of
  ``data.max_prompt_tokens`` tokens), same learning rate.

Each is evaluated on the same positions of the ``data.val_documents`` = 200 held-out documents
(``--positions-per-doc`` of each, a seeded draw: every position would take hours on a CPU), bucketed
by the base model's own top-16 entropy at each position (computed once, from the logits of the base
model's standard-mode pass over the same ``data.max_prompt_tokens`` context the models read, so the
three models share the buckets; every model is evaluated on the built-in engine, which exposes
logits), in both modes: standard next-token prediction (argmax) and the raw-continuation reasoning
mode (``--pass-k`` sampled continuations: Random@1 and Pass@k of the prefix-match reward). The table
has Table 1's shape, with each bucket's count and 95 % confidence interval (clustered by document);
``--out`` receives the JSON (``mini_table1.json``: settings, budgets, the table, wall time per
phase), the table as Markdown, each model's report as its evaluation ends (``eval_base.json``, ...)
and the two training directories. ``--json`` also copies the JSON elsewhere (e.g.
``benchmarks/results/mini_table1.json``).

A small setting checks the plumbing in ~20 minutes on 2 busy cores: ``--documents 20 --positions-per-doc 2
--steps 2 --pass-k 2``. benchmarks/RESULTS.md has the measured run and its wall time per phase.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from megatron_rpt.config import load_config  # noqa: E402
from megatron_rpt.distributed import destroy_distributed  # noqa: E402
from megatron_rpt.eval.engine_loading import load_hf_model, load_megatron_model  # noqa: E402
from megatron_rpt.eval.report import EvalReport, format_table, write_report  # noqa: E402
from megatron_rpt.eval.runner import run_evaluation  # noqa: E402
from megatron_rpt.model.zoo import resolve_model_dir  # noqa: E402

MODES = ("standard", "reasoning")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python benchmarks/mini_table1.py", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="new (or empty) directory for runs, reports and the JSON")
    ap.add_argument("--json", help="also write the JSON here (e.g. benchmarks/results/mini_table1.json)")
    ap.add_argument("--steps", type=int, default=20, help="RPT training steps (default 20)")
    ap.add_argument("--lr", type=float, default=1e-5, help="learning rate of both RPT and NTP (default 1e-5)")
    ap.add_argument("--documents", type=int, default=200, help="held-out documents (the paper: 200)")
    ap.add_argument("--positions-per-doc", type=int, default=4,
                    help="evaluated positions per held-out document, a seeded draw (default 4)")
    ap.add_argument("--pass-k", type=int, default=4, help="samples per position in reasoning mode (default 4)")
    ap.add_argument("--ntp-sequences", type=int, default=8, help="NTP windows per step (default 8)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for training and evaluation (repeatable)")
    args = ap.parse_args(argv)
    for name in ("steps", "documents", "positions_per_doc", "pass_k", "ntp_sequences"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if not args.lr > 0:
        ap.error(f"--lr={args.lr} must be > 0")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        ap.error(f"--out {out} exists and is not empty; give a new directory (runs are never overwritten)")
    return args


def common_overrides(args: argparse.Namespace) -> list[str]:
    """The settings every training run and evaluation shares (on top of configs/tiny_cpu.yaml)."""
    return [
        f"data.val_documents={args.documents}",
        f"eval.positions_per_doc={args.positions_per_doc}",
        "eval.max_positions=null",
        f"eval.pass_k={args.pass_k}",
        "eval.modes=[standard, reasoning]",
        f"optim.lr={args.lr}",
        *args.overrides,
    ]


def train(args: argparse.Namespace, name: str, sets: list[str]) -> tuple[Path, list[dict], float]:
    """One training run in its own process (as a user runs it); (checkpoint dir, metric rows, seconds)."""
    run = Path(args.out) / name
    cmd = [sys.executable, "-m", "megatron_rpt.trainer", "--config", "configs/tiny_cpu.yaml", "--resume", "none"]
    for s in [*common_overrides(args), f"logging.dir={run}", f"checkpoint.dir={run / 'ckpt'}",
              "checkpoint.save_interval=0", "logging.progress_bar=false", "logging.tensorboard=false",
              "logging.save_rollouts=false", "train.eval_interval=0", *sets]:
        cmd += ["--set", s]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    (run / "train.log").parent.mkdir(parents=True, exist_ok=True)
    (run / "train.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"mini_table1: the {name} training run failed (exit {proc.returncode}); "
                         f"see {run / 'train.log'}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return run / "ckpt", rows, seconds


def trained_tokens(rows: list[dict]) -> float:
    return float(sum(r.get("compute/trained_tokens", 0.0) for r in rows))


def ntp_steps_for(budget: float, sequences: int, seq_length: int) -> int:
    """NTP steps whose trained tokens (``sequences`` windows of ``seq_length``) come nearest RPT's budget."""
    return max(1, round(budget / (sequences * seq_length)))


def eval_config(args: argparse.Namespace) -> tuple[Any, Path]:
    """The evaluation config and the base model's directory.

    Every model is evaluated on the built-in engine: it exposes logits (vLLM does not), so the base
    model's standard-mode pass also yields the difficulty entropies at no extra cost -- scoring whole
    documents with ``eval.scorer_model`` would cost more than the evaluation itself on a CPU.
    """
    cfg = load_config(REPO / "configs/tiny_cpu.yaml", [*common_overrides(args), "rollout.engine=builtin"],
                      validate_paths=False)
    return cfg, resolve_model_dir(cfg.model.hf_checkpoint, cfg.model.tokenizer)


def evaluate(cfg: Any, out: Path, name: str, hf_dir: Path | None = None, ckpt: Path | None = None,
             val: Any = None) -> tuple[Any, Any]:
    """One model (an HF dir or a Megatron checkpoint) in both modes; (report, validation set).
    Its engine is closed afterwards, so the next model's vLLM engine starts clean."""
    try:
        loaded = load_hf_model(cfg, hf_dir, name=name) if ckpt is None else load_megatron_model(cfg, ckpt, name=name)
        report, val, _ = run_evaluation(cfg, loaded.engine, loaded.tokenizer, loaded.name, MODES, val=val,
                                        progress=False)
        write_report(report, out, stem=f"eval_{name.split()[-1].lower()}")  # kept even if a later phase fails
        return report, val
    finally:
        destroy_distributed()


def train_both(args: argparse.Namespace, seq_length: int, wall: dict[str, float]) -> dict[str, Any]:
    """RPT for ``--steps``, then NTP at the token budget RPT spent."""
    rpt_ckpt, rpt_rows, wall["train_rpt"] = train(args, "rpt", [f"train.steps={args.steps}"])
    budget = trained_tokens(rpt_rows)
    ntp_steps = ntp_steps_for(budget, args.ntp_sequences, seq_length)
    ntp_ckpt, ntp_rows, wall["train_ntp"] = train(args, "ntp", [
        "train.objective=ntp", f"train.steps={ntp_steps}", f"ntp.seq_length={seq_length}",
        f"ntp.sequences_per_step={args.ntp_sequences}", f"ntp.micro_batch_size={args.ntp_sequences}"])
    return {"rpt_ckpt": rpt_ckpt, "rpt_rows": rpt_rows, "ntp_ckpt": ntp_ckpt, "ntp_rows": ntp_rows,
            "ntp_steps": ntp_steps, "budget": budget}


def result_json(args: argparse.Namespace, argv: list[str] | None, cfg: Any, base_dir: Path, table: Any,
                runs: dict[str, Any], wall: dict[str, float]) -> dict[str, Any]:
    budget, ntp_tokens = runs["budget"], trained_tokens(runs["ntp_rows"])
    return {
        "benchmark": "mini_table1",
        "command": "python benchmarks/mini_table1.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {"model": str(base_dir), "config": "configs/tiny_cpu.yaml", "overrides": common_overrides(args),
                     "rpt_steps": args.steps, "ntp_steps": runs["ntp_steps"],
                     "ntp_seq_length": cfg.data.max_prompt_tokens, "ntp_sequences_per_step": args.ntp_sequences,
                     "lr": args.lr, "pass_k": args.pass_k,
                     "reasoning_mode": "raw continuation (template raw, rl.answer_format raw, "
                                       f"{cfg.rollout.max_response_tokens}-token responses, T={cfg.eval.temperature})"},
        "trained_tokens": {"rpt": budget, "ntp": ntp_tokens,
                           "ntp_over_rpt": ntp_tokens / budget if budget else math.nan},
        "final": {"rpt_reward_mean": runs["rpt_rows"][-1].get("reward/mean"),
                  "ntp_cross_entropy": runs["ntp_rows"][-1].get("train/cross_entropy")},
        "table": table.to_dict(),
        "wall_seconds": {k: round(v, 1) for k, v in wall.items()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "load_average_at_end": os.getloadavg()},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wall: dict[str, float] = {}
    t_all = time.perf_counter()
    cfg, base_dir = eval_config(args)

    t0 = time.perf_counter()
    base, val = evaluate(cfg, out, f"{base_dir.name} base", hf_dir=base_dir)
    reports = [base]
    wall["eval_base"] = time.perf_counter() - t0
    runs = train_both(args, cfg.data.max_prompt_tokens, wall)
    for name in ("NTP", "RPT"):  # both trained models on the same positions and buckets
        t0 = time.perf_counter()
        reports.append(evaluate(cfg, out, f"{base_dir.name} + {name}", ckpt=runs[f"{name.lower()}_ckpt"], val=val)[0])
        wall[f"eval_{name.lower()}"] = time.perf_counter() - t0
    wall["total"] = time.perf_counter() - t_all

    kept = ("documents", "documents_evaluated", "positions", "positions_per_doc_cap", "positions_in_buckets",
            "unwinnable")
    scorer = f"the base model's top-{cfg.data.entropy_top_k} entropy (its standard-mode pass), shared by every row"
    table = EvalReport(base.thresholds, [row for r in reports for row in r.rows],
                       {**{k: v for k, v in base.meta.items() if k in kept}, "difficulty_scorer": scorer})
    write_report(table, out, stem="mini_table1_table")
    text = json.dumps(result_json(args, argv, cfg, base_dir, table, runs, wall), indent=2, default=str) + "\n"
    (out / "mini_table1.json").write_text(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    print(format_table(table))
    print(f"\ntrained tokens: RPT {runs['budget']:,.0f} ({args.steps} steps), NTP "
          f"{trained_tokens(runs['ntp_rows']):,.0f} ({runs['ntp_steps']} steps of {args.ntp_sequences} x "
          f"{cfg.data.max_prompt_tokens}); wall {wall['total'] / 60:.1f} min")
    print(f"wrote {out / 'mini_table1.json'} and {out / 'mini_table1_table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
