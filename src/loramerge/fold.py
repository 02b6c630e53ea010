"""Folding LoRA deltas into base weights: ``W + s · B A`` in float32, in the base weight's layout."""

from __future__ import annotations

import torch

from loramerge.adapter import LoraAdapter, LoraModule
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


def adapter_targets(adapter: LoraAdapter) -> dict[str, str]:
    """Checkpoint tensor name -> adapter entry: ``<module>.weight`` for LoRA modules, and the
    ``modules_to_save`` / embedding base-layer copies under the name they replace."""
    targets = {f"{name}.weight": name for name in adapter.modules}
    for name in adapter.dense:
        targets[name.replace(".base_layer.", ".")] = name
    return targets


def folded_tensor(adapter: LoraAdapter, target: str, key: str, weight: torch.Tensor) -> torch.Tensor:
    """The base tensor ``key`` with what ``adapter`` does to it (``target`` from ``adapter_targets``)."""
    if target in adapter.modules:
        return fold_module(weight, adapter.modules[target], adapter.fan_in_fan_out, target)
    replacement = adapter.dense[target]
    if replacement.shape != weight.shape:
        raise BadInput(f"tensor {key}: adapter copy {tuple(replacement.shape)} does not fit {tuple(weight.shape)}")
    return replacement.to(weight.dtype)
