"""A search job: everything a worker needs, and how it is put together from a recipe and dev files."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from loramerge.adapters.dora import BaseReader, base_to_read
from loramerge.adapters.merge import MergePlan, execute_plan, plan_merge
from loramerge.adapters.model import LoraAdapter
from loramerge.adapters.recipe import adapter_merge_inputs
from loramerge.errors import BadInput
from loramerge.evaluate.data import Sample
from loramerge.evaluate.suite import load_datasets
from loramerge.recipe import Recipe
from loramerge.search.space import Bounds, SearchSpace, search_space


@dataclass(frozen=True)
class SearchJob:
    """What every worker needs, shipped by value (pickled to processes, put in Ray's object store)."""

    base: str
    adapters: list[LoraAdapter]
    space: SearchSpace
    dev: dict[str, list[Sample]]  # {set name: samples}
    seed: int = 0
    device: str = "cpu"
    load_in_4bit: bool = False
    # torch threads of each worker, the same whatever the worker count: CPU kernels may sum in another order
    # with another thread count (the demo's dev losses move in the 5th digit between 1 and 2 threads)
    threads: int = 1

    @property
    def merge_seed(self) -> int:
        """The random methods' seed: the recipe's own (``parameters.seed``), else the search's."""
        return int(self.space.option_values.get("seed", self.seed))

    def plan(self, point: Sequence[float], base: BaseReader | None = None) -> MergePlan:
        """The merge at ``point``; DoRA inputs read their row norms from ``base`` (a worker's loaded model), else
        from the base checkpoint."""
        options = self.space.options(point, seed=self.merge_seed, device=self.device)
        base = base or base_to_read(self.adapters, self.base, options)
        return plan_merge(self.adapters, self.space.weights(point), options, base)


def build_job(
    recipe: Recipe,
    data: Sequence[str],
    *,
    base: str | None = None,
    weight_range: Bounds = (0.0, 2.0),
    tune: Mapping[str, Bounds] | None = None,
    prompt_field: str | None = None,
    completion_field: str | None = None,
    text_field: str | None = None,
    max_samples: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    load_in_4bit: bool = False,
    threads: int = 1,
) -> SearchJob:
    """Read the recipe's adapters and the dev data files (``data``: one score each; their fields as
    ``loramerge.evaluate.data.load_samples`` reads them), and check that the merge plans, in the driver: a bad
    input is reported here, once, before any worker starts."""
    space = search_space(recipe, weight_range, tune)
    adapters, _, _ = adapter_merge_inputs(recipe)
    base = base or (recipe.evaluate.base if recipe.evaluate else None) or adapters[0].base_ref
    if not base:
        raise BadInput("search: the adapters name no base model; give the base model (`base`)", param="base")
    if not data:
        raise BadInput("search: give at least one dev data file (`data`)")
    if threads < 1:
        raise BadInput(f"`threads` must be at least 1, got {threads}", param="threads")
    if max_samples is not None and max_samples < 1:
        raise BadInput(f"`max_samples` must be at least 1, got {max_samples}", param="max_samples")
    # plain text (``text_field``) or prompt/completion pairs
    fields = {"text_field": text_field} if text_field else {"prompt_field": prompt_field,
                                                            "completion_field": completion_field}  # fmt: skip
    samples = load_datasets(data, **fields, max_samples=max_samples)  # an empty file is refused there
    job = SearchJob(base, adapters, space, samples, seed, device, load_in_4bit, threads)
    execute_plan(job.plan(space.start))  # the recipe's own merge must run: it is the first candidate
    return job
