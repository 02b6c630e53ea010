"""Evaluating a merge against its inputs: the base, each adapter and the merge, on every evaluation set."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

from loramerge.errors import BadInput
from loramerge.evaluate.data import load_samples
from loramerge.evaluate.exact_match import EvalResult, Progress, Role, evaluate
from loramerge.evaluate.models import load_model


def evaluate_models(
    base: str,
    adapters: list[str],
    merged: str | None,
    datasets: dict,
    load_in_4bit: bool = False,
    device: str = "cpu",
    progress: Progress | None = None,
) -> list[EvalResult]:
    """Base, each adapter and the merge (a merged adapter folder or a full model), in that order, each on
    every evaluation set of ``datasets`` ({name: samples})."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one bar per model load would bury the table
    runs = [(Role.BASE, "base", base, None)] + [(Role.ADAPTER, f"adapter {_short(a)}", base, a) for a in adapters]
    if merged:
        is_adapter = (Path(merged) / "adapter_config.json").is_file()
        model_ref, adapter = (base, merged) if is_adapter else (merged, None)
        runs.append((Role.MERGED, f"merged {_short(merged)}", model_ref, adapter))
    results = []
    for role, name, model_ref, adapter in runs:
        model, tokenizer = load_model(model_ref, adapter=adapter, load_in_4bit=load_in_4bit, device=device)
        for data, samples in datasets.items():
            result = evaluate(model, tokenizer, samples, name, progress, data=data)
            results.append(dataclasses.replace(result, role=role))
    return results


def retention(exact_match: Mapping[str, float | None], best: Mapping[str, float]) -> float | None:
    """Mean over sets of an exact match divided by the best input adapter's (``kept vs. adapters``);
    sets no adapter solves are left out."""
    ratios = [(exact_match[name] or 0.0) / best[name] for name in exact_match if best.get(name, 0.0) > 0]
    return sum(ratios) / len(ratios) if ratios else None


def _short(ref: str) -> str:
    """A local folder by its name (the table stays narrow), a Hub id as given."""
    return Path(ref).name if Path(ref).exists() else ref


def load_datasets(paths, **fields) -> dict:
    """``{file stem: samples}`` for each evaluation file (``add.eval.jsonl`` is named ``add``)."""
    datasets = {}
    for path in paths:
        name = Path(path).name.split(".")[0]
        if name in datasets:
            raise BadInput(f"`data` {path}: two evaluation sets are named {name!r}; rename one")
        datasets[name] = load_samples(path, **fields)
    return datasets
