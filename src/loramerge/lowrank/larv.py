"""LARV (Wang, Deng, Dou, Bi & Lu, "LARV: Data-Free Layer-wise Adaptive Rescaling Veneer for Model Merging",
arXiv:2602.09413): before any merger runs, every task vector of a layer is multiplied by one scale of that
layer, chosen from two data-free diagnostics of the layer's update ``Δ`` against its base weight ``W``:

- the effective-rank contrast ``e = r_eff(W) / r_eff(Δ)``, with ``r_eff`` the exponential of the entropy of
  the normalised singular value energies ``σ_j² / Σ σ²`` (a concentrated, low-rank update scores high);
- the commutator conflict ``c = ½ (‖W Δᵀ − Δ Wᵀ‖_F + ‖Wᵀ Δ − Δᵀ W‖_F) / (‖W‖_F ‖Δ‖_F)``.

A layer's score is ``e^η · d^ρ / (1 + softplus(z))``, ``d = (ℓ + 1) / L`` its depth and ``z`` its conflict
standardised over the layers; a gate turns scores into scales: ``tiered`` (terciles of the scores, three fixed
scales) or ``continuous`` (``1 + ½ tanh(γ (s − 1))``). Only the abstract of the paper could be read here; the
rest follows secondary descriptions of it, and the tier values are this package's choice (docs/merging-adapters.md,
"LARV").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

ETA, RHO, GAMMA = 1.0, 0.5, 3.0  # the score's exponents and the continuous gate's slope


def effective_rank(values: torch.Tensor) -> float:
    """``exp(H(p))`` for ``p_j = σ_j² / Σ σ²`` (Roy & Vetterli, EUSIPCO 2007, on energies as LARV uses it);
    1 for a rank-one matrix, ``n`` for ``n`` equal singular values."""
    energy = values.double().square()
    energy = energy[energy > 0]
    p = energy / energy.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def commutator_conflict(base: torch.Tensor, left: torch.Tensor, values: torch.Tensor, right: torch.Tensor) -> float:
    """LARV's ``c`` for ``Δ = left · diag(values) · rightᵀ`` (orthonormal columns), from R x R products: with
    ``M = leftᵀ W right`` and ``S = diag(values)``, ``‖X − Xᵀ‖² = 2 ‖X‖² − 2 tr(X²)`` for ``X = W Δᵀ`` gives
    ``2 ‖W right S‖² − 2 tr((M S)²)``, and for ``X = Wᵀ Δ``, ``2 ‖Wᵀ left S‖² − 2 tr((Mᵀ S)²)``."""
    # the products with the base in its own dtype (a float64 copy of an embedding-sized weight is gigabytes)
    base_right = (base @ right.to(base.dtype)).double()
    base_t_left = (base.T @ left.to(base.dtype)).double()
    left, values = left.double(), values.double()
    scale = torch.linalg.matrix_norm(base).double() * values.norm()
    if scale == 0:
        return 0.0
    core = left.T @ base_right
    outer = 2 * (base_right * values).square().sum() - 2 * torch.trace((core * values) @ (core * values))
    inner = 2 * (base_t_left * values).square().sum() - 2 * torch.trace((core.T * values) @ (core.T * values))
    return float((outer.clamp_min(0).sqrt() + inner.clamp_min(0).sqrt()) / (2 * scale))


def layer_scores(
    contrasts: Sequence[float], conflicts: Sequence[float], depths: Sequence[float], eta: float = ETA, rho: float = RHO
) -> torch.Tensor:
    """``e^η · d^ρ / (1 + softplus(z))``, ``z`` the conflicts standardised over the layers (population standard
    deviation; all equal: ``z = 0``)."""
    conflict = torch.tensor(conflicts, dtype=torch.float64)
    spread = conflict.std(correction=0) if len(conflict) > 1 else torch.tensor(0.0, dtype=torch.float64)
    z = (conflict - conflict.mean()) / spread if spread > 0 else torch.zeros_like(conflict)
    contrast, depth = (torch.tensor(v, dtype=torch.float64) for v in (contrasts, depths))
    return contrast.pow(eta) * depth.pow(rho) / (1 + torch.nn.functional.softplus(z))


def tiered_scales(scores: torch.Tensor, tiers: Sequence[float]) -> torch.Tensor:
    """Terciles by rank: the layers in the lowest third of the scores get ``tiers[0]``, the middle third
    ``tiers[1]``, the highest ``tiers[2]`` (rank ``k`` of ``n`` falls in third ``⌊3 (k + ½) / n⌋``, so one layer is
    in the middle; ties keep the layers' order)."""
    count = len(scores)
    ranks = torch.empty(count, dtype=torch.long)
    ranks[torch.argsort(scores, stable=True)] = torch.arange(count)
    third = (3 * (2 * ranks + 1)) // (2 * max(count, 1))
    return torch.tensor(tiers, dtype=torch.float64)[third]


def continuous_scales(scores: torch.Tensor, gamma: float = GAMMA) -> torch.Tensor:
    """The continuous gate ``1 + ½ tanh(γ (s − 1))``: scales in (0.5, 1.5), 1 at a score of 1."""
    return 1 + 0.5 * torch.tanh(gamma * (scores - 1))
