"""Pipelines put together the way the command line runs them: an adapter merge written as an adapter or
folded into its base, and a recipe's ``evaluate:`` section. The CLI calls these and prints; they never do."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from loramerge.adapters.dora import base_to_read
from loramerge.adapters.files import load_adapter, save_adapter
from loramerge.adapters.merge import MergePlan, execute_plan, plan_merge, with_grams
from loramerge.adapters.model import LoraAdapter, recorded_base
from loramerge.adapters.options import MergeOptions
from loramerge.adapters.recipe import adapter_merge_inputs
from loramerge.adapters.single_file import (
    FORMAT_KEY,
    FORMATS,
    check_single_file_target,
    default_format,
    save_single_file,
    single_file_inputs,
)
from loramerge.errors import BadInput
from loramerge.evaluate.activations import calibration_grams
from loramerge.evaluate.exact_match import EvalResult
from loramerge.evaluate.suite import evaluate_models, load_datasets
from loramerge.folding.gguf_out import fold_to_gguf
from loramerge.folding.stream import fold
from loramerge.io.atomic import check_output_target
from loramerge.io.gguf_adapter import GgufAdapterReport, write_gguf_adapter
from loramerge.recipe import Recipe

Progress = Callable[[int, int, str], None]
# a phase of a long job: (its length if known, its label) -> a context giving the progress callback
Phase = Callable[[int | None, str], AbstractContextManager[Progress | None]]


def _silent(total: int | None, label: str) -> AbstractContextManager[Progress | None]:
    return nullcontext(None)


@dataclasses.dataclass(frozen=True)
class GgufOutput:
    """A merge written as a llama.cpp LoRA adapter for ``base`` (its architecture names the tensors)."""

    base: str
    gguf_type: str = "f32"


@dataclasses.dataclass(frozen=True)
class SingleFileOutput:
    """A merge written as one kohya or diffusers LoRA file; ``kernels``: the convolutions' down-factor shapes."""

    format: str
    kernels: dict[str, list]


def executed_plan(plan: MergePlan, float32: bool) -> MergePlan:
    """The plan to execute: a merge folded into a base or written as GGUF keeps its factors in float32 (the fold
    adds them in float32; the GGUF type is applied once, at the end), and the dtype asked for is the model's."""
    return dataclasses.replace(plan, out_dtype=torch.float32) if float32 else plan


def write_merged_adapter(
    merged: LoraAdapter,
    plan: MergePlan,
    target: Path,
    *,
    force: bool = False,
    fold_into: str | None = None,
    card_note: str = "",
    progress: Progress | None = None,
    shard_size: str | None = None,
    gguf: GgufOutput | None = None,
    single_file: SingleFileOutput | None = None,
) -> GgufAdapterReport | None:
    """Write a merged adapter (a PEFT folder, or with ``gguf`` a llama.cpp adapter file), or (``fold_into``) that
    base with the merge folded in (``progress``: the fold; ``shard_size``: its largest shard, default the
    base's), in the dtype the plan asks for (default: the adapters' or the base's)."""
    if single_file is not None:
        save_single_file(merged, target, single_file.format, single_file.kernels, force=force, dtype=plan.out_dtype)
        return None
    if gguf is not None and fold_into:
        fold_to_gguf(merged, fold_into, target, gguf_type=gguf.gguf_type, force=force, progress=progress)
        return None
    if gguf is not None:
        return write_gguf_adapter(merged, gguf.base, target, gguf_type=gguf.gguf_type, force=force, progress=progress)
    if fold_into:
        fold(merged, fold_into, target, dtype=plan.options.dtype, force=force, progress=progress, card_note=card_note,
             shard_size=shard_size)  # fmt: skip
    else:
        save_adapter(merged, target, force=force, dtype=plan.out_dtype)
    return None


@dataclasses.dataclass
class WrittenMerge:
    """What ``merge_and_write`` wrote: a merged adapter, or (``folded``) a full model of ``dtype`` and ``size``."""

    seconds: float
    folded: bool = False
    dtype: str = ""
    size: int = 0  # bytes of the folded model's safetensors
    gguf: GgufAdapterReport | None = None  # what a GGUF adapter holds and left out


