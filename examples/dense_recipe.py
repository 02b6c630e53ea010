"""Run a mergekit-style dense recipe from Python: TIES over three fine-tuned models, each a skill
adapter folded into the base on the fly (``adapters/base+adapters/add``).

    python examples/dense_recipe.py [OUTPUT]        # default out/dense_ties
"""

from __future__ import annotations

import sys

from loramerge import merge_checkpoints
from loramerge.evaluate import generate_text, load_model


def main(output: str) -> None:
    merge_checkpoints("recipes/ties_normalize.yml", output, force=True)
    print(f"ran recipes/ties_normalize.yml -> {output}")
    model, tokenizer = load_model(output)
    for prompt in ("add 21+35=", "reverse dense=", "sort 9372="):
        print(f"{prompt}{generate_text(model, tokenizer, prompt, max_new_tokens=8)}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/dense_ties")
