"""``python -m megatron_rpt.eval --config CFG (--hf DIR | --ckpt DIR) [--mode standard|reasoning|both]``

Next-token prediction accuracy on the held-out validation split, by difficulty (the paper's
Table 1): every position of the ``data.val_documents`` held-out documents (``eval.positions_per_doc``
/ ``eval.max_positions`` cap them), standard next-token prediction (argmax == ground-truth token)
and next-token reasoning (``eval.pass_k`` samples with the prompt template; Random@1 and Pass@k of
the prefix-match reward), each bucket with its count and 95 % confidence interval, and the
positions no answer can win. Prints the table and writes ``eval.json``, ``eval.md`` and
``positions.jsonl`` (one row per position) into ``--out``.

``--hf DIR`` loads a Hugging Face checkpoint straight into the rollout engine; ``--ckpt DIR`` a
Megatron checkpoint (``tools/convert.py hf-to-mcore`` output, a training ``iter_XXXXXXX`` or the
training ``checkpoint.dir``), loaded through Megatron-Core on CPU and streamed into the engine.
Merge the JSON of several models into one table with ``python -m megatron_rpt.eval.report``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import typing
import warnings
from pathlib import Path

from megatron_rpt.atomic import write_text_atomic
from megatron_rpt.config import Config, ConfigError, EvalMode, load_config
from megatron_rpt.data.tokenizer import token_bytes
from megatron_rpt.eval.engine_loading import LOAD_ERRORS, add_model_source_arguments, model_in_engine
from megatron_rpt.eval.report import format_table, write_report
from megatron_rpt.eval.runner import run_evaluation

log = logging.getLogger("megatron_rpt.eval")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m megatron_rpt.eval", description=__doc__.splitlines()[0])
    add_model_source_arguments(parser)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set eval.pass_k=4 (repeatable)")
    parser.add_argument("--mode", choices=("standard", "reasoning", "both"),
                        help="which evaluation to run (default: eval.modes)")
    parser.add_argument("--out", help="output directory (default: <logging.dir>/eval/<name>)")
    parser.add_argument("--name", help="model name in the table (default: the directory name)")
    parser.add_argument("--save-responses", action="store_true",
                        help="also store every sampled response in positions.jsonl (large)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def _modes(args: argparse.Namespace, cfg: Config) -> tuple[str, ...]:
    if args.mode == "both":
        return tuple(typing.get_args(EvalMode))
    if args.mode:
        return (args.mode,)
    return tuple(cfg.eval.modes)


def _position_rows(val, res, tokenizer, save_responses: bool) -> str:
    lines = []
    for i, problem in enumerate(val.problems):
        row = {
            "doc_id": getattr(problem, "doc_id", None),
            "position": getattr(problem, "position", None),
            "entropy": None if val.entropies is None else val.entropies[i],
            "target": b"".join(problem.target_token_bytes[:16]).decode("utf-8", "replace"),  # its start
            "writable_tokens": val.writable[i] if val.writable else None,  # None: no answer can win it
        }
        if res.standard is not None:
            pred = res.standard_pred[i]
            try:
                row["standard_prediction"] = token_bytes(tokenizer, [pred])[0].decode("utf-8", "replace")
            except ValueError:  # the model's vocabulary is larger than the tokenizer's
                row["standard_prediction"] = f"<id {pred}>"
            row["standard_correct"] = res.standard[i]
        if res.rewards is not None and res.rewards[i] is not None:
            row["rewards"] = res.rewards[i]
            if save_responses:
                row["responses"] = res.responses[i]
        lines.append(json.dumps(row, ensure_ascii=False))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="megatron.*")
    try:
        cfg = load_config(args.config, args.overrides, validate_paths=False)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    modes = _modes(args, cfg)

    try:
        with model_in_engine(cfg, args.hf, args.ckpt, args.name) as loaded:
            log.info("evaluating %s (%s) in mode(s) %s", loaded.name, loaded.source, ", ".join(modes))
            report, val, res = run_evaluation(cfg, loaded.engine, loaded.tokenizer, loaded.name, modes,
                                              progress=not args.quiet, extra_meta={"source": loaded.source})
    except LOAD_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(cfg.logging.dir) / "eval" / loaded.name.replace("/", "_")
    print(format_table(report))
    print(f"difficulty scorer: {val.scorer}")
    json_path, md_path = write_report(report, out)
    write_text_atomic(out / "positions.jsonl", _position_rows(val, res, loaded.tokenizer, args.save_responses))
    print(f"wrote {json_path}, {md_path} and {out / 'positions.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
