"""``loramerge run``: run a YAML recipe (dense models, ``model+adapter`` references, or adapters)."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from loramerge.cli.app import app, console, out, publish, reports_errors
from loramerge.cli.merge_cmd import human_bytes, print_warnings, progress_bar, run_adapter_plan
from loramerge.errors import BadInput

if TYPE_CHECKING:
    from loramerge.checkpoint_plan import CheckpointPlan


_CONVENTIONS = ("elect_on", "majority_sign")


def _summary(params: list[dict]) -> str:
    keys = sorted({key for p in params for key in p})
    parts = []
    for key in keys:
        values = [p.get(key) for p in params]
        shown = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in values]
        parts.append(f"{key}={shown[0]}" if len(set(shown)) == 1 else f"{key}={shown[0]}…{shown[-1]}")
    return " ".join(parts)


def dense_plan_lines(plan: CheckpointPlan) -> list[str]:
    """One line per tensor group (layer index as ``*``): count, inputs, parameters over the layers."""
    from loramerge.layers import layer_group

    groups: dict[str, list] = defaultdict(list)
    for tensor in plan.tensors:
        groups[layer_group(tensor.output)].append(tensor)
    lines = [f"plan: {plan.spec.name}, {plan.output_layers} layers, {len(plan.tensors)} tensors"]
    for group, tensors in groups.items():
        shared = _summary([{k: v for k, v in t.shared.items() if k not in _CONVENTIONS} for t in tensors])
        per_input = "; ".join(
            f"{ref}: {_summary([t.per_input[i] for t in tensors]) or '-'}"
            for i, (ref, _) in enumerate(tensors[0].inputs)
        )
        lines.append(f"  {group} x{len(tensors)}  [{shared}]  {per_input}")
    return lines


def _output_bytes(plan: CheckpointPlan) -> int:
    from loramerge.options import DTYPES

    chosen = plan.recipe.out_dtype or plan.recipe.dtype
    total = 0
    for tensor in plan.tensors:
        ref, name = tensor.base or tensor.inputs[0]
        shape_dtype = plan.sources[ref].checkpoint.get(name)
        size = (DTYPES[chosen].itemsize if chosen else shape_dtype.element_size()) * shape_dtype.numel()
        total += size
    return total


@app.command()
@reports_errors
def run(
    recipe: Path = typer.Argument(..., help="YAML recipe (mergekit's format, or an adapters: list)."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder to write the merged model or adapter to."),
    out_shard_size: str = typer.Option("5GB", help="Largest output shard, e.g. 5GB or 500MB."),
    seed: int = typer.Option(0, help="Seed of the random methods (DARE, DELLA)."),
    device: str = typer.Option("cpu", help="Where to compute: cpu | cuda."),
    dry_run: bool = typer.Option(False, help="Print the plan and write nothing."),
    force: bool = typer.Option(False, help="Replace an existing output folder."),
    allow_nonfinite: bool = typer.Option(False, help="Use input tensors holding NaN or Inf (refused by default)."),
    push_to_hub: str = typer.Option(None, help="Upload the output to this Hub repo (REPO_ID)."),
    private: bool = typer.Option(False, help="With --push-to-hub: create the repo private."),
) -> None:
    """Run a merge recipe: dense checkpoints tensor by tensor, or LoRA adapters in low-rank space."""
    from loramerge.recipe import load_recipe

    parsed = load_recipe(recipe)
    started = time.perf_counter()
    if parsed.is_adapter_recipe:
        _run_adapters(parsed, output, seed, device, dry_run, force, allow_nonfinite)
    else:
        _run_dense(parsed, output, out_shard_size, seed, device, dry_run, force, allow_nonfinite)
    if not dry_run:
        out.print(f"done in {time.perf_counter() - started:.2f} s -> {output.absolute()}")
        if parsed.evaluate:
            _evaluate(parsed, output, device)
        publish(output, push_to_hub, private)


def _evaluate(parsed, output: Path, device: str) -> None:
    """The recipe's ``evaluate:`` section: one table for the base, the input adapters and the merge."""
    from loramerge.cli.eval_cmd import evaluate_models, evaluation_table, load_datasets
    from loramerge.io.adapters import load_adapter

    spec = parsed.evaluate
    adapters = [entry.adapter for entry in parsed.adapters or []]
    base = spec.base or parsed.base_model
    if base is None and adapters:
        base = load_adapter(adapters[0]).base_model
    if base is None:
        raise BadInput("evaluate.base: name the base model to compare with")
    folds = parsed.folds_adapters
    files = [spec.data] if isinstance(spec.data, str) else spec.data
    datasets = load_datasets(files, text_field=spec.text_field, prompt_field=spec.prompt_field,
                             completion_field=spec.completion_field, max_samples=spec.max_samples)  # fmt: skip
    out.print(evaluation_table(evaluate_models(base, adapters, str(output), datasets, False, device)))
    if folds:
        out.print("(the merge was folded into the base: its row is the full merged model)")


def _run_adapters(
    parsed, output: Path, seed: int, device: str, dry_run: bool, force: bool, allow_nonfinite: bool
) -> None:
    from loramerge.adapter_merge import plan_merge
    from loramerge.io.atomic import check_output_target
    from loramerge.recipe_adapters import adapter_merge_inputs

    adapters, weights, options = adapter_merge_inputs(parsed, allow_nonfinite, seed=seed, device=device)
    local = [Path(a.source) for a in adapters if Path(a.source).exists()]
    target = check_output_target(output, force or dry_run, local)
    fold_into = None
    if parsed.folds_adapters:
        fold_into = parsed.output.base or next((a.base_model for a in adapters if a.base_model), None)
        if not fold_into:
            raise BadInput("output.base: name the base to fold into (the adapters record none)")
    plan = plan_merge(adapters, weights, options)
    run_adapter_plan(plan, target, dry_run=dry_run, force=force, fold_into=fold_into)


def _run_dense(
    parsed, output: Path, shard_size: str, seed: int, device: str, dry_run: bool, force: bool, allow_nonfinite: bool
) -> None:
    from loramerge.checkpoint_merge import write_checkpoint
    from loramerge.checkpoint_plan import plan_checkpoint_merge
    from loramerge.io.shard_writer import parse_size

    parse_size(shard_size)
    with console.status("reading model indexes"):
        plan = plan_checkpoint_merge(parsed, allow_nonfinite)
    if dry_run:
        for line in dense_plan_lines(plan):
            out.print(line, soft_wrap=True)
        inputs = ", ".join(plan.sources)
        out.print(f"dry run: {plan.spec.name} of {inputs}; output {human_bytes(_output_bytes(plan))}")
        return
    with progress_bar(len(plan.tensors), label="merging tensors") as update:
        write_checkpoint(plan, output, force=force, shard_size=shard_size, seed=seed, device=device, progress=update)
    print_warnings(plan.warnings)
    out.print(f"merged {len(plan.tensors)} tensors, {plan.output_layers} layers with {plan.spec.name}")
