"""PEFT adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from loramerge.adapters.checks import check_finite
from loramerge.adapters.model import LoraAdapter, LoraModule
from loramerge.adapters.param_targets import expert_modules, is_wrapper, join_experts, wrapper_ranks
from loramerge.adapters.peft_types import peft_type
from loramerge.adapters.single_file import is_single_file, load_single_file
from loramerge.errors import BadInput, brief
from loramerge.io.hub import resolve_folder
from loramerge.io.output import output_folder
from loramerge.io.peft_config import validate_lora_config
from loramerge.io.portable_base import card_with_local_base, local_base_of, portable_base

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."


def resolve_adapter_dir(ref: str | Path) -> Path:
    """A local folder as is; otherwise a Hub repo id fetched with ``huggingface_hub.snapshot_download``."""
    return resolve_folder(
        ref, "adapter", "a PEFT adapter folder", [CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME, "README.md"]
    )


def read_config(folder: Path, source: str) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise BadInput(f"adapter {source}: missing {CONFIG_NAME}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadInput(f"adapter {source}: {CONFIG_NAME} is not valid JSON ({brief(error)})") from error
    if not isinstance(config, dict):
        raise BadInput(f"adapter {source}: {CONFIG_NAME} must hold a JSON object")
    validate_lora_config(config, source)
    return config


def read_state_dict(folder: Path, source: str) -> dict[str, torch.Tensor]:
    if (folder / SAFETENSORS_NAME).is_file():
        try:
            return load_file(folder / SAFETENSORS_NAME)
        except (SafetensorError, OSError) as error:
            raise BadInput(f"adapter {source}: cannot read {SAFETENSORS_NAME} ({brief(error)})") from error
    if (folder / BIN_NAME).is_file():
        try:
            state = torch.load(folder / BIN_NAME, map_location="cpu", weights_only=True)
        except Exception as error:  # weights_only unpickling refuses anything but plain tensors and containers
            reason = "it holds Python objects" if "Unsupported global" in str(error) else brief(error)
            raise BadInput(f"adapter {source}: cannot read {BIN_NAME} as a plain state dict ({reason})") from error
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise BadInput(f"adapter {source}: {BIN_NAME} is not a state dict of tensors")
        return state
    raise BadInput(f"adapter {source}: missing {SAFETENSORS_NAME} (or {BIN_NAME})")


def _is_dense_key(name: str, config: dict[str, Any]) -> bool:
    """``modules_to_save`` copies and the embedding base layers PEFT saves beside embedding LoRA."""
    module = name.rsplit(".", 1)[0]
    saved = config.get("modules_to_save") or []
    return ".base_layer." in name or any(module == m or module.endswith("." + m) for m in saved)


def _split_state(state: dict[str, torch.Tensor], config: dict[str, Any], source: str):
    parts = peft_type(config).parts
    factors: dict[str, dict[str, torch.Tensor]] = {}
    dense: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = key.removeprefix(PREFIX)
        match = parts.match(name)
        if match and (".base_layer." not in name or is_wrapper(match["module"], config)):
            factors.setdefault(match["module"], {})[match["part"]] = tensor
        elif _is_dense_key(name, config):
            dense[name] = tensor
        else:
            kind = str(config.get("peft_type")).upper()
            raise BadInput(f"adapter {source}: unexpected tensor {key!r} (not a {kind} factor nor modules_to_save)")
    return factors, dense


def load_adapter(ref: str | Path, *, allow_nonfinite: bool = False) -> LoraAdapter:
    """Read a PEFT adapter (LoRA, DoRA, lora_bias, LoHa, LoKr) from a local folder or a Hub repo id, or a kohya or
    diffusers single-file LoRA (``*.safetensors``), normalised per module."""
    if is_single_file(ref):
        return load_single_file(ref, allow_nonfinite=allow_nonfinite)
    source = str(ref)
    folder = resolve_adapter_dir(ref)
    config = read_config(folder, source)
    adapter = adapter_from_state(read_state_dict(folder, source), config, source, allow_nonfinite=allow_nonfinite)
    adapter.path = folder
    if (folder / "README.md").is_file():
        adapter.local_base = local_base_of((folder / "README.md").read_text(errors="replace"))
    return adapter


def adapter_from_state(
    state: dict[str, torch.Tensor], config: dict[str, Any], source: str, *, allow_nonfinite: bool = False
) -> LoraAdapter:
    """An adapter from the tensors PEFT saves (``get_peft_model_state_dict``) and its validated config."""
    if not allow_nonfinite:
        check_finite(state, f"adapter {source}")
    factors, dense = _split_state(state, config, source)
    if not factors:
        raise BadInput(f"adapter {source}: holds no {str(config.get('peft_type')).upper()} tensors")
    kind = peft_type(config)
    modules = _modules(factors, config, source)
    stored = {tensor.dtype for parts in factors.values() for tensor in parts.values()}
    stored_dtype = stored.pop() if kind.computed and len(stored) == 1 else None
    entries = sum(tensor.numel() for parts in factors.values() for tensor in parts.values())
    return LoraAdapter(
        modules=modules, config=config, dense=dense, source=source, stored_dtype=stored_dtype,
        stored_parameters=entries + sum(t.numel() for t in dense.values()) if kind.computed else None,
    )  # fmt: skip


def _modules(factors: dict[str, dict[str, torch.Tensor]], config: dict[str, Any], source: str) -> dict[str, LoraModule]:
    """Each module's tensors as ``LoraModule``s: one per module, one per expert of a wrapped parameter."""
    kind = peft_type(config)
    wrappers = {name: parts for name, parts in factors.items() if is_wrapper(name, config)}
    rows = {name: parts["lora_A.weight"].shape[0] for name, parts in wrappers.items() if "lora_A.weight" in parts}
    settings = wrapper_ranks(rows, config, source)
    modules: dict[str, LoraModule] = {}
    for name, parts in sorted(factors.items()):
        if name in wrappers:
            rank, alpha = settings.get(name, (1, 1.0))  # no lora_A: expert_modules says what is missing
            modules.update(expert_modules(name, parts, rank, alpha, config, source))
        else:
            modules[name] = kind.build(name, parts, config, source)
    return modules


