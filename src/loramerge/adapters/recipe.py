"""Adapter-only recipes (an ``adapters:`` list): the same merge as ``loramerge merge``."""

from __future__ import annotations

from loramerge import catalogue
from loramerge.adapters.files import load_adapter
from loramerge.adapters.model import LoraAdapter
from loramerge.adapters.options import MergeOptions, parse_options
from loramerge.errors import BadInput
from loramerge.recipe import Recipe

# the merge options a recipe's ``parameters`` may set: the method, weights and dtype have keys of their own
OPTION_KEYS = set(MergeOptions.model_fields) - {"method", "dtype", "device", "params"}


def recipe_option_values(recipe: Recipe) -> dict[str, object]:
    """The merge options a recipe's method and ``parameters`` spell, as ``parse_options`` keywords
    (the method's own parameters under ``params``)."""
    values: dict[str, object] = {"method": recipe.merge_method, "dtype": recipe.out_dtype or recipe.dtype}
    known = recipe.merge_method in catalogue.adapter_methods()  # else parse_options names the problem
    method = catalogue.method(recipe.merge_method) if known else None
    own = method.adapter_parameters - OPTION_KEYS if method else set()
    method_params: dict[str, object] = {}
    for key, value in (recipe.parameters or {}).items():
        if key not in OPTION_KEYS | own:
            known = sorted(OPTION_KEYS | own)
            raise BadInput(f"parameters.{key}: unknown parameter for adapter recipes (known: {known})")
        if not isinstance(value, (bool, int, float, str)):
            raise BadInput(f"parameters.{key}: adapter recipes take plain values, not gradients or filters")
        (method_params if key in own else values)[key] = value
    if method_params:
        values["params"] = method_params
    return values


def adapter_merge_inputs(
    recipe: Recipe, allow_nonfinite: bool = False, **overrides: object
) -> tuple[list[LoraAdapter], list[float], MergeOptions]:
    """Load the recipe's adapters and turn its parameters into merge options (``overrides`` win)."""
    values = recipe_option_values(recipe)
    values.update({key: value for key, value in overrides.items() if value is not None})
    options = parse_options(**values)
    adapters = []
    for i, entry in enumerate(recipe.adapters or []):
        try:
            adapters.append(load_adapter(entry.adapter, allow_nonfinite=allow_nonfinite))
        except BadInput as error:
            raise BadInput(f"adapters[{i}].adapter: {error}") from None
    return adapters, [entry.weight for entry in recipe.adapters or []], options
