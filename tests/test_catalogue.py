"""One method catalogue: a method registered in one place is offered by the CLI, validated in recipes and
mapped in the live API; the derived tables are the hand-written ones, and each entry's claimed facts
(linear, piecewise, random, consensus) hold when the method runs."""

from __future__ import annotations

import pytest
import torch

import loramerge
from cli_helpers import run
from conftest import peft_delta, peft_with_adapters, rel_err
from dense_helpers import load_weights, save_llama, write_recipe
from loramerge import catalogue, load_adapter
from loramerge.catalogue import Method, Parameter
from loramerge.dense.engine import merge_checkpoints
from loramerge.errors import BadInput
from loramerge.kernels import run_kernel, with_cutoffs
from loramerge.lowrank import LowRank


def halved_sum(tasks: torch.Tensor, weights: torch.Tensor, *, factor: float) -> torch.Tensor:
    """A throw-away method: ``factor`` times the weighted sum (in the core space with enough rank: exact)."""
    return factor * torch.einsum("n,n...->...", weights.to(tasks.dtype), tasks)


@pytest.fixture
def throwaway():
    method = catalogue.register(
        Method(
            "halved_sum",
            halved_sum,
            "none (a test)",
            "half the weighted sum",
            piecewise=True,
            parameters=(Parameter("weight", 1.0, per_input=True), Parameter("factor", 0.5)),
            peft_names={"halved": None},
        )
    )
    yield method
    catalogue.unregister("halved_sum")


def test_a_registered_method_is_offered_by_the_cli(throwaway, mixed_adapters, tmp_path):
    result = run("merge", *mixed_adapters, "--method", "halved_sum", "--rank", 64, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    merged = load_adapter(tmp_path / "out")
    inputs = [load_adapter(path) for path in mixed_adapters]
    for name, module in merged.modules.items():
        exact = sum(adapter.modules[name].delta() for adapter in inputs if name in adapter.modules)
        assert rel_err(module.delta(), 0.5 * exact) < 1e-2, name  # bfloat16 output


def test_a_registered_method_is_validated_in_recipes(throwaway, tmp_path):
    base = save_llama(tmp_path / "base", 0)
    tuned = save_llama(tmp_path / "tuned", 1, like=base)
    recipe = {"merge_method": "halved_sum", "base_model": str(base), "dtype": "float32",
              "models": [{"model": str(tuned), "parameters": {"weight": 1.0}}]}  # fmt: skip
    merge_checkpoints(write_recipe(tmp_path / "ok.yml", recipe), tmp_path / "out")
    before, after, merged = load_weights(base), load_weights(tuned), load_weights(tmp_path / "out")
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(merged[name], before[name] + 0.5 * (after[name] - before[name]), atol=1e-6)
    recipe["parameters"] = {"density": 0.5}
    with pytest.raises(BadInput, match=r"parameters\.density: unknown parameter for halved_sum"):
        merge_checkpoints(write_recipe(tmp_path / "bad.yml", recipe), tmp_path / "bad")


def test_a_registered_method_is_mapped_in_the_live_api(throwaway, llama_base, equal_rank_adapters):
    names = ["a", "b", "c"]
    model = peft_with_adapters(llama_base, dict(zip(names, equal_rank_adapters, strict=True)))
    loramerge.add_weighted_adapter(model, names, [1.0, 1.0, 1.0], "halved", combination_type="halved", rank=64)
    name = "model.layers.0.self_attn.q_proj"
    exact = sum(peft_delta(model, name, n) for n in names)
    assert rel_err(peft_delta(model, name, "halved"), 0.5 * exact) < 1e-5


def test_an_unregistered_method_is_refused_everywhere(mixed_adapters, tmp_path):
    result = run("merge", *mixed_adapters, "--method", "halved_sum", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "unknown method 'halved_sum'" in result.stderr


# The tables written out by hand (README, "Methods"; mergekit's method list; PEFT's add_weighted_adapter
# combination types): a method added to the catalogue must be added here too, and its claimed facts are
# then checked below by running it.
ADAPTER_METHODS = {
    "cat", "svd", "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune", "breadcrumbs",
    "breadcrumbs_ties", "della", "della_linear", "knots", "tsv_m", "iso_c", "iso_cts", "robustmerge", "wudi",
    "dc_merge", "regmean",
}  # fmt: skip
DENSE_METHODS = {
    "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune", "breadcrumbs",
    "breadcrumbs_ties", "della", "della_linear", "model_stock", "slerp", "nuslerp", "multislerp", "karcher", "sce",
    "nearswap", "arcee_fusion", "ram", "ramplus_tl", "passthrough",
}  # fmt: skip
WHOLE_MATRIX = {"knots", "tsv_m", "iso_c", "iso_cts", "wudi", "dc_merge"}  # need whole task matrices (SVDs, products)
ON_FACTORS = {"cat", "svd", "robustmerge", "regmean"}  # computed from the factors themselves
PEFT_COMBINATION_TYPES = {
    "cat": ("cat", None), "svd": ("svd", None), "linear": ("linear", None), "ties": ("ties", None),
    "ties_svd": ("ties", "full"), "dare_linear": ("dare_linear", None), "dare_linear_svd": ("dare_linear", "full"),
    "dare_ties": ("dare_ties", None), "dare_ties_svd": ("dare_ties", "full"),
    "magnitude_prune": ("magnitude_prune", None), "magnitude_prune_svd": ("magnitude_prune", "full"),
}  # fmt: skip


def test_the_derived_tables_are_the_hand_written_ones():
    assert set(catalogue.adapter_methods()) == ADAPTER_METHODS
    assert set(catalogue.dense_methods()) == DENSE_METHODS
    assert set(catalogue.element_methods()) == (ADAPTER_METHODS | DENSE_METHODS) - WHOLE_MATRIX - ON_FACTORS
    assert set(catalogue.matrix_methods()) == WHOLE_MATRIX
    assert catalogue.peft_combination_types() == PEFT_COMBINATION_TYPES
    for method in catalogue.methods():
        assert method.paper and method.summary, method.name


def tensor_methods() -> list[str]:
    return [method.name for method in catalogue.methods() if method.level != "module"]


def stack(seed: int, count: int) -> torch.Tensor:
    return torch.randn(count, 12, 10, generator=torch.Generator().manual_seed(seed))


def inputs_of(method: Method) -> int:
    return max(method.min_inputs, min(3, method.max_inputs or 3))


def call(method: Method, tasks: torch.Tensor, seed: int = 0, **params) -> torch.Tensor:
    """The method on ``tasks`` with its catalogue defaults, the values it requires (``t``) and ``params``."""
    given = {p.name: 0.3 for p in method.parameters if p.required and not p.per_input} | params
    weights = torch.tensor([0.6, 0.3, 0.8][: len(tasks)])
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(tasks))]
    return run_kernel(catalogue.method(method.name), tasks, weights, given, generators)


