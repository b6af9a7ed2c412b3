"""Streaming Hugging Face safetensors I/O.

Owns:
  * :class:`HFCheckpointReader`: a lazy view of a HF model directory (single
    ``model.safetensors`` or a sharded ``model.safetensors.index.json``). Files are opened with
    ``safe_open`` (memory-mapped) only when first needed, and :meth:`~HFCheckpointReader.read`
    uses ``get_slice`` so a tensor-parallel rank reads only its rows / columns.
  * :class:`HFShardWriter`: plans ``model-0000x-of-0000y.safetensors`` shards of at most
    ``max_shard_bytes`` up front, then writes each tensor straight to its offset (any order,
    nothing buffered), plus the index.
  * copying the non-weight files of a model directory (config, generation config, tokenizer).

Every problem with the input (no weights, a shard named by the index but missing, a tensor
missing from its file) is a :class:`CheckpointError` naming the file and the fix.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

from megatron_rpt.errors import UserError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files of a model directory that are not weights and travel with a converted checkpoint.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)
CONFIG_FILES = ("config.json", "generation_config.json")


class CheckpointError(UserError, ValueError):
    """A checkpoint on disk is missing, incomplete or does not match the architecture."""


class HFCheckpointReader:
    """Lazy, slice-capable reader of the safetensors weights in a HF model directory."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"Hugging Face checkpoint directory {self.dir} does not exist")
        self._handles: dict[str, object] = {}
        self._keys: dict[str, set[str]] = {}
        self.weight_map = self._weight_map()

    def _weight_map(self) -> dict[str, str]:
        index = self.dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index} is not a valid safetensors index (no 'weight_map'): {exc}") from None
            missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
            if missing:
                raise CheckpointError(
                    f"{index} lists shard file(s) that do not exist: {', '.join(missing)}; "
                    "the download is incomplete — fetch the missing shards again"
                )
            return dict(weight_map)
        single = self.dir / SINGLE_NAME
        if single.is_file():
            return {name: SINGLE_NAME for name in self._open(SINGLE_NAME).keys()}
        bins = sorted(p.name for p in self.dir.glob("*.bin"))
        hint = (
            f" (found {', '.join(bins)}: re-save with transformers' save_pretrained(safe_serialization=True))"
            if bins else ""
        )
        raise CheckpointError(f"no {SINGLE_NAME} or {INDEX_NAME} in {self.dir}{hint}")

    # ------------------------------------------------------------------ lookups

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _open(self, file: str):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(self.dir / file), framework="pt")
            except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
                raise CheckpointError(f"{self.dir / file} is not a readable safetensors file ({exc}); "
                                      "re-download or re-save it") from None
        return self._handles[file]

    def _file_keys(self, file: str) -> set[str]:
        if file not in self._keys:
            self._keys[file] = set(self._open(file).keys())
        return self._keys[file]

    def _handle(self, name: str):
        if name not in self.weight_map:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {self.dir}")
        handle = self._open(self.weight_map[name])
        if name not in self._file_keys(self.weight_map[name]):
            raise CheckpointError(
                f"{self.dir / INDEX_NAME} maps {name!r} to {self.weight_map[name]}, but that file has no such tensor"
            )
        return handle

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str, rows: tuple[int, int, int] | None = None) -> torch.Tensor:
        """The tensor ``name``, or only ``tensor.narrow(dim, start, stop - start)`` for ``rows=(dim, start, stop)``.

        Only the requested bytes are read from the memory-mapped file.
        """
        handle = self._handle(name)
        if rows is None:
            return handle.get_tensor(name)
        dim, start, stop = rows
        tensor_slice = handle.get_slice(name)
        index = [slice(None)] * len(tensor_slice.get_shape())
        index[dim] = slice(start, stop)
        return tensor_slice[tuple(index)]

    def close(self) -> None:
        self._handles.clear()
        self._keys.clear()

    def __enter__(self) -> "HFCheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def parse_size(text: str | int) -> int:
    """``"5GB"`` / ``"200MB"`` / ``"300KB"`` / ``12345`` -> bytes."""
    if isinstance(text, int):
        return text
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40, "B": 1}
    clean = text.strip().upper()
    for unit, factor in units.items():
        if clean.endswith(unit) and clean[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(clean[: -len(unit)]) * factor)
    if clean.isdigit():
        return int(clean)
    raise ValueError(f"size {text!r} is not understood; write e.g. 5GB, 500MB or 300KB")


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}


class HFShardWriter:
    """Writes a planned set of tensors into HF-style safetensors shards, in any order, without buffering.

    The shard layout is fixed up front from ``(name, shape)`` entries (in file order), so each
    shard's header is written first and every tensor goes straight to its byte offset when it
    arrives: peak memory is the tensor being written. Shards are ``model-0000x-of-0000y.safetensors``
    (or one ``model.safetensors``) of at most ``max_shard_bytes`` (a larger single tensor gets
    its own shard), plus ``model.safetensors.index.json`` when there are several.
    """

    def __init__(self, out_dir: str | Path, entries: Iterable[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                 max_shard_bytes: int = 5 << 30):
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"cannot write dtype {dtype} to safetensors; use one of {list(SAFETENSORS_DTYPES)}")
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype
        item = torch.empty((), dtype=dtype).element_size()
        shards: list[list[tuple[str, tuple[int, ...], int]]] = [[]]
        used = 0
        for name, shape in entries:
            nbytes = item * int(torch.Size(shape).numel())
            if shards[-1] and used + nbytes > max_shard_bytes:
                shards.append([])
                used = 0
            shards[-1].append((name, tuple(shape), nbytes))
            used += nbytes
        count = len(shards)
        self.total_bytes = 0
        self._where: dict[str, tuple[Path, int, tuple[int, ...]]] = {}  # name -> (file, absolute offset, shape)
        self.files: list[Path] = []
        for i, shard in enumerate(shards):
            path = self.dir / (SINGLE_NAME if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors")
            header: dict[str, object] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name, shape, nbytes in shard:
                if name in header:
                    raise ValueError(f"tensor {name!r} planned twice")
                header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                                "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)  # safetensors pads the header to 8-byte alignment
            start = 8 + len(blob)
            with open(path, "wb") as f:
                f.write(len(blob).to_bytes(8, "little"))
                f.write(blob)
                f.truncate(start + offset)
            for name, shape, nbytes in shard:
                self._where[name] = (path, start + header[name]["data_offsets"][0], shape)  # type: ignore[index]
            self.files.append(path)
            self.total_bytes += offset
        self._written: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._where:
            raise KeyError(f"tensor {name!r} is not part of the planned export")
        if name in self._written:
            raise ValueError(f"tensor {name!r} written twice")
        path, offset, shape = self._where[name]
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: got shape {list(tensor.shape)}, the export plan says {list(shape)}")
        data = tensor.detach().to(device="cpu", dtype=self.dtype).contiguous().reshape(-1).view(torch.uint8)
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(data.numpy().data)
        self._written.add(name)

    def finish(self) -> list[Path]:
        """Check every planned tensor was written; write the index (several shards)."""
        missing = [name for name in self._where if name not in self._written]
        if missing:
            raise CheckpointError(f"export incomplete: {len(missing)} tensor(s) never written, e.g. {missing[:4]}")
        if len(self.files) > 1:
            weight_map = {name: where[0].name for name, where in self._where.items()}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return list(self.files)


def copy_model_files(
    src: str | Path, dst: str | Path, names: Iterable[str] = CONFIG_FILES + TOKENIZER_FILES
) -> list[str]:
    """Copy the listed non-weight files that exist in ``src`` to ``dst``; return the names copied."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied
