"""Merges that choose, entry by entry, which model's change to keep: SCE, NearSwap, Arcee Fusion, RAM and
RAM+, as mergekit 0.1.5 defines them (its documentation, checked black-box against ``mergekit-yaml`` in
tests/test_mergekit_methods.py).

``sce``, ``ram`` and ``ramplus_tl`` take task vectors; ``nearswap`` and ``arcee_fusion`` take the base and
the other model themselves (base first), since they compare the two.
"""

from __future__ import annotations

import torch

from loramerge.kernels.consensus import consensus_merge
from loramerge.kernels.sparsify import kth_largest


def _variance(tasks: torch.Tensor) -> torch.Tensor:
    """The population variance across the inputs, one input at a time (``Tensor.var(dim=0)`` is an order
    of magnitude slower on large tensors)."""
    mean = tasks.mean(dim=0)
    total = torch.zeros_like(mean)
    for task in tasks:
        total.add_((task - mean).square_())
    return total.div_(len(tasks))


def sce(tasks: torch.Tensor, weights: torch.Tensor, *, select_topk: float) -> torch.Tensor:
    """SCE, FuseChat's merge (Wan et al., arXiv:2408.07990): Select the ``select_topk`` fraction of the
    entries whose values vary most across the models (of those that vary at all), Calculate each model's
    weight as its mean squared change, normalised, and Erase the minority signs: the weighted mean of the
    agreeing changes. mergekit ignores the recipe's weights, and so does this."""
    if select_topk < 1:
        variance = _variance(tasks)
        keep = int(select_topk * int((variance > 0).sum()))
        if keep > 0:  # the keep largest variances (a selection, not a sort; ties at the cut are kept)
            threshold = kth_largest(variance, keep)
            tasks = tasks * ((variance >= threshold) & (variance > 0))
        else:
            tasks = torch.zeros_like(tasks)
    energy = tasks.reshape(len(tasks), -1).pow(2).mean(dim=1)
    total = energy.sum()
    model_weights = energy / total if total > 0 else torch.zeros_like(energy)
    return consensus_merge(tasks, model_weights, "total", False, "weight")


def nearswap(tasks: torch.Tensor, weights: torch.Tensor, *, t: float) -> torch.Tensor:
    """NearSwap (mergekit; the QuartetAnemoi-70B model card): each entry moves from the base towards the
    other model by ``clamp(t / |base - other|, 0, 1)``: entries where the two are close are swapped."""
    base, other = tasks[0], tasks[1]
    share = torch.nan_to_num(t / (base - other).abs(), nan=0.0).clamp(0.0, 1.0)
    return share * other + (1 - share) * base


def _lower_quantile(values: torch.Tensor, q: float) -> float:
    """The order statistic at ``⌊q (n - 1)⌋`` from the bottom (no interpolation)."""
    index = int(q * (values.numel() - 1))
    if bool((values < 0).any()):  # the radix select needs non-negative values (a KL can round below 0)
        return values.kthvalue(index + 1).values.item()
    return kth_largest(values, values.numel() - index)


def arcee_fusion(tasks: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Arcee Fusion (mergekit v0.1; Arcee AI's blog): the importance of each change is its size times the
    KL divergence between the softmaxes of the other model's and the base's row; changes above the Tukey
    fence (median + 1.5 IQR of the importances) are taken, the rest stay the base's. The fence uses
    every entry (mergekit samples 1 M entries of larger tensors, so its result there varies by run)."""
    base, other = tasks[0], tasks[1]
    p, q = torch.softmax(other, dim=-1), torch.softmax(base, dim=-1)
    divergence = (p * torch.log((p + 1e-8) / (q + 1e-8))).sum(dim=-1, keepdim=True)
    change = other - base
    importance = change.abs() * divergence
    flat = importance.reshape(-1)
    fence = _lower_quantile(flat, 0.5) + 1.5 * (_lower_quantile(flat, 0.75) - _lower_quantile(flat, 0.25))
    return base + (importance >= fence) * change


def _active(tasks: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    active = tasks.abs() > epsilon
    return active, active.sum(dim=0)


def ram(tasks: torch.Tensor, weights: torch.Tensor, *, epsilon: float) -> torch.Tensor:
    """RAM (Yuan et al., "Behavior Knowledge Merge in Reinforced Agentic Models", arXiv:2601.13572): the mean
    of the changes larger than ``epsilon`` where several models changed an entry, the one change where a
    single model did."""
    active, count = _active(tasks, epsilon)
    return (tasks * active).sum(dim=0) / count.clamp_min(1)


def ramplus_tl(tasks: torch.Tensor, weights: torch.Tensor, *, r: float, alpha: float, epsilon: float) -> torch.Tensor:
    """RAM+ (same paper), tensor-local: as RAM, but each model's unique changes are scaled by
    ``1 + r · min(S / U, alpha)``, with S and U the counts of its shared and unique changes in this tensor."""
    active, count = _active(tasks, epsilon)
    shared = active & (count >= 2)
    unique = active & (count == 1)
    flat_shared = shared.reshape(len(tasks), -1).sum(dim=1).to(tasks.dtype)
    flat_unique = unique.reshape(len(tasks), -1).sum(dim=1).to(tasks.dtype)
    ratio = torch.where(flat_unique > 0, flat_shared / flat_unique.clamp_min(1), torch.zeros_like(flat_shared))
    boost = (1 + r * ratio.clamp(max=alpha)).reshape(-1, *[1] * (tasks.dim() - 1))
    merged_shared = (tasks * shared).sum(dim=0) / count.clamp_min(1)
    return torch.where(count >= 2, merged_shared, (tasks * unique * boost).sum(dim=0))
