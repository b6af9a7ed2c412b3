"""Load the model to evaluate into a rollout engine: a Hugging Face directory or a Megatron checkpoint.

Owns: :func:`load_hf_model` (``--hf DIR``: safetensors streamed straight into the engine),
:func:`load_megatron_model` (``--ckpt DIR``: the weights loaded through Megatron-Core on CPU --
TP=PP=1 in one gloo process -- then streamed into the engine by the
:class:`~megatron_rpt.bridge.resharding.WeightBridge`, the same path the trainer syncs with),
:func:`model_in_engine` (either one for a ``with`` block, the command lines' one load/teardown path),
and :func:`resolve_megatron_checkpoint`, which accepts every Megatron layout we write:

* ``tools/convert.py hf-to-mcore`` output (a dist checkpoint: ``metadata.json``; the HF config and
  tokenizer in ``hf/``, the dtype in ``rpt_meta.json``), or Megatron-LM's
  ``latest_checkpointed_iteration.txt`` + ``iter_XXXXXXX/``;
* a training checkpoint ``<checkpoint.dir>/iter_XXXXXXX`` (``dist/`` + ``complete.json``);
* the training ``<checkpoint.dir>`` itself (the newest complete checkpoint is taken).

A checkpoint saved at any TP/PP loads: the vocabulary padding is read from the stored embedding.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader

from megatron_rpt.bridge.resharding import WeightBridge
from megatron_rpt.config import Config, ConfigError, ParallelConfig
from megatron_rpt.data.tokenizer import has_tokenizer_files, load_tokenizer
from megatron_rpt.distributed import destroy_distributed, init_distributed
from megatron_rpt.errors import UserError
from megatron_rpt.model.build import build_model_chunks
from megatron_rpt.model.dtypes import DTYPES
from megatron_rpt.model.hf_config import ArchConfig, load_hf_config
from megatron_rpt.model.zoo import resolve_model_dir
from megatron_rpt.rollout import make_engine
from megatron_rpt.trainer import checkpointing
from megatron_rpt.weights.hf_io import HFCheckpointReader
from megatron_rpt.weights.load import validate_hf_checkpoint
from megatron_rpt.weights.megatron_ckpt import load_model_checkpoint, resolve_checkpoint_dir

log = logging.getLogger(__name__)

__all__ = ["LOAD_ERRORS", "LoadedModel", "add_model_source_arguments", "load_hf_model", "load_megatron_model",
           "model_in_engine", "resolve_megatron_checkpoint", "eval_engine_config"]


class ModelLoadError(UserError, FileNotFoundError):
    """The model to evaluate cannot be found or read; the message names the path and the fix."""


# What the evaluation command lines report as one ``error:`` line: a user's mistake (config, path,
# checkpoint) and the ValueError / FileNotFoundError that data and checkpoint readers raise for a bad file.
LOAD_ERRORS = (UserError, ValueError, FileNotFoundError)


@dataclass
class LoadedModel:
    name: str  # shown in the report's rows
    source: str  # "hf:<dir>" | "megatron:<dir>"
    arch: ArchConfig
    engine: Any  # a RolloutEngine
    tokenizer: Any


def eval_engine_config(cfg: Config) -> Config:
    """A copy of ``cfg`` whose engine fits evaluation: room for eval.max_response_tokens."""
    out = copy.deepcopy(cfg)
    if cfg.eval.max_response_tokens:
        out.rollout.max_response_tokens = cfg.eval.max_response_tokens
    return out


def _tokenizer_for(cfg: Config, *dirs: Path | None) -> Any:
    if cfg.model.tokenizer:
        return load_tokenizer(cfg.model.tokenizer)
    for d in dirs:
        if d is not None and has_tokenizer_files(d):
            return load_tokenizer(d)
    raise ConfigError("no tokenizer: set model.tokenizer (--set model.tokenizer=DIR) or put tokenizer.json "
                      "(or a SentencePiece tokenizer.model) next to the model's config.json")


def _safetensors_stream(model_dir: Path, arch: ArchConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint, after checking (headers only) that none is missing: the
    standard mode reads the decoder directly, where a never-written weight would go unnoticed."""
    with HFCheckpointReader(model_dir) as reader:
        validate_hf_checkpoint(reader, arch)
        for name in reader.keys():
            if name.endswith("rotary_emb.inv_freq"):  # a buffer some old checkpoints store
                continue
            yield name, reader.read(name)


