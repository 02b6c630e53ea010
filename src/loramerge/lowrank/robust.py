"""RobustMerge (Zeng et al., NeurIPS 2025, arXiv:2502.17159): direction-robust merging of LoRA factors.

Per task, both factors are pruned to their largest entries; each rank component ``k`` gets a complementary
scale ``s_k = ‖A_k‖₁ / ‖Ã_k‖₁`` (how much of the row's mass pruning removed), raised to at least the
task's ``floor`` quantile of its scales; and the scales are normalised across tasks, component by
component, so they average to one. The pruned ``B``'s columns carry the normalised scales.

The authors' release sums the pruned factors, ``(Σ_i c_i ⊙ B̃_i)(Σ_j Ã_j)``: that adds the cross terms
``B̃_i Ã_j`` (i ≠ j), which collapse into ``n · Σ_i c_i ⊙ B̃_i Ã`` only when every adapter shares one
``A`` (one initialisation that training barely moved). Here each task keeps its own product,
``α Σ_i w_i (c_i ⊙ B̃_i) Ã_i``, exact for adapters of any ranks and initialisations, and the same as the
authors' merge when the ``A``'s are shared (tests/test_robustmerge.py checks both). ``α = 4`` is their
fuse coefficient, 2 on each factor; the catalogue's default ``α = 1`` makes weights of 1 mean a sum, as for every
other method (the quality benchmark measured α = 4 far too strong for independently trained adapters).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from loramerge.errors import BadInput
from loramerge.lowrank.factored import LowRank, concat
from loramerge.lowrank.svd import truncate_rank


def kept_count(numel: int, density: float) -> int:
    """How many entries RobustMerge's mask ``M(k)`` keeps: the top ``k = density`` fraction, ``⌊density · n⌋``
    (at least one, so no task vanishes from a small factor). The product is rounded to 9 decimals first
    so that a density written in decimal keeps the count it names (``0.29 · 100`` is ``28.999…`` in binary).

    Zeng et al., "RobustMerge: Parameter-Efficient Model Merging for MLLMs with Direction Robustness",
    NeurIPS 2025 (arXiv:2502.17159): ``Ã = M_A(k) ⊙ A``, ``B̃ = M_B(k) ⊙ B``, where ``M(k)`` keeps the top-k
    parameters by magnitude. The authors' release computes the mask as ``|x| ≥ kthvalue(int(n (1 − k)))``,
    which also keeps the ``int(n (1 − k))``-th smallest entry: one more than the paper's top-k (31 of 150 at
    k = 0.2). loramerge follows the paper."""
    return max(1, math.floor(round(density * numel, 9)))


def keep_largest(x: torch.Tensor, density: float) -> torch.Tensor:
    """``x`` with all but its ``kept_count`` largest-magnitude entries zeroed (RobustMerge's pruning);
    entries tied with the smallest kept magnitude are kept too."""
    keep = kept_count(x.numel(), density)
    if keep >= x.numel():
        return x.clone()
    threshold = x.abs().flatten().topk(keep).values[-1]
    return torch.where(x.abs() >= threshold, x, torch.zeros_like(x))


def complementary_scales(A: torch.Tensor, pruned: torch.Tensor, floor: float) -> torch.Tensor:
    """One scale per rank component: the L1 mass of ``A``'s row over what pruning left of it, raised to the
    task's ``floor`` quantile (its order statistic at ``⌊floor · r⌋``) so only the outliers stand out."""
    total, kept = A.abs().sum(dim=1), pruned.abs().sum(dim=1)
    scales = torch.where(kept > 0, total / kept.clamp_min(torch.finfo(A.dtype).tiny), torch.ones_like(total))
    index = min(int(floor * scales.numel()), scales.numel() - 1)
    return scales.clamp_min(scales.sort().values[index])


def normalise_across_tasks(scales: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each component's scales divided by their mean over the tasks that have that component (ranks may
    differ): ``c_ik = n_k s_ik / Σ_j s_jk``."""
    width = max(s.numel() for s in scales)
    total = torch.zeros(width, dtype=scales[0].dtype, device=scales[0].device)
    count = torch.zeros_like(total)
    for s in scales:
        total[: s.numel()] += s
        count[: s.numel()] += 1
    return [s * count[: s.numel()] / total[: s.numel()] for s in scales]


def robust_merge(
    terms: Sequence[LowRank],
    weights: Sequence[float],
    *,
    rank: int | None = None,
    density: float,
    floor: float,
    alpha: float,
) -> LowRank:
    """The ``robustmerge`` method: ``α Σ_i w_i (c_i ⊙ B̃_i) Ã_i`` as concatenated factors (rank Σ r_i),
    truncated only when ``rank`` is smaller."""
    if not 0.0 < density <= 1.0:
        raise BadInput(f"density must be in (0, 1], got {density}")
    if not 0.0 <= floor <= 1.0:
        raise BadInput(f"floor must be in [0, 1], got {floor}")
    pruned = [LowRank(keep_largest(term.B, density), keep_largest(term.A, density)) for term in terms]
    scales = [complementary_scales(t.A, p.A, floor) for t, p in zip(terms, pruned, strict=True)]
    normalised = normalise_across_tasks(scales)
    scaled = [LowRank(p.B * c, p.A) for p, c in zip(pruned, normalised, strict=True)]
    merged = concat(scaled, [alpha * w for w in weights])
    return truncate_rank(merged, rank) if rank is not None and rank < merged.rank else merged
