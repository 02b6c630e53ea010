"""What a search varies: each adapter's weight and, optionally, numeric merge parameters (density, a
method's own alpha, keep, …), each within bounds; and how a point of that space becomes merge options
and a recipe."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from loramerge.adapters.options import MergeOptions, parse_options
from loramerge.adapters.recipe import recipe_option_values
from loramerge.errors import BadInput
from loramerge.recipe import AdapterEntry, Recipe


@dataclass(frozen=True)
class Dimension:
    """One searched value: an adapter's weight (``weight:<folder name>``) or a merge parameter, and its bounds."""

    name: str
    given: float  # the recipe's own value
    low: float
    high: float
    adapter: int | None = None  # the adapter whose weight this is; None for a merge parameter

    @property
    def start(self) -> float:
        """The search's first value: the recipe's own, clipped into the bounds."""
        return min(max(self.given, self.low), self.high)


@dataclass(frozen=True)
class SearchSpace:
    recipe: Recipe
    dimensions: tuple[Dimension, ...]
    option_values: dict[str, object]  # the recipe's merge options (``parse_options`` keywords)

    @property
    def names(self) -> list[str]:
        return [dimension.name for dimension in self.dimensions]

    @property
    def start(self) -> list[float]:
        return [dimension.start for dimension in self.dimensions]

    @property
    def warnings(self) -> list[str]:
        return [f"{d.name} = {d.given:g} is outside its bounds {d.low:g}:{d.high:g}; the search starts from {d.start:g}"
                for d in self.dimensions if d.start != d.given]  # fmt: skip

    def weights(self, point: Sequence[float]) -> list[float]:
        weights = [entry.weight for entry in self.recipe.adapters or []]
        for dimension, value in zip(self.dimensions, point, strict=True):
            if dimension.adapter is not None:
                weights[dimension.adapter] = float(value)
        return weights

    def options(self, point: Sequence[float], **overrides: object) -> MergeOptions:
        """The merge options at ``point`` (``overrides``: seed, device)."""
        values = {**self.option_values, "params": dict(self.option_values.get("params") or {}), **overrides}
        for dimension, value in zip(self.dimensions, point, strict=True):
            if dimension.adapter is None:
                target = values if dimension.name in MergeOptions.model_fields else values["params"]
                target[dimension.name] = float(value)
        return parse_options(**values)

    def recipe_at(self, point: Sequence[float], seed: int) -> Recipe:
        """The recipe with the weights and parameters of ``point`` and the merge's ``seed`` (so that
        ``loramerge run`` draws DARE's masks as the search did); its other keys as they were."""
        entries = [AdapterEntry(adapter=entry.adapter, weight=round(weight, 6))
                   for entry, weight in zip(self.recipe.adapters or [], self.weights(point), strict=True)]  # fmt: skip
        parameters = {**(self.recipe.parameters or {}), "seed": seed}
        for dimension, value in zip(self.dimensions, point, strict=True):
            if dimension.adapter is None:
                parameters[dimension.name] = round(float(value), 6)
        return self.recipe.model_copy(update={"adapters": entries, "parameters": parameters})


Bounds = tuple[float, float]


def _checked_bounds(bounds: Bounds, what: str, param: str) -> Bounds:
    """``(low, high)`` as floats, low below high."""
    try:
        low, high = (float(value) for value in bounds) if not isinstance(bounds, str) else ()
    except (TypeError, ValueError):
        raise BadInput(f"{what}: expected two numbers (low, high), got {bounds!r}", param=param) from None
    if not low < high:
        raise BadInput(f"{what}: the low bound must be below the high one, got {low:g} and {high:g}", param=param)
    return low, high


def tunable_parameters(options: MergeOptions) -> dict[str, float]:
    """The numeric merge parameters a search may vary, with their values in ``options``."""
    method = options.method_entry
    values = {"density": options.effective_density} if options.uses_density else {}
    for parameter in method.parameters:
        value = options.params.get(parameter.name, parameter.default)
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if numeric and parameter.name != "density" and not parameter.dense_only:
            values[parameter.name] = float(value)
    return values


def search_space(
    recipe: Recipe, weight_range: Bounds = (0.0, 2.0), tune: Mapping[str, Bounds] | None = None
) -> SearchSpace:
    """The space of an adapter recipe: every adapter's weight within ``weight_range``, and each parameter of
    ``tune`` within its bounds. The recipe's own values, clipped into the bounds (``warnings`` say so), start
    the search."""
    if not recipe.is_adapter_recipe:
        raise BadInput("search: the recipe must be an adapter recipe (an `adapters:` list)")
    if recipe.output and recipe.output.format == "dense":
        raise BadInput("search: the recipe folds its merge (output.format: dense); search the adapter merge")
    values = recipe_option_values(recipe)
    options = parse_options(**values)
    low, high = _checked_bounds(weight_range, "`weight_range`", "weight_range")
    names = [Path(entry.adapter).name for entry in recipe.adapters or []]
    if len(set(names)) < len(names):
        names = [str(i) for i in range(len(names))]
    dimensions = [
        Dimension(f"weight:{name}", entry.weight, low, high, adapter=i)
        for i, (name, entry) in enumerate(zip(names, recipe.adapters or [], strict=True))
    ]
    tunable = tunable_parameters(options)
    if not isinstance(tune or {}, Mapping):
        raise BadInput(f"`tune`: expected {{name: (low, high)}}, got {tune!r}", param="tune")
    for name, bounds in (tune or {}).items():
        if name not in tunable:
            known = ", ".join(sorted(tunable)) or "none"
            raise BadInput(f"`tune`: method {options.method} has no numeric parameter {name!r} ({known})", param="tune")
        p_low, p_high = _checked_bounds(bounds, f"`tune` {name}", "tune")
        dimensions.append(Dimension(name, tunable[name], p_low, p_high))
    space = SearchSpace(recipe, tuple(dimensions), values)
    for corner in ([d.low for d in dimensions], [d.high for d in dimensions]):
        try:  # an impossible bound (density 1.5, say) is refused now, not in a worker
            space.options(corner)
        except BadInput as error:
            raise BadInput(f"`tune`: a bound is out of range: {error}", param="tune") from None
    return space
