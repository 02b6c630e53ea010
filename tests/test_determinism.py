"""Determinism: every method, the random ones included, gives bit-identical files for one seed across
runs, across thread counts, and whatever order the tensors are visited in."""

from __future__ import annotations

import hashlib
from pathlib import Path
from unittest import mock

import pytest
import torch

from dense_helpers import save_llama, write_recipe
from loramerge import catalogue, load_adapter, save_adapter
from loramerge import threads as loramerge_threads
from loramerge.adapters.merge import execute_plan, plan_merge
from loramerge.adapters.options import parse_options
from loramerge.catalogue import Method
from loramerge.dense.engine import merge_checkpoints, merge_tensor
from loramerge.dense.plan import plan_checkpoint_merge
from loramerge.recipe import load_recipe

# Every method of the catalogue, read from it: a method added there is covered here, or (if the recipe
# below cannot run it) fails here.
# (RegMean merges with activations: its determinism is tests/test_regmean.py's)
ADAPTER_CASES = [
    (method, "core") for method in catalogue.adapter_methods() if not catalogue.method(method).calibrated
] + [(method, space) for method in ("ties", "dare_ties", "della") for space in ("full", "factors")]
DENSE_METHODS = catalogue.dense_methods()


def _digest(folder: Path) -> str:
    files = sorted(p for p in folder.rglob("*.safetensors"))
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()


def _with_threads(threads: int, fn):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize(("method", "space"), ADAPTER_CASES, ids=[f"{m}-{s}" for m, s in ADAPTER_CASES])
def test_adapter_merges_are_bit_identical(method, space, equal_rank_adapters, tmp_path):
    adapters = [load_adapter(p) for p in equal_rank_adapters]
    options = parse_options(method=method, space=space, density=0.5, seed=7)
    weights = [0.6, 0.3, -0.4][: len(adapters)]
    digests = []
    # SMALL_WORK 0 keeps every module on the caller's threads, so 1 and 2 threads really differ on these
    # small modules; the last run is the thread policy itself (every module of this size on one thread)
    runs = ((2, False, 0), (2, False, 0), (1, False, 0), (2, True, 0), (2, False, loramerge_threads.SMALL_WORK))
    for threads, reverse, small_work in runs:
        plan = plan_merge(adapters, weights, options)
        if reverse:  # visit the modules in the opposite order
            plan.modules.reverse()
        with mock.patch.object(loramerge_threads, "SMALL_WORK", small_work):
            merged = _with_threads(threads, lambda plan=plan: execute_plan(plan))
        folder = tmp_path / f"{threads}-{reverse}-{len(digests)}"
        save_adapter(merged, folder)
        digests.append(_digest(folder))
    assert len(set(digests)) == 1, digests


@pytest.fixture(scope="module")
def dense_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("determinism")
    base = save_llama(root / "base", 0, layers=1, hidden=32)
    return root, base, [save_llama(root / f"m{i}", i, layers=1, hidden=32, like=base) for i in (1, 2, 3)]


def dense_recipe(method: Method, base: Path, models: list[Path]) -> dict:
    """A recipe the method accepts, from its catalogue entry: as many inputs as it takes (the base counts as
    the first input of ``Inputs.BASE_AND_MODEL`` methods; a one-input method has no base), a weight and a density per
    model where it has them, and a value for each parameter it requires."""
    limit = method.max_inputs or len(models)
    count = limit - 1 if method.inputs == catalogue.Inputs.BASE_AND_MODEL else min(limit, len(models))
    per_model = {"weight": (1.0, 0.5, 0.8), "density": (0.5, 0.5, 0.5)}
    recipe: dict = {"merge_method": method.name, "dtype": "float32"}
    if limit > 1:
        recipe["base_model"] = str(base)
    recipe["models"] = [
        {"model": str(model), "parameters": {k: v[i] for k, v in per_model.items() if k in method.recipe_parameters}}
        for i, model in enumerate(models[:count])
    ]
    required = {p.name: 0.4 for p in method.parameters if p.required and not p.per_input}
    if required:
        recipe["parameters"] = required
    return recipe


@pytest.mark.parametrize("method", DENSE_METHODS)
def test_dense_merges_are_bit_identical(method, dense_models, tmp_path):
    _, base, models = dense_models
    recipe = write_recipe(tmp_path / "recipe.yml", dense_recipe(catalogue.method(method), base, models))
    digests = []
    for threads, small_work in ((2, 0), (2, 0), (1, 0), (2, loramerge_threads.SMALL_WORK)):
        out = tmp_path / f"out-{len(digests)}"
        with mock.patch.object(loramerge_threads, "SMALL_WORK", small_work):
            _with_threads(threads, lambda out=out: merge_checkpoints(recipe, out, seed=11))
        digests.append(_digest(out))
    assert len(set(digests)) == 1, digests
    plan = plan_checkpoint_merge(load_recipe(recipe))
    forward = {t.output: merge_tensor(plan, t, seed=11) for t in plan.tensors}
    backward = {t.output: merge_tensor(plan, t, seed=11) for t in reversed(plan.tensors)}
    assert all(torch.equal(forward[name], backward[name]) for name in forward)
