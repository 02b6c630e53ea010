"""In-memory LoRA adapters, normalised to ``A``, ``B`` and a scale per module."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loramerge.lowrank import LowRank


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: ``Δ = scale · B @ A`` (transposed in the base weight for Conv1D/embeddings).

    ``A`` is r x in (``lora_embedding_A`` for embeddings: r x num_embeddings) and ``B`` is out x r.
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    embedding: bool = False

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)`` of ``B @ A``."""
        return (self.B.shape[0], self.A.shape[1])

    def factors(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> LowRank:
        """``B @ (scale · A)`` in ``dtype``, the scale folded into ``A``."""
        return LowRank(self.B.to(device, dtype), self.scale * self.A.to(device, dtype))

    def delta(self) -> torch.Tensor:
        """The dense ``scale · B @ A`` in float32 (for tests and small modules)."""
        return self.factors().dense()


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter: its modules, its ``adapter_config.json`` and any dense tensors it carries.

    ``dense`` holds ``modules_to_save`` copies and saved embedding base layers, keyed by their name in
    the model (``lm_head.weight``). ``source`` is a label for messages and cards (a path, a Hub id, a live
    adapter's name, "merged"); ``path`` is the local folder it was read from, the only thing an output may
    not overlap.
    """

    modules: dict[str, LoraModule]
    config: dict[str, Any]
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    source: str = ""
    card: str | None = None
    path: Path | None = None

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    @property
    def dtype(self) -> torch.dtype:
        dtypes = {module.A.dtype for module in self.modules.values()}
        return dtypes.pop() if len(dtypes) == 1 else torch.float32

    @property
    def name(self) -> str:
        return self.source or "<in memory>"
