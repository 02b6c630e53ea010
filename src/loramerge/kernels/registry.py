"""The one registry of merge kernels and the conventions (presets) they can follow."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from loramerge.errors import BadInput
from loramerge.kernels import methods
from loramerge.kernels.sparsify import outlier_cutoffs, trim_cutoff

Kernel = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class KernelSpec:
    name: str
    fn: Kernel
    linear: bool  # the result is linear in the tasks: merging in a shared basis is exact
    random: bool = False  # draws from the per-input generators
    consensus: bool = False  # elects signs: ``normalize`` divides by the agreeing weights
    min_inputs: int = 1
    max_inputs: int | None = None
    # Element-wise once ``cutoff`` (per input, over the whole task tensor) is known: a caller may then run
    # the kernel on pieces of a tensor (rows) with ``cutoffs=`` and get the whole-tensor result.
    piecewise: bool = False
    cutoff: Callable[[torch.Tensor, dict[str, float]], object] | None = None

    @functools.cached_property  # read for every call of the kernel, on every row block of a dense merge
    def params(self) -> frozenset[str]:
        signature = inspect.signature(self.fn).parameters
        return frozenset(name for name in signature if name not in {"tasks", "weights", "generators", "cutoffs"})


def _trim(task: torch.Tensor, params: dict[str, float]) -> float:
    return trim_cutoff(task, params["density"]) if params["density"] < 1 else float("-inf")


def _outliers(task: torch.Tensor, params: dict[str, float]) -> tuple[float, float]:
    if params["density"] >= 1:
        return float("-inf"), float("inf")
    return outlier_cutoffs(task, params["density"], params["gamma"])


KERNELS: dict[str, KernelSpec] = {
    spec.name: spec
    for spec in (
        KernelSpec("linear", methods.linear, linear=True, piecewise=True),
        KernelSpec("task_arithmetic", methods.linear, linear=True, piecewise=True),
        KernelSpec("magnitude_prune", methods.magnitude_prune, linear=False, piecewise=True, cutoff=_trim),
        KernelSpec("ties", methods.ties, linear=False, consensus=True, piecewise=True, cutoff=_trim),
        KernelSpec("dare_linear", methods.dare_linear, linear=False, random=True),
        KernelSpec("dare_ties", methods.dare_ties, linear=False, random=True, consensus=True),
        KernelSpec("breadcrumbs", methods.breadcrumbs, linear=False, piecewise=True, cutoff=_outliers),
        KernelSpec(
            "breadcrumbs_ties", methods.breadcrumbs_ties, linear=False, consensus=True, piecewise=True, cutoff=_outliers
        ),
        KernelSpec("della", methods.della, linear=False, random=True, consensus=True),
        KernelSpec("della_linear", methods.della_linear, linear=False, random=True),
        KernelSpec("model_stock", methods.model_stock, linear=False, min_inputs=2),
        KernelSpec("slerp", methods.slerp, linear=False, min_inputs=2, max_inputs=2),
        KernelSpec("passthrough", methods.passthrough, linear=True, max_inputs=1, piecewise=True),
    )
}

# Where peers disagree (DESIGN.md §3) the kernels take the choice as a parameter; a preset names a set.
PRESETS: dict[str, dict[str, str]] = {
    "peft": {"elect_on": "unweighted", "divisor": "count", "random_rescale": "density"},
    "mergekit": {"elect_on": "weighted", "divisor": "weight", "random_rescale": "l1"},
}


def preset_params(preset: str, spec: KernelSpec) -> dict[str, object]:
    """A preset's conventions as the parameters ``spec`` takes: the rescale rule is for random drops only."""
    conventions = PRESETS[preset]
    params: dict[str, object] = {"elect_on": conventions["elect_on"], "divisor": conventions["divisor"]}
    params["rescale"] = conventions["random_rescale"] if spec.random else "none"
    return {key: value for key, value in params.items() if key in spec.params}


def get_kernel(name: str) -> KernelSpec:
    try:
        return KERNELS[name]
    except KeyError:
        raise BadInput(f"unknown merge method {name!r}; known: {', '.join(sorted(KERNELS))}") from None


BLOCK_ELEMENTS = 1 << 20  # a row block of about 4 MB in float32: stays in cache, bounds the working memory


def row_blocks(rows: int, row_elements: int) -> Iterator[slice]:
    """Consecutive row slices of about ``BLOCK_ELEMENTS`` entries each, for piecewise kernels."""
    step = max(1, BLOCK_ELEMENTS // max(1, row_elements))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def runs_by_rows(spec: KernelSpec, params: dict[str, object]) -> bool:
    """Whether the kernel may run on row blocks (an L1 or density rescale needs the whole tensor)."""
    return spec.piecewise and params.get("rescale", "none") == "none"


def input_params(params: dict[str, object], index: int) -> dict[str, float]:
    """Input ``index``'s own values of the per-input parameters (given once or once per input)."""
    values = {}
    for key in ("density", "gamma", "epsilon"):
        if key in params:
            value = params[key]
            values[key] = float(value if isinstance(value, (int, float)) else value[index])  # type: ignore[index]
    return values


def with_cutoffs(spec: KernelSpec, params: dict[str, object], tasks: Iterable[torch.Tensor]) -> dict[str, object]:
    """``params`` plus each whole task's cutoff (tasks are made one at a time), so that a piecewise kernel
    can then run on row blocks and give the whole-tensor result."""
    if spec.cutoff is None:
        return params
    return {**params, "cutoffs": [spec.cutoff(task, input_params(params, i)) for i, task in enumerate(tasks)]}


def run_kernel(
    spec: KernelSpec,
    tasks: torch.Tensor,
    weights: torch.Tensor,
    params: dict[str, object],
    generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Call a kernel with the parameters it accepts; the others (a preset's, say) do not apply to it."""
    accepted = {key: value for key, value in params.items() if key in spec.params or key == "cutoffs"}
    if spec.random:
        accepted["generators"] = generators
    return spec.fn(tasks, weights, **accepted)
