#!/usr/bin/env python
"""Convert between Hugging Face and Megatron-Core checkpoints, and check logits parity.

    python tools/convert.py hf-to-mcore --hf DIR --out DIR --tp N --pp M [--vp V] [--dtype bfloat16|float32]
    python tools/convert.py mcore-to-hf --ckpt DIR --out DIR [--dtype ...] [--max-shard-size 5GB]
    python tools/convert.py verify --hf DIR [--ckpt DIR] [--tp N --pp M] [--seq-len 32 --batch 2 --seed 0] [--atol 1e-4]

``hf-to-mcore`` launches TP*PP ranks itself (gloo on CPU, NCCL on GPU); each reads only its
slices of the safetensors and writes a ``torch_dist`` dist checkpoint loadable at any other
TP/PP. ``mcore-to-hf`` streams a dist checkpoint back to HF shards one layer at a time.
``verify`` runs one random token batch through transformers (float32, eager attention) and
through the Megatron model at (TP, PP) — via Megatron's pipeline schedule — and prints one
JSON line; exit code 1 when the max |logit difference| exceeds ``--atol``.

Layouts (all defined once in ``megatron_rpt/bridge/name_maps.py``):
  * QKV: Megatron's ``linear_qkv`` interleaves per query group — for each of the
    ``num_key_value_heads`` groups: its ``heads/groups`` query heads, one key head, one value
    head (``head_dim`` rows each). TP splits whole groups, so TP must divide the KV heads.
    Qwen2's q/k/v biases use the same interleaving (``linear_qkv.bias``).
  * MLP: ``linear_fc1`` = ``[gate; up]``; a TP rank holds ``[gate_r; up_r]``.
  * Qwen3 qk-norm: ``q_norm`` / ``k_norm`` -> ``self_attention.q_layernorm`` / ``k_layernorm``.
  * Embeddings: ``embed_tokens`` -> ``embedding.word_embeddings``; ``lm_head`` -> ``output_layer``
    unless ``tie_word_embeddings`` (then the output layer reuses the embedding; with PP > 1 the
    last stage holds a copy, filled from ``embed_tokens``).
  * Vocabulary padding: rows padded with zeros to a multiple of
    ``--make-vocab-size-divisible-by`` (default 128) x TP; removed again on export.

Memory: ``hf-to-mcore`` ranks read only their slices (``safetensors`` ``get_slice``); on CPU each
rank's parameters live in memory-mapped scratch files (``<out>.scratch-XXXX``, removed at the
end), so its anonymous RAM is the framework plus a few of the largest tensors, whatever the
shard size (see ``megatron_rpt/weights/convert.py``).
``mcore-to-hf`` holds one layer at a time and writes each tensor straight into its shard.

Every bad input (missing shard or tensor, shape mismatch, unsupported architecture, TP not
dividing heads / KV heads / MLP width, PP not dividing layers, existing output without
``--force``) exits non-zero with a message and leaves no output directory behind: results are
written to ``<out>.tmp-XXXX`` and renamed into place only when complete. Ctrl-C or SIGTERM stops
the ranks and removes the temporary output (exit 130); the ranks also die when this process is
killed outright (they ask the kernel for it), though then nothing can remove the temporary files.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from megatron_rpt.atomic import OutputExistsError
from megatron_rpt.config import ConfigError
from megatron_rpt.weights import convert
from megatron_rpt.weights.hf_io import CheckpointError, parse_size
from megatron_rpt.weights.parity import verify

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

EXIT_BAD_INPUT = 2
EXIT_MISMATCH = 1
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    to_mcore = sub.add_parser("hf-to-mcore", help="HF safetensors -> Megatron dist checkpoint (torch_dist)")
    to_mcore.add_argument("--hf", required=True, type=Path, help="HF model directory (config.json + safetensors)")
    to_mcore.add_argument("--out", required=True, type=Path, help="output checkpoint directory (must not exist)")
    to_mcore.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks used for the conversion")
    to_mcore.add_argument("--pp", type=int, default=1, help="pipeline-parallel ranks used for the conversion")
    to_mcore.add_argument("--vp", type=int, default=None, help="virtual pipeline chunks per rank (needs --pp >= 2)")
    to_mcore.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None,
                          help="stored dtype (default: the HF checkpoint's dtype)")
    to_mcore.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    to_mcore.add_argument("--force", action="store_true", help="replace --out if it exists")
    to_mcore.add_argument("--no-progress", action="store_true")

    to_hf = sub.add_parser("mcore-to-hf", help="Megatron dist checkpoint -> HF safetensors shards")
    to_hf.add_argument("--ckpt", required=True, type=Path, help="dist checkpoint directory (hf-to-mcore output, "
                       "a training checkpoint, or a dir with latest_checkpointed_iteration.txt)")
    to_hf.add_argument("--out", required=True, type=Path, help="output HF model directory (must not exist)")
    to_hf.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None,
                       help="exported dtype (default: the checkpoint's)")
    to_hf.add_argument("--hf-config", type=Path, default=None,
                       help="HF model dir with config.json/tokenizer (default: <ckpt>/hf)")
    to_hf.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB")
    to_hf.add_argument("--force", action="store_true", help="replace --out if it exists")
    to_hf.add_argument("--no-progress", action="store_true")

    verify = sub.add_parser("verify", help="logits parity: transformers vs Megatron at (TP, PP)")
    verify.add_argument("--hf", required=True, type=Path, help="HF model directory (the reference)")
    verify.add_argument("--ckpt", type=Path, default=None,
                        help="converted dist checkpoint to load into Megatron (default: load --hf directly)")
    verify.add_argument("--tp", type=int, default=1)
    verify.add_argument("--pp", type=int, default=1)
    verify.add_argument("--seq-len", type=int, default=32)
    verify.add_argument("--batch", type=int, default=2)
    verify.add_argument("--seed", type=int, default=0)
    verify.add_argument("--atol", type=float, default=1e-4)
    return parser


def _worker_error(exc: RuntimeError) -> str:
    """The last exception line of a failed rank's traceback (spawn reports them as text)."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    last = lines[-1] if lines else str(exc)
    return last.split(": ", 1)[1] if ": " in last and last.split(":", 1)[0].replace(".", "").isidentifier() else last


