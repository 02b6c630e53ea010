"""Merge kernels: a stack of task tensors ``T[n, ...]`` and weights ``w[n]`` in, one tensor out.

No I/O and no PEFT here. The same function merges a dense task vector, a LoRA core matrix or a LoRA
factor. ``generators`` holds one seeded ``torch.Generator`` per input (see ``loramerge.seeding``).
Per-input parameters (density, gamma, epsilon) take one value or one value per input. Their defaults
live in the method catalogue (``loramerge.catalogue``), which ``run_kernel`` applies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch

from loramerge.errors import BadInput
from loramerge.kernels.consensus import Divisor, MajoritySign, consensus_merge
from loramerge.kernels.sparsify import Rescale, magnitude_trim, outlier_trim, random_drop, ranked_drop

ElectOn = Literal["unweighted", "weighted"]
Generators = Sequence[torch.Generator | None] | None
PerInput = float | Sequence[float]
Cutoffs = Sequence[object] | None  # per input, from the whole tensor; lets a caller merge piece by piece


def _each(value: PerInput, count: int) -> list[float]:
    values = [float(value)] * count if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != count:
        raise BadInput(f"expected {count} per-input values, got {len(values)}")
    return values


def _cutoffs(cutoffs: Cutoffs, count: int) -> list[object]:
    return list(cutoffs) if cutoffs is not None else [None] * count


def _generators(generators: Generators, count: int) -> list[torch.Generator | None]:
    return list(generators) if generators is not None else [None] * count


def _sparsify(tasks: torch.Tensor, one: Callable[..., torch.Tensor], *per_input: list) -> torch.Tensor:
    return torch.stack([one(task, *values) for task, *values in zip(tasks, *per_input, strict=True)])


def _sum(sparse: torch.Tensor, weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    merged = linear(sparse, weights)
    total = weights.sum()
    return merged / total if normalize and total.abs() >= 1e-8 else merged


def _consensus(
    sparse: torch.Tensor, weights: torch.Tensor, majority_sign: MajoritySign, elect_on: ElectOn, divisor: Divisor
) -> torch.Tensor:
    return consensus_merge(sparse, weights, majority_sign, elect_on == "weighted", divisor)


def linear(tasks: torch.Tensor, weights: torch.Tensor, *, normalize: bool = False) -> torch.Tensor:
    """Weighted sum: Task Arithmetic (Ilharco et al., ICLR 2023, arXiv:2212.04089); with ``normalize``
    the weighted average of Model Soups (Wortsman et al., ICML 2022, arXiv:2203.05482)."""
    coefficients = weights.tolist()
    merged = tasks[0] * coefficients[0]
    for task, coefficient in zip(tasks[1:], coefficients[1:], strict=True):
        merged.add_(task, alpha=coefficient)  # in place: no n-times-larger temporary
    if normalize:
        return merged.div_(sum(coefficients))
    return merged


def magnitude_prune(
    tasks: torch.Tensor,
    weights: torch.Tensor,
    *,
    density: PerInput,
    rescale: Rescale = "none",
    normalize: bool = False,
    cutoffs: Cutoffs = None,
) -> torch.Tensor:
    """Trim each task to its largest entries, then take the weighted sum (TIES' trim step alone)."""
    n = len(tasks)
    trimmed = _sparsify(tasks, magnitude_trim, _each(density, n), [rescale] * n, _cutoffs(cutoffs, n))
    return _sum(trimmed, weights, normalize)


def ties(
    tasks: torch.Tensor,
    weights: torch.Tensor,
    *,
    density: PerInput,
    majority_sign: MajoritySign = "total",
    elect_on: ElectOn = "unweighted",
    divisor: Divisor = "count",
    rescale: Rescale = "none",
    cutoffs: Cutoffs = None,
) -> torch.Tensor:
    """TIES-Merging: trim, elect sign, disjoint merge (Yadav et al., NeurIPS 2023, arXiv:2306.01708)."""
    n = len(tasks)
    trimmed = _sparsify(tasks, magnitude_trim, _each(density, n), [rescale] * n, _cutoffs(cutoffs, n))
    return _consensus(trimmed, weights, majority_sign, elect_on, divisor)


def dare_linear(
    tasks: torch.Tensor,
    weights: torch.Tensor,
    *,
    density: PerInput,
    rescale: Rescale = "density",
    normalize: bool = False,
    generators: Generators = None,
) -> torch.Tensor:
    """DARE then a weighted sum (Yu et al., "Language Models are Super Mario", ICML 2024, arXiv:2311.03099)."""
    n = len(tasks)
    dropped = _sparsify(tasks, random_drop, _each(density, n), _generators(generators, n), [rescale] * n)
    return _sum(dropped, weights, normalize)


def dare_ties(
    tasks: torch.Tensor,
    weights: torch.Tensor,
    *,
    density: PerInput,
    majority_sign: MajoritySign = "total",
    elect_on: ElectOn = "unweighted",
    divisor: Divisor = "count",
    rescale: Rescale = "density",
    generators: Generators = None,
) -> torch.Tensor:
    """DARE's random drop, then TIES' sign election and disjoint merge (Yu et al., ICML 2024)."""
    n = len(tasks)
    dropped = _sparsify(tasks, random_drop, _each(density, n), _generators(generators, n), [rescale] * n)
    return _consensus(dropped, weights, majority_sign, elect_on, divisor)


def breadcrumbs(
    tasks: torch.Tensor,
    weights: torch.Tensor,
    *,
    density: PerInput,
    gamma: PerInput,
    rescale: Rescale = "none",
    normalize: bool = False,
    cutoffs: Cutoffs = None,
) -> torch.Tensor:
    """Model Breadcrumbs: drop outliers and small entries, then sum (Davari & Belilovsky, arXiv:2312.06795)."""
    n = len(tasks)
    trimmed = _sparsify(tasks, outlier_trim, _each(density, n), _each(gamma, n), [rescale] * n, _cutoffs(cutoffs, n))
    return _sum(trimmed, weights, normalize)


def breadcrumbs_ties(
    tasks: torch.Tensor,
    weights: torch.Tensor,
    *,
    density: PerInput,
    gamma: PerInput,
    majority_sign: MajoritySign = "total",
    elect_on: ElectOn = "unweighted",
    divisor: Divisor = "count",
    rescale: Rescale = "none",
    cutoffs: Cutoffs = None,
) -> torch.Tensor:
    """Model Breadcrumbs' trim with TIES' sign election and disjoint merge (arXiv:2312.06795)."""
    n = len(tasks)
    trimmed = _sparsify(tasks, outlier_trim, _each(density, n), _each(gamma, n), [rescale] * n, _cutoffs(cutoffs, n))
    return _consensus(trimmed, weights, majority_sign, elect_on, divisor)


def della(
    tasks: torch.Tensor,
    weights: torch.Tensor,
    *,
    density: PerInput,
    epsilon: PerInput,
    majority_sign: MajoritySign = "total",
    elect_on: ElectOn = "unweighted",
    divisor: Divisor = "count",
    rescale: Rescale = "density",
    generators: Generators = None,
) -> torch.Tensor:
    """DELLA-Merging: MagPrune, elect sign, fuse (Deep et al., 2024, arXiv:2406.11617)."""
    n = len(tasks)
    args = (_each(density, n), _each(epsilon, n), _generators(generators, n), [rescale] * n)
    return _consensus(_sparsify(tasks, ranked_drop, *args), weights, majority_sign, elect_on, divisor)


def della_linear(
    tasks: torch.Tensor,
    weights: torch.Tensor,
    *,
    density: PerInput,
    epsilon: PerInput,
    rescale: Rescale = "density",
    normalize: bool = False,
    generators: Generators = None,
) -> torch.Tensor:
    """DELLA's MagPrune, then a weighted sum (Deep et al., 2024, arXiv:2406.11617)."""
    n = len(tasks)
    args = (_each(density, n), _each(epsilon, n), _generators(generators, n), [rescale] * n)
    return _sum(_sparsify(tasks, ranked_drop, *args), weights, normalize)


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


def slerp(tasks: torch.Tensor, weights: torch.Tensor, *, t: float, dot_threshold: float = 0.9995) -> torch.Tensor:
    """Spherical interpolation from ``tasks[0]`` (t = 0) to ``tasks[1]`` (t = 1) over the whole tensor
    (Shoemake, SIGGRAPH 1985); nearly parallel tensors are interpolated linearly."""
    first, second = tasks[0].reshape(-1), tasks[1].reshape(-1)
    norm_first, norm_second = first.norm(), second.norm()
    norm_first = norm_first if norm_first > 1e-8 else torch.ones_like(norm_first)
    norm_second = norm_second if norm_second > 1e-8 else torch.ones_like(norm_second)
    dot = ((first / norm_first) * (second / norm_second)).sum().clamp(-1, 1)
    if dot.abs() > dot_threshold:
        return ((1 - t) * first + t * second).reshape(tasks[0].shape)
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    result = (torch.sin((1 - t) * theta) / sin_theta) * first + (torch.sin(t * theta) / sin_theta) * second
    return result.reshape(tasks[0].shape)


def passthrough(
    tasks: torch.Tensor, weights: torch.Tensor, *, scale: float | Sequence[float | None] | None = None
) -> torch.Tensor:
    """One input copied (optionally scaled): the building block of layer stacking ("frankenmerges")."""
    own = scale if scale is None or isinstance(scale, (int, float)) else scale[0]
    return tasks[0] if own is None else tasks[0] * own
