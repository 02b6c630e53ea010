"""Folding adapter deltas into base weights, in float32 and the base weight's layout: ``W + s · B A`` for LoRA,
PEFT's ``diag(m / ‖W + s B A‖_row) (W + s B A)`` for DoRA, and ``b + s · lora_B.bias`` for ``lora_bias``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from loramerge.adapters.dora import dora_delta
from loramerge.adapters.model import LoraAdapter, LoraModule
from loramerge.adapters.param_targets import ParameterLayout, expert_deltas, experts_by_wrapper, split_expert_name
from loramerge.errors import BadInput


def weight_shape(module: LoraModule, fan_in_fan_out: bool) -> tuple[int, int]:
    """The shape of the base weight the module changes (``in x out`` for Conv1D and embeddings)."""
    rows, columns = module.shape
    return (columns, rows) if module.embedding or fan_in_fan_out else (rows, columns)


def fold_module(weight: torch.Tensor, module: LoraModule, fan_in_fan_out: bool, name: str) -> torch.Tensor:
    """The base weight with the module's delta added (DoRA's computed from the weight itself)."""
    if weight_shape(module, fan_in_fan_out) != tuple(weight.shape):
        raise BadInput(
            f"module {name}: adapter delta {weight_shape(module, fan_in_fan_out)} does not fit weight "
            f"{tuple(weight.shape)}"
        )
    transposed = module.embedding or fan_in_fan_out
    full = weight.to(torch.float32)
    oriented = full.T if transposed else full
    delta = dora_delta(module, oriented) if module.dora else module.delta()
    return (full + (delta.T if transposed else delta)).to(weight.dtype)


@dataclass(frozen=True)
class FoldTarget:
    """What an adapter does to one base tensor: replace it (a saved copy), add a LoRA delta, or both
    (an embedding LoRA saved with its base layer); or add a ``lora_bias`` delta to a bias, or a wrapped
    parameter's experts' deltas (``target_parameters``) to it."""

    module: str | None = None
    copy: str | None = None
    bias: str | None = None
    wrapper: str | None = None
    layout: ParameterLayout | None = None
    experts: tuple[LoraModule, ...] = ()  # the wrapper's, in expert order


def adapter_targets(
    adapter: LoraAdapter, layouts: Mapping[str, ParameterLayout] | None = None
) -> dict[str, FoldTarget]:
    """Checkpoint tensor name -> what to do: ``<module>.weight`` for LoRA modules, ``<module>.bias`` for their
    ``lora_bias``, the ``modules_to_save`` / embedding base-layer copies under the name they replace, and the
    wrapped parameters where ``layouts`` (``loramerge.adapters.param_targets.parameter_layouts``) put them."""
    layouts = layouts or {}
    experts = experts_by_wrapper(adapter.modules)
    copies = {name.replace(".base_layer.", "."): name for name in adapter.dense}
    modules = {f"{name}.weight": name for name in adapter.modules if split_expert_name(name) is None}
    wrapped = {layout.key: wrapper for wrapper, layout in layouts.items()}
    # a merge gives every module a bias, zero where no input had one: those change nothing and need no base bias
    biases = {f"{name}.bias": name for name, module in adapter.modules.items()
              if module.bias is not None and bool(module.bias.any())}  # fmt: skip
    keys = sorted(set(copies) | set(modules) | set(biases) | set(wrapped))
    return {
        key: FoldTarget(modules.get(key), copies.get(key), biases.get(key), wrapped.get(key),
                        layouts.get(wrapped.get(key, "")), tuple(experts.get(wrapped.get(key, ""), ())))
        for key in keys
    }  # fmt: skip


def folded_tensor(adapter: LoraAdapter, target: FoldTarget, key: str, weight: torch.Tensor) -> torch.Tensor:
    """The base tensor ``key`` with what ``adapter`` does to it."""
    if target.copy is not None:
        replacement = adapter.dense[target.copy]
        if replacement.shape != weight.shape:
            raise BadInput(f"tensor {key}: adapter copy {tuple(replacement.shape)} does not fit {tuple(weight.shape)}")
        weight = replacement.to(weight.dtype)
    if target.module is not None:
        weight = fold_module(weight, adapter.modules[target.module], adapter.fan_in_fan_out, target.module)
    if target.layout is not None:
        delta = expert_deltas(target.experts, target.layout)
        if delta.shape != weight.shape:
            raise BadInput(f"tensor {key}: the adapter's experts {tuple(delta.shape)} do not fit {tuple(weight.shape)}")
        weight = (weight.to(torch.float32) + delta).to(weight.dtype)
    if target.bias is not None:
        delta = adapter.modules[target.bias].bias_delta()
        if delta is None or delta.shape != weight.shape:
            raise BadInput(f"tensor {key}: the adapter's lora_bias does not fit the base's bias {tuple(weight.shape)}")
        weight = (weight.to(torch.float32) + delta).to(weight.dtype)
    return weight
