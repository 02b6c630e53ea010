"""``loramerge search --gradient`` (AdaMerging): the hooked slot computes task arithmetic at its coefficients (the
logits of PEFT with the written merge), the gradient is the one of that function (a finite difference), one
seed gives identical coefficients and scores, and a task-wise search's best.yml reproduces its adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli_helpers import run
from conftest import CHARDEMO, rel_err
from dense_helpers import SEARCH_DEV, search_recipe, write_recipe
from loramerge.adapters.files import load_adapter, save_adapter
from loramerge.evaluate.models import load_model
from loramerge.recipe import load_recipe
from loramerge.search.evaluator import Evaluator
from loramerge.search.gradient import CoefficientSlot, _encode, layer_of, objective_value
from loramerge.search.job import build_job

BASE = CHARDEMO / "base"
DEV = SEARCH_DEV


@pytest.fixture
def recipe(tmp_path) -> Path:
    return search_recipe(tmp_path / "recipe.yml", "linear")


def test_layers_group_by_block_number():
    assert layer_of("model.layers.12.mlp.down_proj") == "12"
    assert layer_of("lm_head") == "other"


def test_the_hooked_slot_is_task_arithmetic_at_its_coefficients(recipe, tmp_path):
    job = build_job(load_recipe(recipe), [str(p) for p in DEV], base=str(BASE), max_samples=6, threads=2)
    evaluator = Evaluator(job)
    slot = CoefficientSlot(evaluator, job, "layer")
    assert slot.groups == ["0", "1", "2", "3"]
    with torch.no_grad():
        slot.coefficients.copy_(torch.tensor([[0.3, 1.2, 0.0, 0.7], [1.5, 0.2, 0.9, 1.1]]))
    ids = torch.tensor([[1, 5, 9, 12, 40, 7]])
    with torch.no_grad():
        hooked = slot.model(input_ids=ids).logits
    # the same function written independently: PEFT loads the merge whose layer l is Σ_i λ_il s_i B_i A_i
    adapters = [load_adapter(CHARDEMO / name) for name in ("add", "reverse")]
    for name in adapters[0].modules:
        layer = int(layer_of(name))
        delta = sum(float(slot.coefficients.detach()[i, layer]) * a.modules[name].factors().dense()
                    for i, a in enumerate(adapters))  # fmt: skip
        got = slot.adapter().modules[name].factors().dense()
        assert rel_err(got, delta) < 1e-6, name
    slot.close()
    model, _ = load_model(str(BASE), adapter=str(save_adapter(slot.adapter(), tmp_path / "merged")))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, hooked, atol=1e-5)


def test_the_gradient_is_the_objectives(recipe):
    """Autograd's derivative of the entropy objective in one coefficient equals a central finite difference."""
    job = build_job(load_recipe(recipe), [str(p) for p in DEV], base=str(BASE), max_samples=6, threads=2)
    evaluator = Evaluator(job)
    slot = CoefficientSlot(evaluator, job, "task")
    batch = _encode(evaluator.tokenizer, job.dev["add"], "entropy")
    slot.model.double()
    slot.coefficients.data = slot.coefficients.data.double()
    value = objective_value(slot.model, batch, "entropy")
    value.backward()
    analytic = float(slot.coefficients.grad[1, 0])
    step = 1e-4
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            slot.coefficients[1, 0] += sign * step
            values.append(float(objective_value(slot.model, batch, "entropy")))
            slot.coefficients[1, 0] -= sign * step
    numeric = (values[0] - values[1]) / (2 * step)
    assert abs(analytic) > 1e-4 and analytic == pytest.approx(numeric, rel=1e-4)


def test_one_seed_gives_identical_coefficients_and_scores_and_best_yml_reproduces_the_adapter(recipe, tmp_path):
    common = ["search", recipe, "--gradient", "--data", DEV[0], "--data", DEV[1], "--base", BASE, "--max-samples",
              "8", "--budget", "3", "--batch", "4", "--seed", "3"]  # fmt: skip
    for folder in ("one", "two"):
        done = run(*common, "--learning-rate", "0.1", "-o", tmp_path / folder)
        assert done.exit_code == 0, done.output
    first, second = (json.loads((tmp_path / f / "search.json").read_text()) for f in ("one", "two"))
    assert first == second
    assert first["forward_passes"] == 3 * 2 * 4 and len(first["groups"]) == 4
    assert first["coefficients"] != first["start"]  # it moved
    assert not (tmp_path / "one" / "best.yml").exists()  # layer-wise weights are no recipe
    done = run(*common, "--granularity", "task", "-o", tmp_path / "task")
    assert done.exit_code == 0, done.output
    found = load_recipe(tmp_path / "task" / "best.yml")
    again = run("run", tmp_path / "task" / "best.yml", "-o", tmp_path / "again")
    assert again.exit_code == 0, again.output
    learned = json.loads((tmp_path / "task" / "search.json").read_text())["coefficients"]
    assert [entry.weight for entry in found.adapters] == [round(v[0], 6) for v in learned.values()]
    written, rerun = load_adapter(tmp_path / "task" / "adapter"), load_adapter(tmp_path / "again")
    for name, module in written.modules.items():
        assert rel_err(module.factors().dense(), rerun.modules[name].factors().dense()) < 1e-5


@pytest.mark.parametrize(
    ("recipe_body", "flags", "message"),
    [
        ({"merge_method": "iso_c"}, [], "the recipe's method must be linear, cat or task_arithmetic, not iso_c"),
        ({"merge_method": "linear", "parameters": {"rank": 4}}, [], "leave rank out of the recipe's parameters"),
        ({"merge_method": "linear"}, ["--tune", "density=0.1:1"], "--tune: with --gradient only the adapters"),
        ({"merge_method": "linear"}, ["--granularity", "module"], "--granularity module: choose layer or task"),
        ({"merge_method": "linear"}, ["--objective", "exact_match"], "with gradients choose entropy or loss"),
    ],
)
def test_what_gradients_cannot_learn_is_refused(recipe_body, flags, message, tmp_path):
    adapters = [{"adapter": str(CHARDEMO / "add")}, {"adapter": str(CHARDEMO / "reverse")}]
    recipe = write_recipe(tmp_path / "recipe.yml", {**recipe_body, "adapters": adapters})
    refused = run("search", recipe, "--gradient", "--data", DEV[0], "--base", BASE, *flags, "-o", tmp_path / "out")
    assert refused.exit_code == 2 and message in refused.stderr, refused.stderr
    assert not (tmp_path / "out").exists()


def test_the_linear_methods_at_their_exact_rank_are_what_it_learns(tmp_path):
    from loramerge.errors import BadInput
    from loramerge.search.gradient import check_gradient_job

    adapters = [{"adapter": str(CHARDEMO / "add")}, {"adapter": str(CHARDEMO / "reverse")}]
    for method in ("cat", "linear", "task_arithmetic", "svd"):
        recipe = write_recipe(tmp_path / f"{method}.yml", {"merge_method": method, "adapters": adapters})
        job = build_job(load_recipe(recipe), [str(DEV[0])], base=str(BASE), max_samples=2)
        if method == "svd":  # a truncation of the sum, not linear in the weights at the rank it keeps
            with pytest.raises(BadInput, match="must be linear, cat or task_arithmetic, not svd"):
                check_gradient_job(job)
        else:
            check_gradient_job(job)
