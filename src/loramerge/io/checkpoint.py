"""Lazy, tensor-by-tensor reading of transformers checkpoints (sharded safetensors, or ``.bin`` with
``weights_only=True``). Nothing is read until a tensor is asked for."""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from loramerge.errors import BadInput, brief
from loramerge.io.gguf import dense_folder, is_gguf_reference
from loramerge.io.hub import resolve_folder

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}  # fmt: skip
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.bin"]


@dataclass
class Checkpoint:
    """One model folder: its ``config.json`` and where each tensor lives."""

    folder: Path
    source: str
    files: dict[str, Path]  # tensor name -> file holding it
    config: dict[str, Any] = field(default_factory=dict)
    _bins: dict[Path, Any] = field(default_factory=dict, repr=False)

    @property
    def names(self) -> list[str]:
        return list(self.files)

    @contextmanager
    def _open(self, path: Path) -> Iterator[Any]:
        """A safetensors handle for one read, closed right after: mapped pages of inputs are released
        as the merge moves on, so resident memory does not grow with the model. ``.bin`` shards are
        unpickled once (memory-mapped, ``weights_only=True``) and kept."""
        try:
            if path.suffix == ".safetensors":
                with safe_open(path, framework="pt", device="cpu") as handle:
                    yield handle
                return
            if path not in self._bins:
                self._bins[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            yield self._bins[path]
        except FileNotFoundError:
            raise BadInput(f"model {self.source}: missing weight file {path.name}") from None
        except (SafetensorError, OSError, EOFError) as error:
            raise BadInput(f"model {self.source}: cannot read {path.name} ({brief(error)})") from error
        except (RuntimeError, ValueError, pickle.UnpicklingError) as error:  # weights_only refuses objects
            raise BadInput(f"model {self.source}: {path.name} is not a plain state dict ({brief(error)})") from error

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise BadInput(f"model {self.source}: has no tensor {name}")
        with self._open(self.files[name]) as handle:
            try:
                return handle.get_tensor(name) if hasattr(handle, "get_tensor") else handle[name]
            except (SafetensorError, KeyError) as error:
                raise BadInput(f"model {self.source}: cannot read tensor {name} ({brief(error)})") from error

    def layout(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of a tensor, from the file header (nothing is read for safetensors)."""
        if name not in self.files:
            raise BadInput(f"model {self.source}: has no tensor {name}")
        with self._open(self.files[name]) as handle:
            if hasattr(handle, "get_slice"):
                piece = handle.get_slice(name)
                return tuple(piece.get_shape()), _DTYPES[piece.get_dtype()]
            tensor = handle[name]
            return tuple(tensor.shape), tensor.dtype

    @property
    def num_layers(self) -> int | None:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(self.config.get(key), int):
                return self.config[key]
        return None


def resolve_model_dir(ref: str) -> Path:
    """A model folder, a Hub repo id (fetched), or a GGUF file (its cached dequantized folder)."""
    if is_gguf_reference(ref):
        return dense_folder(ref)
    return resolve_folder(ref, "model", "a model folder", HUB_PATTERNS)


def _read_json(path: Path, source: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadInput(f"model {source}: cannot read {path.name} ({brief(error)})") from error


def _index_files(folder: Path, index_name: str, source: str) -> dict[str, Path]:
    index = _read_json(folder / index_name, source)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise BadInput(f"model {source}: {index_name} has no weight_map")
    files = {name: folder / shard for name, shard in weight_map.items()}
    for shard in sorted({path for path in files.values()}):
        if not shard.is_file():
            raise BadInput(f"model {source}: missing shard {shard.name} listed in {index_name}")
    return files


def _single_file(path: Path, source: str) -> dict[str, Path]:
    if path.suffix == ".safetensors":
        try:
            with safe_open(path, framework="pt", device="cpu") as handle:
                return dict.fromkeys(handle.keys(), path)
        except (SafetensorError, OSError) as error:
            raise BadInput(f"model {source}: cannot read {path.name} ({brief(error)})") from error
    with Checkpoint(path.parent, source, {})._open(path) as state:
        if not isinstance(state, dict):
            raise BadInput(f"model {source}: {path.name} is not a state dict")
        return dict.fromkeys(state, path)


def open_checkpoint(ref: str) -> Checkpoint:
    """Index a model folder (or Hub repo id) without reading any tensor."""
    folder = resolve_model_dir(ref)
    config = _read_json(folder / "config.json", ref) if (folder / "config.json").is_file() else {}
    if (folder / SAFETENSORS_INDEX).is_file():
        files = _index_files(folder, SAFETENSORS_INDEX, ref)
    elif (folder / SAFETENSORS).is_file():
        files = _single_file(folder / SAFETENSORS, ref)
    elif (folder / BIN_INDEX).is_file():
        files = _index_files(folder, BIN_INDEX, ref)
    elif (folder / BIN).is_file():
        files = _single_file(folder / BIN, ref)
    else:
        raise BadInput(f"model {ref}: no {SAFETENSORS}, {SAFETENSORS_INDEX}, {BIN} or {BIN_INDEX}")
    return Checkpoint(folder=folder, source=ref, files=files, config=config)


def safetensors_keys(path: str | Path, what: str) -> list[str]:
    """The tensor names of a safetensors file (no tensor is read); an unreadable file is refused as ``what``."""
    try:
        with safe_open(path, framework="pt") as handle:
            return list(handle.keys())
    except Exception as error:  # safetensors raises its own errors for corrupt or truncated files
        raise BadInput(f"{what} {path}: not a readable safetensors file ({error})") from None
