"""``loramerge fold`` and ``loramerge extract``: adapters into full weights, and back."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from loramerge.cli.present import (
    BASE_HELP,
    SHARD_HELP,
    mark_written,
    out,
    print_warnings,
    progress_bar,
    publish,
    reports_errors,
)
from loramerge.errors import BadInput

QUANT_TYPES = ("nf4", "fp4")


def check_quant_type(value: str | None, option: str) -> str | None:
    if value is not None and value not in QUANT_TYPES:
        raise BadInput(f"{option} must be nf4 or fp4, got {value!r}")
    return value


def check_dtype(value: str | None) -> str | None:
    from loramerge.dtypes import DTYPE_NAMES

    if value is not None and value not in DTYPE_NAMES:
        raise BadInput(f"--dtype must be float32, float16 or bfloat16, got {value!r}")
    return value


@reports_errors
def fold_command(
    adapter: str = typer.Argument(..., help="PEFT adapter folder or Hub repo id."),
    base: str = typer.Option(..., "--base", help=BASE_HELP),
    output: Path = typer.Option(
        ..., "-o", "--output", help="Folder to write the full model to (with --format gguf: a .gguf file)."
    ),
    dtype: str = typer.Option(None, help="float32 | float16 | bfloat16 (default: the base's)."),
    quantize: bool = typer.Option(False, help="Write bitsandbytes 4-bit weights of --quant-type."),
    double_quant: bool = typer.Option(True, help="Double quantization of the 4-bit statistics."),
    from_dequantized: bool = typer.Option(False, help="Fold into the 4-bit-rounded weights QLoRA trained on."),
    quant_type: str = typer.Option(
        "nf4", help="The 4-bit type: nf4 | fp4 (of --quantize, and of --from-dequantized for a full-precision base)."
    ),
    out_shard_size: str = typer.Option(None, help=SHARD_HELP),
    format: str = typer.Option(
        "safetensors",
        "--format",
        help="safetensors (a model folder) | gguf (one llama.cpp model file, from a GGUF base).",
    ),
    gguf_type: str = typer.Option(None, help="With --format gguf: f32 | f16 | bf16 | q8_0 | q4_0 (default f16)."),
    force: bool = typer.Option(False, help="Replace an existing output folder."),
    allow_nonfinite: bool = typer.Option(False, help="Use input tensors holding NaN or Inf (refused by default)."),
    push_to_hub: str = typer.Option(None, help="Upload the output to this Hub repo (REPO_ID)."),
    private: bool = typer.Option(False, help="With --push-to-hub: create the repo private."),
) -> None:
    """Add an adapter's deltas into the base weights, streaming the base's shards (or its GGUF tensors)."""
    from loramerge.adapters.files import load_adapter
    from loramerge.folding.stream import fold

    if format == "gguf":
        _fold_to_gguf(
            adapter,
            base,
            output,
            gguf_type or "f16",
            force,
            allow_nonfinite,
            (quantize, dtype, out_shard_size, push_to_hub, from_dequantized),
        )
        return
    if format != "safetensors":
        raise BadInput(f"--format must be safetensors or gguf, got {format!r}")
    if gguf_type:
        raise BadInput(
            "--gguf-type is the tensor type of --format gguf; a safetensors fold takes --dtype or --quantize"
        )

    check_dtype(dtype)
    check_quant_type(quant_type, "--quant-type")
    started = time.perf_counter()
    loaded = load_adapter(adapter, allow_nonfinite=allow_nonfinite)
    with progress_bar(None, label="folding") as update:
        target = fold(
            loaded, base, output, dtype=dtype, quantize=quant_type if quantize else None, double_quant=double_quant,
            from_dequantized=quant_type if from_dequantized else None, shard_size=out_shard_size, force=force,
            progress=update,
        )  # fmt: skip
    mark_written(target)
    kind = f"{quant_type} 4-bit" if quantize else (dtype or "the base's dtype")
    seconds = time.perf_counter() - started
    out.print(f"folded {len(loaded.modules)} modules into {base} ({kind}) in {seconds:.2f} s -> {target}")
    publish(target, push_to_hub, private)


def _fold_to_gguf(
    adapter: str, base: str, output: Path, gguf_type: str, force: bool, allow_nonfinite: bool, others: tuple
) -> None:
    """``fold --format gguf``: the base's GGUF file with the adapter folded in."""
    from loramerge.adapters.files import load_adapter
    from loramerge.folding.gguf_out import DENSE_GGUF_TYPES, fold_to_gguf
    from loramerge.io.gguf_adapter import check_gguf_target
    from loramerge.io.sizes import human_bytes

    for given, flag in zip(others, ("--quantize", "--dtype", "--out-shard-size", "--push-to-hub", "--from-dequantized"),
                           strict=True):  # fmt: skip
        if given:
            raise BadInput(f"--format gguf writes one llama.cpp file in --gguf-type; it does not combine with {flag}")
    if gguf_type not in DENSE_GGUF_TYPES:
        raise BadInput(f"--gguf-type must be one of {', '.join(DENSE_GGUF_TYPES)}, got {gguf_type!r}")
    check_gguf_target(output, force, [Path(adapter), Path(base)])  # before anything is read
    started = time.perf_counter()
    loaded = load_adapter(adapter, allow_nonfinite=allow_nonfinite)
    with progress_bar(None, label="folding") as update:
        target = fold_to_gguf(loaded, base, output, gguf_type=gguf_type, force=force, progress=update)
    mark_written(target)
    seconds = time.perf_counter() - started
    out.print(f"folded {len(loaded.modules)} modules into {base} ({gguf_type} GGUF, "
              f"{human_bytes(target.stat().st_size)}) in {seconds:.2f} s -> {target}")  # fmt: skip


@reports_errors
def extract_command(
    model: str = typer.Argument(..., help="The fine-tuned or merged model folder."),
    base: str = typer.Option(..., "--base", help=BASE_HELP + " The one the model derives from."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder to write the PEFT adapter to."),
    rank: int = typer.Option(..., help="LoRA rank of every module."),
    fast: bool = typer.Option(False, help="Randomized SVD (torch.svd_lowrank) instead of the exact one."),
    dtype: str = typer.Option(None, help="Adapter dtype: float32 (default) | float16 | bfloat16."),
    force: bool = typer.Option(False, help="Replace an existing output folder."),
) -> None:
    """The best rank-K LoRA of MODEL - BASE per module, as a PEFT adapter; reports captured energy."""
    from loramerge.adapters.files import save_adapter
    from loramerge.adapters.options import DTYPES
    from loramerge.folding.extract import extract_lora
    from loramerge.io.atomic import check_output_target

    check_dtype(dtype)
    target = check_output_target(output, force, [Path(model), Path(base)])
    with progress_bar(None, label="extracting") as update:
        result = extract_lora(model, base, rank, fast=fast, progress=update)
    save_adapter(result.adapter, target, force=force, dtype=DTYPES[dtype] if dtype else None)
    mark_written(target)
    if result.skipped:
        print_warnings([f"{len(result.skipped)} changed tensors are not 2-D weights and were left out "
                        f"(e.g. {result.skipped[0]}); the adapter cannot carry them"])  # fmt: skip
    values = sorted(result.energy.items(), key=lambda item: item[1])
    mean = sum(v for _, v in values) / len(values)
    out.print(f"extracted {len(values)} modules at rank {rank}: captured energy mean {mean:.4f}, "
              f"lowest {values[0][1]:.4f} ({values[0][0]}) -> {target}")  # fmt: skip
