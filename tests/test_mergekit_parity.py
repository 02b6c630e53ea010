"""The same recipe through ``mergekit-yaml`` (0.1.5, a black box in a subprocess) and ``loramerge run``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from dense_helpers import load_weights, run_mergekit, save_llama, write_recipe
from loramerge.dense.engine import merge_checkpoints
from loramerge.recipe import parse_recipe


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    base = save_llama(root / "base", 0, layers=4)
    tuned = [save_llama(root / f"tuned{i}", i + 1, layers=4, like=base) for i in range(3)]
    other = save_llama(root / "other", 9, layers=4)
    return {"base": str(base), "m1": str(tuned[0]), "m2": str(tuned[1]), "m3": str(tuned[2]), "other": str(other)}


def recipes(m) -> dict[str, dict]:
    filters = [
        {"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
        {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]},
        {"value": 0.4},
    ]
    return {
        "linear": {"merge_method": "linear", "dtype": "float32", "models": [
            {"model": m["m1"], "parameters": {"weight": 0.5}}, {"model": m["m2"], "parameters": {"weight": 0.3}},
            {"model": m["other"], "parameters": {"weight": 0.2}}]},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": m["base"], "dtype": "float32",
            "parameters": {"lambda": 0.8}, "models": [
            {"model": m["m1"], "parameters": {"weight": 0.7}},
            {"model": m["m2"], "parameters": {"weight": [0.1, 0.9]}}]},
        "ties": {"merge_method": "ties", "base_model": m["base"], "dtype": "float32",
            "parameters": {"normalize": True, "int8_mask": True}, "models": [
            {"model": m["m1"], "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": m["m2"], "parameters": {"weight": 0.4, "density": [0.3, 0.9]}},
            {"model": m["m3"], "parameters": {"weight": -0.2, "density": 0.7}}]},
        "slerp": {"merge_method": "slerp", "base_model": m["m1"], "dtype": "float32",
            "parameters": {"t": filters}, "slices": [{"sources": [
                {"model": m["m1"], "layer_range": [0, 4]}, {"model": m["other"], "layer_range": [0, 4]}]}]},
        "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": m["base"], "dtype": "float32", "models": [
            {"model": m["m1"], "parameters": {"weight": 0.5, "density": 0.8, "gamma": 0.02}},
            {"model": m["m2"], "parameters": {"weight": 0.5, "density": 0.6}}]},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": m["base"], "dtype": "float32",
            "models": [{"model": m["m1"], "parameters": {"weight": 0.5, "density": 0.8, "gamma": 0.02}},
                       {"model": m["m3"], "parameters": {"weight": 0.7, "density": 0.6}}]},
        "model_stock": {"merge_method": "model_stock", "base_model": m["base"], "dtype": "float32",
            "models": [{"model": m["m1"]}, {"model": m["m2"]}, {"model": m["m3"]}]},
        "passthrough": {"merge_method": "passthrough", "dtype": "float32", "slices": [
            {"sources": [{"model": m["m1"], "layer_range": [0, 3]}]},
            {"sources": [{"model": m["m2"], "layer_range": [1, 4]}]}]},
    }  # fmt: skip


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "slerp", "breadcrumbs", "breadcrumbs_ties",
                                    "model_stock", "passthrough"])  # fmt: skip
def test_same_tensors_as_mergekit(method, models, tmp_path):
    recipe = recipes(models)[method]
    path = write_recipe(tmp_path / "recipe.yml", recipe)
    theirs = run_mergekit(path, tmp_path / "mergekit")
    merge_checkpoints(path, tmp_path / "ours")
    ours = load_weights(tmp_path / "ours")
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype
        assert (ours[name] - tensor).abs().max().item() <= 1e-5, name
    first = load_weights(Path(models["m1"]))
    assert any(not torch.equal(ours[name], first[name]) for name in ours if name in first)  # something merged
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert (
        config["num_hidden_layers"]
        == json.loads((tmp_path / "mergekit" / "config.json").read_text())["num_hidden_layers"]
    )


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_random_methods_match_exactly_at_density_one(method, models, tmp_path):
    recipe = {"merge_method": method, "base_model": models["base"], "dtype": "float32", "models": [
        {"model": models["m1"], "parameters": {"weight": 0.6, "density": 1.0}},
        {"model": models["m2"], "parameters": {"weight": 0.4, "density": 1.0}}]}  # fmt: skip
    path = write_recipe(tmp_path / "recipe.yml", recipe)
    theirs = run_mergekit(path, tmp_path / "mergekit")
    merge_checkpoints(path, tmp_path / "ours")
    ours = load_weights(tmp_path / "ours")
    for name, tensor in theirs.items():
        assert (ours[name] - tensor).abs().max().item() <= 1e-5, name


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_random_methods_match_mergekit_in_expectation(method, models, tmp_path):
    seeds = 6
    name = "model.layers.1.mlp.down_proj.weight"
    recipe = {"merge_method": method, "base_model": models["base"], "dtype": "float32", "models": [
        {"model": models["m1"], "parameters": {"weight": 0.7, "density": 0.5}},
        {"model": models["m2"], "parameters": {"weight": 0.5, "density": 0.5}}]}  # fmt: skip
    path = write_recipe(tmp_path / "recipe.yml", recipe)
    theirs = torch.stack([run_mergekit(path, tmp_path / f"mk{s}", seed=s)[name] for s in range(seeds)])
    plan_recipe = parse_recipe(recipe)
    ours = []
    for seed in range(seeds):
        merge_checkpoints(plan_recipe, tmp_path / f"ours{seed}", seed=seed)
        ours.append(load_weights(tmp_path / f"ours{seed}")[name])
    ours = torch.stack(ours)
    assert not torch.equal(ours[0], ours[1])  # the seed matters
    z = (ours.mean(0) - theirs.mean(0)) / ((ours.var(0) + theirs.var(0)) / seeds).sqrt().clamp_min(1e-12)
    assert z.abs().mean().item() < 1.1  # about 0.8-0.9 for equal means with 6 samples a side
    assert ours.std(0).mean().item() == pytest.approx(theirs.std(0).mean().item(), rel=0.15)


def test_merged_model_loads_and_generates(models, tmp_path):
    path = write_recipe(tmp_path / "recipe.yml", recipes(models)["ties"])
    merge_checkpoints(path, tmp_path / "ours", shard_size="100KB")
    assert len(list((tmp_path / "ours").glob("model-*-of-*.safetensors"))) > 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    tokens = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)
    assert tokens.shape == (1, 8)
    assert (tmp_path / "ours" / "loramerge_recipe.yml").is_file()
    assert "ties" in (tmp_path / "ours" / "README.md").read_text()
