#!/usr/bin/env python3
"""``python tools/plot.py --run DIR [--out DIR] [--points FILE] [--metric KEY]``: figures of an RPT run.

Writes into ``--out`` (default: ``DIR/plots``):
  * ``training_curves.png``: reward, accuracy by difficulty, response length (and val/* metrics);
  * ``scaling.png`` + ``scaling.json``: held-out accuracy (``val/*``, logged every
    ``train.eval_interval`` steps) vs cumulative training compute (FLOPs: training 6*N*trained
    tokens + rollout 2*N*generated tokens, N of the model the run trained, from its ``model.json``)
    with the fit P(C) = A / C^alpha + P* and its R^2 per difficulty bucket; the plot and the JSON
    name the metric. Training accuracy is fitted only when asked (``--metric 'accuracy/{bucket}'``).
    ``--points FILE`` fits a JSON list of (compute, accuracy) points instead of the run's metrics.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from megatron_rpt.atomic import write_text_atomic
from megatron_rpt.eval.plots import (
    NoHeldOutAccuracy,
    default_metric,
    describe_metric,
    fit_series,
    load_points,
    plot_scaling,
    plot_training_curves,
    read_metrics_file,
    run_compute_model,
    scaling_points,
)
from megatron_rpt.eval.scaling import PowerLawFit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python tools/plot.py", description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a training run's logging.dir (holds metrics.jsonl and config.yaml)")
    parser.add_argument("--out", help="output directory (default: RUN/plots)")
    parser.add_argument("--points", help="JSON points for the scaling fit instead of the run's metrics: "
                                         "[{\"compute\": C, \"accuracy\": P, \"series\": \"hard\"}, ...]")
    parser.add_argument("--metric", help="accuracy key to fit; may contain {bucket}, e.g. "
                                         "'val/reasoning_random1_{bucket}' "
                                         "(default: val/* if logged, else accuracy/{bucket})")
    parser.add_argument("--hf-config",
                        help="model config.json for the parameter count (default: the run's model.hf_config)")
    parser.add_argument("--num-params", type=int, help="parameter count N (overrides --hf-config)")
    parser.add_argument("--data-parallel", type=int, help="data-parallel size, for runs that log only per-rank "
                                                          "rollout/generated_tokens (default: from config.yaml)")
    args = parser.parse_args(argv)
    if not args.run and not args.points:
        parser.error("give --run DIR (training curves + scaling from its metrics) and/or --points FILE")
    if not args.out and not args.run:
        parser.error("--out is required without --run")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out) if args.out else Path(args.run) / "plots"
    written: list[Path] = []
    metric = None
    try:
        rows = read_metrics_file(args.run) if args.run else None
        if rows is not None:
            written.append(plot_training_curves(rows, out / "training_curves.png", title=Path(args.run).name))
        if args.points:
            points, source = load_points(args.points), str(args.points)
        else:
            metric = args.metric or default_metric(rows)
            model = run_compute_model(args.run, args.num_params, args.hf_config, args.data_parallel)
            points = scaling_points(rows, model, metric)
            source = f"{args.run}/metrics.jsonl (N={model.num_params:,}, data-parallel={model.data_parallel})"
    except NoHeldOutAccuracy as exc:  # the curves are written; the fit is refused, not silently swapped
        for path in written:
            print(f"wrote {path}")
        print(f"no scaling fit: {exc}", file=sys.stderr)
        return 0
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    fits = fit_series(points)
    if metric is not None:
        print(f"fitting {metric}: {describe_metric(metric)}")
    written.append(plot_scaling(points, fits, out / "scaling.png", metric=metric))
    summary = {"source": source, "metric": metric, "metric_meaning": describe_metric(metric) if metric else None,
               "series": {}}
    for name, fit in fits.items():
        entry = {"points": [list(p) for p in points[name]]}
        if isinstance(fit, PowerLawFit):
            entry["fit"] = {k: (v if math.isfinite(v) else None) for k, v in fit.to_dict().items()}
            print(f"{name:>8}: {fit.label()}  [{fit.num_points} points]")
        else:
            entry["fit_error"] = fit
            print(f"{name:>8}: no fit ({fit})")
        summary["series"][name] = entry
    write_text_atomic(out / "scaling.json", json.dumps(summary, indent=2) + "\n")
    written.append(out / "scaling.json")
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
