"""Training-step benchmark: time per phase (rollout / logprob / update / sync), tokens/s, MFU.

Runs the real trainer (``megatron_rpt.trainer.trainer.Trainer``) in one process for a few steps on a
config (default: ``configs/tiny_cpu.yaml``, SmolLM2-135M on OmniMATH; ``--set`` overrides as in the
trainer) and reports, per phase, the mean seconds over the measured steps (the first step is
warm-up and dropped), token throughput, and the achieved FLOP/s:

* training FLOPs  = 6 * N * trained tokens (forward + backward) + 2 * N * trained tokens (old logprobs)
* rollout FLOPs   = 2 * N * generated tokens (prefill counted in the prompt tokens it re-reads: ignored)

with N the parameter count from the architecture. On a GPU, MFU = achieved / peak
(``--peak-tflops``, default 989 = H100 SXM dense bf16; ``benchmarks/gpu.sh`` passes the bf16
matmul rate it measured in the same run), and the CUDA memory after the run is reported with
what emptying PyTorch's cache hands back (what the rollout engine gets at its next wake-up).
Prints a table, writes JSON (atomically) to ``benchmarks/results/bench_train_step.json``.

    python benchmarks/bench_train_step.py [--config configs/tiny_cpu.yaml] [--steps 3] [--set k=v ...]
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
from megatron_rpt.rollout.handover import release_cuda_cache
from megatron_rpt.trainer.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _bench(config: str, overrides: list[str], steps: int) -> dict:
    run_dir = tempfile.mkdtemp(prefix="bench_train_step_")
    cfg = load_config(config, [*overrides, f"train.steps={steps + 1}", f"logging.dir={run_dir}",
                               "checkpoint.dir=null", "logging.progress_bar=false", "logging.tensorboard=false",
                               "logging.save_rollouts=false", "train.eval_interval=0"])
    trainer = Trainer(cfg, resume=None)
    result = trainer.run()
    measured = result["history"][1:] or result["history"]
    n_params = trainer.arch.num_parameters()

    def mean(key: str) -> float:
        vals = [h[key] for h in measured if key in h]
        return sum(vals) / len(vals) if vals else float("nan")

    cuda: dict[str, float] = {}
    if torch.cuda.is_available():
        cuda = {"max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                "reserved_gib": torch.cuda.memory_reserved() / 2**30}
        cuda["released_by_empty_cache_gib"] = release_cuda_cache() / 2**30

    phases = {p: mean(f"time/{p}") for p in ("rollout", "logprob", "update", "sync")}
    step = mean("time/step")
    trained = mean("compute/trained_tokens")
    generated = mean("compute/generated_tokens")
    train_flops = 8 * n_params * trained
    rollout_flops = 2 * n_params * generated
    return {
        "config": config, "overrides": overrides, "params": n_params, "steps_measured": len(measured),
        "phases_s": phases, "step_s": step,
        "trained_tokens_per_step": trained, "generated_tokens_per_step": generated,
        "train_tokens_per_s": trained / (phases["logprob"] + phases["update"]),
        "generated_tokens_per_s": generated / phases["rollout"],
        "train_tflops": train_flops / (phases["logprob"] + phases["update"]) / 1e12,
        "rollout_tflops": rollout_flops / phases["rollout"] / 1e12,
        "reward_mean": mean("reward/mean"),
        "params_dtype": cfg.model.params_dtype, "transformer_impl": cfg.model.transformer_impl,
        "rollout_engine": cfg.rollout.engine, "cuda_memory": cuda,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny_cpu.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=3, help="measured steps (one more is run as warm-up)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="GPU peak for MFU (H100 SXM bf16)")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/bench_train_step.json"))
    args = parser.parse_args(argv)
    os.chdir(REPO)

    (res,) = spawn(_bench, 1, args.config, args.overrides, args.steps)
    on_gpu = torch.cuda.is_available()
    res["mfu"] = (res["train_tflops"] / args.peak_tflops) if on_gpu else None
    res["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                      "device": torch.cuda.get_device_name() if on_gpu else "cpu",
                      "date": time.strftime("%Y-%m-%d")}

    ph = res["phases_s"]
    rows = [
        ("params", f"{res['params'] / 1e6:.1f} M"),
        ("step", f"{res['step_s']:.2f} s"),
        *[(f"  {k}", f"{v:.2f} s ({100 * v / res['step_s']:.0f} %)") for k, v in ph.items()],
        ("trained tokens / step", f"{res['trained_tokens_per_step']:.0f}"),
        ("generated tokens / step", f"{res['generated_tokens_per_step']:.0f}"),
        ("train tokens/s", f"{res['train_tokens_per_s']:.0f}"),
        ("generated tokens/s", f"{res['generated_tokens_per_s']:.1f}"),
        ("train TFLOP/s", f"{res['train_tflops']:.4f}"),
        ("rollout TFLOP/s", f"{res['rollout_tflops']:.4f}"),
        ("MFU", f"{100 * res['mfu']:.1f} %" if res["mfu"] is not None else "n/a (CPU)"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"\ntraining step: {args.config} {' '.join(args.overrides)}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=2))
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
