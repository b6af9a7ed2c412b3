"""``python -m megatron_rpt.trainer --config configs/<name>.yaml [--set key=value ...] [--resume auto|none|DIR]``

The trainer's command line: parse, load and validate the config, run the loop, and print
a short summary on rank 0. Launch several ranks with ``torchrun``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import warnings

from megatron_rpt.config import Config, load_config
from megatron_rpt.errors import UserError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_rpt.trainer", description=__doc__.splitlines()[0],
        epilog="Every config key with its type, default and meaning: python -m megatron_rpt.config explain [KEY]")
    parser.add_argument("--config", required=True,
                        help="YAML config (configs/tiny_cpu.yaml, configs/rpt_14b.yaml, ...)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set rollout.temperature=0.8 (repeatable)")
    parser.add_argument("--resume", default="auto",
                        help="auto (newest verified checkpoint in checkpoint.dir, if any), none (a new run; refused "
                             "when checkpoint.dir holds checkpoints), or a checkpoint (iter_X) or checkpoint directory")
    parser.add_argument("--force-resume", action="store_true",
                        help="resume checkpoint.dir although its run had another model, data source or seed")
    return parser.parse_args(argv)


def _quiet_third_party() -> None:
    """What the trainer's dependencies print at run time; their import-time noise is silenced by
    :func:`megatron_rpt.quiet_dependency_imports` (the package's ``__init__``)."""
    warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")
    warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed\..*")
    warnings.filterwarnings("ignore", message=".*The .grad attribute of a Tensor that is not a leaf Tensor.*")
    # vLLM logs every engine start-up detail and each weight reload at INFO; its warnings stay.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def summarize(result: dict, cfg: Config) -> str:
    history = result["history"]
    lines = [f"megatron-rpt: {result['steps']} steps done ({result['exit']})"]
    if result.get("resumed_from"):
        lines.append(f"  resumed from     {result['resumed_from']}")
    if history:
        def mean(key):
            vals = [h[key] for h in history if key in h and h[key] is not None and not math.isnan(h[key])]
            return sum(vals) / len(vals) if vals else float("nan")

        first, last = history[0], history[-1]
        if cfg.train.objective == "ntp":  # the baseline has no rewards: its loss is the cross-entropy
            lines.append(f"  cross-entropy    first {first.get('train/cross_entropy', float('nan')):.3f} -> last "
                         f"{last.get('train/cross_entropy', float('nan')):.3f} ({mean('compute/trained_tokens'):.0f} "
                         "tokens per step)")
        lines += [
            f"  reward           first {first.get('reward/mean', float('nan')):.3f} -> last "
            f"{last.get('reward/mean', float('nan')):.3f}",
            f"  response length  {mean('response_length/mean'):.1f} tokens (mean)",
            f"  step time        {mean('time/step'):.1f}s (rollout {mean('time/rollout'):.1f}s, logprob "
            f"{mean('time/logprob'):.1f}s, update {mean('time/update'):.1f}s, sync {mean('time/sync'):.2f}s)",
            f"  grad norm        {mean('train/grad_norm'):.4f}",
        ]
    lines.append(f"  metrics          {os.path.join(cfg.logging.dir, 'metrics.jsonl')}")
    if cfg.checkpoint.dir:
        lines.append(f"  checkpoints      {cfg.checkpoint.dir}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    _quiet_third_party()
    started = False
    try:
        cfg = load_config(args.config, args.overrides)
        # lazy: megatron-core is slow to import and warns on import: only after the config is known good
        from megatron_rpt.trainer.trainer import Trainer

        started = True
        trainer = Trainer(cfg, resume=args.resume, force_resume=args.force_resume)
        result = trainer.run()
    except UserError as exc:  # the message is the whole report: no traceback for a user's mistake
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        if started:
            from megatron_rpt.distributed import destroy_distributed  # lazy: as the Trainer above

            destroy_distributed()
    if trainer.rank == 0:
        print(summarize(result, cfg), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
