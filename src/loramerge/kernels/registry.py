"""The one registry of merge kernels and the conventions (presets) they can follow."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from loramerge.errors import BadInput
from loramerge.kernels import methods

Kernel = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class KernelSpec:
    name: str
    fn: Kernel
    linear: bool  # the result is linear in the tasks: merging in a shared basis is exact
    random: bool  # draws from the per-input generators

    @property
    def params(self) -> frozenset[str]:
        signature = inspect.signature(self.fn).parameters
        return frozenset(name for name in signature if name not in {"tasks", "weights", "generators"})


KERNELS: dict[str, KernelSpec] = {
    spec.name: spec
    for spec in (
        KernelSpec("linear", methods.linear, linear=True, random=False),
        KernelSpec("task_arithmetic", methods.linear, linear=True, random=False),
        KernelSpec("magnitude_prune", methods.magnitude_prune, linear=False, random=False),
        KernelSpec("ties", methods.ties, linear=False, random=False),
        KernelSpec("dare_linear", methods.dare_linear, linear=False, random=True),
        KernelSpec("dare_ties", methods.dare_ties, linear=False, random=True),
    )
}

# Where peers disagree (DESIGN.md §3) the kernels take the choice as a parameter; a preset names a set.
PRESETS: dict[str, dict[str, str]] = {
    "peft": {"elect_on": "unweighted", "divisor": "count", "rescale": "density"},
    "mergekit": {"elect_on": "weighted", "divisor": "weight", "rescale": "l1"},
}


def get_kernel(name: str) -> KernelSpec:
    try:
        return KERNELS[name]
    except KeyError:
        raise BadInput(f"unknown merge method {name!r}; known: {', '.join(sorted(KERNELS))}") from None


def run_kernel(
    spec: KernelSpec,
    tasks: torch.Tensor,
    weights: torch.Tensor,
    params: dict[str, object],
    generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Call a kernel with the parameters it accepts; the others (a preset's, say) do not apply to it."""
    accepted = {key: value for key, value in params.items() if key in spec.params}
    if spec.random:
        accepted["generators"] = generators
    return spec.fn(tasks, weights, **accepted)
