"""``loramerge.add_weighted_adapter``: merge adapters already loaded in a ``PeftModel`` (float or
bitsandbytes 4-/8-bit base, CPU or CUDA) and add the result as a new adapter — the same merge code as
the CLI, from the live factors; base weights are never touched.

A drop-in for PEFT's ``model.add_weighted_adapter``: its ``combination_type`` names are accepted
(``ties_svd`` -> ties in the full space, …), but ``linear`` is the exact weighted sum (PEFT's has cross
terms; pass ``space="factors"`` to reproduce PEFT), and ranks may differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loramerge.adapters.merge import merge_adapters
from loramerge.adapters.model import LoraAdapter, LoraModule
from loramerge.catalogue import peft_combination_types
from loramerge.errors import BadInput


def _lora_layers(model) -> list[tuple[str, Any]]:
    from peft.tuners.lora import LoraLayer

    return [(name, layer) for name, layer in model.base_model.model.named_modules() if isinstance(layer, LoraLayer)]


def _saved_copies(model) -> list[tuple[str, Any]]:
    """PEFT's ``modules_to_save`` wrappers, by their name in the model."""
    from peft.utils import ModulesToSaveWrapper

    return [(n, m) for n, m in model.base_model.model.named_modules() if isinstance(m, ModulesToSaveWrapper)]


def _dense_copies(model, adapter_name: str) -> dict[str, Any]:
    """The adapter's ``modules_to_save`` parameters under the names a saved adapter gives them."""
    return {
        f"{name}.{key}": value
        for name, wrapper in _saved_copies(model)
        if adapter_name in wrapper.modules_to_save
        for key, value in wrapper.modules_to_save[adapter_name].named_parameters()
    }


def adapter_from_model(model, adapter_name: str) -> LoraAdapter:
    """The factors and scales of one adapter of a live ``PeftModel``, as a ``LoraAdapter``."""
    if adapter_name not in model.peft_config:
        raise BadInput(f"adapter {adapter_name!r} is not loaded; the model has {sorted(model.peft_config)}")
    config = model.peft_config[adapter_name].to_dict()
    config["peft_type"] = (
        "LORA" if str(config.get("peft_type", "")).upper().endswith("LORA") else config.get("peft_type")
    )
    modules: dict[str, LoraModule] = {}
    for name, layer in _lora_layers(model):
        if getattr(layer, "use_dora", {}).get(adapter_name):
            raise BadInput(f"adapter {adapter_name}: DoRA (use_dora) adapters cannot be merged as low-rank deltas")
        if adapter_name in layer.lora_A:
            A, B, embedding = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight, False
        elif adapter_name in getattr(layer, "lora_embedding_A", {}):
            A, B, embedding = layer.lora_embedding_A[adapter_name], layer.lora_embedding_B[adapter_name], True
        else:
            continue
        modules[name] = LoraModule(
            A=A.detach(), B=B.detach(), scale=float(layer.scaling[adapter_name]), embedding=embedding
        )
    if not modules:
        raise BadInput(f"adapter {adapter_name}: no LoRA layers hold it")
    dense = {name: value.detach() for name, value in _dense_copies(model, adapter_name).items()}
    return LoraAdapter(modules=modules, config=config, dense=dense, source=adapter_name)


def add_weighted_adapter(
    model,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    method: str | None = None,
    *,
    combination_type: str | None = None,
    space: str | None = None,
    density: float | None = None,
    rank: int | None = None,
    svd_rank: int | None = None,
    majority_sign: str | None = None,
    majority_sign_method: str | None = None,
    seed: int | None = None,
    full_svd: str | None = None,
    params: dict[str, float | str] | None = None,
) -> LoraAdapter:
    """Merge ``adapters`` of ``model`` and add the result as ``adapter_name`` (``set_adapter`` activates it).

    ``method``/``space`` as in ``loramerge merge``; PEFT's ``combination_type``, ``svd_rank`` and
    ``majority_sign_method`` are accepted as aliases. Returns the merged adapter.
    """
    from peft import LoraConfig

    if adapter_name in model.peft_config:
        raise BadInput(f"adapter {adapter_name!r} already exists in the model")
    if combination_type is not None:
        combination_types = peft_combination_types()
        if combination_type not in combination_types:
            raise BadInput(f"unknown combination_type {combination_type!r}; known: {', '.join(combination_types)}")
        method, implied_space = combination_types[combination_type]
        space = space or implied_space
    inputs = [adapter_from_model(model, name) for name in adapters]
    device = next(iter(inputs[0].modules.values())).A.device
    merged = merge_adapters(
        inputs, list(weights), method, space=space, density=density, rank=rank or svd_rank,
        majority_sign=majority_sign or majority_sign_method, seed=seed, full_svd=full_svd, device=str(device),
        params=params,
    )  # fmt: skip
    keys = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "fan_in_fan_out", "modules_to_save")
    fields = {key: merged.config.get(key) for key in keys}
    model.add_adapter(adapter_name, LoraConfig(target_modules=sorted(merged.modules), **fields))
    _set_dense_copies(model, adapter_name, merged.dense)
    layers = dict(_lora_layers(model))
    for name, module in merged.modules.items():
        layer = layers[name]
        if module.embedding:
            target_a, target_b = layer.lora_embedding_A[adapter_name], layer.lora_embedding_B[adapter_name]
        else:
            target_a, target_b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        target_a.data = module.A.to(target_a.device, target_a.dtype)
        target_b.data = module.B.to(target_b.device, target_b.dtype)
        layer.scaling[adapter_name] = 1.0
    return merged


def _set_dense_copies(model, adapter_name: str, dense: dict[str, Any]) -> None:
    """Put the merged ``modules_to_save`` weights into the new adapter's copies (PEFT made them from the base)."""
    copies = {name: value for name, value in _dense_copies(model, adapter_name).items() if name in dense}
    missing = sorted(set(dense) - set(copies))
    if missing:
        raise BadInput(f"the merged modules_to_save tensors {missing} have no copy in the model")
    for name, target in copies.items():
        target.data = dense[name].to(target.device, target.dtype)