def merge_and_write(
    plan: MergePlan,
    target: Path,
    *,
    force: bool = False,
    fold_into: str | None = None,
    shard_size: str | None = None,
    gguf: GgufOutput | None = None,
    single_file: SingleFileOutput | None = None,
    phase: Phase = _silent,
) -> WrittenMerge:
    """Execute a plan and write the merged adapter (with ``gguf``, as a llama.cpp adapter file; with
    ``fold_into``, that base with the merge folded in), reporting the merge and the writing as ``phase``s."""
    started = time.perf_counter()
    with phase(len(plan.modules), "merging modules") as update:
        merged = execute_plan(executed_plan(plan, bool(fold_into or gguf)), update)
    label = "folding" if fold_into else "writing GGUF"
    with phase(None, label) if fold_into or gguf else nullcontext(None) as update:
        note = f"Merge: {plan.describe()}."
        report = write_merged_adapter(merged, plan, target, force=force, fold_into=fold_into, card_note=note,
                                      progress=update, shard_size=shard_size, gguf=gguf,
                                      single_file=single_file)  # fmt: skip
    seconds = time.perf_counter() - started
    if not fold_into:
        return WrittenMerge(seconds, gguf=report)
    if gguf is not None:
        return WrittenMerge(seconds, folded=True, dtype=f"{gguf.gguf_type} GGUF", size=target.stat().st_size)
    dtype = json.loads((target / "config.json").read_text()).get("dtype", "")
    size = sum(path.stat().st_size for path in target.glob("*.safetensors"))
    return WrittenMerge(seconds, folded=True, dtype=dtype, size=size)


def adapter_recipe_plan(
    recipe: Recipe,
    output: Path,
    *,
    seed: int | None,
    device: str,
    force: bool,
    allow_nonfinite: bool,
    phase: Phase = _silent,
    calibrate: bool = True,
) -> tuple[MergePlan, Path, str | None, SingleFileOutput | None]:
    """An adapter recipe's plan, its checked output target, the base to fold into (``output.base``) and, for
    single-file inputs, the file it writes; the calibration (RegMean's activations) is a ``phase``, checked but not
    taken with ``calibrate`` False (a dry run)."""
    adapters, weights, options = adapter_merge_inputs(recipe, allow_nonfinite, seed=seed, device=device)
    adapters, single_file = _recipe_single_file(recipe, adapters)
    fold_into = None
    if recipe.folds_adapters:
        fold_into = recipe.output.base or recorded_base(adapters)
        if not fold_into:
            raise BadInput("output.base: name the base to fold into (the adapters record none)")
    base = recipe.base_model or fold_into
    inputs = [a.path for a in adapters if a.path] + [Path(ref) for ref in {base, fold_into} if ref]
    check = check_single_file_target if single_file else check_output_target
    target = check(output, force, inputs)
    if options.layer_scaled:  # LARV reads the base the adapters record where the recipe names none, as RegMean
        base = base or recorded_base(adapters)
        if not base:
            raise BadInput(f"base_model: larv={options.larv[0]} compares each module's update with the base's weight; "
                           "name the base (the adapters record none)")  # fmt: skip
    plan = plan_merge(adapters, weights, options, base_to_read(adapters, base, options))
    _calibrate(plan, recipe, device, phase, calibrate)
    return plan, target, fold_into, single_file


def _calibrate(plan: MergePlan, recipe: Recipe, device: str, phase: Phase, take: bool) -> None:
    """The adapters' input statistics on their ``calibration`` files, where the method merges with activations,
    taken once the plan has passed every other check."""
    entries, method = recipe.adapters or [], plan.options.method
    given = [i for i, entry in enumerate(entries) if entry.calibration]
    if not plan.options.method_entry.calibrated:
        if given:
            raise BadInput(f"adapters[{given[0]}].calibration: method {method} does not use activations")
        return
    missing = next((i for i, entry in enumerate(entries) if not entry.calibration), None)
    if missing is not None:
        raise BadInput(f"adapters[{missing}].calibration: method {method} runs the base on a file of prompts per "
                       "adapter; give each adapter one")  # fmt: skip
    base = recipe.base_model or recorded_base(plan.adapters)
    if not base:
        raise BadInput(f"base_model: method {method} runs the base model on the calibration prompts")
    if not take:
        return
    with phase(None, "calibration") as update:
        files = [entry.calibration or "" for entry in entries]
        with_grams(plan, calibration_grams(base, files, plan.adapters, device=device, progress=update), files)


def _recipe_single_file(
    recipe: Recipe, adapters: list[LoraAdapter]
) -> tuple[list[LoraAdapter], SingleFileOutput | None]:
    """Single-file inputs as the recipe's ``output.format`` (default: theirs) writes them; PEFT folders as they are."""
    asked = recipe.output.format if recipe.output else None
    formats = {adapter.config.get(FORMAT_KEY) for adapter in adapters}
    if formats == {None}:
        if asked in FORMATS:
            raise BadInput(f"output.format: {asked} writes single-file LoRAs (kohya or diffusers .safetensors "
                           "inputs), not PEFT adapter folders")  # fmt: skip
        return adapters, None
    single = next(adapter.name for adapter in adapters if adapter.config.get(FORMAT_KEY))
    if None in formats:
        folder = next(adapter.name for adapter in adapters if not adapter.config.get(FORMAT_KEY))
        raise BadInput(f"adapters: {single} is a single-file LoRA and {folder} a PEFT adapter; merge files with "
                       "files, folders with folders")  # fmt: skip
    if asked is not None and asked not in FORMATS:
        raise BadInput(f"output.format: {single} is a single-file LoRA; write it as kohya or diffusers, not {asked}")
    if recipe.evaluate is not None:
        raise BadInput(f"evaluate: {single} is a single-file LoRA; the evaluation runs language-model adapters")
    if recipe.output is not None and recipe.output.base:
        raise BadInput(f"output.base: {single} is a single-file LoRA, written as one file, not folded (a DoRA merge "
                       "reads its base from base_model)")  # fmt: skip
    fmt = asked or default_format(formats)  # type: ignore[arg-type]
    try:
        adapters, kernels = single_file_inputs(adapters, fmt, recipe.base_model)
    except BadInput as error:
        raise BadInput(f"output.format {fmt}: {error}") from None
    return adapters, SingleFileOutput(fmt, kernels)


