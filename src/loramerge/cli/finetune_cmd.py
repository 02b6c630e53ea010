"""``loramerge finetune``: continue training a (merged) LoRA adapter on a few examples."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from loramerge.cli.present import (
    BASE_HELP,
    COMPLETION_FIELD_HELP,
    DATA_HELP,
    DEVICE_HELP,
    PROMPT_FIELD_HELP,
    out,
    progress_bar,
    reports_errors,
)
from loramerge.train.options import FinetuneOptions as Defaults  # the class attributes: the library's defaults


@reports_errors
def finetune(
    adapter: Path = typer.Argument(..., help="The LoRA adapter to train further (a merged one, say)."),
    base: str = typer.Option(None, help=BASE_HELP + " Default: the adapter's base_model_name_or_path."),
    data: list[Path] = typer.Option(..., "--data", help=DATA_HELP + " The files are mixed."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder to write the trained adapter to."),
    prompt_field: str = typer.Option(None, help=PROMPT_FIELD_HELP),
    completion_field: str = typer.Option(None, help=COMPLETION_FIELD_HELP),
    max_samples: int = typer.Option(None, help="At most this many examples from each file."),
    steps: int = typer.Option(Defaults.steps, help="Optimizer steps."),
    learning_rate: float = typer.Option(
        Defaults.learning_rate, "--lr", help="Peak learning rate (AdamW, warm-up, cosine decay; docs/finetune.md)."
    ),
    batch_size: int = typer.Option(Defaults.batch_size, help="Examples per step."),
    seed: int = typer.Option(Defaults.seed, help="Seed of the shuffling and of the training."),
    device: str = typer.Option(Defaults.device, help=DEVICE_HELP),
    load_in_4bit: bool = typer.Option(False, help="Quantize the base to nf4 at load (QLoRA-style)."),
    rank: int = typer.Option(None, help="First cut every module to at most this rank (default: keep the ranks)."),
    dtype: str = typer.Option(None, help="Output dtype: float32 | float16 | bfloat16 (default: the adapter's)."),
    force: bool = typer.Option(False, help="Replace an existing output folder."),
) -> None:
    """Train a LoRA adapter further with PEFT on a little data (labels on the completions only)."""
    from loramerge.adapters.files import load_adapter
    from loramerge.errors import BadInput
    from loramerge.evaluate.data import load_samples
    from loramerge.train.finetune import finetune as run_finetune
    from loramerge.train.finetune import mixed

    options = Defaults(steps=steps, learning_rate=learning_rate, batch_size=batch_size, seed=seed, device=device,
                       load_in_4bit=load_in_4bit, rank=rank, dtype=dtype)  # fmt: skip
    base = base or load_adapter(adapter).base_ref
    if not base:
        raise BadInput(f"adapter {adapter}: it names no base model; give --base")
    sets = [load_samples(path, prompt_field=prompt_field, completion_field=completion_field, max_samples=max_samples)
            for path in data]  # fmt: skip
    for path, samples in zip(data, sets, strict=True):  # refused now, not after the base has loaded
        if not all(sample.prompt for sample in samples):
            raise BadInput(f"`data` {path}: finetune trains on prompt/completion pairs, and this file has whole "
                           "texts; give `prompt_field` and `completion_field`")  # fmt: skip
    samples = mixed(sets, seed)
    started = time.perf_counter()
    with progress_bar(steps, label="training") as update:
        target, losses = run_finetune(str(adapter), base, samples, output, options, force=force, inputs=data,
                                         progress=update)  # fmt: skip
    out.print(f"{steps} steps on {len(samples)} examples from {len(data)} files, loss {losses[0]:.4f} -> "
              f"{losses[-1]:.4f}, in {time.perf_counter() - started:.1f} s -> {target.absolute()}")  # fmt: skip
