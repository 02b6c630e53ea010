"""Kernels against PEFT's ``merge_utils`` (the reference implementation of the papers) and the math."""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils

from loramerge import catalogue
from loramerge.kernels import preset_params, run_kernel
from loramerge.kernels.consensus import disjoint_merge, elect_sign_mask
from loramerge.kernels.sparsify import magnitude_trim, random_drop
from loramerge.seeding import tensor_generators, tensor_seed

PEFT = preset_params("peft", catalogue.method("ties"))  # the conventions as kernel parameters


@pytest.fixture
def tasks() -> torch.Tensor:
    return torch.randn(3, 24, 16, generator=torch.Generator().manual_seed(0))


WEIGHTS = torch.tensor([0.7, -0.2, 1.3])


def test_linear_is_task_arithmetic(tasks):
    expected = merge_utils.task_arithmetic(list(tasks), WEIGHTS)
    assert torch.allclose(run_kernel(catalogue.method("linear"), tasks, WEIGHTS, {}), expected, atol=1e-6)
    assert catalogue.method("task_arithmetic").fn == catalogue.method("linear").fn


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("majority_sign", ["total", "frequency"])
def test_ties_matches_peft(tasks, density, majority_sign):
    expected = merge_utils.ties(list(tasks), WEIGHTS, density, majority_sign)
    params = {**PEFT, "density": density, "majority_sign": majority_sign}
    assert torch.allclose(run_kernel(catalogue.method("ties"), tasks, WEIGHTS, params), expected, atol=1e-6)


@pytest.mark.parametrize("density", [0.2, 0.7])
def test_magnitude_prune_matches_peft(tasks, density):
    expected = merge_utils.magnitude_prune(list(tasks), WEIGHTS, density)
    assert torch.allclose(
        run_kernel(catalogue.method("magnitude_prune"), tasks, WEIGHTS, {"density": density}), expected, atol=1e-6
    )


def test_magnitude_trim_keeps_exactly_the_largest(tasks):
    trimmed = magnitude_trim(tasks[0], density=0.25, rescale="none")
    kept = trimmed != 0
    assert kept.sum().item() == int(0.25 * tasks[0].numel())
    assert tasks[0][kept].abs().min() >= tasks[0][~kept].abs().max()


def test_random_drop_is_unbiased_and_seeded(tasks):
    gens = [torch.Generator().manual_seed(s) for s in range(4000)]
    mean = torch.stack([random_drop(tasks[0], density=0.3, rescale="density", generator=g) for g in gens]).mean(0)
    assert ((mean - tasks[0]).abs().max() / tasks[0].abs().max()) < 0.15
    again = random_drop(tasks[0], density=0.3, rescale="density", generator=torch.Generator().manual_seed(7))
    assert torch.equal(
        again, random_drop(tasks[0], density=0.3, rescale="density", generator=torch.Generator().manual_seed(7))
    )
    l1 = random_drop(tasks[0], density=0.3, rescale="l1", generator=torch.Generator().manual_seed(7))
    assert l1.abs().sum().item() == pytest.approx(tasks[0].abs().sum().item(), rel=1e-5)


def test_sign_election_and_divisors():
    stack = torch.tensor([[2.0, -1.0, 0.0], [-1.0, -1.0, 3.0], [-0.5, 4.0, 0.0]])
    weights = torch.tensor([1.0, 2.0, 0.5])
    total = elect_sign_mask(stack, "total")  # sums: 0.5, 2, 3 -> +, +, +
    assert total.tolist() == [[True, False, False], [False, False, True], [False, True, False]]
    frequency = elect_sign_mask(stack, "frequency")  # sign sums: -1, -1, +1
    assert frequency[:, 0].tolist() == [False, True, True]
    weighted = stack * weights[:, None]
    assert disjoint_merge(weighted, total, weights, "count")[0].item() == pytest.approx(2.0)
    assert disjoint_merge(weighted, frequency, weights, "weight")[0].item() == pytest.approx((-2 - 0.25) / 2.5)
    assert disjoint_merge(weighted, frequency, weights, "none")[0].item() == pytest.approx(-2.25)