def run(args: argparse.Namespace) -> int:
    if args.command == "hf-to-mcore":
        settings = convert.ConvertSettings(
            tensor_parallel=args.tp, pipeline_parallel=args.pp, virtual_pipeline=args.vp, dtype=args.dtype,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, progress=not args.no_progress,
        )
        out = convert.hf_to_mcore(args.hf, args.out, settings, force=args.force)
        print(json.dumps({"written": str(out), **convert.read_meta(out)}))
        return 0
    if args.command == "mcore-to-hf":
        out = convert.mcore_to_hf(args.ckpt, args.out, dtype=args.dtype, hf_config=args.hf_config,
                                  max_shard_size=parse_size(args.max_shard_size), force=args.force,
                                  progress=not args.no_progress)
        print(json.dumps({"written": str(out)}))
        return 0

    report = verify(args.hf, args.ckpt, tensor_parallel=args.tp, pipeline_parallel=args.pp, seq_len=args.seq_len,
                    batch=args.batch, seed=args.seed, atol=args.atol)
    print(json.dumps(report))
    return 0 if report["ok"] else EXIT_MISMATCH


def _interrupt(signum: int, _frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C: the ranks are killed and the temporary output is removed."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("error: interrupted; the conversion ranks were stopped and nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CheckpointError, ConfigError, OutputExistsError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RuntimeError as exc:  # a rank failed: show its traceback, then the reason on the last line
        print(str(exc), file=sys.stderr)
        print(f"error: {_worker_error(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
