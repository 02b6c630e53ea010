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
    """The expectations come from PEFT and bitsandbytes, not from loramerge: the exact sum (``linear``) must
    give the logits of PEFT's own ``cat`` merge on the same 4-bit model, and one layer's output must be
    ``x Wᵀ + x (Σ w_i s_i B_i A_i)ᵀ``, with ``W`` from bitsandbytes' ``dequantize_4bit`` and the sum of the
    factors PEFT holds in plain torch. A ties merge on the 4-bit base equals the same merge on the float
    base (the factors are read from the model, whatever the base's storage)."""
    import bitsandbytes.functional as bnb
    from peft import PeftModel

    # widths that are multiples of bitsandbytes' 64-entry blocks (its CPU kernels need that)
    llama_base = save_llama(tmp_path / "base", 0)
    paths = {
        "a": build_adapter(llama_base, tmp_path / "a", seed=1, r=4, lora_alpha=8),
        "c": build_adapter(llama_base, tmp_path / "c", seed=3, r=2, lora_alpha=2,
                           target_modules=["q_proj", "down_proj"], rank_pattern={"layers.1.self_attn.q_proj": 6}),
    }  # fmt: skip
    weights = WEIGHTS[:2]
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(llama_base, quantization_config=config, dtype=torch.float32)
    # dequantized before any forward: bitsandbytes repacks the 4-bit data for its CPU kernel on the first call
    quantized = base.get_submodule("model.layers.1.self_attn.q_proj").weight
    W = bnb.dequantize_4bit(quantized.data, quantized.quant_state).float()
    tokens = torch.tensor([[1, 2, 3, 9, 27]])
    with torch.no_grad():
        plain = base(tokens).logits
    model = PeftModel.from_pretrained(base, paths["a"], adapter_name="a")
    model.load_adapter(paths["c"], adapter_name="c")  # ranks 4 and 2 (6 in one module)
    loramerge.add_weighted_adapter(model, ["a", "c"], weights, "ours", method="linear")
    model.add_weighted_adapter(["a", "c"], weights, "peft_cat", combination_type="cat")  # PEFT's own exact sum
    layer = model.base_model.model.get_submodule("model.layers.1.self_attn.q_proj")
    assert type(layer.base_layer).__name__ == "Linear4bit"
    logits = {}
    with torch.no_grad():
        for name in ("ours", "peft_cat"):
            model.set_adapter(name)
            logits[name] = model(tokens).logits
        assert model.active_adapter == "peft_cat"
        model.set_adapter("ours")
        x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(0))
        got, base_out = layer(x), layer.base_layer(x)
        delta = sum(w * layer.scaling[k] * layer.lora_B[k].weight @ layer.lora_A[k].weight
                    for w, k in zip(weights, "ac", strict=True))  # fmt: skip
    # after its first call bitsandbytes' CPU kernel computes in lower precision (~1e-3 relative): the two
    # equal sums differ by that much in the logits, and its base output from the dequantized W as much
    assert (logits["ours"] - logits["peft_cat"]).abs().max().item() < 2e-4
    assert (base_out - x @ W.T).abs().max().item() < 5e-3 * base_out.abs().max().item()
    adapter_out = x @ delta.T  # the adapter's part is float32 throughout: tight
    assert (got - base_out - adapter_out).abs().max().item() < 1e-5 * adapter_out.abs().max().item()
    assert (logits["ours"] - plain).abs().max().item() > 1e-2  # the merged adapter does change the model

    loramerge.add_weighted_adapter(model, ["a", "c"], weights, "ties", method="ties", density=0.6)
    float_model = peft_with_adapters(llama_base, paths)
    loramerge.add_weighted_adapter(float_model, ["a", "c"], weights, "ties", method="ties", density=0.6)
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"):
        assert rel_err(peft_delta(model, name, "ties"), peft_delta(float_model, name, "ties")) < 1e-6, name
