"""Sign election and disjoint merge, the consensus steps of TIES-Merging."""

from __future__ import annotations

from typing import Literal

import torch

MajoritySign = Literal["total", "frequency"]
Divisor = Literal["count", "weight", "none"]


def broadcast_weights(weights: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
    """View ``weights[n]`` so that it multiplies ``tasks[n, ...]`` row by row."""
    return weights.reshape(weights.shape + (1,) * (tasks.dim() - 1)).to(tasks.dtype)


def elect_sign_mask(tasks: torch.Tensor, method: MajoritySign = "total") -> torch.Tensor:
    """Mask of the entries whose sign agrees with the elected sign.

    TIES-Merging "elect" step (Yadav et al., NeurIPS 2023): ``total`` elects the sign of the sum of the
    values, ``frequency`` the sign held by most tasks. Ties go to +. Zeros never agree.
    """
    signs = tasks.sign()
    if method == "total":
        strength = tasks.sum(dim=0)
    elif method == "frequency":
        strength = signs.sum(dim=0)
    else:
        raise ValueError(f"unknown majority_sign {method!r}")
    elected = torch.where(strength >= 0, 1.0, -1.0).to(tasks.dtype)
    return signs == elected


def disjoint_merge(
    weighted: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor, divisor: Divisor = "count"
) -> torch.Tensor:
    """Sum the agreeing entries and divide as the convention asks.

    TIES-Merging "disjoint merge" (Yadav et al., NeurIPS 2023). ``count`` divides by the number of
    agreeing tasks (the paper, PEFT); ``weight`` by the sum of their weights (mergekit ``normalize``);
    ``none`` keeps the sum.
    """
    merged = (weighted * mask).sum(dim=0)
    if divisor == "count":
        return merged / mask.sum(dim=0).clamp(min=1).to(merged.dtype)
    if divisor == "weight":
        total = (broadcast_weights(weights, weighted) * mask).sum(dim=0)
        return merged / torch.where(total.abs() < 1e-8, torch.ones_like(total), total)
    return merged
