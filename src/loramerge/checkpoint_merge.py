"""Merging dense checkpoints one output tensor at a time, streamed into sharded safetensors.

Peak memory is the inputs of one tensor plus one output shard, never the model size (DESIGN.md §4).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from loramerge.checkpoint_plan import CheckpointPlan, TensorPlan, on_deltas, plan_checkpoint_merge
from loramerge.errors import BadInput
from loramerge.io.atomic import atomic_output_dir, check_output_target
from loramerge.io.model_card import dense_model_card
from loramerge.io.model_files import copy_side_files, resolve_chat_template, write_chat_template, write_config
from loramerge.io.shard_writer import ShardWriter, parse_size
from loramerge.kernels import run_kernel
from loramerge.layers import is_vocabulary_tensor
from loramerge.options import DTYPES
from loramerge.recipe import Recipe, load_recipe
from loramerge.seeding import tensor_generators

Progress = Callable[[int, int, str], None]
DEFAULT_SHARD_SIZE = "5GB"


def _read(plan: CheckpointPlan, ref: str, name: str, rows: int | None, device: str) -> torch.Tensor:
    source = plan.sources[ref]
    if name not in source.checkpoint.files:
        raise BadInput(f"tensor {name}: missing from model {ref}")
    tensor = source.get(name)
    if rows is not None and tensor.dim() and tensor.shape[0] > rows and is_vocabulary_tensor(name):
        note = f"model {ref}: vocabulary rows of {name} cut from {tensor.shape[0]} to the base's {rows}"
        if note not in plan.warnings:
            plan.warnings.append(note)
        tensor = tensor[:rows]
    return tensor.to(device=device, dtype=torch.float32)


def merge_tensor(plan: CheckpointPlan, tensor: TensorPlan, seed: int, device: str = "cpu") -> torch.Tensor:
    """One output tensor in float32, from its inputs and parameters."""
    reference = plan.sources[plan.reference]
    rows = None
    if tensor.output in reference.checkpoint.files and is_vocabulary_tensor(tensor.output):
        rows = reference.checkpoint.get(tensor.output).shape[0]
    base = _read(plan, *tensor.base, rows, device) if tensor.base else None
    inputs = [_read(plan, ref, name, rows, device) for ref, name in tensor.inputs]
    shapes = {tuple(x.shape) for x in inputs + ([base] if base is not None else [])}
    if len(shapes) > 1:
        detail = ", ".join(f"{ref}: {tuple(x.shape)}" for (ref, _), x in zip(tensor.inputs, inputs, strict=True))
        raise BadInput(f"tensor {tensor.output}: shapes differ ({detail})")
    spec = plan.spec
    weights = torch.tensor([float(p.get("weight", 1.0)) for p in tensor.per_input], device=device)
    params = dict(tensor.shared)
    for key in ("density", "gamma", "epsilon"):
        if key in spec.params:
            params[key] = [float(p[key]) for p in tensor.per_input]
    if spec.name == "passthrough":
        params["scale"] = tensor.per_input[0].get("scale")
    generators = tensor_generators(seed, tensor.output, range(len(inputs)), device) if spec.random else None
    try:
        if on_deltas(spec.name):
            deltas = torch.stack([x - base for x in inputs])
            return base + float(tensor.shared.get("lambda", 1.0)) * run_kernel(
                spec, deltas, weights, params, generators
            )
        return run_kernel(spec, torch.stack(inputs), weights, params, generators)
    except ValueError as error:
        raise BadInput(f"tensor {tensor.output}: {error}") from None


def _out_dtype(plan: CheckpointPlan, tensor: TensorPlan) -> torch.dtype:
    chosen = plan.recipe.out_dtype or plan.recipe.dtype
    if chosen:
        return DTYPES[chosen]
    ref, name = tensor.base or tensor.inputs[0]
    return plan.sources[ref].checkpoint.get(name).dtype


def _side_file_source(plan: CheckpointPlan) -> Path:
    choice = plan.recipe.tokenizer_source
    if choice in (None, "base"):
        return plan.sources[plan.reference].checkpoint.folder
    if choice in plan.sources:
        return plan.sources[choice].checkpoint.folder
    if Path(choice).is_dir():
        return Path(choice)
    raise BadInput(f"tokenizer_source: {choice!r} is not 'base', a model of the recipe, or a folder")


def write_checkpoint(
    plan: CheckpointPlan,
    output: str | Path,
    *,
    force: bool = False,
    shard_size: str | int = DEFAULT_SHARD_SIZE,
    seed: int = 0,
    device: str = "cpu",
    progress: Progress | None = None,
) -> Path:
    """Run a plan and write the merged model (config, weights, tokenizer, card, recipe), atomically."""
    max_bytes = parse_size(shard_size)
    inputs = [source.checkpoint.folder for source in plan.sources.values()]
    target = check_output_target(Path(output), force, inputs)
    side_files = _side_file_source(plan)
    template = resolve_chat_template(plan.recipe.chat_template) if plan.recipe.chat_template else None
    with atomic_output_dir(target, force=force) as staging:
        writer = ShardWriter(staging, max_bytes)
        for done, tensor in enumerate(plan.tensors, start=1):
            writer.add(tensor.output, merge_tensor(plan, tensor, seed, device).to(_out_dtype(plan, tensor)))
            if progress is not None:
                progress(done, len(plan.tensors), tensor.output)
        writer.close()
        copy_side_files(side_files, staging)
        config = plan.sources[plan.reference].config
        updates = {"num_hidden_layers": plan.output_layers} if "num_hidden_layers" in config else {}
        if plan.recipe.out_dtype or plan.recipe.dtype:
            updates["dtype"] = plan.recipe.out_dtype or plan.recipe.dtype
        write_config(config, staging, **updates)
        if template:
            write_chat_template(staging, template)
        recipe_yaml = yaml.safe_dump(plan.recipe.model_dump(exclude_none=True), sort_keys=False)
        (staging / "loramerge_recipe.yml").write_text(recipe_yaml)
        (staging / "README.md").write_text(dense_model_card(plan, recipe_yaml))
    return target


def merge_checkpoints(
    recipe: Recipe | str | Path, output: str | Path, *, progress: Progress | None = None, **options: object
) -> Path:
    """Merge the dense models of a recipe (a ``Recipe`` or a YAML path) into ``output``."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    return write_checkpoint(plan_checkpoint_merge(recipe), output, progress=progress, **options)