def adapter_state_dict(adapter: LoraAdapter, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Tensors under the keys PEFT saves (experts joined into their wrapped parameters); each module's scale must
    already be what its config implies."""
    state: dict[str, torch.Tensor] = {}
    for name, module in join_experts(adapter.modules)[0].items():
        a_key, b_key = (
            ("lora_embedding_A", "lora_embedding_B")
            if module.embedding
            else (
                "lora_A.weight",
                "lora_B.weight",
            )
        )
        state[f"{PREFIX}{name}.{a_key}"] = module.A.to(dtype or module.A.dtype).contiguous()
        state[f"{PREFIX}{name}.{b_key}"] = module.B.to(dtype or module.B.dtype).contiguous()
        for key, vector in (("lora_magnitude_vector", module.magnitude), ("lora_B.bias", module.bias)):
            if vector is not None:
                state[f"{PREFIX}{name}.{key}"] = vector.to(dtype or vector.dtype).contiguous()
    for name, tensor in adapter.dense.items():
        state[f"{PREFIX}{name}"] = tensor.to(dtype or tensor.dtype).contiguous()
    return state


def save_adapter(
    adapter: LoraAdapter, path: str | Path, *, force: bool = False, dtype: torch.dtype | None = None
) -> Path:
    """Write ``adapter_config.json``, ``adapter_model.safetensors`` and the model card, atomically. A GGUF base
    is named by its source model's Hub id, loramerge's reference kept in the card (``io.portable_base``)."""
    target = Path(path)
    state = adapter_state_dict(adapter, dtype)
    base, local = portable_base(adapter.base_model)
    local = local or adapter.local_base
    config = {**adapter.config, "base_model_name_or_path": base}
    card = card_with_local_base(adapter.card, local, base)
    with output_folder(target, force=force) as folder:
        folder.json(CONFIG_NAME, config)
        folder.tensors(SAFETENSORS_NAME, state)
        if card is not None:
            folder.card(card)
    return target
