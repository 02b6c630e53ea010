"""``loramerge eval`` and ``loramerge generate``: judge and try merged models."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import typer
from rich.table import Table

from loramerge.cli.app import app, out, reports_errors
from loramerge.cli.merge_cmd import progress_bar
from loramerge.errors import BadInput


def evaluation_table(results) -> Table:
    """One evaluation set: a row per model. Several: exact match per model and set, and the merge's retention."""
    if len({r.data for r in results}) > 1:
        return skills_table(results)
    table = Table(title="evaluation")
    for column in ("model", "loss", "perplexity", "exact match", "samples", "tokens"):
        table.add_column(column)
    for r in results:
        exact = "-" if r.exact_match is None else f"{100 * r.exact_match:.1f}%"
        table.add_row(r.name, f"{r.loss:.4f}", f"{r.perplexity:.3f}", exact, str(r.samples), str(r.tokens))
    return table


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def skills_table(results) -> Table:
    """Exact match (or loss, for plain texts) of every model on every evaluation set. The last column of
    the merge is its mean retention: its score on each set over the best input adapter's, averaged."""
    sets = list(dict.fromkeys(r.data for r in results))
    models = list(dict.fromkeys(r.name for r in results))
    score = {(r.name, r.data): r for r in results}
    exact = all(r.exact_match is not None for r in results)
    table = Table(title="exact match per evaluation set" if exact else "loss per evaluation set")
    table.add_column("model")
    for name in sets:
        table.add_column(name, justify="right")
    table.add_column("mean" if exact else "mean loss", justify="right")
    adapters = [m for m in models if m.startswith("adapter ")]
    merged = [m for m in models if m.startswith("merged ")]
    if exact and adapters and merged:
        table.add_column("kept vs. adapters", justify="right")
    for model in models:
        values = [score[(model, name)].exact_match if exact else score[(model, name)].loss for name in sets]
        cells = [_percent(v) if exact else f"{v:.4f}" for v in values]
        mean = sum(values) / len(values)
        cells.append(_percent(mean) if exact else f"{mean:.4f}")
        if len(table.columns) > len(cells) + 1:
            cells.append(_percent(retention(score, model, adapters, sets)) if model in merged else "")
        table.add_row(model, *cells)
    return table


def retention(score, model: str, adapters: list[str], sets: list[str]) -> float | None:
    """Mean over sets of ``model``'s exact match divided by the best adapter's (sets no adapter solves are
    left out)."""
    ratios = []
    for name in sets:
        best = max(score[(a, name)].exact_match for a in adapters)
        if best > 0:
            ratios.append(score[(model, name)].exact_match / best)
    return sum(ratios) / len(ratios) if ratios else None


def evaluate_models(
    base: str, adapters: list[str], merged: str | None, datasets: dict, load_in_4bit: bool, device: str
):
    """Base, each adapter and the merge (a merged adapter folder or a full model), in that order, each on
    every evaluation set of ``datasets`` ({name: samples})."""
    from transformers.utils import logging as transformers_logging

    from loramerge.evaluate import evaluate, load_model

    transformers_logging.disable_progress_bar()  # one bar per model load would bury the table
    runs = [("base", base, None)] + [(f"adapter {_short(a)}", base, a) for a in adapters]
    if merged:
        is_adapter = (Path(merged) / "adapter_config.json").is_file()
        runs.append((f"merged {_short(merged)}", base if is_adapter else merged, merged if is_adapter else None))
    results = []
    with progress_bar(None, label="evaluating") as update:
        for name, model_ref, adapter in runs:
            model, tokenizer = load_model(model_ref, adapter=adapter, load_in_4bit=load_in_4bit, device=device)
            for data, samples in datasets.items():
                results.append(evaluate(model, tokenizer, samples, name, update, data=data))
    return results


def _short(ref: str) -> str:
    """A local folder by its name (the table stays narrow), a Hub id as given."""
    return Path(ref).name if Path(ref).exists() else ref


def load_datasets(paths, **fields) -> dict:
    """``{file stem: samples}`` for each evaluation file (``add.eval.jsonl`` is named ``add``)."""
    import datasets

    from loramerge.evaluate import load_samples

    datasets.disable_progress_bars()  # the table is the output; a broken file is reported in one line
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)

    datasets = {}
    for path in paths:
        name = Path(path).name.split(".")[0]
        if name in datasets:
            raise BadInput(f"--data {path}: two evaluation sets are named {name!r}; rename one")
        datasets[name] = load_samples(path, **fields)
    return datasets


@app.command("eval")
@reports_errors
def eval_command(
    base: str = typer.Argument(..., help="Base model folder (with its tokenizer)."),
    adapter: list[str] = typer.Option([], "--adapter", help="An adapter to evaluate on the base (repeatable)."),
    merged: str = typer.Option(None, help="The merge: a merged adapter folder or a full merged model."),
    data: list[Path] = typer.Option(..., help="Local JSONL, JSON, CSV, Parquet or text file (repeatable)."),
    text_field: str = typer.Option(None, help="Field holding whole texts (default: text)."),
    prompt_field: str = typer.Option(None, help="Field holding prompts (with --completion-field)."),
    completion_field: str = typer.Option(None, help="Field holding reference completions."),
    load_in_4bit: bool = typer.Option(False, help="Load the base in nf4 with bitsandbytes."),
    max_samples: int = typer.Option(None, help="Evaluate at most this many rows."),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Loss and perplexity of the completions (or whole texts), and exact-match accuracy of greedy
    completions, for the base, each adapter and the merge."""
    datasets = load_datasets(data, text_field=text_field, prompt_field=prompt_field,
                             completion_field=completion_field, max_samples=max_samples)  # fmt: skip
    results = evaluate_models(base, adapter, merged, datasets, load_in_4bit, device)
    if as_json:
        out.print_json(json.dumps([dataclasses.asdict(r) for r in results]))
    else:
        out.print(evaluation_table(results))


@app.command("generate")
@reports_errors
def generate_command(
    base: str = typer.Argument(..., help="Model folder (with its tokenizer)."),
    adapter: str = typer.Option(None, help="An adapter to apply on the base."),
    prompt: str = typer.Option(..., help="The prompt."),
    chat: bool = typer.Option(False, help="Wrap the prompt in the tokenizer's chat template."),
    max_new_tokens: int = typer.Option(64, help="Tokens to generate (greedy)."),
    load_in_4bit: bool = typer.Option(False, help="Load the base in nf4 with bitsandbytes."),
    device: str = typer.Option("cpu", help="cpu | cuda"),
) -> None:
    """Greedy generation from a (merged) model: try it."""
    from loramerge.evaluate import generate_text, load_model

    model, tokenizer = load_model(base, adapter=adapter, load_in_4bit=load_in_4bit, device=device)
    out.print(generate_text(model, tokenizer, prompt, chat=chat, max_new_tokens=max_new_tokens), soft_wrap=True)
