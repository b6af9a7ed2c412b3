"""Update-phase throughput, packed vs padded micro-batches, on the lengths of a real rollout.

Builds the real trainer (``megatron_rpt.trainer.trainer.Trainer``) on a config (default:
``configs/tiny_cpu_reasoning.yaml``, SmolLM2-135M, the paper's prompt template, 64-token
responses), runs ONE real rollout step with its engine (the prompt and response lengths that
step produced are recorded), then times ``MegatronPolicy.train_step`` (forward + backward +
Adam) on the same samples built both ways:

* padded: ``rl.micro_batch_size`` rows per micro-batch, each as wide as the step's longest sample
  (same shape for every micro-batch, as the trainer built them before packing);
* packed: the trainer's default, samples packed into ``rl.micro_batch_tokens`` token budgets.

Trained tokens/s counts the real (prompt + response) tokens; best of ``--repeats`` each, the two
variants interleaved in one run. Writes JSON (atomically) to ``benchmarks/results/bench_packing.json``.

    python benchmarks/bench_packing.py [--config configs/tiny_cpu_reasoning.yaml] [--repeats 3] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from megatron_rpt.config import load_config
from megatron_rpt.distributed import spawn
from megatron_rpt.rl import build_micro_batches, group_advantages
from megatron_rpt.trainer.rollout_phase import collect_step_groups
from megatron_rpt.trainer.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _bench(config: str, overrides: list[str], repeats: int) -> dict:
    run_dir = tempfile.mkdtemp(prefix="bench_packing_")
    cfg = load_config(config, [*overrides, f"logging.dir={run_dir}", "checkpoint.dir=null",
                               "logging.progress_bar=false", "logging.tensorboard=false"])
    trainer = Trainer(cfg, resume=None)
    trainer.sync_weights()
    start = time.perf_counter()
    groups, _ = collect_step_groups(cfg, trainer.engine, trainer.stream, trainer.prompts_per_rank,
                                    cfg.rollout.seed, False)
    rollout_s = time.perf_counter() - start
    samples = [(g.problem.prompt_ids, ids) for g in groups for ids in g.token_ids]
    rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float32)
    advantages = group_advantages(rewards, normalize_std=cfg.rl.normalize_advantage_std).reshape(-1).tolist()
    # Advantages of exactly 0 (all-equal rewards) would still run the same kernels: timing is unaffected.
    tokens = sum(len(p) + len(r) for p, r in samples)
    policy = trainer.policy
    layouts = {"padded": None, "packed": policy.packing}
    built = {}
    for name, packing in layouts.items():
        micro = build_micro_batches(samples, advantages, micro_batch_size=cfg.rl.micro_batch_size,
                                    pad_token_id=0, packing=packing)
        for mb, lp in zip(micro, policy.compute_logprobs(micro)):
            mb["old_logprobs"] = lp
        built[name] = micro
    best = {name: float("inf") for name in layouts}
    for _ in range(repeats):
        for name, micro in built.items():
            begin = time.perf_counter()
            policy.train_step(micro, tokens, len(samples))
            best[name] = min(best[name], time.perf_counter() - begin)
    shapes = {name: [list(mb["tokens"].shape) for mb in micro] for name, micro in built.items()}
    slots = {name: sum(s[0] * s[1] for s in shape) for name, shape in shapes.items()}
    return {
        "config": config, "overrides": overrides, "samples": len(samples), "rollout_s": rollout_s,
        "prompt_lengths": [len(p) for p, _ in samples], "response_lengths": [len(r) for _, r in samples],
        "real_tokens": tokens, "micro_batch_shapes": shapes, "token_slots": slots,
        "update_s": best, "tokens_per_s": {name: tokens / s for name, s in best.items()},
        "speedup": best["padded"] / best["packed"],
        "micro_batch_size": cfg.rl.micro_batch_size, "packing": repr(policy.packing),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny_cpu_reasoning.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before the run is abandoned")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/bench_packing.json"))
    args = parser.parse_args(argv)
    os.chdir(REPO)

    (res,) = spawn(_bench, 1, args.config, args.overrides, args.repeats, timeout=args.timeout)
    res["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                      "date": time.strftime("%Y-%m-%d")}
    resp = sorted(res["response_lengths"])
    prm = sorted(res["prompt_lengths"])
    print(f"\nupdate phase, packed vs padded: {args.config} {' '.join(args.overrides)}")
    print(f"  samples {res['samples']}: prompt tokens {prm[0]}-{prm[-1]}, response tokens {resp[0]}-{resp[-1]} "
          f"(median {resp[len(resp) // 2]}); {res['real_tokens']} real tokens")
    for name in ("padded", "packed"):
        print(f"  {name:<7} {len(res['micro_batch_shapes'][name])} micro-batches, {res['token_slots'][name]} token "
              f"slots, update {res['update_s'][name]:.2f} s, {res['tokens_per_s'][name]:.0f} trained tokens/s")
    print(f"  packed / padded tokens/s: {res['speedup']:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=2))
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
