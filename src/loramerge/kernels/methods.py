"""Merge kernels: a stack of task tensors ``T[n, ...]`` and weights ``w[n]`` in, one tensor out.

No I/O and no PEFT here. The same function merges a dense task vector, a LoRA core matrix or a LoRA
factor. ``generators`` holds one seeded ``torch.Generator`` per input (see ``loramerge.seeding``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from loramerge.kernels.consensus import Divisor, MajoritySign, broadcast_weights, disjoint_merge, elect_sign_mask
from loramerge.kernels.sparsify import Rescale, magnitude_trim, random_drop

ElectOn = Literal["unweighted", "weighted"]
Generators = Sequence[torch.Generator | None] | None


def linear(tasks: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of task tensors: Task Arithmetic (Ilharco et al., ICLR 2023, arXiv:2212.04089)."""
    return (tasks * broadcast_weights(weights, tasks)).sum(dim=0)


def magnitude_prune(tasks: torch.Tensor, weights: torch.Tensor, *, density: float) -> torch.Tensor:
    """Trim each task to its largest entries, then take the weighted sum (the TIES trim step alone)."""
    trimmed = torch.stack([magnitude_trim(task, density) for task in tasks])
    return linear(trimmed, weights)


def _resolve_signs(
    sparse: torch.Tensor,
    weights: torch.Tensor,
    majority_sign: MajoritySign,
    elect_on: ElectOn,
    divisor: Divisor,
) -> torch.Tensor:
    weighted = sparse * broadcast_weights(weights, sparse)
    mask = elect_sign_mask(sparse if elect_on == "unweighted" else weighted, majority_sign)
    return disjoint_merge(weighted, mask, weights, divisor)


def ties(
    tasks: torch.Tensor,
    weights: torch.Tensor,
    *,
    density: float,
    majority_sign: MajoritySign = "total",
    elect_on: ElectOn = "unweighted",
    divisor: Divisor = "count",
) -> torch.Tensor:
    """TIES-Merging: trim, elect sign, disjoint merge (Yadav et al., NeurIPS 2023, arXiv:2306.01708)."""
    trimmed = torch.stack([magnitude_trim(task, density) for task in tasks])
    return _resolve_signs(trimmed, weights, majority_sign, elect_on, divisor)


def _drop_each(tasks: torch.Tensor, density: float, generators: Generators, rescale: Rescale) -> torch.Tensor:
    gens = list(generators) if generators is not None else [None] * len(tasks)
    return torch.stack([random_drop(task, density, gen, rescale) for task, gen in zip(tasks, gens, strict=True)])


def dare_linear(
    tasks: torch.Tensor,
    weights: torch.Tensor,
    *,
    density: float,
    rescale: Rescale = "density",
    generators: Generators = None,
) -> torch.Tensor:
    """DARE then a weighted sum (Yu et al., "Language Models are Super Mario", ICML 2024, arXiv:2311.03099)."""
    return linear(_drop_each(tasks, density, generators, rescale), weights)


def dare_ties(
    tasks: torch.Tensor,
    weights: torch.Tensor,
    *,
    density: float,
    majority_sign: MajoritySign = "total",
    elect_on: ElectOn = "unweighted",
    divisor: Divisor = "count",
    rescale: Rescale = "density",
    generators: Generators = None,
) -> torch.Tensor:
    """DARE's random drop, then TIES' sign election and disjoint merge (Yu et al., ICML 2024)."""
    dropped = _drop_each(tasks, density, generators, rescale)
    return _resolve_signs(dropped, weights, majority_sign, elect_on, divisor)
