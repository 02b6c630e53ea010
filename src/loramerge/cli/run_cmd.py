"""``loramerge run``: run a YAML recipe (dense models, ``model+adapter`` references, or adapters)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from loramerge.cli.present import (
    DEFAULT_SHARD_SIZE,
    DEVICE_HELP,
    SHARD_HELP,
    console,
    evaluation_table,
    mark_written,
    out,
    print_warnings,
    progress_bar,
    publish,
    reports_errors,
    run_adapter_plan,
)
from loramerge.errors import BadInput
from loramerge.io.sizes import human_bytes


@reports_errors
def run(
    recipe: Path = typer.Argument(..., help="YAML recipe (mergekit's format, or an adapters: list)."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder to write the merged model or adapter to."),
    out_shard_size: str = typer.Option(None, help=SHARD_HELP),
    seed: int = typer.Option(
        None, help="Seed of the random methods (DARE, DELLA); default: the recipe's parameters.seed, else 0."
    ),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
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
        _run_adapters(parsed, output, out_shard_size, seed, device, dry_run, force, allow_nonfinite, push_to_hub)
    else:
        _run_dense(parsed, output, out_shard_size or DEFAULT_SHARD_SIZE, seed, device, dry_run, force, allow_nonfinite)
    if not dry_run:
        out.print(f"done in {time.perf_counter() - started:.2f} s -> {output.absolute()}")
        if parsed.evaluate:
            _evaluate(parsed, output, device)
        publish(output, push_to_hub, private)


def _evaluate(parsed, output: Path, device: str) -> None:
    """The recipe's ``evaluate:`` section: one table for the base, the input adapters and the merge."""
    from loramerge.workflows import evaluate_recipe

    with progress_bar(None, label="evaluating") as update:
        results = evaluate_recipe(parsed, output, device, update)
    out.print(evaluation_table(results))
    if parsed.folds_adapters:
        out.print("(the merge was folded into the base: its row is the full merged model)")


def _run_adapters(
    parsed, output: Path, shard_size: str | None, seed: int | None, device: str, dry_run: bool, force: bool,
    allow_nonfinite: bool, push_to_hub: str | None,
) -> None:  # fmt: skip
    from loramerge.io.sizes import parse_size
    from loramerge.workflows import adapter_recipe_plan

    if shard_size:
        parse_size(shard_size)
    plan, target, fold_into, single_file = adapter_recipe_plan(
        parsed, output, seed=seed, device=device, force=force or dry_run, allow_nonfinite=allow_nonfinite,
        phase=progress_bar, calibrate=not dry_run,
    )  # fmt: skip
    if single_file and push_to_hub:
        raise BadInput("--push-to-hub uploads a folder; this recipe writes one single-file LoRA")
    if shard_size and not fold_into:
        print_warnings(["`out_shard_size` applies to a full model; this recipe writes an adapter (one file)"])
    run_adapter_plan(plan, target, dry_run=dry_run, force=force, fold_into=fold_into, shard_size=shard_size,
                     single_file=single_file)  # fmt: skip


def _run_dense(
    parsed, output: Path, shard_size: str, seed: int | None, device: str, dry_run: bool, force: bool,
    allow_nonfinite: bool,
) -> None:  # fmt: skip
    from loramerge.dense.engine import write_checkpoint
    from loramerge.dense.plan import plan_checkpoint_merge
    from loramerge.io.sizes import parse_size

    parse_size(shard_size)
    with console.status("reading model indexes"):
        plan = plan_checkpoint_merge(parsed, allow_nonfinite)
    if dry_run:
        for line in plan.describe():
            out.print(line, soft_wrap=True)
        inputs = ", ".join(plan.sources)
        out.print(f"dry run: {plan.method.name} of {inputs}; output {human_bytes(plan.output_bytes)}")
        return
    with progress_bar(len(plan.tensors), label="merging tensors") as update:
        write_checkpoint(plan, output, force=force, shard_size=shard_size, seed=seed or 0, device=device,
                         progress=update)  # fmt: skip
    mark_written(output.absolute())
    print_warnings(plan.warnings)
    out.print(f"merged {len(plan.tensors)} tensors, {plan.output_layers} layers with {plan.method.name}")
