"""``loramerge run``: dry runs, ``base+adapter`` references, adapter recipes, and bad recipes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from cli_helpers import assert_clean_failure, run
from conftest import build_adapter
from dense_helpers import load_weights, save_llama, write_recipe


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    base = save_llama(root / "base", 0)
    return {
        "root": root,
        "base": base,
        "m1": save_llama(root / "m1", 1, like=base),
        "m2": save_llama(root / "m2", 2, like=base),
        "small": save_llama(root / "small", 3, hidden=32),
        "adapter": build_adapter(base, root / "adapter", seed=4, r=4, lora_alpha=8),
    }


def test_base_plus_adapter_equals_merging_peft_merge_and_unload(dense, tmp_path):
    folded = tmp_path / "folded"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dense["base"]), dense["adapter"])
    model.merge_and_unload().save_pretrained(folded)
    recipe = {"merge_method": "ties", "base_model": str(dense["base"]), "dtype": "float32", "models": [
        {"model": str(dense["m1"]), "parameters": {"weight": 0.5, "density": 0.6}},
        {"model": f"{dense['base']}+{dense['adapter']}", "parameters": {"weight": 0.5, "density": 0.6}}]}  # fmt: skip
    assert run("run", write_recipe(tmp_path / "a.yml", recipe), "-o", tmp_path / "on_the_fly").exit_code == 0
    recipe["models"][1]["model"] = str(folded)
    assert run("run", write_recipe(tmp_path / "b.yml", recipe), "-o", tmp_path / "from_peft").exit_code == 0
    ours, reference = load_weights(tmp_path / "on_the_fly"), load_weights(tmp_path / "from_peft")
    assert sorted(ours) == sorted(reference)
    for name in reference:
        assert (ours[name] - reference[name]).abs().max().item() <= 1e-6, name
    base = load_weights(dense["base"])
    assert not torch.equal(
        ours["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"]
    )


def test_dry_run_prints_groups_and_writes_nothing(dense, tmp_path):
    recipe = {"merge_method": "task_arithmetic", "base_model": str(dense["base"]), "models": [
        {"model": str(dense["m1"]), "parameters": {"weight": [0.2, 0.8]}}]}  # fmt: skip
    result = run("run", write_recipe(tmp_path / "r.yml", recipe), "-o", tmp_path / "out", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "model.layers.*.mlp.up_proj.weight" in result.stdout and "weight=0.2…0.8" in result.stdout
    assert not (tmp_path / "out").exists()


def test_adapter_recipe_matches_merge_command(dense, tmp_path):
    other = build_adapter(dense["base"], tmp_path / "other", seed=5, r=2, lora_alpha=2)
    recipe = {"merge_method": "ties", "adapters": [{"adapter": str(dense["adapter"]), "weight": 0.7},
              {"adapter": str(other), "weight": 0.3}], "parameters": {"density": 0.4}}  # fmt: skip
    assert run("run", write_recipe(tmp_path / "r.yml", recipe), "-o", tmp_path / "recipe").exit_code == 0
    command = ["merge", dense["adapter"], other, "--weights", "0.7,0.3", "--method", "ties", "--density", "0.4"]
    assert run(*command, "-o", tmp_path / "cli").exit_code == 0
    a = load_weights(tmp_path / "recipe")
    b = load_weights(tmp_path / "cli")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _recipe(dense, **changes):
    recipe = {"merge_method": "ties", "base_model": str(dense["base"]), "models": [
        {"model": str(dense["m1"]), "parameters": {"weight": 0.5, "density": 0.5}},
        {"model": str(dense["m2"]), "parameters": {"weight": 0.5, "density": 0.5}}]}  # fmt: skip
    recipe.update(changes)
    return recipe


def _passthrough(dense, layer_range):
    return {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(dense["m1"]), "layer_range": layer_range}]}],
    }


def _passthrough(dense, layer_range):
    return {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(dense["m1"]), "layer_range": layer_range}]}],
    }


BAD = {
    "unknown method": (lambda d: _recipe(d, merge_method="average"), "merge_method: unknown method 'average'"),
    "no base for ties": (
        lambda d: {k: v for k, v in _recipe(d).items() if k != "base_model"},
        "base_model: merge_method ties needs",
    ),
    "layer_range out of bounds": (lambda d: _passthrough(d, [0, 5]), "slices[0].sources[0].layer_range"),
    "shapes differ": (
        lambda d: _recipe(d, models=[{"model": str(d["small"]), "parameters": {"weight": 1.0}}]),
        "shapes differ",
    ),
    "missing model folder": (
        lambda d: _recipe(d, models=[{"model": str(d["root"] / "nope")}]),
        "models[0].model: model",
    ),
    "unknown key": (
        lambda d: _recipe(d, merge_methd="ties"),
        "unknown key 'merge_methd' (did you mean 'merge_method'?)",
    ),
    "unknown parameter": (lambda d: _recipe(d, parameters={"densty": 0.5}), "parameters.densty: unknown parameter"),
    "wrong type": (lambda d: _recipe(d, models="m1"), "models"),
    "tokenizer union without tokenizer files": (
        lambda d: _recipe(d, tokenizer_source="union"),
        "has no tokenizer.json to align its vocabulary by",
    ),
    "tokenizer overrides": (
        lambda d: _recipe(d, tokenizer={"source": "union", "tokens": {"<x>": {"source": {"kind": "zero"}}}}),
        "per-token overrides (tokenizer.tokens) are not supported",
    ),
    "two input kinds": (lambda d: _recipe(d, slices=[{"sources": []}]), "exactly one of models, slices or adapters"),
    "della epsilon": (lambda d: _recipe(d, merge_method="della", parameters={"epsilon": 0.6}), "della needs"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recipes_are_one_clear_line(case, dense, tmp_path):
    build, message = BAD[case]
    result = run("run", write_recipe(tmp_path / "bad.yml", build(dense)), "-o", tmp_path / "out")
    assert_clean_failure(result, message, tmp_path / "out")


def test_malformed_yaml_and_missing_recipe(tmp_path):
    (tmp_path / "bad.yml").write_text("merge_method: ties\nmodels: [\n  - model: x\n")
    assert_clean_failure(
        run("run", tmp_path / "bad.yml", "-o", tmp_path / "out"), "malformed YAML at line", tmp_path / "out"
    )
    assert_clean_failure(run("run", tmp_path / "nope.yml", "-o", tmp_path / "out"), "cannot read", tmp_path / "out")


def test_missing_shard_is_named(dense, tmp_path):
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(dense["m1"]).save_pretrained(sharded, max_shard_size="100KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    shards[-1].unlink()
    recipe = _recipe(dense, models=[{"model": str(sharded), "parameters": {"weight": 1.0, "density": 0.5}}])
    result = run("run", write_recipe(tmp_path / "r.yml", recipe), "-o", tmp_path / "out")
    assert_clean_failure(result, shards[-1].name, tmp_path / "out")


def test_sharded_inputs_and_outputs(dense, tmp_path):
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(dense["m1"]).save_pretrained(sharded, max_shard_size="100KB")
    recipe = _recipe(dense, models=[{"model": str(sharded), "parameters": {"weight": 1.0, "density": 1.0}}])
    result = run("run", write_recipe(tmp_path / "r.yml", recipe), "-o", tmp_path / "out", "--out-shard-size", "200KB")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    merged, original = load_weights(tmp_path / "out"), load_weights(dense["m1"])
    # one fine-tune at weight 1, nothing dropped: ties gives the fine-tune back
    assert all((merged[k] - original[k]).abs().max() < 1e-6 for k in original)
    shutil.rmtree(sharded)


def test_tied_embeddings_and_larger_vocabularies(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    def tiny(path, seed, vocab, tied):
        torch.manual_seed(seed)
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, vocab_size=vocab, tie_word_embeddings=tied)  # fmt: skip
        LlamaForCausalLM(config).save_pretrained(path)
        return str(path)

    base = tiny(tmp_path / "base", 0, 128, True)
    bigger = tiny(tmp_path / "bigger", 1, 136, True)
    recipe = {"merge_method": "linear", "models": [{"model": base, "parameters": {"weight": 0.5}},
              {"model": bigger, "parameters": {"weight": 0.5}}], "base_model": base}  # fmt: skip
    result = run("run", write_recipe(tmp_path / "r.yml", recipe), "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "vocabulary rows of model.embed_tokens.weight cut from 136 to the base's 128" in result.stderr
    merged = load_weights(tmp_path / "out")
    assert "lm_head.weight" not in merged and merged["model.embed_tokens.weight"].shape == (128, 32)
    expected = (
        0.5 * load_weights(Path(base))["model.embed_tokens.weight"]
        + 0.5 * load_weights(Path(bigger))["model.embed_tokens.weight"][:128]
    )
    assert torch.allclose(merged["model.embed_tokens.weight"], expected, atol=1e-6)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
