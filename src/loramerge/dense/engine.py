"""Merging dense checkpoints one output tensor at a time, streamed into sharded safetensors.

Peak memory is the inputs of one tensor plus small working buffers, never the model size:
element-wise methods run on row blocks of each tensor, so float32 copies of whole inputs are never
made; the output goes to disk as soon as it is computed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from loramerge.adapters.checks import check_finite
from loramerge.dense.plan import CheckpointPlan, TensorPlan, plan_checkpoint_merge
from loramerge.dense.vocabulary import align_rows
from loramerge.errors import BadInput
from loramerge.io.atomic import check_output_target
from loramerge.io.layers import is_vocabulary_tensor
from loramerge.io.model_card import dense_model_card
from loramerge.io.model_files import resolve_chat_template
from loramerge.io.output import output_folder
from loramerge.io.shard_writer import TensorLayout
from loramerge.io.sizes import parse_size
from loramerge.kernels import run_by_row_blocks, run_kernel, runs_by_rows
from loramerge.recipe import Recipe, load_recipe
from loramerge.seeding import tensor_generators
from loramerge.threads import cpu_threads, threads_for

Progress = Callable[[int, int, str], None]
DEFAULT_SHARD_SIZE = "5GB"


def _read(plan: CheckpointPlan, ref: str, name: str, rows: int | None, device: str) -> torch.Tensor:
    """An input tensor as stored (no float32 copy yet), vocabulary rows cut to the output's ``rows``
    (None: kept whole, for the vocabulary alignment)."""
    source = plan.sources[ref]
    if name not in source.checkpoint.files:
        raise BadInput(f"tensor {name}: missing from model {ref}")
    tensor = source.get(name)
    if not plan.allow_nonfinite:
        check_finite({name: tensor}, f"model {ref}")
    if rows is not None and tensor.dim() and tensor.shape[0] > rows and is_vocabulary_tensor(name):
        note = f"model {ref}: vocabulary rows of {name} cut from {tensor.shape[0]} to the base's {rows}"
        if note not in plan.warnings:
            plan.warnings.append(note)
        tensor = tensor[:rows]
    return tensor.to(device)


def _kernel_params(plan: CheckpointPlan, tensor: TensorPlan) -> dict[str, object]:
    method = plan.method
    params = dict(tensor.shared)
    for key in method.per_input_parameters:  # the weights are the kernel's own argument
        if key != "weight" and key in method.params:
            params[key] = [p.get(key) for p in tensor.per_input]
    return params


def _aligned(plan: CheckpointPlan, tensor: TensorPlan, device: str) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """A vocabulary tensor's base and inputs re-indexed to the merged vocabulary (the recipe's base model
    lends its rows to tokens a model lacks, even where it is not an input)."""
    pairs = [*tensor.inputs, *([tensor.base] if tensor.base else [])]
    if plan.base is not None and plan.base not in {ref for ref, _ in pairs}:
        pairs.append((plan.base, tensor.output))
    raw = {ref: _read(plan, ref, name, None, "cpu") for ref, name in pairs}
    aligned = {ref: matrix.to(device) for ref, matrix in align_rows(plan.vocabulary, raw, plan.base).items()}
    return (aligned[tensor.base[0]] if tensor.base else None), [aligned[ref] for ref, _ in tensor.inputs]


def merge_tensor(plan: CheckpointPlan, tensor: TensorPlan, seed: int, device: str = "cpu") -> torch.Tensor:
    """One output tensor, in the output dtype, from its inputs and parameters."""
    rows = tensor.shape[0] if tensor.shape else 0
    if plan.vocabulary is not None and is_vocabulary_tensor(tensor.output):
        base, inputs = _aligned(plan, tensor, device)
    else:
        base = _read(plan, *tensor.base, rows, device) if tensor.base else None
        inputs = [_read(plan, ref, name, rows, device) for ref, name in tensor.inputs]
    if any(tuple(x.shape) != tensor.shape for x in inputs + ([base] if base is not None else [])):
        detail = ", ".join(f"{ref}: {tuple(x.shape)}" for (ref, _), x in zip(tensor.inputs, inputs, strict=True))
        raise BadInput(f"tensor {tensor.output}: shapes differ ({detail}; expected {tensor.shape})")
    method, params = plan.method, _kernel_params(plan, tensor)
    weights = torch.tensor([float(p.get("weight", 1.0)) for p in tensor.per_input], device=device)
    scale = float(tensor.shared.get("lambda", 1.0))
    deltas = tensor.base is not None

    buffer: torch.Tensor | None = None

    def tasks_of(block: slice) -> torch.Tensor:
        """The inputs' rows ``block`` as float32 task tensors, converted straight into one reused buffer."""
        nonlocal buffer
        shape = inputs[0][block].shape
        if buffer is None or buffer[0].numel() < shape.numel():
            buffer = torch.empty((len(inputs), shape.numel()), dtype=torch.float32, device=device)
        tasks = buffer[:, : shape.numel()].view(len(inputs), *shape)
        for task, x in zip(tasks, inputs, strict=True):
            task.copy_(x[block])
        return tasks.sub_(base[block]) if deltas else tasks

    def finish(block: slice, merged: torch.Tensor) -> torch.Tensor:
        return merged.mul_(scale).add_(base[block]) if deltas else merged

    try:
        if not runs_by_rows(method, params) or len(tensor.shape) < 2:
            generators = tensor_generators(seed, tensor.output, range(len(inputs)), device) if method.random else None
            whole = slice(None)
            return finish(whole, run_kernel(method, tasks_of(whole), weights, params, generators)).to(tensor.dtype)
        # one input at a time over the whole tensor: a single float32 copy alive, not one per input
        whole = (_task(x, base, deltas) for x in inputs)
        out = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
        return run_by_row_blocks(method, tasks_of, weights, params, whole, out,
                                 lambda block, merged: finish(block, merged).to(tensor.dtype))  # fmt: skip
    except BadInput as error:  # a kernel refusing its parameters or inputs (multislerp's zero weights, say)
        raise BadInput(f"tensor {tensor.output}: {error}") from None


