"""Model cards (``huggingface_hub.ModelCard``) that record what was merged and how."""

from __future__ import annotations

from dataclasses import dataclass

import yaml
from huggingface_hub import ModelCard, ModelCardData

TAGS = ["lora", "peft", "merge", "loramerge"]


@dataclass(frozen=True)
class MergeRecord:
    """What a merge did, as its card states it (executors return one; this module never reads plans)."""

    method: str
    inputs: list[tuple[str, float]]  # (name, weight) of each input
    modules: int
    ranks: list[int]
    parameters: dict[str, object]  # the inputs and parameters as the YAML a recipe would hold


@dataclass(frozen=True)
class DenseRecord:
    method: str
    base: str | None
    inputs: list[str]
    layers: int
    tensors: int
    recipe_yaml: str


def merged_adapter_card(record: MergeRecord, base_model: str | None) -> str:
    data = ModelCardData(base_model=base_model, library_name="peft", tags=TAGS)
    inputs = "\n".join(f"| `{name}` | {weight:g} |" for name, weight in record.inputs)
    content = f"""---
{data.to_yaml()}
---

# Merged LoRA adapter

Merged with [loramerge](https://github.com/loramerge/loramerge) using **{record.method}**
over {record.modules} modules (output ranks {record.ranks}). Load it with
`PeftModel.from_pretrained(base, this_folder)` on `{base_model or "the base model of the inputs"}`.

| input adapter | weight |
|---|---|
{inputs}

## Merge parameters

```yaml
{yaml.safe_dump(record.parameters, sort_keys=False).rstrip()}
```
"""
    return str(ModelCard(content))


def dense_model_card(record: DenseRecord) -> str:
    inputs = [ref for ref in record.inputs if ref != record.base]
    data = ModelCardData(base_model=record.base or inputs, library_name="transformers", tags=["merge", "loramerge"])
    listed = "\n".join(f"- `{ref}`" for ref in inputs)
    base = f"`{record.base}` as the base, " if record.base else ""
    content = f"""---
{data.to_yaml()}
---

# Merged model

Merged with [loramerge](https://github.com/loramerge/loramerge) using **{record.method}**, {base}from:

{listed}

{record.layers} layers, {record.tensors} tensors. Load it with
`AutoModelForCausalLM.from_pretrained(this_folder)`.

## Recipe

```yaml
{record.recipe_yaml.rstrip()}
```
"""
    return str(ModelCard(content))


def folded_model_card(base_ref: str, adapter, record_yaml: str, note: str = "") -> str:
    data = ModelCardData(base_model=base_ref, library_name="transformers", tags=["merge", "lora", "loramerge"])
    content = f"""---
{data.to_yaml()}
---

# {base_ref} with a LoRA adapter folded in

Written by [loramerge](https://github.com/loramerge/loramerge) `fold`: every adapter module's
`scale · B @ A` added (in float32) into the matching base weight; {len(adapter.modules)} modules.
{note}
Load it with `AutoModelForCausalLM.from_pretrained(this_folder)`.

```yaml
{record_yaml.rstrip()}
```
"""
    return str(ModelCard(content))


def extracted_adapter_card(model_ref: str, base_ref: str, rank: int, energy: dict[str, float]) -> str:
    data = ModelCardData(base_model=base_ref, library_name="peft", tags=["lora", "peft", "loramerge", "extracted"])
    mean = sum(energy.values()) / max(len(energy), 1)
    content = f"""---
{data.to_yaml()}
---

# LoRA extracted from {model_ref}

The best rank-{rank} approximation (truncated SVD) of `{model_ref}` minus `{base_ref}` in each of
{len(energy)} modules, written by [loramerge](https://github.com/loramerge/loramerge) `extract`.
Mean captured energy ‖ΔK‖²/‖Δ‖²: {mean:.4f} (lowest {min(energy.values(), default=1.0):.4f}).
Load it with `PeftModel.from_pretrained(base, this_folder)` on `{base_ref}`.
"""
    return str(ModelCard(content))


def moe_model_card(base_ref: str, experts: list[str], gate_mode: str, config_yaml: str) -> str:
    data = ModelCardData(base_model=base_ref, library_name="transformers", tags=["moe", "merge", "loramerge"])
    listed = "\n".join(f"{i}. `{ref}`" for i, ref in enumerate(experts))
    content = f"""---
{data.to_yaml()}
---

# Mixture of experts

Built with [loramerge](https://github.com/loramerge/loramerge) `moe` from a mergekit-moe config:
attention, norms and embeddings of `{base_ref}`, one expert MLP per model, routers from
`gate_mode: {gate_mode}`. Experts:

{listed}

Load it with `AutoModelForCausalLM.from_pretrained(this_folder)` (Mixtral architecture).

```yaml
{config_yaml.rstrip()}
```
"""
    return str(ModelCard(content))
