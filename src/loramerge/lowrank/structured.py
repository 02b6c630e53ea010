"""Exact low-rank factors of the structured deltas of LoHa and LoKr (no ``out x in`` matrix is built).

Once an adapter's delta is ``B @ A``, every method and space runs on it unchanged (``docs/adapter_types.md``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loramerge.lowrank.factored import LowRank
from loramerge.seeding import reproducible_qr


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


Basis = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # a matrix, or the two sides of a Kronecker product


def kronecker_core(
    pairs: Sequence[tuple[LowRank, LowRank]], coefficients: Sequence[float], limit: int
) -> tuple[Basis, torch.Tensor, Basis] | None:
    """A core space for deltas ``c_i · kron(L_i, R_i)`` (LoKr) built from the small Kronecker sides: ``U``, the
    stacked cores and ``V``, or None where that space would be wider than ``limit``.

    The columns of ``kron(X, Y)`` span ``col(X) ⊗ col(Y)``, so ``U = kron(Q_L, Q_R)``, ``Q_L`` and ``Q_R``
    orthonormal bases of the stacked ``L_i`` and ``R_i`` columns, spans every delta (likewise ``V`` for the
    rows), and by the mixed-product property each core ``Uᵀ kron(L_i, R_i) V`` is
    ``kron(Q_Lᵀ L_i P_L, Q_Rᵀ R_i P_R)``: no ``out x Σr`` QR, which for a full ``L_i`` (rank ``rank(L_i) · rank(R_i)``
    factors) costs many times the LoRA of the same file size. The basis contains ``core_basis``'s span (it
    may be wider), so only methods whose result does not depend on the basis may use it (the catalogue's
    ``any_basis``). The bases are returned as their two sides (``basis_times`` applies them)."""
    left_columns = reproducible_qr(torch.cat([left.B for left, _ in pairs], dim=1))[0]
    right_columns = reproducible_qr(torch.cat([right.B for _, right in pairs], dim=1))[0]
    left_rows = reproducible_qr(torch.cat([left.A.T for left, _ in pairs], dim=1))[0]
    right_rows = reproducible_qr(torch.cat([right.A.T for _, right in pairs], dim=1))[0]
    width = left_columns.shape[1] * right_columns.shape[1]
    height = left_rows.shape[1] * right_rows.shape[1]
    if max(width, height) > limit:
        return None
    cores = torch.stack([
        coefficient * torch.kron((left_columns.T @ left.B) @ (left.A @ left_rows),
                                 (right_columns.T @ right.B) @ (right.A @ right_rows))
        for (left, right), coefficient in zip(pairs, coefficients, strict=True)
    ])  # fmt: skip
    return (left_columns, right_columns), cores, (left_rows, right_rows)


def basis_times(basis: Basis, matrix: torch.Tensor) -> torch.Tensor:
    """``basis @ matrix``; for ``kron(P, Q)`` without forming it: ``kron(P, Q) vec(X) = vec(Q X Pᵀ)``, one
    product per side (row ``a · q + b`` of ``matrix`` is entry ``(a, b)`` of its column reshaped)."""
    if isinstance(basis, torch.Tensor):
        return basis @ matrix
    first, second = basis
    (m, p), (n, q), k = first.shape, second.shape, matrix.shape[1]
    blocks = matrix.reshape(p, q * k)
    if m * p * q + m * n * q <= p * n * q + m * p * n:  # the cheaper order of the two side products
        result = torch.matmul(second, (first @ blocks).view(m, q, k))  # m x n x k
    else:
        result = first @ torch.matmul(second, blocks.view(p, q, k)).view(p, n * k)  # m x (n k)
    return result.view(m * n, k)  # both orders end contiguous: no copy
