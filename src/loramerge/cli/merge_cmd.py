"""``loramerge merge``: merge adapters and write a PEFT adapter folder."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from loramerge.catalogue import DEFAULT_DENSITY, DEFAULT_METHOD, DEFAULT_SPACE, SPACES, adapter_methods
from loramerge.cli.present import console, publish, reports_errors, run_adapter_plan
from loramerge.errors import BadInput

if TYPE_CHECKING:  # the library (and torch) load when a command runs, so --help stays instant
    pass


def parse_params(items: list[str]) -> dict[str, float | str]:
    """``--param NAME=VALUE`` pairs: numbers as numbers, anything else as text."""
    params: dict[str, float | str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise BadInput(f"--param must be NAME=VALUE, got {item!r}")
        try:
            params[name.strip()] = float(value)
        except ValueError:
            params[name.strip()] = value.strip()
    return params


def parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BadInput(f"--weights must be comma-separated numbers, got {text!r}") from None


@reports_errors
def merge(
    adapters: list[str] = typer.Argument(..., help="PEFT adapter folders or Hub repo ids."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder to write the merged adapter to."),
    weights: str = typer.Option(None, help="Comma-separated weights, one per adapter (default: 1 each)."),
    method: str = typer.Option(None, help=f"{' | '.join(adapter_methods())} (default {DEFAULT_METHOD})."),
    density: float = typer.Option(
        None, help=f"Fraction kept by the pruning methods, in (0, 1] (default {DEFAULT_DENSITY:g})."
    ),
    rank: int = typer.Option(
        None, help="Output rank (default: exact for cat/linear/iso_c/tsv_m/knots, largest input rank otherwise)."
    ),
    space: str = typer.Option(
        None, help=f"Where element-wise methods work: {' | '.join(SPACES)} (default {DEFAULT_SPACE})."
    ),
    majority_sign: str = typer.Option(None, help="Sign election of ties/dare_ties: total (default) | frequency."),
    param: list[str] = typer.Option(
        [], "--param", help="A parameter of the method, NAME=VALUE (repeatable): alpha=1.2, keep=0.5, inner=linear."
    ),
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
    base: str = typer.Option(
        None,
        help="The adapters' base model (a folder, Hub id, .gguf file, pkg: reference or 4-bit checkpoint): DoRA "
        "inputs need its weights (default: --fold-into).",
    ),
    fold_into: str = typer.Option(None, help="Also fold the merge into this base and write a full model."),
    force: bool = typer.Option(False, help="Replace an existing output folder."),
    dry_run: bool = typer.Option(False, help="Print the plan and write nothing."),
    push_to_hub: str = typer.Option(None, help="Upload the output to this Hub repo (REPO_ID)."),
    private: bool = typer.Option(False, help="With --push-to-hub: create the repo private."),
) -> None:
    """Merge LoRA adapters in low-rank space and write a PEFT adapter folder."""
    from loramerge.adapters.files import load_adapter
    from loramerge.adapters.merge import plan_merge
    from loramerge.adapters.options import parse_options
    from loramerge.io.atomic import check_output_target
    from loramerge.workflows import dora_base

    options = parse_options(
        method=method, density=density, rank=rank, space=space, majority_sign=majority_sign, full_svd=full_svd,
        preset=preset, seed=seed, dtype=dtype, device=device, strict=strict, params=parse_params(param),
    )  # fmt: skip
    base = base or fold_into
    inputs = [Path(ref) for ref in [*adapters, *{ref for ref in (base, fold_into) if ref}]]
    target = check_output_target(output, force or dry_run, inputs)
    with console.status("reading adapters"):
        loaded = [load_adapter(ref, allow_nonfinite=allow_nonfinite) for ref in adapters]
    plan = plan_merge(loaded, parse_weights(weights), options, dora_base(loaded, base))
    run_adapter_plan(plan, target, dry_run=dry_run, force=force, fold_into=fold_into)
    if not dry_run:
        publish(target, push_to_hub, private)
