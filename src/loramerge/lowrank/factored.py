"""A factored matrix ``B @ A`` and the exact operations on it (no ``out x in`` matrix is built)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LowRank:
    """``B @ A`` with ``B`` (out x r) and ``A`` (r x in); any scale is already inside the factors."""

    B: torch.Tensor
    A: torch.Tensor

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def dense(self) -> torch.Tensor:
        return self.B @ self.A

    def to(self, dtype: torch.dtype) -> LowRank:
        return LowRank(self.B.to(dtype), self.A.to(dtype))


def concat(terms: Sequence[LowRank], coefficients: Sequence[float]) -> LowRank:
    """``Σ c_i B_i A_i`` exactly, as ``[B_1 … B_n] @ [c_1 A_1; …; c_n A_n]`` (rank Σ r_i)."""
    B = torch.cat([term.B for term in terms], dim=1)
    A = torch.cat([coef * term.A for term, coef in zip(terms, coefficients, strict=True)], dim=0)
    return LowRank(B, A)


def frobenius_inner(x: LowRank, y: LowRank) -> torch.Tensor:
    """``<B_x A_x, B_y A_y>_F = tr((B_xᵀ B_y)(A_y A_xᵀ))`` from r x r products only."""
    return ((x.B.T @ y.B) * (x.A @ y.A.T)).sum()
