"""``python -m megatron_rpt.preflight --gpus N --config X [--set k=v ...]``: check a node before a run.

Owns the checks the SLURM launcher (``examples/lib/launch.sh``) runs on every compute node
before it starts torchrun: the config loads and its paths exist there, torch sees the GPUs
the allocation promised, and the packages the config needs import in this environment
(``vllm`` for ``rollout.engine=vllm``; Transformer Engine when the config asks for it, or
when ``transformer_impl=auto`` would pick it because it is installed). A broken install
otherwise surfaces minutes into the job -- after the model loaded, inside the first rollout
or the first forward -- on one rank among hundreds. Prints one line per problem (and
warnings), exits 1 when there is a problem. Accepts the trainer's arguments (``--resume``
is ignored) so the launcher passes the same command line.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import socket
import sys

import torch

from megatron_rpt.config import Config, ConfigError, load_config
from megatron_rpt.trainer.__main__ import parse_args as trainer_args


def _import_error(module: str) -> str | None:
    """Why ``import module`` fails here (None: it imports)."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any failure of a broken install is the answer
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def check_node(cfg: Config, gpus: int) -> tuple[list[str], list[str]]:
    """(problems, warnings) of running ``cfg`` on this node with ``gpus`` GPUs expected (0: CPU)."""
    host = socket.gethostname()
    problems: list[str] = []
    warnings: list[str] = []
    if gpus:
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if found < gpus:
            problems.append(
                f"{host}: expected {gpus} GPUs, torch {torch.__version__} sees {found} "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); check the allocation "
                "(--gpus-per-node) and that torch is a CUDA build")
    error = _import_error("megatron.core")
    if error:
        problems.append(f"{host}: `import megatron.core` fails ({error}); pip install -e . in this environment")
    if cfg.rollout.engine == "vllm":
        error = _import_error("vllm")
        if error:
            problems.append(f"{host}: rollout.engine=vllm but `import vllm` fails ({error}); "
                            "pip install -e '.[vllm]' in this environment, or set rollout.engine=builtin")
    impl = cfg.model.transformer_impl
    te_required = impl == "transformer_engine" or bool(cfg.model.fp8) or cfg.parallel.context_parallel > 1
    te_installed = importlib.util.find_spec("transformer_engine") is not None
    if te_required or (gpus and impl == "auto" and te_installed):
        error = _import_error("transformer_engine.pytorch")
        if error:
            why = ("model.transformer_impl=transformer_engine" if impl == "transformer_engine" else
                   f"model.fp8={cfg.model.fp8}" if cfg.model.fp8 else
                   f"parallel.context_parallel={cfg.parallel.context_parallel}" if te_required else
                   "model.transformer_impl=auto picks it because it is installed")
            problems.append(f"{host}: {why} but `import transformer_engine.pytorch` fails ({error}); pip install "
                            "-e '.[gpu]' (matching this torch and CUDA), or set model.transformer_impl=local")
    elif gpus and impl == "auto":
        warnings.append(f"{host}: Transformer Engine is not installed: model.transformer_impl=auto uses the local "
                        "spec (slower, no FP8); pip install -e '.[gpu]' for the fast path")
    return problems, warnings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_rpt.preflight", add_help=True)
    parser.add_argument("--gpus", type=int, default=0, help="GPUs this node must have (0: a CPU run)")
    own, rest = parser.parse_known_args(argv)
    args = trainer_args(rest)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"[preflight] {socket.gethostname()}: config: {exc}", file=sys.stderr)
        return 1
    problems, warnings = check_node(cfg, own.gpus)
    for line in warnings:
        print(f"[preflight] warning: {line}", file=sys.stderr)
    for line in problems:
        print(f"[preflight] error: {line}", file=sys.stderr)
    if not problems:
        print(f"[preflight] {socket.gethostname()}: ok ({own.gpus} GPU(s) expected, engine {cfg.rollout.engine}, "
              f"transformer_impl {cfg.model.transformer_impl})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
