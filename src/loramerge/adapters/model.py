"""In-memory LoRA adapters, normalised to ``A``, ``B`` and a scale per module."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loramerge.lowrank import LowRank


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: ``Δ = scale · B @ A`` (transposed in the base weight for Conv1D/embeddings).

    ``A`` is r x in (``lora_embedding_A`` for embeddings: r x num_embeddings) and ``B`` is out x r. LoHa and
    LoKr modules arrive here as exact factors (``loramerge.adapters.peft_types``). Two optional terms:

    - ``magnitude`` (DoRA, Liu et al., ICML 2024): the folded weight is ``diag(g) (W0 + s B A)`` with
      ``g = magnitude / ‖W0 + s B A‖_row``. ``row_scale`` holds ``g`` once the base's norms are known
      (``loramerge.adapters.dora``); the delta is then ``diag(g − 1) W0 + diag(g) s B A``, and ``factors``
      returns its direction term ``diag(g) s B A``.
    - ``bias`` (PEFT's ``lora_bias``): ``lora_B.bias``; the base bias moves by ``scale · bias``.

    A LoKr module also keeps its two Kronecker sides (``B A = kron(L, R)``), from which a merge of LoKr modules
    may build its core space cheaply (``loramerge.lowrank.structured.kronecker_core``).
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    embedding: bool = False
    magnitude: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    row_scale: torch.Tensor | None = None
    kronecker: tuple[LowRank, LowRank] | None = None

    @property
    def dora(self) -> bool:
        return self.magnitude is not None

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)`` of ``B @ A``."""
        return (self.B.shape[0], self.A.shape[1])

    def factors(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> LowRank:
        """``B @ (scale · A)`` in ``dtype``, the scale folded into ``A``; with a DoRA ``row_scale`` ``g``, the
        direction term ``diag(g) B @ (scale · A)``."""
        B = self.B.to(device, dtype)
        if self.row_scale is not None:
            B = self.row_scale.to(device, dtype).unsqueeze(1) * B
        return LowRank(B, self.scale * self.A.to(device, dtype))

    def delta(self) -> torch.Tensor:
        """The dense ``scale · B @ A`` in float32 (for tests and small modules; a DoRA module's delta needs
        the base: ``loramerge.adapters.dora.dora_delta``)."""
        if self.dora:
            raise ValueError("a DoRA module's delta needs the base weight (loramerge.adapters.dora.dora_delta)")
        return self.factors().dense()

    def bias_delta(self) -> torch.Tensor | None:
        """What the module adds to the base bias (``scale · lora_B.bias``), float32; None without ``lora_bias``."""
        return None if self.bias is None else self.scale * self.bias.to(torch.float32)


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
    stored_dtype: torch.dtype | None = None  # of the file's tensors, where the modules were computed in float32
    stored_parameters: int | None = None  # entries of the file's tensors, where they are not the factors (LoHa, LoKr)
    local_base: str | None = None  # loramerge's reference to the base where the config names its Hub id (a GGUF)

    @property
    def base_model(self) -> str | None:
        """The base as PEFT sees it (``base_model_name_or_path``)."""
        return self.config.get("base_model_name_or_path")

    @property
    def base_ref(self) -> str | None:
        """The base as loramerge reads it: the local reference recorded beside a Hub id, else the config's."""
        return self.local_base or self.base_model

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    @property
    def dtype(self) -> torch.dtype:
        if self.stored_dtype is not None:
            return self.stored_dtype
        dtypes = {module.A.dtype for module in self.modules.values()}
        return dtypes.pop() if len(dtypes) == 1 else torch.float32

    @property
    def kind(self) -> str:
        """The adapter's type as its users name it: LoRA, DoRA, LoHa, LoKr (``+bias`` with ``lora_bias``,
        ``+params`` with ``target_parameters``)."""
        peft_type = str(self.config.get("peft_type", "LORA")).upper()
        kind = {"LOHA": "LoHa", "LOKR": "LoKr"}.get(peft_type, "DoRA" if self.config.get("use_dora") else "LoRA")
        extras = {"+bias": self.config.get("lora_bias"), "+params": self.config.get("target_parameters")}
        return kind + "".join(extra for extra, present in extras.items() if present)

    @property
    def needs_base(self) -> bool:
        """DoRA modules need the base's weights to merge (their row norms)."""
        return any(module.dora for module in self.modules.values())

    @property
    def name(self) -> str:
        return self.source or "<in memory>"


def recorded_base(adapters: Iterable[LoraAdapter]) -> str | None:
    """The base the first adapter that records one names (``base_model_name_or_path``), the fallback wherever a
    base is needed and none was given."""
    return next((adapter.base_ref for adapter in adapters if adapter.base_ref), None)