def test_mergekit_preset_elects_on_weighted_tasks():
    stack = torch.tensor([[1.0], [-0.6]])
    weights = torch.tensor([0.1, 1.0])
    method = catalogue.method("ties")
    peft = run_kernel(method, stack, weights, {**preset_params("peft", method), "density": 1.0})
    mergekit = run_kernel(method, stack, weights, {**preset_params("mergekit", method), "density": 1.0})
    assert peft.item() == pytest.approx(0.1)  # unweighted sum +0.4 elects +
    assert mergekit.item() == pytest.approx(-0.6)  # weighted sum -0.5 elects -; divided by weight 1.0


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_random_kernels_use_one_generator_per_input(tasks, name):
    method = catalogue.method(name)
    params = {**preset_params("peft", method), "density": 0.5, "majority_sign": "total"}
    first = run_kernel(method, tasks, WEIGHTS, params, tensor_generators(3, "t", [0, 1, 2]))
    second = run_kernel(method, tasks, WEIGHTS, params, tensor_generators(3, "t", [0, 1, 2]))
    other = run_kernel(method, tasks, WEIGHTS, params, tensor_generators(4, "t", [0, 1, 2]))
    assert torch.equal(first, second) and not torch.equal(first, other)
    full = run_kernel(method, tasks, WEIGHTS, {**params, "density": 1.0}, tensor_generators(3, "t", [0, 1, 2]))
    reference = "task_arithmetic" if name == "dare_linear" else "ties"
    expected = run_kernel(catalogue.method(reference), tasks, WEIGHTS, {**params, "density": 1.0})
    assert torch.allclose(full, expected)


def test_tensor_seeds_depend_only_on_seed_name_and_index():
    assert tensor_seed(1, "a.q_proj", 0) == tensor_seed(1, "a.q_proj", 0)
    assert len({tensor_seed(1, "a", 0), tensor_seed(1, "a", 1), tensor_seed(1, "b", 0), tensor_seed(2, "a", 0)}) == 4


def test_unknown_kernel_is_a_clear_error():
    from loramerge import BadInput

    with pytest.raises(BadInput, match="unknown merge method 'nope'"):
        catalogue.method("nope")


@pytest.mark.parametrize("majority_sign", ["total", "frequency"])
@pytest.mark.parametrize("weighted_vote", [False, True])
@pytest.mark.parametrize("divisor", ["count", "weight", "none"])
def test_fused_consensus_equals_elect_then_disjoint_merge(majority_sign, weighted_vote, divisor):
    """The fused consensus step (used on every block) against the two steps written out with masks."""
    from loramerge.kernels.consensus import broadcast_weights, consensus_merge

    generator = torch.Generator().manual_seed(1)
    tasks = torch.randn(4, 30, 20, generator=generator)
    tasks[tasks.abs() < 0.6] = 0  # trimmed entries: zeros never vote
    tasks[:, 0, 0] = 0  # an entry where nobody votes
    weights = torch.tensor([1.0, -0.5, 0.8, 0.0])
    weighted = tasks * broadcast_weights(weights, tasks)
    mask = elect_sign_mask(weighted if weighted_vote else tasks, majority_sign)
    expected = disjoint_merge(weighted, mask, weights, divisor)
    fused = consensus_merge(tasks, weights, majority_sign, weighted_vote, divisor)
    torch.testing.assert_close(fused, expected, rtol=1e-6, atol=0)
    assert fused[0, 0] == 0 and (fused != 0).any()


def test_a_misspelt_parameter_reaching_a_kernel_is_refused():
    from loramerge import catalogue
    from loramerge.errors import BadInput
    from loramerge.kernels import run_kernel

    tasks, weights = torch.randn(2, 8), torch.ones(2)
    method = catalogue.method("ties")
    run_kernel(method, tasks, weights, {"density": 0.5, "rescale": "none"})  # another kernel's convention: not an error
    with pytest.raises(BadInput, match=r"ties: unknown parameter 'densty'"):
        run_kernel(method, tasks, weights, {"densty": 0.5})
