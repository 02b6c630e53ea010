"""``loramerge eval`` and ``loramerge generate``: judge and try merged models."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import typer

from loramerge.cli.present import evaluation_table, out, progress_bar, reports_errors


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
    from loramerge.evaluate.suite import evaluate_models, load_datasets

    datasets = load_datasets(data, text_field=text_field, prompt_field=prompt_field,
                             completion_field=completion_field, max_samples=max_samples)  # fmt: skip
    with progress_bar(None, label="evaluating") as update:
        results = evaluate_models(base, adapter, merged, datasets, load_in_4bit, device, update)
    if as_json:
        out.print_json(json.dumps([dataclasses.asdict(r) for r in results]))
    else:
        out.print(evaluation_table(results))


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
