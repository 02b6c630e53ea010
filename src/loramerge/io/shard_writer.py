"""Streaming sharded safetensors writer: tensors go out as they are produced, one shard in memory."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from loramerge.errors import BadInput

INDEX_NAME = "model.safetensors.index.json"
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a byte count."""
    if isinstance(text, int):
        return text
    cleaned = text.strip().upper().replace(" ", "")
    for unit in sorted(_UNITS, key=len, reverse=True):
        if cleaned.endswith(unit):
            number = cleaned[: -len(unit)]
            break
    else:
        number, unit = cleaned, "B"
    try:
        size = int(float(number) * _UNITS[unit])
    except ValueError:
        raise BadInput(f"cannot read size {text!r}; write it like 5GB or 500MB") from None
    if size <= 0:
        raise BadInput(f"size must be positive, got {text!r}")
    return size


class ShardWriter:
    """Collects tensors up to ``max_shard_bytes`` and writes each full shard at once.

    Shards are named ``model-0000i-of-0000n.safetensors`` with an index (transformers' layout), or a
    single ``model.safetensors`` when everything fits in one.
    """

    def __init__(self, folder: Path, max_shard_bytes: int) -> None:
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.folder / f"shard-{len(self._written) + 1:05d}.safetensors"
        save_file(self._pending, path, metadata={"format": "pt"})
        self._written.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Write the last shard, give every shard its final name, write the index if several."""
        if self._pending or not self._written:
            self._flush()
        count = len(self._written)
        if count == 1:
            final = self.folder / "model.safetensors"
            self._written[0][0].rename(final)
            return [final]
        weight_map, finals = {}, []
        for number, (path, names) in enumerate(self._written, start=1):
            final = self.folder / f"model-{number:05d}-of-{count:05d}.safetensors"
            path.rename(final)
            finals.append(final)
            weight_map.update(dict.fromkeys(names, final.name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return finals
