"""The one writer of output folders: every pipeline (adapter merge, dense merge, fold, extract) writes
its weights, config, model card, recipe copy and tokenizer files through an ``OutputFolder``, which is
staged and renamed into place when complete (``io.atomic``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from loramerge.io.atomic import atomic_output_dir
from loramerge.io.model_files import copy_side_files, write_chat_template
from loramerge.io.shard_writer import BufferedShardWriter, ShardWriter, TensorLayout


class OutputFolder:
    """A staging folder being filled; files appear at the target only when the ``with`` block ends."""

    def __init__(self, staging: Path) -> None:
        self.staging = staging

    def tensors(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """One safetensors file."""
        save_file(state, self.staging / name, metadata={"format": "pt"})

    def shards(self, layout: list[TensorLayout], max_bytes: int) -> ShardWriter:
        """Sharded safetensors, written tensor by tensor in a known layout (streaming)."""
        return ShardWriter(self.staging, layout, max_bytes)

    def buffered_shards(self, max_bytes: int) -> BufferedShardWriter:
        """Sharded safetensors whose layout is learnt as tensors arrive (one shard held in memory)."""
        return BufferedShardWriter(self.staging, max_bytes)

    def json(self, name: str, data: dict[str, Any]) -> None:
        (self.staging / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    def model_config(self, config: dict[str, Any], **updates: Any) -> None:
        """``config.json``: ``config`` with ``updates``."""
        self.json("config.json", {**config, **updates})

    def side_files(self, source: Path) -> list[str]:
        """The tokenizer files and generation config that exist in ``source``."""
        return copy_side_files(source, self.staging)

    def tokenizer(self, tokenizer: Any) -> None:
        """A transformers tokenizer, with ``save_pretrained``."""
        tokenizer.save_pretrained(self.staging)

    def chat_template(self, template: str) -> None:
        write_chat_template(self.staging, template)

    def card(self, text: str) -> None:
        self.text("README.md", text)

    def text(self, name: str, text: str) -> None:
        (self.staging / name).write_text(text)


@contextmanager
def output_folder(target: Path, *, force: bool = False) -> Iterator[OutputFolder]:
    """Write a folder at ``target`` atomically (``force`` replaces an existing one)."""
    with atomic_output_dir(target, force=force) as staging:
        yield OutputFolder(staging)
