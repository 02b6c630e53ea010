"""``loramerge search``: look for better merge weights (and parameters) than a recipe's on dev sets."""

from __future__ import annotations

import os
import time
from pathlib import Path

import typer

from loramerge.cli.present import (
    BASE_HELP,
    COMPLETION_FIELD_HELP,
    DEVICE_HELP,
    PROMPT_FIELD_HELP,
    TEXT_FIELD_HELP,
    deprecated,
    out,
    print_warnings,
    progress_bar,
    reports_errors,
)
from loramerge.errors import BadInput


def parse_bounds(text: str, flag: str) -> tuple[float, float]:
    """``LOW:HIGH`` as two numbers."""
    try:
        low, high = (float(part) for part in text.split(":"))
    except ValueError:
        raise BadInput(f"{flag}: expected LOW:HIGH (two numbers), got {text!r}") from None
    return low, high


def parse_tune(items: list[str]) -> dict[str, tuple[float, float]]:
    """``--tune NAME=LOW:HIGH`` (repeatable) as ``{name: (low, high)}``."""
    tune: dict[str, tuple[float, float]] = {}
    for item in items:
        name, _, bounds = item.partition("=")
        if name in tune:
            raise BadInput(f"--tune {item}: {name} is tuned twice")
        tune[name] = parse_bounds(bounds, f"--tune {item}")
    return tune


@reports_errors
def search(
    recipe: Path = typer.Argument(..., help="An adapter recipe (an adapters: list); its values start the search."),
    data: list[Path] = typer.Option([], "--data", help="A dev data file (repeatable; one score per file)."),
    dev: list[Path] = typer.Option([], "--dev", hidden=True),  # the old spelling of --data
    output: Path = typer.Option(..., "-o", "--output", help="Folder for best.yml, history.csv/png, search.json."),
    budget: int = typer.Option(
        32, help="Candidate merges to score (the recipe's own values are the first); with --gradient: steps."
    ),
    batch: int = typer.Option(
        None,
        help="Candidates asked of the optimiser at once (its parallelism; not --workers); with --gradient: rows "
        "of each dev file per step (default 4; with --gradient 16).",
    ),
    gradient: bool = typer.Option(
        False,
        help="AdaMerging: learn task arithmetic's coefficients by gradient descent (the recipe's method: "
        "linear, cat or task_arithmetic), one per adapter and layer; writes OUTPUT/adapter.",
    ),
    granularity: str = typer.Option(
        "layer",
        help="With --gradient: layer (a coefficient per adapter and layer) | "
        "task (one per adapter; also writes best.yml).",
    ),
    learning_rate: float = typer.Option(0.01, help="With --gradient: Adam's learning rate."),
    workers: int = typer.Option(
        None,
        help="Parallel evaluators: local processes, or Ray actors with --ray-address "
        "(default: one per CPU of this machine).",
    ),
    ray_address: str = typer.Option(None, help="A Ray cluster (auto, ray://HOST:10001, HOST:6379), or 'local'."),
    weight_range: str = typer.Option("0:2", help="Bounds of every adapter weight, LOW:HIGH."),
    tune: list[str] = typer.Option([], "--tune", help="Also search a parameter: NAME=LOW:HIGH (alpha, density…)."),
    objective: str = typer.Option(
        None,
        help="exact_match (kept vs. adapters; the default) | loss (mean dev loss); with --gradient: entropy "
        "(of the next token after each prompt, no labels needed; the default) | loss.",
    ),
    optimizer: str = typer.Option("CMA", help="A nevergrad optimiser: CMA, TwoPointsDE, DE, OnePlusOne, …"),
    base: str = typer.Option(None, help=BASE_HELP + " Default: evaluate.base, else the adapters' base."),
    prompt_field: str = typer.Option(None, help=PROMPT_FIELD_HELP),
    completion_field: str = typer.Option(None, help=COMPLETION_FIELD_HELP),
    text_field: str = typer.Option(None, help=TEXT_FIELD_HELP + " With --objective loss."),
    max_samples: int = typer.Option(None, help="At most this many examples from each dev file."),
    write_adapter: bool = typer.Option(False, help="Also write the best merge as a PEFT adapter (OUTPUT/adapter)."),
    seed: int = typer.Option(0, help="Seed of the optimiser (and of random methods, unless the recipe sets one)."),
    threads: int = typer.Option(1, help="Torch threads per worker (the same for any --workers, so results match)."),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    load_in_4bit: bool = typer.Option(False, help="Quantize the base to nf4 at load."),
    force: bool = typer.Option(False, help="Replace an existing output folder."),
) -> None:
    """Search adapter weights on dev sets: gradient-free (nevergrad, candidates scored in parallel) or, with
    --gradient, AdaMerging's coefficients by gradient descent."""
    from loramerge.io.atomic import check_output_target
    from loramerge.recipe import load_recipe
    from loramerge.search.job import build_job
    from loramerge.search.optimise import check_settings
    from loramerge.search.optimise import search as run_search
    from loramerge.search.pools import evaluator_pool, ray_module
    from loramerge.search.report import write_search

    if dev:
        deprecated("--dev", "--data")
    data = [*data, *dev]
    parsed = load_recipe(recipe)
    bounds = parse_bounds(weight_range, "--weight-range")
    if gradient:
        _gradient_search(parsed, recipe, data, output, bounds, budget=budget, batch=batch or 16,
                         granularity=granularity,
                         objective=objective or "entropy", learning_rate=learning_rate, base=base,
                         prompt_field=prompt_field, completion_field=completion_field, text_field=text_field,
                         max_samples=max_samples, seed=seed, threads=threads, device=device,
                         load_in_4bit=load_in_4bit, force=force, tune=tune, workers=workers,
                         ray_address=ray_address)  # fmt: skip
        return
    objective, batch = objective or "exact_match", batch or 4
    job = build_job(parsed, [str(p) for p in data], base=base, weight_range=bounds, tune=parse_tune(tune),
                    prompt_field=prompt_field, completion_field=completion_field, text_field=text_field,
                    max_samples=max_samples, seed=seed, device=device, load_in_4bit=load_in_4bit,
                    threads=threads)  # fmt: skip
    inputs = [recipe, *data, *(a.path for a in job.adapters if a.path), Path(job.base)]
    target = check_output_target(output, force, inputs)
    check_settings(job, objective, optimizer, budget, batch)
    if ray_address:
        ray_module()  # a missing extra is reported before the search starts
    busy = max(batch, len(job.adapters))  # tasks in flight at most: more workers would only hold a base each
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(cpus, busy) if workers is None else workers
    print_warnings(job.space.warnings + job.plan(job.space.start).warnings)
    if workers > busy:
        print_warnings([f"`workers={workers}`: at most {busy} tasks are scored at once (`batch={batch}`, "
                        f"{len(job.adapters)} adapters alone first)"])  # fmt: skip
    started = time.perf_counter()
    with evaluator_pool(job, workers, ray_address) as pool:
        where = f"Ray at {ray_address}" if ray_address else ("this process" if workers == 1 else "local processes")
        out.print(f"searching {len(job.space.dimensions)} values ({', '.join(job.space.names)}) over {budget} "
                  f"candidates, {workers} worker(s) in {where}, {job.threads} thread(s) each")  # fmt: skip
        with progress_bar(None, label="scoring") as update:
            result = run_search(job, pool, budget=budget, batch=batch, optimizer=optimizer, objective=objective,
                                progress=update)  # fmt: skip
    settings = {"recipe": str(recipe), "dev": [str(p) for p in data], "budget": budget, "batch": batch,
                "optimizer": optimizer, "objective": objective, "seed": seed, "weight_range": weight_range,
                "tune": tune, "max_samples": max_samples, "base": job.base, "threads": job.threads,
                "merge_seed": job.merge_seed}  # fmt: skip
    written = write_search(target, job, result, settings, force=force, with_adapter=write_adapter)
    if "history.png" not in written:
        print_warnings(["no history.png: the plot needs matplotlib (pip install 'loramerge[search]')"])
    best, start = result.best, result.start
    values = ", ".join(f"{n}={v:.3f}" for n, v in zip(job.space.names, best.point, strict=True))
    out.print(f"recipe's own values: score {start.score:.4f}; best: candidate {best.index}, score {best.score:.4f} "
              f"({values})")  # fmt: skip
    out.print(f"{budget} candidates in {time.perf_counter() - started:.1f} s -> {target.absolute()} "
              f"({', '.join(written)})")  # fmt: skip


