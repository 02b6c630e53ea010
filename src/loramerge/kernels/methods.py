"""Merge kernels: a stack of task tensors ``T[n, ...]`` and weights ``w[n]`` in, one tensor out.

No I/O and no PEFT here. The same function merges a dense task vector, a LoRA core matrix or a LoRA
factor. The task-vector methods (task arithmetic, TIES, DARE, Breadcrumbs, DELLA and their mixes) are one
sparsify step on each task (``loramerge.kernels.sparsify``) and one combine step on the stack (below), as
in mergekit's generalized task arithmetic (sparsification × consensus): the catalogue
(``loramerge.catalogue``) names each method's pair and holds every default, which ``run_kernel`` applies;
no signature here has one. ``generators`` holds one seeded ``torch.Generator`` per input (see
``loramerge.seeding``); per-input parameters (density, gamma, epsilon) take one value or one per input.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from loramerge.errors import BadInput
from loramerge.kernels.consensus import Divisor, MajoritySign, consensus_merge

ElectOn = Literal["unweighted", "weighted"]
ZERO_SUM = 1e-8  # weights summing to less than this are not normalised by (dense recipes refuse them)
Generators = Sequence[torch.Generator | None] | None
Cutoffs = Sequence[object] | None  # per input, from the whole tensor; lets a caller merge piece by piece
_INPUTS = {"tensor", "tasks", "weights", "generator", "cutoff"}  # what a step receives besides its parameters


def weighted_sum(tasks: torch.Tensor, weights: torch.Tensor, *, normalize: bool) -> torch.Tensor:
    """The combine step of Task Arithmetic (Ilharco et al., ICLR 2023, arXiv:2212.04089): the weighted sum;
    with ``normalize`` the weighted average of Model Soups (Wortsman et al., ICML 2022, arXiv:2203.05482),
    left a sum where the weights sum to zero."""
    coefficients = weights.tolist()
    merged = tasks[0] * coefficients[0]
    for task, coefficient in zip(tasks[1:], coefficients[1:], strict=True):
        merged.add_(task, alpha=coefficient)  # in place: no n-times-larger temporary
    total = sum(coefficients)
    return merged.div_(total) if normalize and abs(total) >= ZERO_SUM else merged


def consensus(
    tasks: torch.Tensor, weights: torch.Tensor, *, majority_sign: MajoritySign, elect_on: ElectOn, divisor: Divisor
) -> torch.Tensor:
    """The combine step of TIES-Merging (Yadav et al., NeurIPS 2023, arXiv:2306.01708): elect a sign per
    entry, then the disjoint merge of the agreeing entries."""
    return consensus_merge(tasks, weights, majority_sign, elect_on == "weighted", divisor)


@functools.cache
def step_parameters(step: Callable[..., torch.Tensor]) -> tuple[str, ...]:
    """The parameters of a step: its keywords besides the tensors, generator and cutoff it is handed."""
    return tuple(name for name in inspect.signature(step).parameters if name not in _INPUTS)


@functools.cache
def _receives(step: Callable[..., torch.Tensor]) -> frozenset[str]:
    return frozenset(inspect.signature(step).parameters)


def _per_input(name: str, value: object, count: int) -> list[object]:
    """A parameter's value for each input: given once (shared) or once per input."""
    if isinstance(value, str):
        return [value] * count
    values = [value] * count if isinstance(value, int | float) else list(value)  # type: ignore[call-overload]
    if len(values) != count:
        raise BadInput(f"{name}: expected {count} per-input values, got {len(values)}")
    return [v if isinstance(v, str) else float(v) for v in values]


@dataclass(frozen=True)
class SparsifyThenCombine:
    """A task-vector kernel: ``sparsify`` applied to each task with that input's values, cutoff and
    generator (None: every entry kept), then ``combine`` on the stack."""

    sparsify: Callable[..., torch.Tensor] | None
    combine: Callable[..., torch.Tensor]

    def __call__(
        self,
        tasks: torch.Tensor,
        weights: torch.Tensor,
        *,
        cutoffs: Cutoffs = None,
        generators: Generators = None,
        **params: object,
    ) -> torch.Tensor:
        if self.sparsify is not None:
            tasks = self._sparsified(tasks, params, cutoffs, generators)
        return self.combine(tasks, weights, **{name: params[name] for name in step_parameters(self.combine)})

    def _sparsified(
        self, tasks: torch.Tensor, params: dict[str, object], cutoffs: Cutoffs, generators: Generators
    ) -> torch.Tensor:
        count = len(tasks)
        columns = {name: _per_input(name, params[name], count) for name in step_parameters(self.sparsify)}
        accepted = _receives(self.sparsify)
        if "cutoff" in accepted:
            columns["cutoff"] = list(cutoffs) if cutoffs is not None else [None] * count
        if "generator" in accepted:
            columns["generator"] = list(generators) if generators is not None else [None] * count
        own = [{name: values[i] for name, values in columns.items()} for i in range(count)]
        return torch.stack([self.sparsify(task, **values) for task, values in zip(tasks, own, strict=True)])


def model_stock(tasks: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Model Stock (Jang et al., ECCV 2024, arXiv:2403.19522) on task vectors (fine-tuned minus base):
    ``t · mean(tasks)`` with ``t = N cos / (1 + (N - 1) cos)``, cos the mean pairwise cosine."""
    flat = tasks.reshape(len(tasks), -1)
    norms = flat.norm(dim=1)
    cosines = [
        ((flat[i] * flat[j]).sum() / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
        for i in range(len(flat))
        for j in range(i + 1, len(flat))
    ]
    cos = torch.stack(cosines).mean()
    count = len(tasks)
    denominator = 1 + (count - 1) * cos
    t = torch.zeros_like(cos) if denominator.abs() < 1e-6 else count * cos / denominator
    return t * tasks.mean(dim=0)


NEARLY_PARALLEL = 0.9995  # slerp: tensors whose directions' cosine is above this are interpolated linearly


def slerp(tasks: torch.Tensor, weights: torch.Tensor, *, t: float) -> torch.Tensor:
    """Spherical interpolation from ``tasks[0]`` (t = 0) to ``tasks[1]`` (t = 1) over the whole tensor
    (Shoemake, SIGGRAPH 1985); nearly parallel tensors are interpolated linearly."""
    first, second = tasks[0].reshape(-1), tasks[1].reshape(-1)
    norm_first, norm_second = first.norm(), second.norm()
    norm_first = norm_first if norm_first > 1e-8 else torch.ones_like(norm_first)
    norm_second = norm_second if norm_second > 1e-8 else torch.ones_like(norm_second)
    dot = ((first / norm_first) * (second / norm_second)).sum().clamp(-1, 1)
    if dot.abs() > NEARLY_PARALLEL:
        return ((1 - t) * first + t * second).reshape(tasks[0].shape)
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    result = (torch.sin((1 - t) * theta) / sin_theta) * first + (torch.sin(t * theta) / sin_theta) * second
    return result.reshape(tasks[0].shape)


def passthrough(
    tasks: torch.Tensor, weights: torch.Tensor, *, scale: float | Sequence[float | None] | None
) -> torch.Tensor:
    """One input copied (scaled where ``scale`` is not None): the building block of layer stacking
    ("frankenmerges")."""
    own = scale if scale is None or isinstance(scale, (int, float)) else scale[0]
    return tasks[0] if own is None or own == 1 else tasks[0] * own