def load_hf_model(cfg: Config, hf_dir: str | Path, name: str | None = None) -> LoadedModel:
    """Engine (``rollout.engine``) holding the Hugging Face checkpoint in ``hf_dir``."""
    path = Path(hf_dir)
    if not path.is_dir():
        raise ModelLoadError(f"--hf {hf_dir}: no such directory; give a Hugging Face model directory")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"--hf {hf_dir}: no config.json; this is not a Hugging Face model directory "
                             "(for a Megatron checkpoint use --ckpt)")
    arch = load_hf_config(path)
    tokenizer = _tokenizer_for(cfg, path)
    ecfg = eval_engine_config(cfg)
    ecfg.model.hf_checkpoint = str(path)  # the vLLM engine loads it itself
    engine = make_engine(ecfg, arch, tokenizer)
    if cfg.rollout.engine == "builtin":
        engine.update_weights(_safetensors_stream(path, arch))
    return LoadedModel(name or path.name, f"hf:{path}", arch, engine, tokenizer)


# ----------------------------------------------------------------------------- Megatron checkpoints


def resolve_megatron_checkpoint(path: str | Path) -> Path:
    """The directory holding the dist checkpoint's ``metadata.json`` for any layout we write."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"--ckpt {path}: no such directory")
    if not p.is_dir():
        raise ModelLoadError(f"--ckpt {path}: is a file; give a checkpoint directory")
    if (p / checkpointing.COMPLETE).is_file() or (p / "dist").is_dir():  # one training checkpoint
        if not (p / checkpointing.COMPLETE).is_file():
            raise ModelLoadError(f"--ckpt {path}: no {checkpointing.COMPLETE}: the checkpoint was interrupted "
                                 "mid-save; use an older iter_* directory")
        return _require_metadata(p / "dist", path)
    if (p / "latest").is_file() or any(c.name.startswith("iter_") and (c / "dist").is_dir() for c in p.iterdir()):
        for cand in checkpointing.candidates(p):  # newest first
            if (cand / checkpointing.COMPLETE).is_file() and (cand / "dist" / "metadata.json").is_file():
                log.info("--ckpt %s: using %s", path, cand.name)
                return cand / "dist"
        raise ModelLoadError(f"--ckpt {path}: a training checkpoint directory without any complete iter_* "
                             "checkpoint (each needs complete.json and dist/metadata.json)")

    try:
        return resolve_checkpoint_dir(p)  # converter output / Megatron-LM layout
    except ValueError as exc:
        raise ModelLoadError(f"--ckpt {path}: {exc}") from None


def _require_metadata(dist_dir: Path, given: str | Path) -> Path:
    if not (dist_dir / "metadata.json").is_file():
        raise ModelLoadError(f"--ckpt {given}: {dist_dir} has no metadata.json; the checkpoint is incomplete")
    return dist_dir


def _arch_for_checkpoint(cfg: Config, given: Path, mcore_dir: Path) -> tuple[ArchConfig, Path | None]:
    """The architecture: the HF config saved with the checkpoint, else model.hf_config.

    ``tools/convert.py`` keeps it in ``<out>/hf/``; a training checkpoint has none (the config the
    run was trained with says which model it is).
    """
    near = [mcore_dir, mcore_dir / "hf", given, given / "hf"]
    if mcore_dir.name == "dist":  # training layout: <checkpoint.dir>/iter_X/dist
        near += [mcore_dir.parent, mcore_dir.parent.parent]
    for d in near:
        if (d / "config.json").is_file():
            return load_hf_config(d), d
    source = cfg.model.hf_config or cfg.model.hf_checkpoint
    if source and source.startswith("auto:"):
        source = str(resolve_model_dir(source, cfg.model.tokenizer))
    if not source or not Path(source).exists():
        raise ConfigError(f"--ckpt {given}: no config.json saved with the checkpoint and model.hf_config "
                          f"({source!r}) does not exist; pass --config with the training config or "
                          "--set model.hf_config=CONFIG.json")
    model_dir = Path(source) if Path(source).is_dir() else Path(source).parent
    return load_hf_config(source), model_dir


def _checkpoint_model_config(cfg: Config, given: Path, mcore_dir: Path) -> Any:
    """``cfg.model`` adjusted to how the checkpoint was written.

    * vocabulary padding: Megatron pads the vocabulary to a multiple of
      ``make_vocab_size_divisible_by * TP`` *of the run that saved it*; at TP=1 that padding is
      reproduced by padding to the stored row count itself;
    * dtype: the converter records it in ``rpt_meta.json`` (training checkpoints use model.params_dtype).
    """
    model_cfg = copy.deepcopy(cfg.model)
    for meta_path in (mcore_dir / "rpt_meta.json", given / "rpt_meta.json"):
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            if meta.get("dtype") in ("float32", "bfloat16", "float16"):
                model_cfg.params_dtype = meta["dtype"]
            break
    try:
        stored = FileSystemReader(str(mcore_dir)).read_metadata().state_dict_metadata
    except Exception as exc:  # noqa: BLE001 - any unreadable metadata is a broken checkpoint
        raise ModelLoadError(f"--ckpt {given}: cannot read {mcore_dir / '.metadata'} ({exc}); "
                             "the checkpoint is incomplete or not a torch_dist checkpoint") from None
    rows = [int(md.size[0]) for key, md in stored.items()
            if key.endswith("embedding.word_embeddings.weight") and hasattr(md, "size")]
    if rows:
        model_cfg.make_vocab_size_divisible_by = rows[0]
    return model_cfg


def load_megatron_model(cfg: Config, ckpt_dir: str | Path, name: str | None = None) -> LoadedModel:
    """Load a Megatron checkpoint on CPU (TP=PP=1, one gloo process) and stream it into the engine.

    Initialises ``torch.distributed`` when needed (a single-rank gloo group). The Megatron model is
    dropped once the engine holds the weights.
    """
    given = Path(ckpt_dir)
    mcore_dir = resolve_megatron_checkpoint(given)
    arch, model_dir = _arch_for_checkpoint(cfg, given, mcore_dir)
    model_cfg = _checkpoint_model_config(cfg, given, mcore_dir)
    tokenizer = _tokenizer_for(cfg, model_dir, given)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() != 1:
        raise RuntimeError("load_megatron_model runs in a single process; it was called inside a "
                           f"{torch.distributed.get_world_size()}-rank job")
    init_distributed(1, 1, 1, 1, None, seed=cfg.train.seed)
    chunks = build_model_chunks(arch, model_cfg, ParallelConfig(), config_overrides={"perform_initialization": False})
    load_model_checkpoint(chunks, mcore_dir)
    ecfg = eval_engine_config(cfg)
    ecfg.model.hf_checkpoint = None  # weights come from the bridge
    engine = make_engine(ecfg, arch, tokenizer)
    bridge = WeightBridge(chunks, arch, bucket_mb=cfg.rollout.bucket_mb, dtype=DTYPES[cfg.rollout.dtype])
    bridge.sync(engine)
    del bridge, chunks
    label = name or (given.name if not given.name.startswith("iter_") else f"{given.parent.name}/{given.name}")
    return LoadedModel(label, f"megatron:{mcore_dir}", arch, engine, tokenizer)


def add_model_source_arguments(parser: argparse.ArgumentParser) -> None:
    """The evaluation command lines' shared flags: ``--config`` and the model, exactly one of ``--hf DIR``
    and ``--ckpt DIR`` (what :func:`model_in_engine` loads)."""
    parser.add_argument("--config", required=True, help="YAML config (data, template, eval.* settings)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", metavar="DIR", help="Hugging Face model directory (config.json + safetensors)")
    source.add_argument("--ckpt", metavar="DIR",
                        help="Megatron checkpoint (converter output, iter_XXXXXXX, or checkpoint.dir)")


@contextmanager
def model_in_engine(cfg: Config, hf_dir: str | Path | None, ckpt_dir: str | Path | None,
                    name: str | None = None) -> Iterator[LoadedModel]:
    """The model of ``--hf`` or ``--ckpt`` (exactly one is set) in a rollout engine, for a ``with`` block.

    Loading a Megatron checkpoint initialises a single-rank process group (and the engine may hold
    vLLM, whose shutdown destroys that group), so both are torn down when the block ends, also on an
    error: a caller in the same process (tests, a notebook) can load the next model. Catch
    :data:`LOAD_ERRORS` around the block to report a bad input as one line.
    """
    if (hf_dir is None) == (ckpt_dir is None):
        raise ValueError(f"model_in_engine needs exactly one of hf_dir ({hf_dir!r}) and ckpt_dir ({ckpt_dir!r})")
    megatron = ckpt_dir is not None
    try:
        yield load_megatron_model(cfg, ckpt_dir, name) if megatron else load_hf_model(cfg, hf_dir, name)
    finally:
        if megatron:
            destroy_distributed()
