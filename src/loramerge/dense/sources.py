"""Model references of recipes: a checkpoint, or ``path+adapter`` (the adapter folded in on the fly)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from loramerge.adapters.files import load_adapter
from loramerge.adapters.model import LoraAdapter
from loramerge.errors import BadInput
from loramerge.folding.math import FoldTarget, adapter_targets, folded_tensor
from loramerge.io.checkpoint import Checkpoint, open_checkpoint


@dataclass
class ModelSource:
    ref: str
    checkpoint: Checkpoint
    adapter: LoraAdapter | None = None
    _targets: dict[str, FoldTarget] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.adapter is None:
            return
        self._targets = adapter_targets(self.adapter)
        missing = sorted(set(self._targets) - set(self.checkpoint.files))
        if missing:
            raise BadInput(f"model {self.ref}: adapter targets {missing[0]}, which the model does not have")

    @property
    def names(self) -> list[str]:
        return self.checkpoint.names

    @property
    def config(self) -> dict:
        return self.checkpoint.config

    def get(self, name: str) -> torch.Tensor:
        tensor = self.checkpoint.get(name)
        if name in self._targets:
            return folded_tensor(self.adapter, self._targets[name], name, tensor)
        return tensor


def split_reference(ref: str) -> tuple[str, str | None]:
    """``model+adapter`` -> (model, adapter); a plain reference -> (ref, None)."""
    if "+" not in ref or Path(ref).exists():
        return ref, None
    model, adapter = ref.rsplit("+", 1)
    return model, adapter


def open_source(ref: str, allow_nonfinite: bool = False) -> ModelSource:
    model, adapter = split_reference(ref)
    loaded = load_adapter(adapter, allow_nonfinite=allow_nonfinite) if adapter else None
    return ModelSource(ref=ref, checkpoint=open_checkpoint(model), adapter=loaded)
