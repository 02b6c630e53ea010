"""Compatibility checks between adapters, run before any merge work."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from loramerge.adapters.model import LoraAdapter
from loramerge.adapters.param_targets import experts_by_wrapper
from loramerge.errors import BadInput


def check_finite(tensors: Mapping[str, torch.Tensor], owner: str) -> None:
    """Refuse NaN or Inf values: merged, they spread over every entry they meet (sign election, SVD)."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            hint = "pass `allow_nonfinite=True` to use it anyway"
            raise BadInput(f"{owner}: tensor {key} holds NaN or Inf values; {hint}")


def check_weights(adapters: Sequence[LoraAdapter], weights: Sequence[float]) -> list[float]:
    if len(weights) != len(adapters):
        raise BadInput(f"got {len(weights)} weights for {len(adapters)} adapters; give one weight per adapter")
    values = [float(weight) for weight in weights]
    if any(value != value or value in (float("inf"), float("-inf")) for value in values):
        raise BadInput(f"weights must be finite numbers, got {values}")
    if values and all(value == 0 for value in values):
        raise BadInput(f"weights are all zero ({values}): the merge would be empty")
    return values


def check_shapes(adapters: Sequence[LoraAdapter]) -> None:
    """Every module (and dense tensor) shared by several adapters has one shape and kind."""
    seen: dict[str, tuple[tuple[int, int], bool, str]] = {}
    for adapter in adapters:
        for name, module in adapter.modules.items():
            first = seen.setdefault(name, (module.shape, module.embedding, adapter.name))
            if (module.shape, module.embedding) != first[:2]:
                raise BadInput(
                    f"module {name}: {adapter.name} has delta shape {module.shape} but {first[2]} has {first[0]}"
                    + (" (embedding vs linear LoRA)" if module.embedding != first[1] else "")
                )
    dense_seen: dict[str, tuple[tuple[int, ...], str]] = {}
    for adapter in adapters:
        for name, tensor in adapter.dense.items():
            shape, owner = dense_seen.setdefault(name, (tuple(tensor.shape), adapter.name))
            if tuple(tensor.shape) != shape:
                raise BadInput(f"tensor {name}: {adapter.name} has shape {tuple(tensor.shape)} but {owner} has {shape}")


def check_layouts(adapters: Sequence[LoraAdapter]) -> None:
    """``fan_in_fan_out`` decides how the delta lies in the base weight; inputs must agree."""
    layouts = {adapter.fan_in_fan_out for adapter in adapters}
    if len(layouts) > 1:
        names = ", ".join(f"{a.name}={a.fan_in_fan_out}" for a in adapters)
        raise BadInput(f"adapters disagree on fan_in_fan_out ({names}); they target different layer types")


def check_base_models(adapters: Sequence[LoraAdapter], strict: bool) -> list[str]:
    """Different ``base_model_name_or_path`` values: an error when strict, else a warning returned."""
    bases = {adapter.base_ref for adapter in adapters if adapter.base_ref}
    if len(bases) <= 1:
        return []
    detail = "; ".join(f"{adapter.name}: {adapter.base_ref}" for adapter in adapters)
    if strict:
        raise BadInput(f"adapters name different base models ({detail})")
    return [f"adapters name different base models ({detail}); merging anyway (`strict=True` refuses)"]


def check_parameter_targets(adapters: Sequence[LoraAdapter]) -> None:
    """Adapters with ``target_parameters`` must name the same parameters (PEFT nests their wrappers by that set,
    and refuses adapters that differ) and give every wrapped parameter the same number of experts."""
    named = [(adapter, sorted(adapter.config.get("target_parameters") or [])) for adapter in adapters]
    named = [(adapter, targets) for adapter, targets in named if targets]
    if not named:
        return
    first, targets = named[0]
    for adapter, other in named[1:]:
        if other != targets:
            raise BadInput(
                f"adapters {first.name} and {adapter.name} wrap different parameters (target_parameters {targets} vs "
                f"{other}); PEFT nests them differently, so they cannot share one output"
            )
    seen: dict[str, tuple[int, str]] = {}
    for adapter in adapters:
        for wrapper, experts in experts_by_wrapper(adapter.modules).items():
            count = len(experts)
            known, owner = seen.setdefault(wrapper, (count, adapter.name))
            if count != known:
                raise BadInput(
                    f"module {wrapper}: {adapter.name} has {count} experts but {owner} has {known}; are they "
                    "adapters of one base?"
                )
    if any(adapter.needs_base or adapter.config.get("lora_bias") for adapter in adapters):
        kind = next(a for a in adapters if a.needs_base or a.config.get("lora_bias")).kind
        raise BadInput(
            f"adapter {first.name} wraps parameters (target_parameters) and another input is {kind}: PEFT has no "
            "DoRA nor lora_bias on wrapped parameters, so they cannot share one output; merge them separately"
        )
