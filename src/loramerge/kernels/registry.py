"""Running the catalogue's kernels: calling one with the parameters it accepts, on row blocks of big
tensors, with the conventions (presets) where PEFT and mergekit disagree."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from loramerge import catalogue
from loramerge.catalogue import PRESETS, Method
from loramerge.errors import BadInput
from loramerge.kernels.sparsify import outlier_cutoffs, trim_cutoff


def trim_cutoff_of(task: torch.Tensor, params: dict[str, float]) -> float:
    """The per-input cutoff of the magnitude trim (ties, magnitude_prune)."""
    return trim_cutoff(task, params["density"]) if params["density"] < 1 else float("-inf")


def outlier_cutoffs_of(task: torch.Tensor, params: dict[str, float]) -> tuple[float, float]:
    """The per-input cutoffs of Breadcrumbs' outlier trim."""
    if params["density"] >= 1:
        return float("-inf"), float("inf")
    return outlier_cutoffs(task, params["density"], params["gamma"])


def preset_params(preset: str, method: Method) -> dict[str, object]:
    """A preset's conventions as the parameters ``method`` takes: the rescale rule is for random drops only."""
    conventions = PRESETS[preset]
    params: dict[str, object] = {"elect_on": conventions["elect_on"], "divisor": conventions["divisor"]}
    params["rescale"] = conventions["random_rescale"] if method.random else "none"
    return {key: value for key, value in params.items() if key in method.params}


def mergekit_params(method: Method, normalize: object = None, rescale: object = None) -> dict[str, object]:
    """mergekit's ``normalize`` and ``rescale`` (None: the method's mergekit default) as kernel parameters."""
    normalize = bool(method.mergekit_normalize if normalize is None else normalize)
    params: dict[str, object] = {}
    if method.consensus:
        params.update(divisor="weight" if normalize else "none", elect_on="weighted", majority_sign="total")
    elif "normalize" in method.params:
        params["normalize"] = normalize
    if "rescale" in method.params:
        params["rescale"] = "l1" if (method.mergekit_rescale if rescale is None else rescale) else "none"
    return params


BLOCK_ELEMENTS = 1 << 20  # a row block of about 4 MB in float32: stays in cache, bounds the working memory


def row_blocks(rows: int, row_elements: int) -> Iterator[slice]:
    """Consecutive row slices of about ``BLOCK_ELEMENTS`` entries each, for piecewise kernels."""
    step = max(1, BLOCK_ELEMENTS // max(1, row_elements))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def runs_by_rows(method: Method, params: dict[str, object]) -> bool:
    """Whether the kernel may run on row blocks (an L1 or density rescale needs the whole tensor)."""
    return method.piecewise and params.get("rescale", "none") == "none"


def input_params(method: Method, params: dict[str, object], index: int) -> dict[str, float]:
    """Input ``index``'s own values of the method's per-input parameters (given once or once per input)."""
    values = {}
    for key in method.per_input_parameters:
        if key in params and key != "weight":
            value = params[key]
            values[key] = float(value if isinstance(value, (int, float)) else value[index])  # type: ignore[index]
    return values


def with_cutoffs(method: Method, params: dict[str, object], tasks: Iterable[torch.Tensor]) -> dict[str, object]:
    """``params`` plus each whole task's cutoff (tasks are made one at a time), so that a piecewise kernel
    can then run on row blocks and give the whole-tensor result."""
    if method.cutoff is None:
        return params
    given = {**method.kernel_defaults, **params}
    return {
        **params,
        "cutoffs": [method.cutoff_fn(task, input_params(method, given, i)) for i, task in enumerate(tasks)],
    }


def run_by_row_blocks(
    method: Method,
    tasks_of: Callable[[slice], torch.Tensor],
    weights: torch.Tensor,
    params: dict[str, object],
    whole_tasks: Iterable[torch.Tensor],
    out: torch.Tensor,
    finish: Callable[[slice, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """A piecewise kernel over row blocks, the one runner of adapter and dense merges: each task's cutoff from
    the whole task (``whole_tasks``, made one at a time), then ``out[block] = finish(block, kernel(tasks_of(block)))``
    block by block, so only one block of every task is in memory."""
    params = with_cutoffs(method, params, whole_tasks)
    for block in row_blocks(out.shape[0], out[0].numel()):
        merged = run_kernel(method, tasks_of(block), weights, params)
        out[block] = merged if finish is None else finish(block, merged)
    return out


def _kernel_parameter_names() -> set[str]:
    """Every name a kernel or a recipe may pass: the kernels' arguments and the methods' recipe parameters
    (mergekit's ``int8_mask``, ``lambda``, … applied around the kernel)."""
    methods = catalogue.methods()
    return {name for m in methods for name in m.params | m.recipe_parameters} | {"cutoffs"}


def run_kernel(
    method: Method,
    tasks: torch.Tensor,
    weights: torch.Tensor,
    params: dict[str, object],
    generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Call a kernel with the parameters it accepts. The others must be some kernel's (a preset's
    conventions apply to the consensus methods only, say); a name no kernel takes is a misspelling."""
    unknown = sorted(set(params) - _kernel_parameter_names())
    if unknown:
        raise BadInput(
            f"{method.name}: unknown parameter {', '.join(map(repr, unknown))} (it takes {sorted(method.params)})"
        )
    accepted = {**method.kernel_defaults}
    accepted.update((key, value) for key, value in params.items() if key in method.params or key == "cutoffs")
    if method.random:
        accepted["generators"] = generators
    return method.fn(tasks, weights, **accepted)
