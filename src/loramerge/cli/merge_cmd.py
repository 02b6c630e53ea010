"""``loramerge merge``: merge adapters and write a PEFT adapter folder."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from loramerge.cli.app import app, console, out, publish, reports_errors
from loramerge.defaults import DEFAULT_DENSITY, DEFAULT_METHOD, DEFAULT_SPACE, METHODS
from loramerge.errors import BadInput

if TYPE_CHECKING:  # the library (and torch) load when a command runs, so --help stays instant
    from loramerge.adapter_merge import MergePlan

PROGRESS_MIN_ITEMS = 64


def parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BadInput(f"--weights must be comma-separated numbers, got {text!r}") from None


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1000
    return f"{count:.1f} GB"


def plan_table(plan: MergePlan) -> Table:
    table = Table(title="merge plan", show_lines=False)
    for column in ("module", "delta shape", "input ranks", "output rank"):
        table.add_column(column)
    for module in plan.modules:
        ranks = ["-"] * len(plan.adapters)
        for index, rank in zip(module.inputs, module.input_ranks, strict=True):
            ranks[index] = str(rank)
        table.add_row(module.name, f"{module.shape[0]}x{module.shape[1]}", ",".join(ranks), str(module.output_rank))
    return table


def describe(plan: MergePlan) -> str:
    from loramerge.kernels import KERNELS

    options = plan.options
    ranks = sorted({m.output_rank for m in plan.modules})
    parts = [f"method={options.method}"]
    if options.strategy not in ("concat", "svd"):
        parts.append(f"space={options.space}")
    if options.strategy == "full":
        parts.append(f"full_svd={options.full_svd}")
    if options.uses_density:
        parts.append(f"density={options.effective_density:g}")
    if options.method in KERNELS and KERNELS[options.method].consensus:
        parts.append(f"majority_sign={options.majority_sign}")
    parts += [f"weights={','.join(f'{w:g}' for w in plan.weights)}", f"seed={options.seed}"]
    return (
        f"{len(plan.adapters)} adapters, {len(plan.modules)} modules, {' '.join(parts)}, output ranks {ranks}, "
        f"{str(plan.out_dtype).removeprefix('torch.')}, {human_bytes(plan.output_bytes)}"
    )


@contextmanager
def progress_bar(total: int | None, label: str = "merging modules") -> Iterator[Callable[[int, int, str], None]]:
    """A rich progress bar on stderr (for long jobs; ``None``: the length comes with the first update)
    and the callback that advances it."""
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    columns += (TextColumn("{task.description}"),)
    hidden = total is not None and total < PROGRESS_MIN_ITEMS
    with Progress(*columns, console=console, transient=True, disable=hidden) as bar:
        task = bar.add_task("", total=total)
        yield lambda done, count, name: bar.update(task, completed=done, total=count, description=name)


@app.command()
@reports_errors
def merge(
    adapters: list[str] = typer.Argument(..., help="PEFT adapter folders or Hub repo ids."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder to write the merged adapter to."),
    weights: str = typer.Option(None, help="Comma-separated weights, one per adapter (default: 1 each)."),
    method: str = typer.Option(None, help=f"{' | '.join(METHODS)} (default {DEFAULT_METHOD})."),
    density: float = typer.Option(
        None, help=f"Fraction kept by the pruning methods, in (0, 1] (default {DEFAULT_DENSITY:g})."
    ),
    rank: int = typer.Option(None, help="Output rank (default: exact for cat/linear, largest input rank otherwise)."),
    space: str = typer.Option(
        None, help=f"Where element-wise methods work: core | full | factors (default {DEFAULT_SPACE})."
    ),
    majority_sign: str = typer.Option(None, help="Sign election of ties/dare_ties: total (default) | frequency."),
    full_svd: str = typer.Option(
        None,
        help="Rank truncation in the full space: auto (default: exact for modules narrower than 8x the "
        "kept rank + 8, randomized range finder above) | exact | randomized.",
    ),
    preset: str = typer.Option(None, help="Conventions where peers differ: peft (default) | mergekit."),
    seed: int = typer.Option(None, help="Seed of the random methods (default 0)."),
    dtype: str = typer.Option(None, help="Output dtype: float32 | float16 | bfloat16 (default: the inputs')."),
    device: str = typer.Option(None, help="Where to compute: cpu (default) | cuda."),
    strict: bool = typer.Option(False, help="Refuse adapters that name different base models."),
    allow_nonfinite: bool = typer.Option(False, help="Use input tensors holding NaN or Inf (refused by default)."),
    fold_into: str = typer.Option(None, help="Also fold the merge into this base and write a full model."),
    force: bool = typer.Option(False, help="Replace an existing output folder."),
    dry_run: bool = typer.Option(False, help="Print the plan and write nothing."),
    push_to_hub: str = typer.Option(None, help="Upload the output to this Hub repo (REPO_ID)."),
    private: bool = typer.Option(False, help="With --push-to-hub: create the repo private."),
) -> None:
    """Merge LoRA adapters in low-rank space and write a PEFT adapter folder."""
    from loramerge.adapter_merge import plan_merge
    from loramerge.io.adapters import load_adapter
    from loramerge.io.atomic import check_output_target
    from loramerge.options import parse_options

    options = parse_options(
        method=method, density=density, rank=rank, space=space, majority_sign=majority_sign, full_svd=full_svd,
        preset=preset, seed=seed, dtype=dtype, device=device, strict=strict,
    )  # fmt: skip
    local_inputs = [Path(ref) for ref in adapters if Path(ref).exists()]
    target = check_output_target(output, force or dry_run, local_inputs)
    with console.status("reading adapters"):
        loaded = [load_adapter(ref, allow_nonfinite=allow_nonfinite) for ref in adapters]
    plan = plan_merge(loaded, parse_weights(weights), options)
    run_adapter_plan(plan, target, dry_run=dry_run, force=force, fold_into=fold_into)
    if not dry_run:
        publish(target, push_to_hub, private)


def print_warnings(warnings: list[str]) -> None:
    for warning in warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}", markup=True, soft_wrap=True)


def run_adapter_plan(
    plan: MergePlan, target: Path, *, dry_run: bool, force: bool, fold_into: str | None = None
) -> None:
    """Print a plan's warnings, then either the plan (dry run) or merge with a progress bar and save
    the adapter (or, with ``fold_into``, the base with the merge folded in)."""
    from loramerge.adapter_merge import execute_plan

    print_warnings(plan.warnings)
    if dry_run:
        out.print(plan_table(plan))
        out.print(f"dry run: {describe(plan)}; would write {target}")
        return
    started = time.perf_counter()
    with progress_bar(len(plan.modules)) as update:
        merged = execute_plan(plan, update)
    if fold_into:
        from loramerge.fold_checkpoint import fold

        with progress_bar(None, label="folding") as update:
            fold(merged, fold_into, target, force=force, progress=update, card_note=f"Merge: {describe(plan)}.")
    else:
        merged.save(target, force=force, dtype=plan.out_dtype)
    out.print(f"merged {describe(plan)} in {time.perf_counter() - started:.2f} s -> {target}")
