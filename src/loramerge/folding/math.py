"""Folding LoRA deltas into base weights: ``W + s · B A`` in float32, in the base weight's layout."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loramerge.adapters.model import LoraAdapter, LoraModule
from loramerge.errors import BadInput


def weight_delta(module: LoraModule, fan_in_fan_out: bool) -> torch.Tensor:
    """``s · B A`` in float32, transposed where the base stores ``in x out`` (Conv1D, embeddings)."""
    delta = module.delta()
    return delta.T if module.embedding or fan_in_fan_out else delta


def fold_module(weight: torch.Tensor, module: LoraModule, fan_in_fan_out: bool, name: str) -> torch.Tensor:
    delta = weight_delta(module, fan_in_fan_out)
    if tuple(delta.shape) != tuple(weight.shape):
        raise BadInput(f"module {name}: adapter delta {tuple(delta.shape)} does not fit weight {tuple(weight.shape)}")
    return (weight.to(torch.float32) + delta).to(weight.dtype)


@dataclass(frozen=True)
class FoldTarget:
    """What an adapter does to one base tensor: replace it (a saved copy), add a LoRA delta, or both
    (an embedding LoRA saved with its base layer)."""

    module: str | None = None
    copy: str | None = None


def adapter_targets(adapter: LoraAdapter) -> dict[str, FoldTarget]:
    """Checkpoint tensor name -> what to do: ``<module>.weight`` for LoRA modules, and the
    ``modules_to_save`` / embedding base-layer copies under the name they replace."""
    copies = {name.replace(".base_layer.", "."): name for name in adapter.dense}
    modules = {f"{name}.weight": name for name in adapter.modules}
    return {key: FoldTarget(modules.get(key), copies.get(key)) for key in sorted(set(copies) | set(modules))}


def folded_tensor(adapter: LoraAdapter, target: FoldTarget, key: str, weight: torch.Tensor) -> torch.Tensor:
    """The base tensor ``key`` with what ``adapter`` does to it."""
    if target.copy is not None:
        replacement = adapter.dense[target.copy]
        if replacement.shape != weight.shape:
            raise BadInput(f"tensor {key}: adapter copy {tuple(replacement.shape)} does not fit {tuple(weight.shape)}")
        weight = replacement.to(weight.dtype)
    if target.module is not None:
        weight = fold_module(weight, adapter.modules[target.module], adapter.fan_in_fan_out, target.module)
    return weight
