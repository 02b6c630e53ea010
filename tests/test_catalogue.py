"""One method catalogue: a method registered in one place is offered by the CLI, validated in recipes and
mapped in the live API; the derived tables agree with the catalogue."""

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
from loramerge.kernels import KERNELS


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


def test_the_derived_tables_follow_the_catalogue():
    assert set(KERNELS) == {m.name for m in catalogue.methods() if m.level == "element"}
    assert catalogue.peft_combination_types()["ties_svd"] == ("ties", "full")
    assert "cat" in catalogue.adapter_methods() and "cat" not in catalogue.dense_methods()
    assert "slerp" in catalogue.dense_methods() and "slerp" not in catalogue.adapter_methods()
    for method in catalogue.methods():
        if method.level == "element":  # every catalogued parameter the kernel takes has one default, here
            signature_defaults = {name for name in method.params if name in method.recipe_parameters}
            assert signature_defaults <= method.recipe_parameters
        assert method.paper and method.summary


def test_a_method_can_carry_its_own_default_density(mixed_adapters, tmp_path):
    """della's keep probabilities are density ± epsilon (0.15): the general 0.95 would leave (0, 1)."""
    from loramerge.adapters.options import parse_options

    assert parse_options(method="della").effective_density == catalogue.get("della").adapter_density == 0.8
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