def _gradient_search(parsed, recipe: Path, data: list[Path], output: Path, bounds, *, budget: int, batch: int,
                     granularity: str, objective: str, learning_rate: float, base, prompt_field, completion_field,
                     text_field, max_samples, seed: int, threads: int, device: str, load_in_4bit: bool, force: bool,
                     tune: list[str], workers, ray_address) -> None:  # fmt: skip
    """``search --gradient``: AdaMerging in this process (one model, its gradients)."""
    from loramerge.io.atomic import check_output_target
    from loramerge.search.gradient import gradient_search
    from loramerge.search.job import build_job
    from loramerge.search.report import write_gradient_search

    if tune:
        raise BadInput("--tune: with --gradient only the adapters' weights are learned")
    if workers or ray_address:
        raise BadInput("--gradient runs in this process: leave out --workers and --ray-address")
    if granularity not in ("layer", "task"):
        raise BadInput(f"--granularity {granularity}: choose layer or task")
    job = build_job(parsed, [str(p) for p in data], base=base, weight_range=bounds, prompt_field=prompt_field,
                    completion_field=completion_field, text_field=text_field, max_samples=max_samples, seed=seed,
                    device=device, load_in_4bit=load_in_4bit, threads=threads)  # fmt: skip
    inputs = [recipe, *data, *(a.path for a in job.adapters if a.path), Path(job.base)]
    target = check_output_target(output, force, inputs)
    started = time.perf_counter()
    with progress_bar(budget, label="steps") as update:
        result, merged = gradient_search(job, steps=budget, batch=batch, granularity=granularity,
                                         objective=objective, learning_rate=learning_rate, progress=update)  # fmt: skip
    settings = {"recipe": str(recipe), "dev": [str(p) for p in data], "gradient": True, "steps": budget,
                "batch": batch, "granularity": granularity, "objective": objective, "learning_rate": learning_rate,
                "seed": seed, "weight_range": f"{bounds[0]:g}:{bounds[1]:g}", "max_samples": max_samples,
                "base": job.base, "threads": job.threads}  # fmt: skip
    written = write_gradient_search(target, job, result, merged, settings, force=force)
    kept = ", ".join(f"{k} {v:.3f}" for k, v in result.scores.exact_match.items() if v is not None)
    out.print(f"{len(result.groups)} coefficient(s) per adapter over {budget} steps ({result.forward_passes} rows "
              f"with gradients); the merge's dev exact match: {kept}")  # fmt: skip
    out.print(f"in {time.perf_counter() - started:.1f} s -> {target.absolute()} ({', '.join(written)})")
