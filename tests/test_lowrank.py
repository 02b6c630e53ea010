"""Factored algebra against dense ``torch.linalg`` on the exact matrices."""

from __future__ import annotations

import pytest
import torch

from conftest import rel_err
from loramerge.lowrank import (
    LowRank,
    concat,
    core_basis,
    frobenius_inner,
    from_core,
    project_to_core,
    truncate_dense,
    truncate_rank,
)


def random_terms(shapes, out=40, inp=30, seed=0) -> list[LowRank]:
    g = torch.Generator().manual_seed(seed)
    return [LowRank(torch.randn(out, r, generator=g), torch.randn(r, inp, generator=g)) for r in shapes]


def test_concat_is_the_exact_weighted_sum():
    terms = random_terms([2, 5, 3])
    weights = [0.5, -1.5, 2.0]
    merged = concat(terms, weights)
    assert merged.rank == 10
    assert rel_err(merged.dense(), sum(w * t.dense() for w, t in zip(weights, terms, strict=True))) < 1e-6


@pytest.mark.parametrize("rank", [1, 4, 9, 10, 30])
def test_truncate_rank_equals_dense_svd(rank):
    merged = concat(random_terms([2, 5, 3]), [0.5, -1.5, 2.0])
    dense = merged.dense().double()
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    best = (U[:, :rank] * S[:rank]) @ Vh[:rank]
    truncated = truncate_rank(merged, rank)
    assert truncated.rank == min(rank, 10)
    assert rel_err(truncated.dense().double(), best) < 1e-5
    assert rel_err(truncate_dense(merged.dense(), rank).dense().double(), best) < 1e-5


def test_core_basis_represents_every_term_exactly():
    terms = random_terms([3, 6, 4], out=50, inp=8)  # R = 13 > in: V is square
    U, V = core_basis(terms)
    assert torch.allclose(U.T @ U, torch.eye(U.shape[1]), atol=1e-5)
    for term in terms:
        back = U @ project_to_core(term, U, V) @ V.T
        assert rel_err(back, term.dense()) < 1e-5
    core = sum(project_to_core(t, U, V) for t in terms)
    assert rel_err(from_core(U, core, V, 100).dense(), sum(t.dense() for t in terms)) < 1e-5


def test_frobenius_inner_from_factors():
    x, y = random_terms([3, 5])
    assert frobenius_inner(x, y).item() == pytest.approx((x.dense() * y.dense()).sum().item(), rel=1e-4)
