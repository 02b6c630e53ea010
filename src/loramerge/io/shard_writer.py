"""Streaming sharded safetensors writer: every tensor goes to disk the moment it is produced.

The output layout (names, shapes, dtypes) is known from the plan before any tensor is merged, so each
shard's header is written first and the tensors follow in order — nothing is buffered, whatever the
shard size. The files are the standard safetensors format (8-byte header length, JSON header padded
to 8 bytes, raw little-endian data), readable by ``safetensors`` and ``transformers``.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip


@dataclass(frozen=True)
class TensorLayout:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(layout: list[TensorLayout], max_shard_bytes: int) -> list[list[TensorLayout]]:
    shards: list[list[TensorLayout]] = [[]]
    size = 0
    for tensor in layout:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def _header(tensors: list[TensorLayout]) -> bytes:
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in tensors:
        entries[tensor.name] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class ShardWriter:
    """Write tensors, in the planned order, into ``model-0000i-of-0000n.safetensors`` shards (or one
    ``model.safetensors``) with transformers' index file."""

    def __init__(self, folder: Path, layout: list[TensorLayout], max_shard_bytes: int) -> None:
        self.folder = Path(folder)
        self.shards = plan_shards(layout, max_shard_bytes)
        self.names = shard_file_names(len(self.shards))
        self._order = [(shard_index, tensor) for shard_index, shard in enumerate(self.shards) for tensor in shard]
        self._next = 0
        self._file: BinaryIO | None = None
        self._file_index = -1

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard_index, expected = self._order[self._next]
        if name != expected.name or tuple(tensor.shape) != expected.shape or tensor.dtype != expected.dtype:
            raise AssertionError(f"writer expected {expected}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        if shard_index != self._file_index:
            self._open(shard_index)
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._next += 1

    def _open(self, shard_index: int) -> None:
        if self._file is not None:
            self._file.close()
        self._file = open(self.folder / self.names[shard_index], "wb")  # noqa: SIM115  (closed on the next shard)
        self._file.write(_header(self.shards[shard_index]))
        self._file_index = shard_index

    def close(self) -> None:
        if self._next != len(self._order):
            raise AssertionError(f"writer got {self._next} of {len(self._order)} tensors")
        if self._file is None:  # no tensors at all: still one valid, empty file
            self._open(0)
        if self._file is not None:
            self._file.close()
        if len(self.shards) > 1:
            contents = [[t.name for t in shard] for shard in self.shards]
            write_index(self.folder, self.names, contents, sum(t.nbytes for shard in self.shards for t in shard))


def shard_file_names(count: int) -> list[str]:
    """transformers' names: one ``model.safetensors``, or ``model-0000i-of-0000n.safetensors``."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_index(folder: Path, files: list[str], contents: list[list[str]], total_bytes: int) -> None:
    """transformers' ``model.safetensors.index.json``: which shard holds each tensor."""
    weight_map = {name: file for file, names in zip(files, contents, strict=True) for name in names}
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


class BufferedShardWriter:
    """For outputs whose layout is only known as they are produced (re-quantized 4-bit states): holds
    one shard in memory (at most ``max_shard_bytes``), writes it with ``safetensors``, names the shards
    and writes the index at the end."""

    def __init__(self, folder: Path, max_shard_bytes: int) -> None:
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.folder / f"pending-{len(self._written) + 1:05d}.safetensors"
        save_file(self._pending, path, metadata={"format": "pt"})
        self._written.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        if self._pending or not self._written:
            self._flush()
        names = shard_file_names(len(self._written))
        for (path, _), name in zip(self._written, names, strict=True):
            path.rename(self.folder / name)
        if len(names) > 1:
            write_index(self.folder, names, [content for _, content in self._written], self.total_bytes)
