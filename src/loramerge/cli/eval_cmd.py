"""``loramerge eval`` and ``loramerge generate``: judge and try merged models."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import typer

from loramerge.cli.present import (
    BASE_HELP,
    COMPLETION_FIELD_HELP,
    DATA_HELP,
    DEVICE_HELP,
    PROMPT_FIELD_HELP,
    TEXT_FIELD_HELP,
    deprecated,
    evaluation_table,
    out,
    progress_bar,
    reports_errors,
)


def chosen_base(base: str | None, positional: str | None) -> str:
    """``--base``, or the base given the old way (first argument), with its deprecation line."""
    from loramerge.errors import BadInput

    if positional is not None:
        if base is not None:
            raise BadInput(f"give the base once: --base {base} (not also {positional!r} before the options)")
        deprecated("the base as the first argument", f"--base {positional}")
        return positional
    if base is None:
        raise BadInput("give the base model: --base MODEL")
    return base


@reports_errors
def eval_command(
    positional: str = typer.Argument(None, hidden=True, metavar="[BASE]"),
    base: str = typer.Option(None, "--base", help=BASE_HELP),
    adapter: list[str] = typer.Option([], "--adapter", help="An adapter to evaluate on the base (repeatable)."),
    merged: str = typer.Option(None, help="The merge: a merged adapter folder or a full merged model."),
    data: list[Path] = typer.Option(..., help=DATA_HELP),
    text_field: str = typer.Option(None, help=TEXT_FIELD_HELP),
    prompt_field: str = typer.Option(None, help=PROMPT_FIELD_HELP),
    completion_field: str = typer.Option(None, help=COMPLETION_FIELD_HELP),
    load_in_4bit: bool = typer.Option(False, help="Load the base in nf4 with bitsandbytes."),
    max_samples: int = typer.Option(None, help="Evaluate at most this many rows."),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Loss and perplexity of the completions (or whole texts), and exact-match accuracy of greedy
    completions, for the base, each adapter and the merge."""
    from loramerge.evaluate.suite import evaluate_models, load_datasets

    base = chosen_base(base, positional)
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
    positional: str = typer.Argument(None, hidden=True, metavar="[BASE]"),
    base: str = typer.Option(None, "--base", help=BASE_HELP),
    adapter: str = typer.Option(None, help="An adapter to apply on the base."),
    prompt: str = typer.Option(..., help="The prompt."),
    chat: bool = typer.Option(False, help="Wrap the prompt in the tokenizer's chat template."),
    max_new_tokens: int = typer.Option(64, help="Tokens to generate (greedy)."),
    load_in_4bit: bool = typer.Option(False, help="Load the base in nf4 with bitsandbytes."),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
) -> None:
    """Greedy generation from a (merged) model: try it."""
    from loramerge.evaluate import generate_text, load_model

    base = chosen_base(base, positional)
    model, tokenizer = load_model(base, adapter=adapter, load_in_4bit=load_in_4bit, device=device)
    out.print(generate_text(model, tokenizer, prompt, chat=chat, max_new_tokens=max_new_tokens), soft_wrap=True)