def _task(x: torch.Tensor, base: torch.Tensor | None, deltas: bool) -> torch.Tensor:
    task = x.to(torch.float32, copy=True)  # never a view of the input: it is modified in place
    return task.sub_(base) if deltas else task


def _side_file_source(plan: CheckpointPlan) -> Path:
    if plan.vocabulary is not None:  # the core's files; its tokenizer.json is then replaced by the merged one
        return plan.sources[plan.vocabulary.core].checkpoint.folder
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
    layout = [TensorLayout(t.output, t.shape, t.dtype) for t in plan.tensors]
    with output_folder(target, force=force) as folder:
        writer = folder.shards(layout, max_bytes)
        for done, tensor in enumerate(plan.tensors, start=1):
            # the adapter merge's thread policy (loramerge.threads): a tensor's element-wise work is the
            # full space's dense delta, so small tensors run on one thread and never wait on a busy core
            with cpu_threads(threads_for(tensor.numel), device):
                writer.write(tensor.output, merge_tensor(plan, tensor, seed, device))
            if progress is not None:
                progress(done, len(plan.tensors), tensor.output)
        writer.close()
        folder.side_files(side_files)
        config = plan.sources[plan.reference].config
        updates = {"num_hidden_layers": plan.output_layers} if "num_hidden_layers" in config else {}
        if plan.vocabulary is not None:
            folder.text("tokenizer.json", plan.vocabulary.tokenizer_json)
            updates["vocab_size"] = plan.vocabulary.padded_size
        if plan.recipe.out_dtype or plan.recipe.dtype:
            updates["dtype"] = plan.recipe.out_dtype or plan.recipe.dtype
        folder.model_config(config, **updates)
        if template:
            folder.chat_template(template)
        recipe_yaml = yaml.safe_dump(plan.recipe.model_dump(exclude_none=True), sort_keys=False)
        folder.text("loramerge_recipe.yml", recipe_yaml)
        folder.card(dense_model_card(plan.record(recipe_yaml)))
    return target


def merge_checkpoints(
    recipe: Recipe | str | Path, output: str | Path, *, progress: Progress | None = None, **options: object
) -> Path:
    """Merge the dense models of a recipe (a ``Recipe`` or a YAML path) into ``output``."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    allow_nonfinite = bool(options.pop("allow_nonfinite", False))
    return write_checkpoint(plan_checkpoint_merge(recipe, allow_nonfinite), output, progress=progress, **options)
