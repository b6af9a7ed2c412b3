#!/usr/bin/env python
"""Plan TP/PP/CP/EP/DP layouts for an RPT config on N GPUs: per-GPU memory and step time.

    python tools/plan.py --config configs/rpt_32b.yaml --gpus 32 --gpu-mem 80 [--top 10] [--json]

Exit status 0 when some layout fits, 2 (with the smallest requirement and fixes) when none
does or the config is invalid. The model behind the numbers: megatron_rpt/memory_plan/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_rpt.config import ConfigError, load_config  # noqa: E402
from megatron_rpt.memory_plan import Hardware, cpu_optimizer_line, plan_config, render_table  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="RPT YAML config (model.hf_config gives the architecture)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set rollout.gpu_memory_utilization=0.4")
    p.add_argument("--gpus", type=int, default=None, help="GPU count (default: parallel.world_size of the config)")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="memory per GPU in GiB (default 80)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="TP/EP groups larger than this cross nodes (default 8)")
    p.add_argument("--top", type=int, default=10, help="show this many layouts (default 10)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100 SXM: 989)")
    p.add_argument("--train-mfu", type=float, default=0.35,
                   help="assumed model FLOPs utilisation of training (default 0.35)")
    p.add_argument("--rollout-mfu", type=float, default=0.10,
                   help="assumed model FLOPs utilisation of decoding (default 0.10)")
    p.add_argument("--overhead-gib", type=float, default=3.0,
                   help="CUDA context + NCCL + fragmentation per GPU (default 3)")
    p.add_argument("--host-mem-gbps", type=float, default=50.0,
                   help="host memory bandwidth per GPU for the CPU optimizer step, GB/s (default 50: DGX H100 / 8)")
    p.add_argument("--host-link-gbps", type=float, default=50.0,
                   help="GPU <-> host copy bandwidth, GB/s (default 50: PCIe Gen5 x16; GH200 C2C: 450)")
    p.add_argument("--no-flash-attention", action="store_true",
                   help="count the a*s^2 attention matrix (unfused attention, e.g. no Transformer Engine)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, validate_paths=False)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    gpus = args.gpus or cfg.parallel.world_size
    if not gpus:
        print("error: give --gpus N (the config has no parallel.world_size)", file=sys.stderr)
        return 2
    try:
        hw = Hardware(gpus=gpus, gpu_mem_gib=args.gpu_mem, gpus_per_node=args.gpus_per_node,
                      peak_tflops=args.peak_tflops, train_mfu=args.train_mfu, rollout_mfu=args.rollout_mfu,
                      overhead_gib=args.overhead_gib, host_mem_gbps=args.host_mem_gbps,
                      host_link_gbps=args.host_link_gbps)
        result = plan_config(cfg, hw, flash_attention=not args.no_flash_attention)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_dict(args.top), indent=2))
    else:
        from rich.console import Console

        console = Console(width=None if sys.stdout.isatty() else 160)
        if result.plan.ok:
            console.print(render_table(result, args.top))
        if result.configured is not None:
            g = result.configured.memory.gib()
            verdict = (f"fits, rank {result.configured_rank} of {len(result.plan.fitting)}" if result.configured.fits
                       else "does NOT fit")
            console.print(f"configured layout {result.configured.layout.label()}: peak {g['peak']:.1f} GiB, "
                          f"step ~{result.configured.time.total_s:.0f} s -> {verdict}", highlight=False)
        if (line := cpu_optimizer_line(result)) is not None:
            console.print(line, highlight=False)
        for problem in result.configured_problems:
            console.print(f"configured layout problem: {problem}", highlight=False)
    if not result.plan.ok:
        print(result.to_dict()["refusal"], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
