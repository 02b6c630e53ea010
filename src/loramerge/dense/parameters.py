"""Parameter values of recipes, resolved per tensor the way mergekit users know them.

A value is a scalar, a gradient (a list interpolated over a slice's layers at ``t = idx / (n - 1)``;
non-numeric lists pick an element) or a list of ``{filter, value}`` where the first filter that is a
substring of the tensor name wins. Model-level settings beat slice-level, which beat global ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from loramerge.recipe import Conditional, Setting


def evaluate(setting: Setting, tensor_name: str, t: float) -> object | None:
    """The value of one setting for one tensor; None when no filter matches."""
    if isinstance(setting, Conditional):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if not setting:
        return None
    if all(isinstance(item, (bool, int, float, str)) for item in setting):
        numeric = all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in setting)
        if not numeric:
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        low = int(scaled)
        high = min(len(setting) - 1, low + 1)
        fraction = scaled - low
        return (1 - fraction) * setting[low] + fraction * setting[high]
    for condition in setting:
        if condition.filter in (None, "*") or (tensor_name and condition.filter in tensor_name):
            return evaluate(condition.value, tensor_name, t)
    return None


def resolve(
    name: str, scopes: Iterable[Mapping[str, Setting] | None], tensor_name: str, t: float, default: object = None
) -> object:
    """The first scope (highest precedence first) whose setting for ``name`` gives a value."""
    for scope in scopes:
        if scope and name in scope:
            value = evaluate(scope[name], tensor_name, t)
            if value is not None:
                return value
    return default
