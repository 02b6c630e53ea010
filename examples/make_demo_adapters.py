"""Regenerate ``adapters/``: a tiny Llama base and three PEFT LoRA adapters (a, b, c) for the demo.

The adapters are real PEFT folders with random (non-zero) factors and different ranks, alphas and
targets — enough to exercise every path of ``loramerge merge``. Deterministic; runs in seconds on CPU:

    python examples/make_demo_adapters.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent / "adapters"
ADAPTERS = {
    "a": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "b": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]),
    "c": LoraConfig(r=16, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
}


def make_base(path: Path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)


def make_adapter(base: Path, name: str, config: LoraConfig, seed: int) -> None:
    model = AutoModelForCausalLM.from_pretrained(base)
    config.init_lora_weights = False  # non-zero B: each adapter changes the model
    torch.manual_seed(seed)
    get_peft_model(model, config).save_pretrained(ROOT / name)
    (ROOT / name / "README.md").unlink(missing_ok=True)
    config_file = ROOT / name / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    saved["base_model_name_or_path"] = "adapters/base"  # relative to the repository, not this machine
    config_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def main() -> None:
    for name in ("base", *ADAPTERS):
        shutil.rmtree(ROOT / name, ignore_errors=True)
    make_base(ROOT / "base")
    for seed, (name, config) in enumerate(ADAPTERS.items(), start=1):
        make_adapter(ROOT / "base", name, config, seed)
    print(f"wrote {ROOT}/base and adapters {', '.join(ADAPTERS)}")


if __name__ == "__main__":
    main()
