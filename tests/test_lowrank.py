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
    truncate_dense_randomized,
    truncate_rank,
    use_randomized,
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


def decaying_matrix(out=300, inp=200, seed=0) -> torch.Tensor:
    """A dense matrix with a slowly decaying spectrum, like a trimmed and sign-elected merge result."""
    g = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(out, inp, generator=g))
    right, _ = torch.linalg.qr(torch.randn(inp, inp, generator=g))
    values = 1.0 / torch.arange(1, inp + 1, dtype=torch.float32) ** 0.7
    return (left * values) @ right.T


@pytest.mark.parametrize("rank", [4, 16])
def test_randomized_truncation_is_near_the_best_rank_k(rank):
    """The one randomized truncation (``--full-svd randomized`` and ``extract --fast``) against the best
    rank-k residual ``sqrt(Σ_{i>k} σ_i²)`` of ``torch.linalg.svd`` (Eckart–Young–Mirsky)."""
    matrix = decaying_matrix()
    U, S, Vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    randomized = truncate_dense_randomized(matrix, rank, seed=3)
    assert randomized.rank == rank
    best = S[rank:].norm().item()
    error = torch.linalg.matrix_norm(matrix.double() - randomized.dense().double()).item()
    assert best * (1 - 1e-5) <= error <= 1.02 * best  # Eckart–Young bound below; range finder within 2 % above
    assert rel_err(randomized.dense().double(), (U[:, :rank] * S[:rank]) @ Vh[:rank]) < 0.1
    exact = truncate_dense(matrix, rank).dense().double()
    assert torch.linalg.matrix_norm(matrix.double() - exact).item() == pytest.approx(best, rel=1e-5)


def test_randomized_truncation_is_seeded_and_leaves_the_global_generator_alone():
    matrix = decaying_matrix(seed=1)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    first = truncate_dense_randomized(matrix, 8, seed=5)
    assert torch.equal(torch.rand(3), before)
    again = truncate_dense_randomized(matrix, 8, seed=5)
    assert torch.equal(first.A, again.A) and torch.equal(first.B, again.B)


def test_randomized_truncation_is_exact_for_low_rank_matrices():
    merged = concat(random_terms([2, 3], out=500, inp=400), [1.0, -0.5])
    randomized = truncate_dense_randomized(merged.dense(), 5, seed=0)
    assert rel_err(randomized.dense(), merged.dense()) < 1e-5


def test_full_svd_choice_by_module_size():
    assert use_randomized("auto", (576, 1536), 16) and use_randomized("auto", (4096, 14336), 16)
    assert not use_randomized("auto", (160, 576), 16) and not use_randomized("auto", (64, 96), 4)
    assert not use_randomized("auto", (576, 1536), 128)  # a wide sketch: the dense SVD is as cheap
    assert use_randomized("randomized", (8, 8), 4) and not use_randomized("exact", (4096, 14336), 16)


@pytest.mark.parametrize("method", ["ties", "magnitude_prune", "breadcrumbs_ties", "linear", "dare_ties"])
def test_full_space_row_blocks_equal_the_whole_tensor_kernel(method, monkeypatch):
    """The full space runs piecewise kernels on row blocks made from the factors; with blocks of a few
    rows the result must be the kernel on the whole stacked deltas."""
    from loramerge import catalogue
    from loramerge.adapters.merge import merge_full_space
    from loramerge.kernels import registry, run_kernel

    monkeypatch.setattr(registry, "BLOCK_ELEMENTS", 3 * 40)  # 3 rows of 40 columns per block
    generator = torch.Generator().manual_seed(0)

    def dyadic(*shape: int) -> torch.Tensor:
        # multiples of 1/64: every product and sum is exact in float32, so a block's rows of B @ A are the
        # whole product's bit for bit (BLAS may otherwise round a 3-row and a 50-row product differently,
        # and an entry at the trim's cutoff then falls on the other side of it)
        return (torch.randn(*shape, generator=generator) * 64).round() / 64

    terms = [LowRank(dyadic(50, r), dyadic(r, 40)) for r in (2, 5, 3)]
    weights = torch.tensor([1.0, -0.5, 0.8])
    entry = catalogue.method(method)
    params = {"density": 0.4, "gamma": 0.05} if "density" in entry.params else {}
    params = {key: value for key, value in params.items() if key in entry.params}
    seeds = [torch.Generator().manual_seed(i) for i in range(3)]
    blocked = merge_full_space(entry, terms, weights, params, seeds)
    seeds = [torch.Generator().manual_seed(i) for i in range(3)]
    whole = run_kernel(entry, torch.stack([term.dense() for term in terms]), weights, params, seeds)
    torch.testing.assert_close(blocked, whole, rtol=1e-6, atol=1e-6)
    if entry.piecewise and method != "linear":
        assert (blocked == 0).any()  # the trim really ran
