"""Model cards (``huggingface_hub.ModelCard``) that record what was merged and how."""

from __future__ import annotations

from typing import TYPE_CHECKING

import yaml
from huggingface_hub import ModelCard, ModelCardData

if TYPE_CHECKING:
    from loramerge.adapter_merge import MergePlan
    from loramerge.checkpoint_plan import CheckpointPlan

TAGS = ["lora", "peft", "merge", "loramerge"]


def merge_record(plan: MergePlan) -> dict[str, object]:
    """The inputs and parameters of a merge, as the YAML a recipe would hold."""
    options = plan.options.model_dump(exclude_defaults=False, exclude={"device", "strict"})
    return {
        "adapters": [
            {"adapter": adapter.name, "weight": weight}
            for adapter, weight in zip(plan.adapters, plan.weights, strict=True)
        ],
        **{key: value for key, value in options.items() if value is not None},
    }


def merged_adapter_card(plan: MergePlan, base_model: str | None) -> str:
    data = ModelCardData(base_model=base_model, library_name="peft", tags=TAGS)
    inputs = "\n".join(
        f"| `{adapter.name}` | {weight:g} |" for adapter, weight in zip(plan.adapters, plan.weights, strict=True)
    )
    ranks = sorted({m.output_rank for m in plan.modules})
    content = f"""---
{data.to_yaml()}
---

# Merged LoRA adapter

Merged with [loramerge](https://github.com/loramerge/loramerge) using **{plan.options.method}**
over {len(plan.modules)} modules (output ranks {ranks}). Load it with
`PeftModel.from_pretrained(base, this_folder)` on `{base_model or "the base model of the inputs"}`.

| input adapter | weight |
|---|---|
{inputs}

## Merge parameters

```yaml
{yaml.safe_dump(merge_record(plan), sort_keys=False).rstrip()}
```
"""
    return str(ModelCard(content))


def dense_model_card(plan: CheckpointPlan, recipe_yaml: str) -> str:
    inputs = [ref for ref in plan.sources if ref != plan.base]
    data = ModelCardData(base_model=plan.base or inputs, library_name="transformers", tags=["merge", "loramerge"])
    listed = "\n".join(f"- `{ref}`" for ref in inputs)
    base = f"`{plan.base}` as the base, " if plan.base else ""
    content = f"""---
{data.to_yaml()}
---

# Merged model

Merged with [loramerge](https://github.com/loramerge/loramerge) using **{plan.spec.name}**, {base}from:

{listed}

{plan.output_layers} layers, {len(plan.tensors)} tensors. Load it with
`AutoModelForCausalLM.from_pretrained(this_folder)`.

## Recipe

```yaml
{recipe_yaml.rstrip()}
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