def evaluate_recipe(
    recipe: Recipe, output: Path, device: str = "cpu", progress: Progress | None = None
) -> list[EvalResult]:
    """A recipe's ``evaluate:`` section on its written output: the base, each input adapter and the merge."""
    evaluation = recipe.evaluate
    if evaluation is None:
        return []
    adapters = [entry.adapter for entry in recipe.adapters or []]
    base = evaluation.base or recipe.base_model
    if base is None and adapters:
        base = load_adapter(adapters[0]).base_ref
    if base is None:
        raise BadInput("evaluate.base: name the base model to compare with")
    files = [evaluation.data] if isinstance(evaluation.data, str) else evaluation.data
    fields = {"text_field": evaluation.text_field, "prompt_field": evaluation.prompt_field,
              "completion_field": evaluation.completion_field}  # fmt: skip
    datasets = load_datasets(files, **fields, max_samples=evaluation.max_samples)
    return evaluate_models(base, adapters, str(output), datasets, False, device, progress)


# read as factors (loramerge.adapters.peft_types; "": unreadable, the loader reports it); others go through PEFT
LOW_RANK_TYPES = {"LORA", "LOHA", "LOKR", ""}


@dataclasses.dataclass
class DenseMergeResult:
    """What ``merge_via_dense`` wrote: the tensors it changed and, for an extracted LoRA, its relative error."""

    tensors: int
    relative_error: float | None = None
    skipped: list[str] = dataclasses.field(default_factory=list)


def needs_peft_fold(kinds: list[str]) -> list[int]:
    """Positions of the adapters with no low-rank form (IA3, OFT, VeRA, …): they merge through PEFT's fold."""
    return [i for i, kind in enumerate(kinds) if kind not in LOW_RANK_TYPES]


def check_via_dense(
    refs: list[str], weights: list[float] | None, options: MergeOptions, *, rank: int | None, fold_into: str | None
) -> list[float]:
    """What a merge through PEFT's fold can refuse before reading anything; returns the weights."""
    from loramerge.dense.peft_fold import check_dense_merge

    if not fold_into and rank is None:
        raise BadInput("give `rank` for the LoRA extracted from a merge through PEFT's fold, or `fold_into`")
    if rank is not None and rank < 1:
        raise BadInput(f"`rank` must be at least 1, got {rank}")
    weights = [1.0] * len(refs) if weights is None else weights
    check_dense_merge(len(refs), weights, options)
    return weights


def merge_via_dense(
    refs: list[str],
    weights: list[float] | None,
    options: MergeOptions,
    base: str,
    target: Path,
    *,
    rank: int | None,
    fold_into: str | None,
    force: bool = False,
    progress: Progress | None = None,
    shard_size: str | None = None,
) -> DenseMergeResult:
    """Fold each adapter with PEFT, merge the dense deltas with the options' method, and write the folded model
    (``fold_into``) or a LoRA extracted from the merged deltas at ``rank``."""
    from loramerge.dense.peft_fold import as_exact_adapter, extract_adapter, merge_dense_deltas, peft_type_of
    from loramerge.io.model_card import MergeRecord

    weights = check_via_dense(refs, weights, options, rank=rank, fold_into=fold_into)
    merge = merge_dense_deltas(base, refs, weights, options, [peft_type_of(ref) for ref in refs])
    if fold_into:
        fold(as_exact_adapter(merge), fold_into, target, dtype=options.dtype, force=force, progress=progress,
             shard_size=shard_size)  # fmt: skip
        return DenseMergeResult(len(merge.deltas))
    inputs = [(ref, weight) for ref, _, weight in merge.inputs]
    parameters = {"adapters": [{"adapter": ref, "weight": w} for ref, w in inputs], "via": "PEFT merge_and_unload",
                  **options.model_dump(exclude_defaults=True)}  # fmt: skip
    record = MergeRecord(options.method, inputs, len(merge.deltas), [rank or 0], parameters)
    extracted = extract_adapter(merge, rank or 0, options, record)
    save_adapter(extracted.adapter, target, force=force, dtype=options.torch_dtype())
    return DenseMergeResult(len(merge.deltas), extracted.relative_error, extracted.skipped)
