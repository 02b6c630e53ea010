"""``tokenizer_source: union`` (and the ``tokenizer:`` block) against ``mergekit-yaml`` 0.1.5 (a black box
in a subprocess): two or three tiny Llamas whose tokenizers differ by added tokens; the merged vocabulary,
its embedding and head rows, and the written tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer, LlamaForCausalLM

from dense_helpers import WORDS, load_weights, run_mergekit, save_llama, save_tokenizer, write_recipe
from loramerge.dense.engine import merge_checkpoints


def with_tokens(source: Path, folder: Path, seed: int, added=(), special=()) -> Path:
    """A copy of ``source`` whose tokenizer has extra tokens, with new random embedding and head rows."""
    model = LlamaForCausalLM.from_pretrained(source)
    rows = save_tokenizer(folder, added, special)
    generator = torch.Generator().manual_seed(seed)
    extra = rows - model.config.vocab_size
    embed = torch.cat([model.model.embed_tokens.weight.data, torch.randn(extra, 64, generator=generator)])
    head = torch.cat([model.lm_head.weight.data, torch.randn(extra, 64, generator=generator)])
    model.resize_token_embeddings(rows, mean_resizing=False)
    model.model.embed_tokens.weight.data.copy_(embed)
    model.lm_head.weight.data.copy_(head)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("union")
    a = save_llama(root / "a", 0)
    save_tokenizer(a)
    b = with_tokens(save_llama(root / "b_raw", 1, like=a), root / "b", 1, ["<extra_b>"], ["<|im_start|>", "<|im_end|>"])
    c = with_tokens(save_llama(root / "c_raw", 2, like=a), root / "c", 2, ["<|im_end|>", "<extra_c>"])
    return {"a": str(a), "b": str(b), "c": str(c)}


def recipes(m) -> dict[str, dict]:
    def entry(name, weight):
        return {"model": m[name], "parameters": {"weight": weight}}

    return {
        "linear": {"merge_method": "linear", "base_model": m["a"], "dtype": "float32", "tokenizer_source": "union",
                   "models": [entry("a", 0.7), entry("b", 0.5)]},
        "slerp": {"merge_method": "slerp", "base_model": m["a"], "dtype": "float32", "tokenizer_source": "union",
                  "parameters": {"t": 0.3}, "models": [{"model": m["a"]}, {"model": m["b"]}]},
        "ties_base_c": {"merge_method": "ties", "base_model": m["c"], "dtype": "float32",
                        "tokenizer_source": "union", "models": [
                            {"model": m["a"], "parameters": {"weight": 0.6, "density": 0.7}},
                            {"model": m["b"], "parameters": {"weight": 0.4, "density": 0.5}}]},
        "three_models": {"merge_method": "linear", "base_model": m["a"], "dtype": "float32",
                         "tokenizer": {"source": "union", "pad_to_multiple_of": 16},
                         "models": [entry("a", 1.0), entry("b", 1.0), entry("c", 2.0)]},
        "source_c": {"merge_method": "linear", "base_model": m["a"], "dtype": "float32", "tokenizer_source": m["c"],
                     "models": [entry("a", 0.5), entry("c", 0.5)]},
    }  # fmt: skip


def vocabulary(folder: Path) -> dict[str, int]:
    return Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab(with_added_tokens=True)


@pytest.mark.parametrize("case", list(recipes({"a": "", "b": "", "c": ""})))
def test_union_matches_mergekit(case, models, tmp_path):
    path = write_recipe(tmp_path / "recipe.yml", recipes(models)[case])
    theirs = run_mergekit(path, tmp_path / "mergekit", tokenizer=True)
    merge_checkpoints(path, tmp_path / "ours")
    ours = load_weights(tmp_path / "ours")
    mine, their = vocabulary(tmp_path / "ours"), vocabulary(tmp_path / "mergekit")
    assert set(mine) == set(their) and all(mine[t] == their[t] for t in WORDS)  # the core keeps its ids
    if case != "three_models":  # mergekit appends the other models' tokens in Python's hash order
        assert mine == their
    order = [their[token] for token in sorted(mine, key=mine.get)]
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):  # the same rows, token by token
            tensor = tensor[order + list(range(len(order), tensor.shape[0]))]
        assert ours[name].shape == tensor.shape, name
        assert (ours[name] - tensor).abs().max().item() <= 1e-5, name
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["vocab_size"] == ours["lm_head.weight"].shape[0]


def test_the_union_model_loads_and_tokenizes_the_added_tokens(models, tmp_path):
    merge_checkpoints(write_recipe(tmp_path / "recipe.yml", recipes(models)["linear"]), tmp_path / "ours")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ours")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "ours")
    ids = tokenizer("w3 <extra_b> <|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids == [WORDS.index("w3"), 128, 130]
    assert model(torch.tensor([ids])).logits.shape == (1, 3, 131)
