"""Exact low-rank factors of the structured deltas of LoHa and LoKr (no ``out x in`` matrix is built).

Once an adapter's delta is ``B @ A``, every method and space runs on it unchanged (``docs/adapter_types.md``).
"""

from __future__ import annotations

import torch

from loramerge.lowrank.factored import LowRank


def hadamard_factors(first: LowRank, second: LowRank) -> LowRank:
    """``(B1 A1) ⊙ (B2 A2)`` as exact factors of rank ``r1 · r2`` (LoHa: Hyeon-Woo et al., FedPara, ICLR 2022).

    Entry ``(i, j)`` is ``Σ_k Σ_l B1[i,k] B2[i,l] · A1[k,j] A2[l,j]``: the rows of ``B`` are the Kronecker
    products of the rows of ``B1`` and ``B2`` (face-splitting product), the columns of ``A`` those of the
    columns of ``A1`` and ``A2`` (Khatri–Rao product), both indexed by the pair ``(k, l)``.
    """
    rows, columns = first.B.shape[0], first.A.shape[1]
    B = (first.B.unsqueeze(2) * second.B.unsqueeze(1)).reshape(rows, first.rank * second.rank)
    A = (first.A.unsqueeze(1) * second.A.unsqueeze(0)).reshape(first.rank * second.rank, columns)
    return LowRank(B, A)


def kronecker_factors(first: LowRank, second: LowRank) -> LowRank:
    """``kron(B1 A1, B2 A2) = kron(B1, B2) @ kron(A1, A2)``: exact factors of rank ``r1 · r2``
    (LoKr: Yeh et al., LyCORIS, ICLR 2024; the mixed-product property of the Kronecker product)."""
    return LowRank(torch.kron(first.B, second.B), torch.kron(first.A, second.A))


def full_factors(matrix: torch.Tensor) -> LowRank:
    """A full matrix as ``B @ A`` with an identity on its shorter side (rank ``min(rows, columns)``), so a
    Kronecker product with it keeps the smallest exact rank."""
    rows, columns = matrix.shape
    if columns <= rows:
        return LowRank(matrix, torch.eye(columns, dtype=matrix.dtype, device=matrix.device))
    return LowRank(torch.eye(rows, dtype=matrix.dtype, device=matrix.device), matrix)
