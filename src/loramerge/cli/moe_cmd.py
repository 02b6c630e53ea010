"""``loramerge moe``: a Mixtral-architecture mixture of experts from a mergekit-moe config."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from loramerge.cli.present import (
    DEFAULT_SHARD_SIZE,
    DEVICE_HELP,
    SHARD_HELP,
    out,
    progress_bar,
    publish,
    reports_errors,
)


@reports_errors
def moe(
    config: Path = typer.Argument(..., help="mergekit-moe YAML config (base_model, experts, gate_mode, …)."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder to write the mixture of experts to."),
    out_shard_size: str = typer.Option(None, help=SHARD_HELP),
    seed: int = typer.Option(0, help="Seed of random routers and expert noise (mergekit's --random-seed)."),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    force: bool = typer.Option(False, help="Replace an existing output folder."),
    allow_nonfinite: bool = typer.Option(False, help="Use input tensors holding NaN or Inf (refused by default)."),
    push_to_hub: str = typer.Option(None, help="Upload the output to this Hub repo (REPO_ID)."),
    private: bool = typer.Option(False, help="With --push-to-hub: create the repo private."),
) -> None:
    """Build a mixture of experts: the base's attention and embeddings, one expert MLP per model (or
    model+adapter), routers from prompts (hidden, hidden_avg, cheap_embed) or random."""
    from loramerge.io.sizes import parse_size
    from loramerge.moe.build import build_moe
    from loramerge.moe.config import load_moe_config

    parsed = load_moe_config(config)
    out_shard_size = out_shard_size or DEFAULT_SHARD_SIZE
    parse_size(out_shard_size)
    started = time.perf_counter()
    with progress_bar(None, label=f"routers ({parsed.gate_mode}), then tensors") as update:
        target = build_moe(parsed, output, config_yaml=config.read_text(), seed=seed, force=force,
                           shard_size=out_shard_size, device=device, allow_nonfinite=allow_nonfinite,
                           progress=update)  # fmt: skip
    out.print(f"{len(parsed.experts)} experts, {parsed.experts_per_token} per token, gate_mode {parsed.gate_mode}: "
              f"done in {time.perf_counter() - started:.2f} s -> {target.absolute()}")  # fmt: skip
    publish(target, push_to_hub, private)
