"""``loramerge merge``: merge adapters and write a PEFT adapter folder."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from loramerge.catalogue import DEFAULT_DENSITY, DEFAULT_METHOD, DEFAULT_SPACE, SPACES, adapter_methods, methods
from loramerge.cli.present import (
    BASE_HELP,
    DATA_HELP,
    DEVICE_HELP,
    SHARD_HELP,
    console,
    print_warnings,
    progress_bar,
    publish,
    reports_errors,
    run_adapter_plan,
)
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


def exact_rank_methods() -> list[str]:
    """The adapter methods whose output keeps the exact sum's rank, from the catalogue."""
    return [method.name for method in methods() if method.adapters and method.exact_rank]


def parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    if text.rstrip().endswith(","):
        raise BadInput(
            f"--weights {text!r} ends with a comma: write the list without spaces (--weights 1,-0.5) or quote it"
        )
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BadInput(f"--weights must be comma-separated numbers, got {text!r}") from None


@reports_errors
def merge(
    adapters: list[str] = typer.Argument(
        ..., help="PEFT adapter folders or Hub repo ids, or kohya/LyCORIS/diffusers .safetensors files."
    ),
    output: Path = typer.Option(
        ..., "-o", "--output", help="Folder to write the merged adapter to (with --format gguf: a .gguf file)."
    ),
    weights: str = typer.Option(None, help="Comma-separated weights, one per adapter (default: 1 each)."),
    method: str = typer.Option(None, help=f"{' | '.join(adapter_methods())} (default {DEFAULT_METHOD})."),
    density: float = typer.Option(
        None, help=f"Fraction kept by the pruning methods, in (0, 1] (default {DEFAULT_DENSITY:g})."
    ),
    rank: int = typer.Option(
        None,
        help=f"Output rank (default: exact, Σ r_i, for {'/'.join(exact_rank_methods())}; the largest input "
        "rank otherwise).",
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
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    strict: bool = typer.Option(False, help="Refuse adapters that name different base models."),
    allow_nonfinite: bool = typer.Option(False, help="Use input tensors holding NaN or Inf (refused by default)."),
    base: str = typer.Option(
        None, help=BASE_HELP + " DoRA inputs need its weights, regmean its activations (default: --fold-into)."
    ),
    calibration: list[Path] = typer.Option(
        [],
        "--calibration",
        help="With --method regmean: a file of prompts per adapter, in order (repeatable); "
        "the base's activations on them weigh the merge. " + DATA_HELP.removesuffix(" (repeatable)."),
    ),
    fold_into: str = typer.Option(None, help="Fold the merge into this base and write the full model instead."),
    out_shard_size: str = typer.Option(None, help=SHARD_HELP + " With --fold-into."),
    via_dense: bool = typer.Option(
        False,
        help="Fold each adapter with PEFT (merge_and_unload) and merge the dense deltas: needs --base, and --rank "
        "(a LoRA extracted from the merge) or --fold-into. Automatic for adapters with no low-rank form (IA3, OFT, "
        "VeRA, ...).",
    ),
    format: str = typer.Option(
        None,
        "--format",
        help="peft (an adapter folder) | gguf (a llama.cpp LoRA adapter file; needs the base's architecture: "
        "--base, else the adapters' base) | kohya | diffusers (one .safetensors file; from single-file inputs). "
        "Default: the inputs' (kohya where single files differ), else peft.",
    ),
    gguf_type: str = typer.Option(
        None, help="With --format gguf: f32 (default) | f16 | bf16 | q8_0; with --fold-into also q4_0 (default f16)."
    ),
    force: bool = typer.Option(False, help="Replace an existing output folder."),
    dry_run: bool = typer.Option(False, help="Print the plan and write nothing."),
    push_to_hub: str = typer.Option(None, help="Upload the output to this Hub repo (REPO_ID)."),
    private: bool = typer.Option(False, help="With --push-to-hub: create the repo private."),
) -> None:
    """Merge LoRA adapters in low-rank space and write a PEFT adapter folder (or a llama.cpp GGUF adapter)."""
    from loramerge.adapters.dora import base_to_read
    from loramerge.adapters.files import load_adapter
    from loramerge.adapters.merge import plan_merge
    from loramerge.adapters.options import parse_options
    from loramerge.dense.peft_fold import peft_type_of
    from loramerge.io.sizes import parse_size
    from loramerge.workflows import needs_peft_fold

    options = parse_options(
        method=method, density=density, rank=rank, space=space, majority_sign=majority_sign, full_svd=full_svd,
        preset=preset, seed=seed, dtype=dtype, device=device, strict=strict, params=parse_params(param),
    )  # fmt: skip
    parse_weights(weights)  # a malformed list is refused before any adapter is read
    if out_shard_size:
        parse_size(out_shard_size)
        if not fold_into:
            print_warnings(["`out_shard_size` applies to a full model (`fold_into`); an adapter is one file"])
    base = base or fold_into
    inputs = [Path(ref) for ref in [*adapters, *{ref for ref in (base, fold_into) if ref}]]
    format = _chosen_format(format, adapters)
    if format == "gguf":
        gguf_type = gguf_type or ("f16" if fold_into else "f32")  # fold's default for a model, lossless for factors
    target = _output_target(format, output, force or dry_run, inputs, adapters, gguf_type=gguf_type, dtype=dtype,
                           fold_into=fold_into, via_dense=via_dense, push_to_hub=push_to_hub)  # fmt: skip
    kinds = [peft_type_of(ref) for ref in adapters]
    dense_only = needs_peft_fold(kinds)
    if dense_only and format != "peft":
        raise BadInput(f"--format {format}: {adapters[dense_only[0]]} ({kinds[dense_only[0]]}) has no low-rank form; "
                       "it merges through PEFT's fold into a PEFT adapter or a full model")  # fmt: skip
    if via_dense or dense_only:
        if not base:
            raise BadInput("merging through PEFT's fold needs the base model: give --base MODEL (or --fold-into)")
        _merge_via_dense(adapters, weights, options, base, target, rank, fold_into, force, dry_run, out_shard_size)
        if dense_only and not via_dense:  # said after the work, so that a refusal stays one line
            names = ", ".join(f"{adapters[i]} ({kinds[i]})" for i in dense_only)
            console.print(f"{names}: no low-rank form, so every input was merged through PEFT's fold (--via-dense)")
        if not dry_run:
            publish(target, push_to_hub, private)
        return
    with console.status("reading adapters"):
        loaded = [load_adapter(ref, allow_nonfinite=allow_nonfinite) for ref in adapters]
    loaded, gguf, single_file = _prepared_output(format, loaded, base=base, fold_into=fold_into, gguf_type=gguf_type)
    plan = plan_merge(loaded, parse_weights(weights), options, base_to_read(loaded, base, options))
    _calibrate(plan, calibration, base, device, dry_run)
    run_adapter_plan(plan, target, dry_run=dry_run, force=force, fold_into=fold_into, shard_size=out_shard_size,
                     gguf=gguf, single_file=single_file)  # fmt: skip
    if not dry_run:
        publish(target, push_to_hub, private)


def _calibrate(plan, calibration: list[Path], base: str | None, device: str, dry_run: bool) -> None:
    """The adapters' input statistics, for a method that merges with activations (RegMean), taken once the plan
    has passed every other check; a dry run takes none."""
    method = plan.options.method
    if not plan.options.method_entry.calibrated:
        if calibration:
            raise BadInput(f"--calibration: method {method} does not use activations (regmean does)")
        return
    if not calibration:
        raise BadInput(f"--method {method} merges with each adapter's activations: give one --calibration FILE of "
                       "prompts per adapter")  # fmt: skip
    if not base:
        raise BadInput(f"--method {method} runs the base model on the calibration prompts: give --base MODEL")
    if len(calibration) != len(plan.adapters):
        raise BadInput(f"--calibration: {len(calibration)} files for {len(plan.adapters)} adapters; give one per "
                       "adapter, in the adapters' order")  # fmt: skip
    if dry_run:
        return
    from loramerge.adapters.merge import with_grams
    from loramerge.evaluate.activations import calibration_grams

    with progress_bar(None, "calibration") as update:
        with_grams(
            plan, calibration_grams(base, calibration, plan.adapters, device=device, progress=update), calibration
        )


def _merge_via_dense(adapters, weights, options, base, target, rank, fold_into, force, dry_run, shard_size) -> None:
    """``merge --via-dense``: every input folded by PEFT, the dense deltas merged, written folded or extracted."""
    from loramerge.workflows import check_via_dense, merge_via_dense

    weights = check_via_dense(list(adapters), parse_weights(weights), options, rank=rank, fold_into=fold_into)
    what = f"the base {fold_into} with the merge folded in" if fold_into else f"a rank-{rank} LoRA of the merge"
    if dry_run:
        console.print(f"would fold {len(adapters)} adapters into {base} with PEFT, merge the deltas with "
                      f"{options.method} and write {what} to {target}")  # fmt: skip
        return
    with console.status("folding each adapter with PEFT and merging the deltas"):
        result = merge_via_dense(list(adapters), weights, options, base, target, rank=rank,
                                 fold_into=fold_into, force=force, shard_size=shard_size)  # fmt: skip
    line = f"merged {len(adapters)} adapters through PEFT's fold ({result.tensors} tensors changed), {what}"
    if result.relative_error is not None:
        line += f", relative error {result.relative_error:.3g}"
    if result.skipped:
        line += f"; not in the LoRA (1-D): {', '.join(result.skipped[:3])}{' …' if len(result.skipped) > 3 else ''}"
    console.print(f"{line} -> {target}")


# --format: which output a merge writes, and what each format cannot take, refused before the merge runs
OUTPUT_FORMATS = ("peft", "gguf", "kohya", "diffusers")
SINGLE_FILE_FORMATS = ("kohya", "diffusers")


def _chosen_format(format: str | None, adapters: list[str]) -> str:
    """The format asked for; by default the inputs' own (kohya where single files differ), else peft."""
    from loramerge.adapters.single_file import default_format, formats_of, is_single_file

    if format is None:
        if not all(is_single_file(ref) for ref in adapters):
            return "peft"
        return default_format(formats_of(adapters))
    if format not in OUTPUT_FORMATS:
        raise BadInput(f"--format must be peft, gguf, kohya or diffusers, got {format!r}")
    return format


def _output_target(format: str, output: Path, force: bool, inputs: list[Path], adapters: list[str], *,
                  gguf_type: str | None, dtype: str | None, fold_into: str | None, via_dense: bool,
                  push_to_hub: str | None) -> Path:  # fmt: skip
    """The checked output of ``format``, after what it does not combine with is refused."""
    from loramerge.adapters.single_file import check_single_file_target, is_single_file
    from loramerge.io.atomic import check_output_target
    from loramerge.io.gguf_adapter import check_gguf_target

    single = [is_single_file(ref) for ref in adapters]
    if gguf_type and format != "gguf":
        raise BadInput(f"--gguf-type is the tensor type of --format gguf; --format {format} takes --dtype")
    if format == "peft":
        if any(single):
            raise BadInput(f"{adapters[single.index(True)]} is a single-file LoRA: write it as --format kohya or "
                           "--format diffusers")  # fmt: skip
        return check_output_target(output, force, inputs)
    if format == "gguf":
        _check_gguf_type(gguf_type, bool(fold_into))
        if dtype:
            raise BadInput("--format gguf writes its tensors in --gguf-type; it does not combine with --dtype")
        refused = ((via_dense, "--via-dense"), (push_to_hub, "--push-to-hub"))
    else:
        refused = ((fold_into, "--fold-into"), (via_dense, "--via-dense"), (push_to_hub, "--push-to-hub"))
        if not all(single):
            raise BadInput(f"--format {format} merges single-file LoRAs (kohya or diffusers .safetensors), not "
                           f"{adapters[single.index(False)]}")  # fmt: skip
    for given, flag in refused:
        if given:
            raise BadInput(f"--format {format} writes one file; it does not combine with {flag}")
    check = check_gguf_target if format == "gguf" else check_single_file_target
    return check(output, force, inputs)


def _check_gguf_type(gguf_type: str, folded: bool) -> None:
    from loramerge.folding.gguf_out import DENSE_GGUF_TYPES
    from loramerge.io.gguf_adapter import GGUF_TYPES

    types = DENSE_GGUF_TYPES if folded else GGUF_TYPES
    if gguf_type not in types:
        raise BadInput(f"--gguf-type must be one of {', '.join(types)}, got {gguf_type!r}")


def _prepared_output(format: str, loaded: list, *, base: str | None, fold_into: str | None, gguf_type: str | None):
    """The inputs as the format merges them, and what ``workflows.merge_and_write`` is told to write (a
    ``GgufOutput``, a ``SingleFileOutput``, or neither), after every check the written file would fail."""
    from loramerge.adapters.model import recorded_base
    from loramerge.adapters.single_file import single_file_inputs
    from loramerge.folding.gguf_out import check_gguf_fold
    from loramerge.io.gguf_adapter import adapter_tensor_names, check_plain_lora, layout_of
    from loramerge.workflows import GgufOutput, SingleFileOutput

    if format in SINGLE_FILE_FORMATS:
        loaded, kernels = single_file_inputs(loaded, format, base)
        return loaded, None, SingleFileOutput(format, kernels)
    if format != "gguf":
        return loaded, None, None
    gguf_base = fold_into or base or recorded_base(loaded)
    if not gguf_base:
        raise BadInput("--format gguf names tensors by the base's architecture: give --base MODEL")
    layout = layout_of(gguf_base)
    for adapter in loaded:
        if fold_into:
            check_gguf_fold(adapter, fold_into, gguf_type)
        else:
            check_plain_lora(adapter)
            adapter_tensor_names(adapter, layout)
    return loaded, GgufOutput(gguf_base, gguf_type), None
