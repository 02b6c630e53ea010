"""A merged adapter loads with ``PeftModel.from_pretrained`` and gives base + exact merged delta."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import build_adapter
from loramerge import load_adapter, merge_adapters, save_adapter

TOKENS = torch.tensor([[1, 5, 9, 33, 64, 2, 100, 7]])


def patched_logits(base, deltas: dict[str, torch.Tensor], replaced: dict[str, torch.Tensor] = ()) -> torch.Tensor:
    """Logits of the base with each ``<module>.weight`` += delta (weight orientation), written by hand."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    state = model.state_dict()
    with torch.no_grad():
        for name, delta in deltas.items():
            state[f"{name}.weight"] += delta
        for name, tensor in dict(replaced).items():
            state[name].copy_(tensor)
        return model(TOKENS).logits


def adapter_logits(base, adapter_dir) -> torch.Tensor:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter_dir)
    with torch.no_grad():
        return model(TOKENS).logits


def weight_orientation(adapter, name, delta):
    module = adapter.modules[name]
    return delta.T if module.embedding or adapter.fan_in_fan_out else delta


@pytest.mark.parametrize("method", ["linear", "svd", "ties", "dare_ties"])
def test_written_adapter_logits(method, llama_base, mixed_adapters, tmp_path):
    weights = [0.8, 0.5, -0.6]
    adapters = [load_adapter(p) for p in mixed_adapters]
    merged = merge_adapters(adapters, weights, method=method, density=0.5 if method != "linear" else None)
    save_adapter(merged, tmp_path / "out")
    if method == "linear":  # the exact sum, from the inputs alone
        names = {n for a in adapters for n in a.modules}
        deltas = {
            n: sum(w * weight_orientation(a, n, a.modules[n].delta()) for a, w in zip(adapters, weights, strict=True)
                   if n in a.modules)
            for n in names
        }  # fmt: skip
    else:
        deltas = {n: weight_orientation(merged, n, m.delta()) for n, m in merged.modules.items()}
    expected = patched_logits(llama_base, deltas)
    got = adapter_logits(llama_base, tmp_path / "out")
    assert (got - expected).abs().max().item() < 1e-4
    assert (got - patched_logits(llama_base, {})).abs().max().item() > 1e-3  # the merge does change the model


def test_modules_to_save_are_averaged_by_weight(llama_base, tmp_path):
    paths = [
        build_adapter(
            llama_base, tmp_path / f"m{i}", seed=i, r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]
        )
        for i in range(2)
    ]
    file = paths[1] / "adapter_model.safetensors"
    state = load_file(file)
    head_key = "base_model.model.lm_head.weight"
    state[head_key] = state[head_key] + 0.05 * torch.randn_like(state[head_key])
    save_file(state, file)
    adapters = [load_adapter(p) for p in paths]
    merged = merge_adapters(adapters, [0.75, 0.25], method="linear")
    save_adapter(merged, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["modules_to_save"] == ["lm_head"]
    head = 0.75 * adapters[0].dense["lm_head.weight"] + 0.25 * adapters[1].dense["lm_head.weight"]
    deltas = {
        n: 0.75 * adapters[0].modules[n].delta() + 0.25 * adapters[1].modules[n].delta() for n in adapters[0].modules
    }
    expected = patched_logits(llama_base, deltas, {"lm_head.weight": head})
    assert (adapter_logits(llama_base, tmp_path / "out") - expected).abs().max().item() < 1e-4


def test_model_card_records_the_merge(mixed_adapters, tmp_path):
    from huggingface_hub import ModelCard

    merged = merge_adapters([load_adapter(p) for p in mixed_adapters], [1, 2, 3], method="ties", density=0.3)
    save_adapter(merged, tmp_path / "out")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert set(card.data.tags) >= {"lora", "peft", "merge"}
    assert card.data.base_model == load_adapter(mixed_adapters[0]).base_model
    assert "method: ties" in card.text and "density: 0.3" in card.text
    for path in mixed_adapters:
        assert str(path) in card.text
