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

from loramerge.adapters.dora import base_to_read
from loramerge.adapters.files import adapter_from_state
from loramerge.adapters.merge import execute_plan, plan_merge
from loramerge.adapters.model import LoraAdapter
from loramerge.adapters.options import parse_options
from loramerge.adapters.param_targets import is_wrapper, join_experts
from loramerge.catalogue import peft_combination_types
from loramerge.errors import BadInput
from loramerge.io.peft_config import validate_lora_config


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
    """One adapter of a live ``PeftModel`` (LoRA, DoRA, lora_bias, LoHa, LoKr), read from the tensors PEFT would
    save for it, exactly as ``load_adapter`` reads a folder."""
    from peft.utils import get_peft_model_state_dict

    if adapter_name not in model.peft_config:
        raise BadInput(f"adapter {adapter_name!r} is not loaded; the model has {sorted(model.peft_config)}")
    config = model.peft_config[adapter_name].to_dict()
    config["peft_type"] = str(getattr(config.get("peft_type"), "value", config.get("peft_type")))
    validate_lora_config(config, adapter_name)
    state = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    state = {key: value.detach() for key, value in state.items()}
    return adapter_from_state(state, config, adapter_name, allow_nonfinite=True)


class LiveBaseWeights:
    """The base weights of a live ``PeftModel``, by module name (dequantized where 4-/8-bit): DoRA's row norms and
    LARV's diagnostics (a ``loramerge.adapters.dora.BaseReader``)."""

    def __init__(self, model, fan_in_fan_out: bool = False) -> None:
        self.ref = "of the live model"
        self.model = model.base_model.model
        self.fan_in_fan_out = fan_in_fan_out

    def _base_layer(self, module: str):
        try:
            layer = self.model.get_submodule(module)
        except AttributeError:
            raise BadInput(f"module {module}: the live model has no such layer") from None
        return layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer

    def shape(self, module: str) -> tuple[int, ...]:
        layer = self._base_layer(module)
        if hasattr(layer, "out_features"):
            return (layer.out_features, layer.in_features)
        shape = tuple(layer.weight.shape)  # Conv1D stores in x out: the orientation ``weight`` turns round
        return tuple(reversed(shape)) if self.fan_in_fan_out else shape

    def weight(self, module: str):
        from peft.utils.integrations import dequantize_module_weight

        weight = dequantize_module_weight(self._base_layer(module)).detach().float()
        return weight.T if self.fan_in_fan_out else weight


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
    kinds = {str(getattr(config.peft_type, "value", config.peft_type)) for config in model.peft_config.values()}
    if kinds != {"LORA"}:
        raise BadInput(
            f"the model holds {', '.join(sorted(kinds))} adapters, and PEFT adds a LoRA adapter only beside LoRA "
            "ones: merge the saved adapters with loramerge.merge_adapters (or loramerge merge) instead"
        )
    if combination_type is not None:
        combination_types = peft_combination_types()
        if combination_type not in combination_types:
            raise BadInput(f"unknown combination_type {combination_type!r}; known: {', '.join(combination_types)}")
        method, implied_space = combination_types[combination_type]
        space = space or implied_space
    inputs = [adapter_from_model(model, name) for name in adapters]
    device = next(iter(inputs[0].modules.values())).A.device
    options = parse_options(
        method=method, space=space, density=density, rank=rank or svd_rank,
        majority_sign=majority_sign or majority_sign_method, seed=seed, full_svd=full_svd, device=str(device),
        params=params,
    )  # fmt: skip
    base = base_to_read(inputs, LiveBaseWeights(model, inputs[0].fan_in_fan_out), options)
    merged = execute_plan(plan_merge(inputs, list(weights), options, base))
    keys = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "fan_in_fan_out", "modules_to_save", "use_dora",
            "lora_bias", "target_parameters")  # fmt: skip
    fields = {key: merged.config.get(key) for key in keys}
    modules = join_experts(merged.modules)[0]  # a wrapped parameter's experts in PEFT's layout
    plain = sorted(name for name in modules if not is_wrapper(name, merged.config))
    model.add_adapter(adapter_name, LoraConfig(target_modules=plain, **fields))
    _set_dense_copies(model, adapter_name, merged.dense)
    layers = dict(_lora_layers(model))
    for name, module in modules.items():
        layer = layers[name]
        if module.embedding:
            targets = [
                (layer.lora_embedding_A[adapter_name], module.A),
                (layer.lora_embedding_B[adapter_name], module.B),
            ]
        else:
            targets = [(layer.lora_A[adapter_name].weight, module.A), (layer.lora_B[adapter_name].weight, module.B)]
        if module.magnitude is not None:
            targets.append((layer.lora_magnitude_vector[adapter_name].weight, module.magnitude))
        if module.bias is not None:
            targets.append((layer.lora_B[adapter_name].bias, module.bias))
        for target, value in targets:
            target.data = value.to(target.device, target.dtype)
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
