"""Merge adapters live on a 4-bit (bitsandbytes nf4) base, the way PEFT's ``add_weighted_adapter`` is
used, but exact and without equal ranks: the adapters here have ranks 16, 8, 8 and 4.

    python examples/merge_on_4bit.py
"""

from __future__ import annotations

import logging

import torch


def main() -> None:
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # it announces an optional CPU speed-up at import
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    import loramerge
    from loramerge.evaluate import generate_text

    quantized = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained("adapters/base", quantization_config=quantized, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained("adapters/base")
    skills = ["add", "reverse", "sort", "cipher"]
    model = PeftModel.from_pretrained(base, f"adapters/{skills[0]}", adapter_name=skills[0])
    for skill in skills[1:]:
        model.load_adapter(f"adapters/{skill}", adapter_name=skill)
    merged = loramerge.add_weighted_adapter(model, skills, [1.0] * 4, "merged", combination_type="ties", density=0.8)
    model.set_adapter("merged")
    print(f"added adapter 'merged' (rank {merged.config['r']}) to a 4-bit base of {len(merged.modules)} LoRA layers")
    for prompt in ("add 12+34=", "reverse lora=", "sort 8145=", "cipher merge="):
        print(f"{prompt}{generate_text(model, tokenizer, prompt, max_new_tokens=8)}")


if __name__ == "__main__":
    main()
