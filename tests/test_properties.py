"""Property tests (hypothesis) of the merge kernels and the low-rank algebra, on generated inputs."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loramerge import catalogue
from loramerge.kernels import run_kernel
from loramerge.lowrank import LowRank, concat, core_basis, from_core, project_to_core, truncate_rank
from loramerge.seeding import tensor_generators

PROPERTY_SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
# kernels that treat their inputs as a set: everything but slerp (ordered pair) and passthrough (one input)
SYMMETRIC = sorted(name for name, method in catalogue.element_methods().items() if method.max_inputs is None)
PARAMS = {"density": 0.6, "gamma": 0.05, "epsilon": 0.1, "majority_sign": "total"}


@st.composite
def task_sets(draw, min_inputs: int = 2, max_inputs: int = 4):
    n = draw(st.integers(min_inputs, max_inputs))
    rows, cols = draw(st.integers(2, 12)), draw(st.integers(2, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    tasks = torch.randn(n, rows, cols, generator=generator, dtype=torch.float64)
    weights = torch.rand(n, generator=generator, dtype=torch.float64) * 2 + 0.1
    return tasks, weights, seed


@st.composite
def low_rank_terms(draw):
    n = draw(st.integers(1, 4))
    rows, cols = draw(st.integers(3, 24)), draw(st.integers(3, 24))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    ranks = [draw(st.integers(1, 4)) for _ in range(n)]
    terms = [
        LowRank(torch.randn(rows, r, generator=generator, dtype=torch.float64),
                torch.randn(r, cols, generator=generator, dtype=torch.float64))
        for r in ranks
    ]  # fmt: skip
    coefficients = [draw(st.floats(-2, 2, allow_nan=False)) for _ in range(n)]
    return terms, coefficients


def _run(name: str, tasks, weights, seed: int, order=None) -> torch.Tensor:
    method = catalogue.method(name)
    order = list(range(len(tasks))) if order is None else order
    generators = tensor_generators(seed, "t", order) if method.random else None  # each input keeps its own stream
    return run_kernel(method, tasks[order], weights[order], PARAMS, generators)


@PROPERTY_SETTINGS
@given(task_sets(), st.randoms(use_true_random=False))
def test_permuting_inputs_with_their_weights_changes_nothing(data, rng):
    tasks, weights, seed = data
    order = list(range(len(tasks)))
    rng.shuffle(order)
    for name in SYMMETRIC:
        expected = _run(name, tasks, weights, seed)
        assert torch.allclose(_run(name, tasks, weights, seed, order), expected, atol=1e-9), name


@PROPERTY_SETTINGS
@given(task_sets(), st.floats(0.1, 10))
def test_linear_methods_are_homogeneous(data, factor):
    tasks, weights, _ = data
    for name in sorted(
        n for n, method in catalogue.element_methods().items() if method.linear and method.max_inputs is None
    ):
        method = catalogue.method(name)
        scaled = run_kernel(method, tasks * factor, weights, {})
        assert torch.allclose(scaled, factor * run_kernel(method, tasks, weights, {}), rtol=1e-9, atol=1e-9), name
        both = run_kernel(method, tasks, weights * factor, {})
        assert torch.allclose(both, factor * run_kernel(method, tasks, weights, {}), rtol=1e-9, atol=1e-9), name


@PROPERTY_SETTINGS
@given(task_sets())
def test_ties_at_density_one_with_agreeing_signs_is_the_weighted_mean(data):
    tasks, weights, _ = data
    tasks = tasks.abs() * torch.sign(tasks[0]).where(tasks[0] != 0, torch.ones_like(tasks[0]))  # one sign per entry
    params = {"density": 1.0, "elect_on": "weighted", "divisor": "weight"}
    merged = run_kernel(catalogue.method("ties"), tasks, weights, params)
    weighted_mean = (weights[:, None, None] * tasks).sum(0) / weights.sum()
    assert torch.allclose(merged, weighted_mean, atol=1e-9)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(task_sets(min_inputs=1, max_inputs=1), st.sampled_from([0.3, 0.5, 0.8]))
def test_dare_is_unbiased(data, density):
    """E[DARE(x)] = x: the mean over many seeds is within five standard errors of the input."""
    tasks, _, seed = data
    draws = 3000
    total = torch.zeros_like(tasks[0])
    method = catalogue.method("dare_linear")
    for i in range(draws):
        generators = tensor_generators(seed + i, "t", [0])
        total += run_kernel(method, tasks, torch.ones(1, dtype=tasks.dtype), {"density": density}, generators)
    standard_error = tasks[0].abs() * ((1 - density) / density / draws) ** 0.5
    assert ((total / draws - tasks[0]).abs() <= 5 * standard_error + 1e-12).all()


@PROPERTY_SETTINGS
@given(low_rank_terms())
def test_core_space_linear_equals_full_space_linear(data):
    terms, coefficients = data
    U, V = core_basis(terms)
    cores = torch.stack([project_to_core(term, U, V) for term in terms])
    weights = torch.tensor(coefficients, dtype=torch.float64)
    core_result = run_kernel(catalogue.method("linear"), cores, weights, {})
    full_result = run_kernel(catalogue.method("linear"), torch.stack([term.dense() for term in terms]), weights, {})
    rank = sum(term.rank for term in terms)
    assert torch.allclose(from_core(U, core_result, V, rank).dense(), full_result, atol=1e-8)


@PROPERTY_SETTINGS
@given(low_rank_terms())
def test_svd_at_full_rank_is_exact(data):
    terms, coefficients = data
    exact = sum(c * term.dense() for c, term in zip(coefficients, terms, strict=True))
    total_rank = sum(term.rank for term in terms)
    truncated = truncate_rank(concat(terms, coefficients), total_rank)
    assert torch.allclose(truncated.dense(), exact, atol=1e-8)
