"""``loramerge.add_weighted_adapter`` keeps PEFT's ``modules_to_save`` copies, as ``merge`` does for files."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

import loramerge


def test_modules_to_save_are_merged_into_the_new_adapter(llama_base):
    """PEFT's own adapters with a ``modules_to_save`` head: the merged adapter's head copy is the weighted
    mean of the inputs' copies (what ``merge`` writes for saved adapters), and it is what the model uses."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(llama_base)
    config = {"r": 4, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}
    model = get_peft_model(base, LoraConfig(**config), adapter_name="a")
    model.add_adapter("b", LoraConfig(**config))
    wrapper = model.base_model.model.lm_head
    torch.manual_seed(0)
    for name in ("a", "b"):
        wrapper.modules_to_save[name].weight.data += torch.randn_like(wrapper.modules_to_save[name].weight)
    heads = [wrapper.modules_to_save[name].weight.detach().clone() for name in ("a", "b")]
    loramerge.add_weighted_adapter(model, ["a", "b"], [3.0, 1.0], "merged", method="linear")
    expected = (3.0 * heads[0] + 1.0 * heads[1]) / 4.0
    assert torch.allclose(wrapper.modules_to_save["merged"].weight, expected, atol=1e-6)
    model.set_adapter("merged")
    ids = torch.tensor([[1, 2, 3]])
    hidden = model.base_model.model.model(ids).last_hidden_state
    assert torch.allclose(model(ids).logits, hidden @ expected.T, atol=1e-5)