@pytest.mark.parametrize("name", tensor_methods())
def test_every_method_runs_on_its_catalogue_defaults_alone(name):
    """Every parameter the function takes without a default of its own has one in the catalogue (or is
    one the user must give: ``required``)."""
    method = catalogue.method(name)
    tasks = stack(0, inputs_of(method))
    merged = call(method, tasks)
    assert merged.shape == tasks.shape[1:] and torch.isfinite(merged).all()


@pytest.mark.parametrize("name", [m.name for m in catalogue.methods() if m.linear and m.level != "module"])
def test_the_linear_methods_are_linear_and_basis_equivariant(name):
    """``linear``: f(X + 2Y) = f(X) + 2 f(Y), and f(P X Q) = P f(X) Q for orthogonal P, Q (merging in any
    shared basis is exact)."""
    method = catalogue.method(name)
    x, y = stack(1, inputs_of(method)), stack(2, inputs_of(method))
    params = {"density": 0.5} if "density" in method.params else {}  # a pruning method would show here
    torch.testing.assert_close(
        call(method, x + 2 * y, **params), call(method, x, **params) + 2 * call(method, y, **params)
    )
    P, _ = torch.linalg.qr(torch.randn(12, 12, generator=torch.Generator().manual_seed(3)))
    Q, _ = torch.linalg.qr(torch.randn(10, 10, generator=torch.Generator().manual_seed(4)))
    torch.testing.assert_close(call(method, P @ x @ Q, **params), P @ call(method, x, **params) @ Q)


@pytest.mark.parametrize("name", [m.name for m in catalogue.methods() if m.linear and m.level == "module"])
def test_the_linear_factor_methods_are_linear_in_the_weights(name):
    method = catalogue.method(name)
    generator = torch.Generator().manual_seed(5)
    terms = [LowRank(torch.randn(12, r, generator=generator), torch.randn(r, 10, generator=generator)) for r in (2, 3)]
    exact = 5  # Σ r_i: nothing truncated

    def dense(weights):
        return method.fn(terms, weights, rank=exact).dense()

    torch.testing.assert_close(dense([1.0, -2.0]), dense([1.0, 0.0]) - 2 * dense([0.0, 1.0]))
    torch.testing.assert_close(dense([0.7, 0.4]), 0.7 * terms[0].dense() + 0.4 * terms[1].dense())


@pytest.mark.parametrize("name", [m.name for m in catalogue.methods() if m.piecewise])
def test_the_piecewise_methods_give_the_whole_tensor_result_on_row_blocks(name):
    """``piecewise``: with each whole task's cutoff known, the method on blocks of rows is the method on the
    whole tensor (the full space and dense merges rely on it)."""
    method = catalogue.method(name)
    tasks = stack(6, inputs_of(method))
    params = {"density": 0.5} if "density" in method.params else {}
    whole = call(method, tasks, **params)
    cut = with_cutoffs(method, params, tasks)
    blocks = [call(method, tasks[:, rows], **cut) for rows in (slice(0, 5), slice(5, 10), slice(10, 12))]
    assert torch.equal(torch.cat(blocks), whole)


