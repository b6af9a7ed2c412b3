"""``python -m megatron_rpt.eval.solve --config CFG (--hf DIR | --ckpt DIR) --out DIR``: problem-solving responses.

The paper's reasoning-pattern analysis (section 4.5) compares a model's next-token-reasoning
responses with its *problem-solving* responses on OmniMATH. This writes the latter: each held-out
document's problem (the row field ``--field``, default ``problem``; the ``data.val_documents``
documents of the config's corpus, the ones evaluation uses) asked as a math problem with
DeepSeek-R1's recommended instruction, through the tokenizer's chat template when
``data.use_chat_template``, sampled with ``eval.temperature`` and ``eval.max_response_tokens``.

Output ``<out>/responses.jsonl``: one row per sample (``doc_id``, ``problem``, ``response``), read
by ``python -m megatron_rpt.eval.patterns --rollouts RUN/rollouts --compare <out>/responses.jsonl``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from megatron_rpt.atomic import write_text_atomic
from megatron_rpt.config import Config, ConfigError, load_config
from megatron_rpt.data.corpus import CorpusStream, heldout_doc_ids, open_sources
from megatron_rpt.data.templates import render_chat
from megatron_rpt.eval.engine_loading import LOAD_ERRORS, add_model_source_arguments, model_in_engine
from megatron_rpt.eval.reasoning import reasoning_params

log = logging.getLogger("megatron_rpt.solve")

# DeepSeek-R1's recommended instruction for math problems (its model card's usage notes).
SOLVING_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def solving_prompt(problem: str, tokenizer: Any, use_chat_template: bool) -> str:
    """The problem, then the instruction on its own line, as one user turn."""
    return render_chat(f"{problem}\n{SOLVING_INSTRUCTION}", tokenizer, use_chat_template)


def heldout_problems(cfg: Config, field: str, limit: int | None = None) -> list[tuple[str, str]]:
    """(doc id, problem text) of the held-out documents, in corpus order."""
    d = cfg.data
    if not d.paths and not d.hf_dataset:
        raise ConfigError("problem solving reads the raw rows: set data.paths (a prepared directory holds only "
                          "token ids, not the problem field)")
    sources = open_sources(d.paths, d.hf_dataset, d.hf_split, d.hf_streaming)
    held = heldout_doc_ids(sources, d.val_documents, d.seed)
    out = [(doc.doc_id, doc.text) for doc in CorpusStream(sources, [field], keep=lambda i: i in held)]
    if not out:
        raise ConfigError(f"no held-out document has a non-empty {field!r} field (data.val_documents="
                          f"{d.val_documents}); pass --field with the row field that holds the problem")
    return out[:limit] if limit else out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m megatron_rpt.eval.solve", description=__doc__.splitlines()[0])
    add_model_source_arguments(parser)
    parser.add_argument("--out", required=True, help="output directory (responses.jsonl)")
    parser.add_argument("--field", default="problem", help="row field holding the problem (default: problem)")
    parser.add_argument("--samples", type=int, default=1, help="responses per problem (default 1)")
    parser.add_argument("--max-problems", type=int, help="at most this many held-out problems")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    for name in ("samples", "max_problems"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')}={value} must be >= 1")
    return args


def _generate(cfg: Config, loaded: Any, problems: list[tuple[str, str]], samples: int,
              progress: bool) -> list[dict[str, Any]]:
    params = dataclasses.replace(reasoning_params(cfg), n=samples)
    tok = loaded.tokenizer
    rows = []
    chunk = 16
    for start in range(0, len(problems), chunk):
        batch = problems[start:start + chunk]
        prompts = [tok(solving_prompt(text, tok, cfg.data.use_chat_template), add_special_tokens=False)["input_ids"]
                   for _, text in batch]
        for (doc_id, text), outs in zip(batch, loaded.engine.generate(prompts, params)):
            rows += [{"doc_id": doc_id, "problem": text, "response": o.text, "kind": "problem_solving",
                      "model": loaded.name} for o in outs]
        if progress:
            log.info("%d / %d problems", min(start + chunk, len(problems)), len(problems))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = load_config(args.config, args.overrides, validate_paths=False)
        problems = heldout_problems(cfg, args.field, args.max_problems)
        with model_in_engine(cfg, args.hf, args.ckpt) as loaded:
            rows = _generate(cfg, loaded, problems, args.samples, progress=not args.quiet)
    except LOAD_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) / "responses.jsonl"
    write_text_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} problem-solving responses ({len(problems)} problems) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
