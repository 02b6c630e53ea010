"""Reading and writing the LoRA fields of ``adapter_config.json`` the way PEFT interprets them."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from loramerge.errors import BadInput

# PEFT types whose deltas loramerge reads as exact low-rank factors (loramerge.adapters.peft_types), and the
# key of each one's alpha in adapter_config.json.
ALPHA_KEYS = {"LORA": "lora_alpha", "LOHA": "alpha", "LOKR": "alpha"}

# Fields whose adapters cannot be written as plain ``B @ A`` deltas; merging them would be silently wrong.
_REFUSED_FLAGS = {
    "trainable_token_indices": "trainable_token_indices (TrainableTokens) are not supported",
    "use_qalora": "QA-LoRA (use_qalora) adapters are not a plain low-rank delta",
}
_REFUSED_INITS = {"pissa", "olora", "corda", "eva", "loftq", "orthogonal"}


def validate_lora_config(config: Mapping[str, Any], source: str) -> None:
    """Refuse configs loramerge cannot merge exactly, naming the adapter and the field."""
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in ALPHA_KEYS:
        raise BadInput(
            f"adapter {source}: peft_type is {config.get('peft_type')!r}; loramerge merges LORA (with DoRA and "
            "lora_bias), LOHA and LOKR adapters"
        )
    for key, why in _REFUSED_FLAGS.items():
        if config.get(key):
            raise BadInput(f"adapter {source}: {why} (field {key!r})")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.split("_")[0].lower() in _REFUSED_INITS:
        raise BadInput(
            f"adapter {source}: init_lora_weights={init!r} changes the base weights; convert it to a plain "
            "LoRA first (PEFT's path_initial_model_for_weight_conversion)"
        )
    for key, kind in (("r", int), (ALPHA_KEYS[peft_type], (int, float))):
        value = config.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or value <= 0:
            raise BadInput(f"adapter {source}: field {key!r} must be a positive number, got {value!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise BadInput(f"adapter {source}: field {key!r} must be a mapping, got {config.get(key)!r}")


def module_rank_and_alpha(config: Mapping[str, Any], module_name: str) -> tuple[int, float]:
    """The rank and alpha PEFT gives ``module_name``: ``rank_pattern``/``alpha_pattern`` keys first."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rank, alpha = config["r"], config[ALPHA_KEYS[str(config.get("peft_type", "LORA")).upper()]]
    if rank_pattern or alpha_pattern:
        from peft.utils.other import get_pattern_key  # importing peft costs seconds; only patterns need it

        rank = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module_name), rank)
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module_name), alpha)
    return int(rank), float(alpha)


def lora_scale(rank: int, alpha: float, use_rslora: bool) -> float:
    """``alpha / r`` (Hu et al., LoRA, 2021) or ``alpha / sqrt(r)`` (Kalajdzievski, rsLoRA, 2023)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _as_regex(target_modules: Sequence[str] | str) -> str:
    if isinstance(target_modules, str):
        return target_modules
    names = "|".join(re.escape(name) for name in sorted(target_modules))
    return rf"(.*\.)?({names})"


def union_target_modules(configs: Sequence[Mapping[str, Any]]) -> list[str] | str:
    """The union of the inputs' ``target_modules``: a list when all are lists, else one regex."""
    targets = [config.get("target_modules") or [] for config in configs]
    if all(not isinstance(target, str) for target in targets):
        return sorted(set().union(*targets))
    return "|".join(f"({_as_regex(target)})" for target in targets)


# Fields of a LoRA config that a merge of other PEFT types (LoHa, LoKr) takes from PEFT's defaults.
_LORA_DEFAULTS = {"peft_type": "LORA", "bias": "none", "fan_in_fan_out": False, "lora_dropout": 0.0}
_LYCORIS_ONLY = ("alpha", "rank_dropout", "module_dropout", "use_effective_conv2d", "init_weights",
                 "decompose_both", "decompose_factor", "rank_dropout_scale")  # fmt: skip


def merged_lora_config(
    configs: Sequence[Mapping[str, Any]],
    module_ranks: Mapping[str, int],
    base_model: str | None,
    modules_to_save: Sequence[str],
    dora: bool = False,
    bias: bool = False,
    parameter_rank: int | None = None,
) -> dict[str, Any]:
    """Config of a merged adapter: scale folded into the factors (``lora_alpha = r`` for every module), from
    the first LoRA input's config (PEFT's LoRA defaults where every input is LoHa or LoKr); ``use_dora`` and
    ``lora_bias`` where any input has them. ``parameter_rank`` is the one rank of every wrapped parameter
    (``target_parameters``): it becomes ``r``, and every module of another rank gets a pattern entry."""
    lora = [config for config in configs if str(config.get("peft_type", "")).upper() == "LORA"]
    template = dict(lora[0]) if lora else {**{k: v for k, v in configs[0].items() if k not in _LYCORIS_ONLY},
                                           **_LORA_DEFAULTS}  # fmt: skip
    counts = Counter(module_ranks.values())
    common_rank = max(counts, key=lambda rank: (counts[rank], rank)) if counts else 1
    if parameter_rank is not None:
        common_rank = parameter_rank
    odd = {name: rank for name, rank in sorted(module_ranks.items()) if rank != common_rank}
    same = {key: configs[0].get(key) for key in ("layers_to_transform", "layers_pattern", "exclude_modules")}
    for key in same:
        if any(config.get(key) != same[key] for config in configs):
            same[key] = None
    config = dict(template)
    config.update(
        r=common_rank,
        lora_alpha=common_rank,
        rank_pattern=odd,
        alpha_pattern=dict(odd),
        use_rslora=False,
        use_dora=dora,
        lora_bias=bias,
        init_lora_weights=True,
        inference_mode=True,
        target_modules=union_target_modules(configs),
        target_parameters=next((c["target_parameters"] for c in configs if c.get("target_parameters")), None),
        modules_to_save=sorted(modules_to_save) or None,
        base_model_name_or_path=base_model,
        **same,
    )
    return config


def extracted_lora_config(
    module_ranks: Mapping[str, int], rank: int, base_model: str, fan_in_fan_out: bool
) -> dict[str, Any]:
    """Config of an adapter extracted from a fine-tune: scale 1 (``lora_alpha = r``) for every module."""
    odd = {name: r for name, r in module_ranks.items() if r != rank}
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "rank_pattern": odd,
        "alpha_pattern": dict(odd), "target_modules": sorted(module_ranks), "base_model_name_or_path": base_model,
        "bias": "none", "fan_in_fan_out": fan_in_fan_out, "use_rslora": False, "use_dora": False,
        "lora_dropout": 0.0, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }  # fmt: skip