@pytest.mark.parametrize("name", tensor_methods())
def test_the_random_methods_and_only_they_draw_from_their_generators(name):
    """``random``: the result follows the per-input generators (another seed, another result) and nothing
    else; every other method ignores the global random state. (KnOTS draws through its inner method.)"""
    method = catalogue.method(name)
    tasks = stack(7, inputs_of(method))
    params = {"density": 0.5} if "density" in method.params else {}
    params |= {"inner": "dare_ties"} if "inner" in method.params else {}
    torch.manual_seed(1)
    first = call(method, tasks, seed=10, **params)
    torch.manual_seed(2)
    assert torch.equal(call(method, tasks, seed=10, **params), first)
    assert torch.equal(call(method, tasks, seed=20, **params), first) != method.random


@pytest.mark.parametrize("name", [m.name for m in catalogue.methods() if m.consensus])
def test_the_consensus_methods_elect_a_sign(name):
    """``consensus``: with nothing dropped (density 1), tasks ``[a, a, -1.5 a]`` elect the sign of ``a`` (the
    sign of their sum) and the disjoint mean of the two agreeing tasks is ``a`` — a weighted sum would give
    ``0.5 a`` (TIES-Merging, Yadav et al., NeurIPS 2023)."""
    method = catalogue.method(name)
    a = stack(8, 1)[0]
    params = {"density": 1.0} | ({"epsilon": 0.0} if "epsilon" in method.params else {})
    got = run_kernel(catalogue.method(name), torch.stack([a, a, -1.5 * a]), torch.ones(3), params,
                     [torch.Generator().manual_seed(i) for i in range(3)])  # fmt: skip
    torch.testing.assert_close(got, a, rtol=1e-5, atol=1e-5)


def test_a_method_can_carry_its_own_default_density(mixed_adapters, tmp_path):
    """della's keep probabilities are density ± epsilon (0.15): the general 0.95 would leave (0, 1)."""
    from loramerge.adapters.options import parse_options

    assert parse_options(method="della").effective_density == catalogue.method("della").adapter_density == 0.8
    assert parse_options(method="ties").effective_density == catalogue.DEFAULT_DENSITY
    assert parse_options(method="della", density=0.5).effective_density == 0.5
    result = run("merge", *mixed_adapters, "--method", "della", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output


def test_adapter_merges_refuse_the_dense_only_parameters(tmp_path):
    """mergekit's normalize / rescale / lambda / int8_mask / weight have no meaning in ``params``: refused."""
    from loramerge.adapters.options import parse_options
    from loramerge.adapters.recipe import adapter_merge_inputs
    from loramerge.recipe import load_recipe

    for name in ("normalize", "rescale", "lambda", "int8_mask", "weight"):
        with pytest.raises(BadInput, match=f"method ties has no parameter '{name}'"):
            parse_options(method="ties", params={name: 1.0})
    assert parse_options(method="breadcrumbs", params={"gamma": 0.02}).kernel_params["gamma"] == 0.02
    recipe = tmp_path / "r.yml"
    recipe.write_text("merge_method: ties\nadapters:\n  - adapter: a\nparameters:\n  normalize: true\n")
    with pytest.raises(BadInput, match=r"parameters\.normalize: unknown parameter for adapter recipes"):
        adapter_merge_inputs(load_recipe(recipe))


def test_kernels_have_no_defaults_and_task_vector_methods_are_two_steps():
    """Every default is in the catalogue: no kernel or step function has one for a parameter the catalogue
    passes (a cutoff or generator handed in by the runner may be absent), and the methods of generalized
    task arithmetic are a sparsify step and a combine step, whose nature makes the method's."""
    import inspect

    optional_inputs = {"cutoff", "cutoffs", "generator", "generators"}
    for method in catalogue.methods():
        if method.level == "module":
            continue
        kernel = method.fn
        functions = [kernel.sparsify, kernel.combine] if isinstance(method.function, catalogue.Steps) else [kernel]
        for function in filter(None, functions):
            for name, parameter in inspect.signature(function).parameters.items():
                if name not in optional_inputs:
                    assert parameter.default is inspect.Parameter.empty, (method.name, function.__name__, name)
        assert set(method.kernel_defaults) <= method.params, method.name
    pairs = {name: (m.function.sparsify, m.function.combine) for name, m in catalogue.element_methods().items()
             if isinstance(m.function, catalogue.Steps)}  # fmt: skip
    assert pairs == {
        "linear": (None, "sum"), "task_arithmetic": (None, "sum"), "ties": ("magnitude", "consensus"),
        "magnitude_prune": ("magnitude", "sum"), "dare_linear": ("random", "sum"), "dare_ties": ("random", "consensus"),
        "breadcrumbs": ("outliers", "sum"), "breadcrumbs_ties": ("outliers", "consensus"),
        "della": ("ranked", "consensus"), "della_linear": ("ranked", "sum"),
    }  # fmt: skip
    for name, (sparsify, combine) in pairs.items():
        method = catalogue.method(name)
        assert method.random == (sparsify in ("random", "ranked")) and method.consensus == (combine == "consensus")
        assert method.piecewise == (not method.random) and (method.cutoff is not None) == (
            sparsify in ("magnitude", "outliers")
        )
