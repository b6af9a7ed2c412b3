"""Update-phase throughput, packed vs padded micro-batches, on the lengths of a real rollout.

Builds the real trainer (``megatron_rpt.trainer.trainer.Trainer``) on a config (default:
``configs/tiny_cpu_reasoning.yaml``, SmolLM2-135M-Instruct, the paper's prompt template v0 in the
chat template, T=0.8), runs ONE real rollout step with its engine (``rollout.engine``: vLLM's CPU
build in-process by default, ``--set rollout.engine=builtin`` for the torch engine) exactly as the
trainer does (:func:`~megatron_rpt.trainer.rollout_phase.sample_engine_share`), records the prompt
and response lengths and finish reasons that step produced, then times ``MegatronPolicy.train_step``
(forward + backward + Adam) on the same samples split into mini-batches by the trainer's own
:func:`~megatron_rpt.trainer.mini_batches.split_mini_batches`, both ways:

* padded: the trainer's path with ``rl.sequence_packing=false``: ``rl.micro_batch_size`` rows per
  micro-batch, every row as wide as the mini-batch's longest sample;
* packed: the trainer's default, samples packed into ``rl.micro_batch_tokens`` token budgets
  (``policy.packing``).

The lengths come from the config: ``--set rollout.max_response_tokens=N`` (a longer cap lets some
samples stop at EOS and others hit it) and ``--set data.max_prompt_tokens=N`` (above most contexts,
prompts keep their own lengths instead of all filling the budget). Trained tokens/s counts the real
(prompt + response) tokens; best of ``--repeats`` each, the two layouts interleaved in one run, the
load average recorded before and after each timing. Writes JSON (atomically) to
``benchmarks/results/bench_packing.json``.

    python benchmarks/bench_packing.py [--config configs/tiny_cpu_reasoning.yaml] [--repeats 3] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from megatron_rpt.config import load_config
from megatron_rpt.distributed import spawn
from megatron_rpt.rl import group_advantages
from megatron_rpt.rollout.handover import engine_awake
from megatron_rpt.trainer.mini_batches import MiniBatch, split_mini_batches
from megatron_rpt.trainer.rollout_phase import sample_engine_share
from megatron_rpt.trainer.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _update(policy, mini_batches: list[MiniBatch]) -> float:
    """Seconds of one update phase over the mini-batches, as the trainer runs it."""
    begin = time.perf_counter()
    for mb in mini_batches:
        policy.train_step(mb.micro_batches, mb.global_tokens, mb.global_seqs)
    return time.perf_counter() - begin


def _bench(config: str, overrides: list[str], repeats: int) -> dict:
    run_dir = tempfile.mkdtemp(prefix="bench_packing_")
    cfg = load_config(config, [*overrides, f"logging.dir={run_dir}", "checkpoint.dir=null",
                               "logging.progress_bar=false", "logging.tensorboard=false"])
    trainer = Trainer(cfg, resume=None)
    trainer.sync_weights()
    start = time.perf_counter()
    with engine_awake(trainer.engine, cfg.rollout.sleep_between_phases):
        share = sample_engine_share(cfg, trainer.engine, trainer.stream, trainer.prompts_per_engine,
                                    cfg.rollout.seed, dynamic=False)
    rollout_s = time.perf_counter() - start
    groups = share.kept
    samples = [(g.problem.prompt_ids, ids) for g in groups for ids in g.token_ids]
    rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float32)
    advantages = group_advantages(rewards, normalize_std=cfg.rl.normalize_advantage_std).reshape(-1).tolist()
    # Advantages of exactly 0 (all-equal rewards) would still run the same kernels: timing is unaffected.
    engine_logprobs = [lp for g in groups for lp in g.engine_logprobs]
    print(f"rollout ({rollout_s:.0f} s): prompt lengths {sorted(len(p) for p, _ in samples)}, response lengths "
          f"{sorted(len(r) for _, r in samples)}", file=sys.stderr, flush=True)
    tokens = sum(len(p) + len(r) for p, r in samples)
    policy = trainer.policy
    layouts = {"padded": None, "packed": policy.packing}
    built: dict[str, list[MiniBatch]] = {}
    for name, packing in layouts.items():
        built[name] = split_mini_batches(samples, advantages, engine_logprobs, cfg.rl, trainer.topo.dp_group,
                                         packing=packing)
        for mb in built[name]:
            mb.attach("old_logprobs", policy.compute_logprobs(mb.micro_batches))
    times: dict[str, list[float]] = {name: [] for name in layouts}
    loads = [os.getloadavg()[0]]
    for _ in range(repeats):
        for name, mini_batches in built.items():
            times[name].append(_update(policy, mini_batches))
            loads.append(os.getloadavg()[0])
    best = {name: min(t) for name, t in times.items()}
    shapes = {name: [list(micro["tokens"].shape) for mb in mbs for micro in mb.micro_batches]
              for name, mbs in built.items()}
    slots = {name: sum(s[0] * s[1] for s in shape) for name, shape in shapes.items()}
    return {
        "config": config, "overrides": overrides, "engine": cfg.rollout.engine, "samples": len(samples),
        "rollout_s": rollout_s, "prompt_lengths": [len(p) for p, _ in samples],
        "response_lengths": [len(r) for _, r in samples],
        "finish_reasons": [fr for g in groups for fr in g.finish_reasons],
        "real_tokens": tokens, "mini_batches": cfg.rl.mini_batches_per_step, "micro_batch_shapes": shapes,
        "token_slots": slots, "padding_fraction": {name: 1 - tokens / n for name, n in slots.items()},
        "update_s_all": times, "update_s": best, "tokens_per_s": {name: tokens / s for name, s in best.items()},
        "speedup": best["padded"] / best["packed"],
        "speedup_per_repeat": [p / q for p, q in zip(times["padded"], times["packed"])],
        "load_average_1min": loads, "load_average_median": statistics.median(loads),
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
    stopped = sum(fr != "length" for fr in res["finish_reasons"])
    print(f"\nupdate phase, packed vs padded: {args.config} {' '.join(args.overrides)}")
    print(f"  {res['samples']} samples ({res['engine']} engine, {stopped} stopped before the cap): prompt tokens "
          f"{prm[0]}-{prm[-1]} (median {statistics.median(prm):g}), response tokens {resp[0]}-{resp[-1]} "
          f"(median {statistics.median(resp):g}); {res['real_tokens']} real tokens")
    for name in ("padded", "packed"):
        print(f"  {name:<7} {len(res['micro_batch_shapes'][name])} micro-batches, {res['token_slots'][name]} token "
              f"slots ({100 * res['padding_fraction'][name]:.0f}% padding), update {res['update_s'][name]:.2f} s, "
              f"{res['tokens_per_s'][name]:.0f} trained tokens/s")
    print(f"  packed / padded tokens/s: {res['speedup']:.2f}x (per repeat: "
          f"{', '.join(f'{x:.2f}' for x in res['speedup_per_repeat'])}; load average median "
          f"{res['load_average_median']:.1f})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=2))
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
