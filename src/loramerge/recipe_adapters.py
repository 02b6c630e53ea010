"""Adapter-only recipes (an ``adapters:`` list): the same merge as ``loramerge merge``."""

from __future__ import annotations

from loramerge.adapter import LoraAdapter
from loramerge.errors import BadInput
from loramerge.io.adapters import load_adapter
from loramerge.options import MergeOptions, parse_options
from loramerge.recipe import Recipe

OPTION_KEYS = {"density", "rank", "space", "full_svd", "majority_sign", "preset", "seed", "strict"}


def adapter_merge_inputs(
    recipe: Recipe, allow_nonfinite: bool = False, **overrides: object
) -> tuple[list[LoraAdapter], list[float], MergeOptions]:
    """Load the recipe's adapters and turn its parameters into merge options (``overrides`` win)."""
    values: dict[str, object] = {"method": recipe.merge_method, "dtype": recipe.out_dtype or recipe.dtype}
    for key, value in (recipe.parameters or {}).items():
        if key not in OPTION_KEYS:
            raise BadInput(f"parameters.{key}: unknown parameter for adapter recipes (known: {sorted(OPTION_KEYS)})")
        if not isinstance(value, (bool, int, float, str)):
            raise BadInput(f"parameters.{key}: adapter recipes take plain values, not gradients or filters")
        values[key] = value
    values.update({key: value for key, value in overrides.items() if value is not None})
    options = parse_options(**values)
    adapters = []
    for i, entry in enumerate(recipe.adapters or []):
        try:
            adapters.append(load_adapter(entry.adapter, allow_nonfinite=allow_nonfinite))
        except BadInput as error:
            raise BadInput(f"adapters[{i}].adapter: {error}") from None
    return adapters, [entry.weight for entry in recipe.adapters or []], options
