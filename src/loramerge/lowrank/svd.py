"""Rank truncation and shared bases from the factors: QR of the stacked factors, SVD of a small core.

For ``Δ = B A`` with ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A``, ``Δ = Q_B (R_B R_Aᵀ) Q_Aᵀ``; the SVD of the
R x R core gives the SVD of ``Δ`` (Eckart–Young–Mirsky: its leading terms are the best rank-k
approximation). Cost O((out + in) R² + R³) instead of a dense O(out · in · min(out, in)).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loramerge.lowrank.factored import LowRank, concat
from loramerge.lowrank.structured import Basis, basis_times
from loramerge.seeding import default_generator_seeded, reproducible_qr, reproducible_svd, thread_independent


def core_basis(terms: Sequence[LowRank]) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal ``U`` (out x R') spanning every ``B_i`` and ``V`` (in x R'') spanning every ``A_iᵀ``.

    Each ``B_i A_i`` is then exactly ``U (Uᵀ B_i A_i V) Vᵀ`` (Core Space merging, NeurIPS 2025).
    """
    U, _ = reproducible_qr(torch.cat([term.B for term in terms], dim=1))
    V, _ = reproducible_qr(torch.cat([term.A.T for term in terms], dim=1))
    return U, V


def project_to_core(term: LowRank, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """The R' x R'' core ``Uᵀ B A V`` of one term."""
    return (U.T @ term.B) @ (term.A @ V)


def from_core(U: Basis, core: torch.Tensor, V: Basis, rank: int) -> LowRank:
    """The best rank-``rank`` factorisation of ``U core Vᵀ`` (singular values kept in ``B``, as PEFT does);
    ``U`` and ``V`` may be Kronecker products given by their sides (``loramerge.lowrank.structured``)."""
    left, values, right_t = reproducible_svd(core)
    keep = min(rank, values.shape[0])
    return LowRank(B=basis_times(U, left[:, :keep] * values[:keep]), A=basis_times(V, right_t[:keep].T).T)


def factored_svd(term: LowRank) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD ``B A = left · diag(values) · rightᵀ`` from the factors: QR of each, SVD of the R x R core."""
    U, R_B = reproducible_qr(term.B)
    V, R_A = reproducible_qr(term.A.T)
    left, values, right_t = reproducible_svd(R_B @ R_A.T)
    return U @ left, values, V @ right_t.T


def truncate_rank(term: LowRank, rank: int) -> LowRank:
    """The best rank-``rank`` approximation of ``B A``, computed from the factors."""
    U, R_B = reproducible_qr(term.B)
    V, R_A = reproducible_qr(term.A.T)
    return from_core(U, R_B @ R_A.T, V, rank)


OVERSAMPLE, POWER_ITERATIONS = 8, 2
# The range finder costs a few products with an (in x (rank + OVERSAMPLE)) sketch, a dense SVD a cube of
# the smaller side: past this many sketch widths the dense SVD is the slower one by far (0.2 s for one
# 576 x 1536 module, minutes for a 14336 x 4096 one), and the truncations agree to 2 % of the residual.
RANDOMIZED_MIN_SKETCHES = 8


def use_randomized(choice: str, shape: tuple[int, int], rank: int) -> bool:
    """``choice`` is ``auto`` (by the module's size against the kept rank), ``exact`` or ``randomized``."""
    if choice != "auto":
        return choice == "randomized"
    return min(shape) >= RANDOMIZED_MIN_SKETCHES * (rank + OVERSAMPLE)


def truncate_dense_randomized(delta: torch.Tensor, rank: int, seed: int) -> LowRank:
    """A near-best rank-``rank`` factorisation of a dense matrix by the randomized range finder with
    power iterations (Halko, Martinsson & Tropp, SIAM Review 2011, Alg. 4.4 + 5.1), via
    ``torch.svd_lowrank``: a few products with a thin random matrix instead of a full SVD.

    The one randomized truncation of the package: the full space's ``--full-svd randomized`` and
    ``extract --fast`` both call it. Seeded (the sketch is drawn from ``seed`` alone, on a forked
    generator, so the caller's random stream is untouched): the same inputs give the same bits.
    ``benchmarks/llama8b_shaped.py`` reports its error against the exact truncation."""
    sketch = min(rank + OVERSAMPLE, *delta.shape)
    # the sketch from the seed alone, and bits independent of the cores
    with default_generator_seeded(delta.device, seed), thread_independent(delta):
        left, values, right = torch.svd_lowrank(delta, q=sketch, niter=POWER_ITERATIONS)
    keep = min(rank, values.shape[0])
    return LowRank(B=left[:, :keep] * values[:keep], A=right[:, :keep].T)


def truncate_dense(delta: torch.Tensor, rank: int) -> LowRank:
    """The best rank-``rank`` factorisation of a dense matrix (``torch.linalg.svd``; Eckart–Young–Mirsky):
    the ``full`` space's exact truncation and ``extract``'s."""
    left, values, right_t = reproducible_svd(delta)
    keep = min(rank, values.shape[0])
    return LowRank(B=left[:, :keep] * values[:keep], A=right_t[:keep])


def concat_merge(terms: Sequence[LowRank], weights: Sequence[float], *, rank: int | None = None) -> LowRank:
    """The ``cat`` method: the exact weighted sum (rank Σ r_i), truncated only when ``rank`` is smaller."""
    merged = concat(terms, weights)
    return truncate_rank(merged, rank) if rank is not None and rank < merged.rank else merged


def svd_merge(terms: Sequence[LowRank], weights: Sequence[float], *, rank: int) -> LowRank:
    """The ``svd`` method: the best rank-``rank`` approximation of the exact weighted sum, from the factors."""
    return truncate_rank(concat(terms, weights), rank)
