"""RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023,
arXiv:2212.09849) on LoRA factors: per linear module, the update whose outputs are closest to every task's own
on that task's inputs, ``argmin_Δ Σ_i w_i ‖X_i Δᵀ − X_i Δ_iᵀ‖²_F``, solved in closed form from the input Gram
matrices ``G_i = X_iᵀ X_i`` of the base's activations.

The solution ``Δ* = (Σ_i w_i Δ_i G_i)(Σ_i w_i G_i)⁻¹`` needs no ``out x in`` matrix: with ``Δ_i = B_i A_i`` it
is ``Σ_i B_i (w_i A_i G_i M⁻¹)``, ``M = Σ_i w_i G_i``, so the factors ``[B_1 … B_n]`` and the stacked
``w_i A_i G_i M⁻¹`` (rank Σ r_i) are exact; only the in x in matrix ``M`` is inverted.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loramerge.errors import BadInput
from loramerge.lowrank.factored import LowRank
from loramerge.lowrank.svd import truncate_rank


def shrink_off_diagonal(gram: torch.Tensor, kept: float) -> torch.Tensor:
    """RegMean's regularisation: the off-diagonal entries of a Gram matrix times ``kept`` (its α), the
    diagonal as it is; ``kept`` = 1 is the plain least-squares solution, 0 a per-input-feature weighting."""
    return kept * gram + (1.0 - kept) * torch.diag_embed(gram.diagonal())


def solve_psd(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``X`` with ``X M = rhs`` for a symmetric positive semi-definite ``M``: by Cholesky where ``M`` is definite
    (the shrunk Gram matrices are, wherever every input feature was active), else by the pseudo-inverse from its
    eigendecomposition, eigenvalues below ``1e-10 λ_max`` (directions no prompt reached) counting as zero."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    pivots = factor.diagonal().square()
    # Cholesky also "succeeds" on a singular matrix that round-off left slightly definite, dividing by ~1e-14
    if int(info) == 0 and float(pivots.min()) > 1e-10 * float(matrix.diagonal().max()):
        return torch.cholesky_solve(rhs.T, factor).T
    values, vectors = torch.linalg.eigh(matrix)
    if float(values[-1]) <= 0:
        return torch.zeros_like(rhs)
    kept = values > values[-1] * 1e-10
    return ((rhs @ vectors[:, kept]) / values[kept]) @ vectors[:, kept].T


def regmean(
    terms: Sequence[LowRank],
    weights: Sequence[float],
    *,
    rank: int,
    grams: Sequence[torch.Tensor],
    off_diagonal: float,
    absent: Sequence[tuple[float, torch.Tensor]] = (),
) -> LowRank:
    """RegMean's merge of one module from its inputs' factors and input Gram matrices (``grams``, in x in, one
    per term), each Gram's off-diagonal entries scaled by ``off_diagonal`` (the paper's α); the result has rank
    Σ r_i, truncated to ``rank`` where that is smaller. ``absent``: the (weight, Gram matrix) of each task that
    does not adapt this module (``Δ_j = 0``: its inputs still ask for the base's outputs). The weights weigh the
    tasks' inputs against each other (RegMean is a mean: scaling every weight by the same factor changes
    nothing)."""
    if any(weight < 0 for weight in [*weights, *(w for w, _ in absent)]):
        raise BadInput("regmean weighs each task's inputs: its weights must not be negative")
    device = terms[0].A.device
    shrunk = [shrink_off_diagonal(gram.to(device, torch.float64), off_diagonal) for gram in grams]
    others = [weight * shrink_off_diagonal(gram.to(device, torch.float64), off_diagonal) for weight, gram in absent]
    total = sum(weight * gram for weight, gram in zip(weights, shrunk, strict=True)) + sum(others)
    stacked = torch.cat([weight * (term.A.to(torch.float64) @ gram)
                         for term, weight, gram in zip(terms, weights, shrunk, strict=True)])  # fmt: skip
    rights = solve_psd(total, stacked)  # every term's w_i A_i G_i M⁻¹ at once
    merged = LowRank(torch.cat([term.B for term in terms], dim=1), rights.to(terms[0].A.dtype))
    return truncate_rank(merged, rank) if rank < merged.rank else merged
