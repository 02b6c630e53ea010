"""``loramerge.add_weighted_adapter`` on live PeftModels, float and 4-bit bases."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import loramerge
from conftest import build_adapter, peft_delta, peft_with_adapters, rel_err
from dense_helpers import save_llama
from loramerge import load_adapter, merge_adapters

WEIGHTS = [0.5, 0.3, 0.2]


def test_same_delta_as_the_cli_merge_on_saved_adapters(llama_base, mixed_adapters):
    names = ["a", "b", "c"]
    model = peft_with_adapters(llama_base, dict(zip(names, mixed_adapters, strict=True)))
    loramerge.add_weighted_adapter(model, names, WEIGHTS, "merged", method="ties", density=0.5)
    saved = merge_adapters([load_adapter(p) for p in mixed_adapters], WEIGHTS, method="ties", density=0.5)
    for name, module in saved.modules.items():
        expected = module.delta().T if module.embedding else module.delta()
        assert rel_err(peft_delta(model, name, "merged"), expected) < 1e-5, name
    model.set_adapter("merged")
    assert model.active_adapter == "merged"


def test_peft_combination_type_names_and_exact_linear(llama_base, equal_rank_adapters):
    names = ["a", "b", "c"]
    model = peft_with_adapters(llama_base, dict(zip(names, equal_rank_adapters, strict=True)))
    loramerge.add_weighted_adapter(model, names, WEIGHTS, "lin", combination_type="linear")
    loramerge.add_weighted_adapter(model, names, WEIGHTS, "tsvd", combination_type="ties_svd", density=0.5)
    model.add_weighted_adapter(names, WEIGHTS, "peft_tsvd", combination_type="ties_svd", density=0.5)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        exact = sum(w * peft_delta(model, name, n) for w, n in zip(WEIGHTS, names, strict=True))
        assert rel_err(peft_delta(model, name, "lin"), exact) < 1e-5
        assert rel_err(peft_delta(model, name, "tsvd"), peft_delta(model, name, "peft_tsvd")) < 1e-4
    with pytest.raises(loramerge.BadInput, match="unknown combination_type"):
        loramerge.add_weighted_adapter(model, names, WEIGHTS, "x", combination_type="average")


def test_on_a_4bit_base(tmp_path):
    from peft import PeftModel

    # widths that are multiples of bitsandbytes' 64-entry blocks (its CPU kernels need that)
    llama_base = save_llama(tmp_path / "base", 0)
    mixed_adapters = [
        build_adapter(llama_base, tmp_path / "a", seed=1, r=4, lora_alpha=8),
        None,
        build_adapter(llama_base, tmp_path / "c", seed=3, r=2, lora_alpha=2, target_modules=["q_proj", "down_proj"],
                      rank_pattern={"layers.1.self_attn.q_proj": 6}),
    ]  # fmt: skip
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(llama_base, quantization_config=config, dtype=torch.float32)
    tokens = torch.tensor([[1, 2, 3, 9, 27]])
    with torch.no_grad():
        plain = base(tokens).logits
    model = PeftModel.from_pretrained(base, mixed_adapters[0], adapter_name="a")
    model.load_adapter(mixed_adapters[2], adapter_name="c")  # ranks 4 and 2 (6 in one module)
    merged = loramerge.add_weighted_adapter(model, ["a", "c"], WEIGHTS[:2], "merged", method="ties", density=0.6)
    model.set_adapter("merged")
    assert model.active_adapter == "merged"
    layer = model.base_model.model.get_submodule("model.layers.1.self_attn.q_proj")
    assert type(layer.base_layer).__name__ == "Linear4bit"
    with torch.no_grad():
        got = model(tokens).logits
        # reference: the 4-bit base alone, plus x @ Δᵀ of the exact merged delta at every merged module
        hooks = []
        for name, module in merged.modules.items():
            delta = module.delta()
            base_layer = model.base_model.model.get_submodule(name).base_layer
            hooks.append(base_layer.register_forward_hook(lambda m, i, o, d=delta: o + i[0] @ d.T))
        with model.disable_adapter():
            expected = model(tokens).logits
        for hook in hooks:
            hook.remove()
    assert (got - expected).abs().max().item() < 1e-4
    assert (got - plain).abs().max().item() > 1e-3  # the merged adapter does change the model
